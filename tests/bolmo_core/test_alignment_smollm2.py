"""Alignment check (docs/architecture.md Appendix A check 4) on SmolLM2-135M-Instruct, real weights (Llama layout, tied head)."""

from test_global_model import check_alignment


def test_alignment_smollm2_135m():
    check_alignment("smollm2-135m")
