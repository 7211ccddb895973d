"""benchmarks/gpu.py runs on the CPU (tiny preset) and prints one sane JSON line (issues 7, 12)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_cpu_tiny():
    env = dict(os.environ, OMP_NUM_THREADS="1")  # shared CPU: one intra-op thread is ~10x faster here
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu.py"),
        "--device",
        "cpu",
        "--steps",
        "1",
        "--gen-bytes",
        "8",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout[-2000:]
    out = json.loads(lines[0])

    assert out["device"] == "cpu" and out["preset"] == "tiny"
    assert out["window_tokens"] == 64 and out["byte_slots"] == 384
    assert out["mlstm_kernel"] == "mlstm_chunkwise"  # "auto" on the CPU: our torch kernel
    assert out["attn_implementation"] == "sdpa"
    assert "CUDA" in out["triton_check"]["skipped"]
    for stage in ("stage1", "stage2"):
        s = out[stage]
        assert s["tokens_per_s"] > 0 and s["bytes_per_s"] > 0 and s["flops_per_step"] > 0
        # real bytes are fewer than byte slots (padding), tokens are P per window
        assert s["bytes_per_s"] <= s["byte_slots_per_s"]
        assert abs(s["bytes_per_s"] / s["tokens_per_s"] - 1) > 0.5  # several bytes per token
        assert 0 < s["mfu"] <= 1
        assert s["loss"] == s["loss"] and s["loss"] > 0  # finite and positive
    assert out["tokens_per_s"] == out["stage2"]["tokens_per_s"] and 0 < out["mfu"] <= 1
    assert out["peak_mem_bytes"] > 50 * 2**20 and out["peak_mem_kind"]
    g = out["generation"]
    assert g["batch1"]["new_bytes"] == 8 and g["batch8"]["new_bytes"] == 64
    assert out["gen_bytes_per_s_b1"] > 0 and out["gen_bytes_per_s_b8"] > 0
    assert out["peak_flops"] > 0 and "measured" in out["peak_source"]
    assert "6*N_g*P" in out["flop_model"]
    f = out["fsdp_dcp"]  # the FSDP2 + sharded-checkpoint path, one process (gloo here, NCCL on a GPU)
    assert f["steps"] == 1 and f["step_s"] > 0 and 0 < f["loss"] < 20
    assert f["dcp_round_trip_exact"] and f["dcp_bytes"] > 0 and f["dcp_save_s"] > 0 and f["dcp_load_s"] > 0
    assert f["dcp_consolidated_tensors"] > 50 and f["plan_step_mem_bytes"] > 0
