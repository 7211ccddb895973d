"""lm-eval-harness adapter: folded byte log-likelihoods, checked against the evaluator; local tasks, no hub."""

import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")  # the `eval` extra

from lm_eval.api.instance import Instance  # noqa: E402

from bolmo_core import evaluate as E  # noqa: E402
from bolmo_core.config import get_preset  # noqa: E402
from bolmo_core.lm_eval_adapter import ByteifyLM  # noqa: E402
from bolmo_core.model import BolmoModel  # noqa: E402
from bolmo_core.source import load_tokenizer  # noqa: E402
from bolmo_core.subword import get_vocab  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = BolmoModel.from_source(preset.model).eval()
    tok = load_tokenizer(preset.model.source)
    return ByteifyLM(model=model, tokenizer=tok, max_length=preset.data.byte_slots, batch_size=3), tok


def _req(kind, args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_scores_are_consistent_and_match_the_evaluator(lm):
    adapter, tok = lm
    ctx, cont = "The capital of France", " is Paris."
    [(ll, _)] = adapter.loglikelihood([_req("loglikelihood", (ctx, cont))])
    r_ctx, r_all = adapter.loglikelihood_rolling(
        [_req("loglikelihood_rolling", (ctx,)), _req("loglikelihood_rolling", (ctx + cont,))]
    )
    # Same forward over BOS + ctx + cont: log p(ctx) + log p(cont | ctx) = log p(ctx + cont).
    assert ll < 0 and r_ctx + ll == pytest.approx(r_all, rel=1e-5)
    # The evaluator's bits for the same text (one window, BOS first) are the same number: causal
    # boundaries by default (the headline), the predictor's look-ahead ones when asked.
    text = (ctx + cont).encode()
    stats = E.byte_model_stats(adapter.model, get_vocab(tok), E.make_windows(tok, [text], 1000))
    assert -r_all / math.log(2) == pytest.approx(stats["bits"], rel=1e-5)
    ahead = ByteifyLM(
        model=adapter.model, tokenizer=tok, max_length=adapter.max_length, boundaries="lookahead"
    )
    [r_ahead] = ahead.loglikelihood_rolling([_req("loglikelihood_rolling", (ctx + cont,))])
    assert -r_ahead / math.log(2) == pytest.approx(stats["bits_lookahead"], rel=1e-5)


def test_unknown_boundaries_are_refused(lm):
    adapter, tok = lm
    with pytest.raises(E.EvalError, match="boundaries='ahead'"):
        ByteifyLM(model=adapter.model, tokenizer=tok, boundaries="ahead")


def test_rolling_windows_cover_long_text(lm):
    adapter, _ = lm
    text = "abcdefghij " * 60  # 660 bytes > the tiny model's 384-byte length: two windows
    [r] = adapter.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
    room = adapter.max_length - 1
    parts = [text[:room], text[room:]]
    assert r == pytest.approx(
        sum(adapter.loglikelihood_rolling([_req("loglikelihood_rolling", (p,)) for p in parts])), rel=1e-5
    )


def _write_tasks(tmp_path):
    mc = [
        {
            "question": "Which word is spelled h-e-l-l-o?",
            "choices": [" hello", " world", " yellow"],
            "answer": 0,
        },
        {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0},
        {"question": "The opposite of up is", "choices": [" left", " down", " in"], "answer": 1},
    ]
    rolling = [
        {"text": "Bytes are data. A document is a string of bytes."},
        {"text": "Ünïcödé text costs bytes."},
    ]
    gen = [{"prompt": "Repeat: abc abc abc", "target": "abc"}]
    for name, rows in (("mc", mc), ("rolling", rolling), ("gen", gen)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "byteify_tiny_mc.yaml").write_text(f"""task: byteify_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    (tmp_path / "byteify_tiny_rolling.yaml").write_text(f"""task: byteify_tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "rolling.jsonl"}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
""")
    (tmp_path / "byteify_tiny_gen.yaml").write_text(f"""task: byteify_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "gen.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""")


def test_local_tasks_through_the_harness(lm, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    adapter, _ = lm
    _write_tasks(tmp_path)
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    tasks = ["byteify_tiny_mc", "byteify_tiny_rolling"]
    if E.byte_generation_available():
        tasks.append("byteify_tiny_gen")
    out = simple_evaluate(model=adapter, tasks=tasks, task_manager=tm, bootstrap_iters=0)
    res = out["results"]
    assert 0.0 <= res["byteify_tiny_mc"]["acc,none"] <= 1.0
    # The harness's bits per byte equals ours from the adapter's own rolling log-likelihoods.
    texts = ["Bytes are data. A document is a string of bytes.", "Ünïcödé text costs bytes."]
    lls = adapter.loglikelihood_rolling([_req("loglikelihood_rolling", (t,)) for t in texts])
    ours = -sum(lls) / math.log(2) / sum(len(t.encode()) for t in texts)
    assert res["byteify_tiny_rolling"]["bits_per_byte,none"] == pytest.approx(ours, rel=1e-6)
    if "byteify_tiny_gen" in tasks:
        assert res["byteify_tiny_gen"]["exact_match,none"] in (0.0, 1.0)
