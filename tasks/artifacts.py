"""Prefect UI artifacts: manifest summary, training curves, evaluation table, boundary view, links.

Each task reads what it shows from storage (URIs in, artifact ids out) and never changes
what the pipeline produces, so none of them is cached or worth a long retry.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from bolmo_core import storage

_RETRY = dict(retries=2, retry_delay_seconds=2, cache_policy=None)


def plots_uri(root: str, checkpoint_hash: str) -> str:
    """Where the training-curve PNG of a Stage-2 checkpoint goes (pure)."""
    return storage.join(root, "plots", f"curves-{checkpoint_hash[:16]}.png")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@task(name="artifact-manifest", **_RETRY)
def manifest_summary(manifest_uri: str) -> str:
    """Markdown summary of the data manifest: sources, tokenizer, splits and shards."""
    m = storage.read_json(manifest_uri)
    lines = [f"# Data manifest\n\n`{manifest_uri}`\n", f"- manifest hash: `{m.get('manifest_hash', '')}`"]
    for key in ("sources", "format", "tokenizer", "code_version"):
        if key in m:
            v = m[key]
            lines.append(f"- {key}: `{json.dumps(v, sort_keys=True)[:300] if not isinstance(v, str) else v}`")
    totals = m.get("totals") or m.get("splits") or {}
    if isinstance(totals, dict) and totals:
        lines += [
            "",
            "| split | "
            + " | ".join(sorted({k for v in totals.values() if isinstance(v, dict) for k in v}))
            + " |",
        ]
        cols = sorted({k for v in totals.values() if isinstance(v, dict) for k in v})
        lines.append("|---" * (len(cols) + 1) + "|")
        for split, v in totals.items():
            if isinstance(v, dict):
                lines.append(f"| {split} | " + " | ".join(_fmt(v.get(c, "")) for c in cols) + " |")
    shards = m.get("shards", [])
    if shards:
        lines += [
            "",
            f"{len(shards)} shard file(s):",
            "",
            "| shard | split | rows | bytes | tokens |",
            "|---|---|---|---|---|",
        ]
        for s in shards[:20]:
            lines.append(
                f"| `{str(s.get('uri', ''))[-60:]}` | {s.get('split', '')} | {s.get('rows', '')} | "
                f"{s.get('bytes', '')} | {s.get('tokens', '')} |"
            )
        if len(shards) > 20:
            lines.append(f"| ... {len(shards) - 20} more | | | | |")
    return str(
        create_markdown_artifact("\n".join(lines), key="data-manifest", description="Data manifest summary")
    )


def plot_curves(
    curves: dict[str, list[dict]],
    keys: tuple[str, ...] = ("loss", "loss_ce", "loss_boundary", "boundary_acc", "bytes_per_patch"),
) -> bytes:
    """A PNG with one panel per metric, one line per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k in keys if any(k in r for c in curves.values() for r in c)] or ["loss"]
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present):
        for stage, curve in curves.items():
            pts = [(r["step"], r[key]) for r in curve if key in r and isinstance(r[key], int | float)]
            if pts:
                ax.plot(*zip(*pts), label=stage)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


@task(name="artifact-curves", **_RETRY)
def training_curves(curve_uris: dict[str, str], out_uri: str) -> str:
    """Plot the stages' training curves to `out_uri` (PNG) and show it in the UI; returns the PNG URI."""
    curves = {}
    for stage, uri in curve_uris.items():
        if storage.exists(uri):
            curves[stage] = [
                json.loads(x) for x in storage.read_bytes(uri).decode().splitlines() if x.strip()
            ]
    png = plot_curves(curves)
    storage.write_bytes_atomic(out_uri, png)
    b64 = base64.b64encode(png).decode()
    md = f"# Training curves\n\n![training curves](data:image/png;base64,{b64})\n\n`{out_uri}`"
    create_markdown_artifact(md, key="training-curves", description="Stage 1 and Stage 2 training curves")
    return out_uri


@task(name="artifact-evaluation", **_RETRY)
def evaluation_table(report_uri: str) -> tuple[str, dict[str, float]]:
    """The evaluation table (source vs byte model) as a table artifact; (markdown, flat metrics)."""
    report = storage.read_json(report_uri)
    rows = eval_rows(report)
    create_table_artifact(rows, key="evaluation", description=f"Source vs byte model ({report_uri})")
    return to_markdown(rows), eval_summary(report)


def eval_rows(report: dict) -> list[dict[str, Any]]:
    """One row per metric: source vs byte model (from a bolmo_core.evaluate report)."""
    src, byt = report.get("source") or {}, report.get("byte_model") or {}
    bnd = byt.get("boundary") or {}
    rows = [
        ("bits per byte", src.get("bits_per_byte"), byt.get("bits_per_byte")),
        ("bytes per token / patch", src.get("bytes_per_token"), byt.get("bytes_per_patch")),
        ("boundary accuracy", None, bnd.get("accuracy")),
        ("boundary precision", None, bnd.get("precision")),
        ("boundary recall", None, bnd.get("recall")),
    ]
    cute = report.get("cute") or {}
    sc, bc = src.get("cute") or {}, byt.get("cute") or {}
    for t in cute.get("tasks", []):
        rows.append((f"char task: {t}", (sc.get(t) or {}).get("accuracy"), (bc.get(t) or {}).get("accuracy")))
    if cute.get("tasks"):
        rows.append(("char tasks: mean", src.get("cute_mean"), byt.get("cute_mean")))
    return [{"metric": n, "source": _num(a), "byte_model": _num(b)} for n, a, b in rows]


def _num(v):
    return round(v, 4) if isinstance(v, float) else v


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| metric | source | byte model |", "|---|---|---|"]
    lines += [
        f"| {r['metric']} | {_fmt(r['source']) if r['source'] is not None else '—'} | "
        f"{_fmt(r['byte_model']) if r['byte_model'] is not None else '—'} |"
        for r in rows
    ]
    return "\n".join(lines)


def eval_summary(report: dict) -> dict[str, float]:
    """Flat numeric summary for lineage tags and MLflow metrics."""
    out = {}
    for r in eval_rows(report):
        key = r["metric"].replace(" ", "_").replace("/", "_").replace(":", "")
        for side in ("source", "byte_model"):
            if isinstance(r[side], int | float):
                out[f"{side}.{key}"] = float(r[side])
    return out


def _show(piece: str) -> str:
    return piece.replace("\n", "⏎").replace("`", "'")


def boundary_markdown(samples: list[dict]) -> str:
    """Held-out text with the predicted patches marked ('|' between patches), and the source tokens."""
    parts = [
        "# Predicted patches",
        "",
        "Each text is shown twice: cut into the patches the byte model predicts (what it pools into "
        "one global position each), then into the source tokenizer's tokens. `|` separates pieces.",
        "",
    ]
    for i, s in enumerate(samples):
        parts += [
            f"### Sample {i + 1}",
            "",
            "```text",
            "patches: " + "|".join(_show(p) for p in s.get("patches", [])),
            "tokens:  " + "|".join(_show(t) for t in s.get("tokens", [])),
            "```",
            "",
        ]
    return "\n".join(parts)


@task(name="artifact-boundaries", **_RETRY)
def boundary_view(samples_uri: str) -> str:
    """Markdown artifact with the predicted patches of a few held-out texts."""
    samples = storage.read_json(samples_uri)
    return str(
        create_markdown_artifact(
            boundary_markdown(samples),
            key="boundaries",
            description="Predicted patch boundaries on held-out text",
        )
    )


@task(name="artifact-links", **_RETRY)
def mlflow_links(tracking_uri: str, run_id: str, model_url: str | None, model_uri: str | None) -> str:
    """Links to the MLflow run and model version; returns the run's URL."""
    from . import tracking

    run_url = tracking.run_url(tracking_uri, run_id)
    create_link_artifact(
        run_url, link_text="MLflow run", key="mlflow-run", description="This flow run in MLflow"
    )
    if model_url:
        create_link_artifact(
            model_url,
            link_text=model_uri or "model version",
            key="mlflow-model",
            description=f"Registered model version {model_uri}",
        )
    return run_url
