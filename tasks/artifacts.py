"""What the Prefect UI shows: progress of each long step, the data manifest, training curves,
the evaluation table, the predicted patches, and links into MLflow.

Artifacts read what they show from storage (URIs in) and never change what the pipeline
produces, so none of these tasks is cached.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from bolmo_core import storage

from .retries import RETRY

_ARTIFACT = dict(cache_policy=None, **RETRY)


# ---------------------------------------------------------------- progress


def _logger():
    """The task's run logger (its lines reach the UI), or a plain one outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("tasks.artifacts")


def duration(seconds: float) -> str:
    """'42 s', '7 min 5 s', '3 h 20 min'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class Progress:
    """One progress artifact per long step, updated in place: the bar plus a line saying where
    the step is (``Stage 1: step 40/60 · loss 3.21 · ETA 42 s``).

    The ETA uses the rate since this attempt started (a resumed stage starts part-way).
    Updates are throttled, and a failed update is logged, never raised: the display must not
    stop the work it displays.
    """

    def __init__(self, key: str, title: str, min_interval_s: float = 2.0):
        self.title, self.min_interval_s = title, min_interval_s
        self.t0 = time.monotonic()
        self.first: float | None = None
        self.last_update = 0.0
        self.id = None
        self._send(0.0, "starting", create=key)

    def _send(self, percent: float, text: str, create: str | None = None) -> None:
        description = f"{self.title}: {text}"
        try:
            if create:
                self.id = create_progress_artifact(percent, key=create, description=description)
            elif self.id is not None:
                update_progress_artifact(self.id, percent, description=description)
        except Exception as e:  # noqa: BLE001 - display only
            _logger().warning(f"progress artifact not updated: {str(e).splitlines()[0]}")

    def update(self, done: float, total: float, text: str, force: bool = False, eta: bool = True) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first, self.t_first = done, now
        if not force and now - self.last_update < self.min_interval_s:
            return
        self.last_update = now
        if eta and total and done > self.first and now > self.t_first:
            eta = (now - self.t_first) / (done - self.first) * (total - done)
            text += f" · ETA {duration(eta)}"
        self._send(min(100.0, 100.0 * done / total) if total else 0.0, text)

    def finish(self, text: str) -> None:
        self._send(100.0, f"done in {duration(time.monotonic() - self.t0)} · {text}")


# ---------------------------------------------------------------- data manifest


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@task(name="artifact-manifest", **_ARTIFACT)
def manifest_summary(manifest_uri: str) -> str:
    """Markdown summary of the data manifest: sources, tokenizer, splits and shards."""
    m = storage.read_json(manifest_uri)
    lines = [f"# Data manifest\n\n`{manifest_uri}`\n", f"- manifest hash: `{m.get('manifest_hash', '')}`"]
    shown = {
        "sources": (m.get("inputs") or {}).get("sources"),
        **{k: m.get(k) for k in ("budget", "tokenizer", "code_version")},
    }
    for key, v in shown.items():
        if v is not None:
            lines.append(f"- {key}: `{v if isinstance(v, str) else json.dumps(v, sort_keys=True)[:300]}`")
    totals = {k: v for k, v in (m.get("totals") or m.get("splits") or {}).items() if isinstance(v, dict)}
    if totals:
        cols = sorted({k for v in totals.values() for k in v})
        lines += ["", "| split | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [
            f"| {s} | " + " | ".join(_fmt(v.get(c, "")) for c in cols) + " |" for s, v in totals.items()
        ]
    shards = m.get("shards", [])
    if shards:
        lines += ["", f"{len(shards)} shard file(s):", "", "| shard | split | rows | bytes | tokens |"]
        lines.append("|---|---|---|---|---|")
        for s in shards[:20]:
            lines.append(
                f"| `{str(s.get('uri', ''))[-60:]}` | {s.get('split', '')} | {s.get('rows', '')} | "
                f"{s.get('bytes', '')} | {s.get('tokens', '')} |"
            )
        if len(shards) > 20:
            lines.append(f"| ... {len(shards) - 20} more | | | | |")
    return str(create_markdown_artifact("\n".join(lines), key="data-manifest", description="Data manifest"))


# ---------------------------------------------------------------- training curves

# One panel per quantity; each line is a metric of the stage's curve (eval/ ones from validation).
PANELS = {
    "training loss": ("loss", "loss_ce", "loss_boundary", "loss_encoder", "loss_distill"),
    "boundary accuracy": ("boundary_acc", "eval/val_boundary_acc"),
    "bytes per patch": ("bytes_per_patch", "eval/val_bytes_per_patch_pred"),
    "validation bits per byte": ("eval/val_bpb", "eval/val_source_bpb"),
}


def plot_curves(curves: dict[str, list[dict]], columns: int = 2) -> bytes:
    """A PNG: a block of panels per stage (its own step axis), one panel per quantity in PANELS.

    Two panels a row, ~1000 px wide: the UI shows it at its width, so the text stays readable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def points(curve: list[dict], key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in curve if isinstance(r.get(key), int | float)]

    panels = [p for p, keys in PANELS.items() if any(points(c, k) for c in curves.values() for k in keys)]
    panels = panels or ["training loss"]
    per_stage = -(-len(panels) // columns)
    rows = max(1, len(curves)) * per_stage
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 2.9 * rows), squeeze=False)
    for s, (stage, curve) in enumerate(curves.items()):
        last = max((r["step"] for r in curve), default=1)
        for i, panel in enumerate(panels):
            ax = axes[s * per_stage + i // columns][i % columns]
            for key in PANELS[panel]:
                if pts := points(curve, key):
                    ax.plot(*zip(*pts), label=key, marker="o" if key.startswith("eval/") else None, ms=4)
            ax.set_xlim(0, last * 1.02)
            ax.set_title(f"{stage}: {panel}", fontsize=11)
            ax.set_xlabel(f"{stage} step")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
            else:
                ax.text(
                    0.5, 0.5, "not measured in this stage", ha="center", transform=ax.transAxes, color="grey"
                )
        for i in range(len(panels), per_stage * columns):
            axes[s * per_stage + i // columns][i % columns].axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def read_curve(uri: str) -> list[dict]:
    """A stage's curve.jsonl (empty when the stage wrote none)."""
    if not storage.exists(uri):
        return []
    return [json.loads(x) for x in storage.read_bytes(uri).decode().splitlines() if x.strip()]


def _png_markdown(title: str, png: bytes, caption: str) -> str:
    return f"# {title}\n\n![{title}](data:image/png;base64,{base64.b64encode(png).decode()})\n\n{caption}"


@task(name="artifact-curves", **_ARTIFACT)
def training_curves(curve_uris: dict[str, str], out_uri: str) -> str:
    """Plot the stages' curves to `out_uri` (PNG) and show it in the UI; returns the PNG URI."""
    png = plot_curves({stage: read_curve(uri) for stage, uri in curve_uris.items()})
    storage.write_bytes_atomic(out_uri, png)
    create_markdown_artifact(
        _png_markdown("Training curves", png, f"`{out_uri}`"),
        key="training-curves",
        description="Stage 1 and 2",
    )
    return out_uri


def plots_uri(root: str, checkpoint_hash: str) -> str:
    """Where the training-curve PNG of a Stage-2 checkpoint goes (pure)."""
    return storage.join(root, "plots", f"curves-{checkpoint_hash[:16]}.png")


# ---------------------------------------------------------------- evaluation


def eval_rows(report: dict) -> list[dict[str, Any]]:
    """The report's rows (bolmo_core.evaluate.report_rows), values rounded for display."""
    from bolmo_core.evaluate import report_rows

    return [
        {**r, "source": _num(r["source"]), "byte_model": _num(r["byte_model"])} for r in report_rows(report)
    ]


def _num(v):
    return round(v, 4) if isinstance(v, float) else v


def to_markdown(rows: list[dict[str, Any]]) -> str:
    def cell(v):
        return "—" if v is None else _fmt(v)

    lines = ["| metric | source | byte model |", "|---|---|---|"]
    return "\n".join(
        lines + [f"| {r['metric']} | {cell(r['source'])} | {cell(r['byte_model'])} |" for r in rows]
    )


def eval_summary(report: dict) -> dict[str, float]:
    """MLflow metric names -> values: ``source/bits_per_byte``, ``byte_model/bytes_per_patch``, ..."""
    return {
        f"{side}/{r['keys'][side]}": float(r[side])
        for r in eval_rows(report)
        for side in ("source", "byte_model")
        if isinstance(r[side], int | float)
    }


@task(name="artifact-evaluation", **_ARTIFACT)
def evaluation_table(report_uri: str) -> tuple[str, dict[str, float]]:
    """The evaluation table (source vs byte model) as a table artifact; (markdown, metrics)."""
    report = storage.read_json(report_uri)
    rows = eval_rows(report)
    table = [{k: v for k, v in r.items() if k != "keys"} for r in rows]
    create_table_artifact(table, key="evaluation", description=f"Source vs byte model ({report_uri})")
    return to_markdown(rows), eval_summary(report)


# ---------------------------------------------------------------- predicted patches

PATCH_COLOURS = ("#cfe3ff", "#ffe0b8")  # alternate, so neighbouring patches read apart
TOKEN_COLOURS = ("#d8f0d0", "#f0f0f0")


def _cells(pieces: list[str]) -> list[tuple[str, int]]:
    """(visible character, index of its piece): newlines and tabs drawn as ⏎ and →."""
    return [(c.replace("\n", "⏎").replace("\t", "→"), i) for i, p in enumerate(pieces) for c in p]


def patches_png(samples: list[dict], width: int = 1100) -> bytes:
    """Each text in rows: its predicted patches as coloured boxes, the source tokens beneath it."""
    from matplotlib import font_manager
    from PIL import Image, ImageDraw, ImageFont

    mono = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans Mono"))
    font, small = ImageFont.truetype(mono, 15), ImageFont.truetype(mono, 12)
    cw, margin, line_h = font.getlength("M"), 12, 42
    per_line = int((width - 2 * margin) // cw)
    blocks = []
    for i, s in enumerate(samples):
        top, low = _cells(s.get("patches", [])), _cells(s.get("tokens", []))
        n_bytes = sum(len(p.encode()) for p in s.get("patches", []))
        head = f"Sample {i + 1}: {len(s.get('patches', []))} patches, {len(s.get('tokens', []))} source tokens, {n_bytes} bytes"
        lines = [
            (top[j : j + per_line], low[j : j + per_line])
            for j in range(0, max(len(top), len(low)), per_line)
        ]
        blocks.append((head, lines))
    height = margin + sum(26 + line_h * len(lines) + 10 for _, lines in blocks) + 20
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    y = margin
    for head, lines in blocks:
        draw.text((margin, y), head, font=font, fill="#333333")
        y += 26
        for top, low in lines:
            for row, (cells, colours, f, h) in enumerate(
                ((top, PATCH_COLOURS, font, 20), (low, TOKEN_COLOURS, small, 16))
            ):
                yy = y + row * 21
                for k, (ch, piece) in enumerate(cells):
                    x = margin + k * cw
                    draw.rectangle([x, yy, x + cw, yy + h], fill=colours[piece % 2])
                    draw.text((x, yy + 1), ch, font=f, fill="#000000" if row == 0 else "#555555")
            y += line_h
        y += 10
    draw.text(
        (margin, y),
        "top: patches the byte model predicts · beneath: the source tokenizer's tokens",
        font=small,
        fill="#777777",
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@task(name="artifact-boundaries", **_ARTIFACT)
def boundary_view(samples_uri: str) -> str:
    """The predicted patches of a few held-out texts, as an image."""
    samples = storage.read_json(samples_uri)
    caption = (
        "Each box on a top row is one patch: the bytes the byte model pools into one global position. "
        f"Beneath, the same text cut into the source tokenizer's tokens. Samples: `{samples_uri}`"
    )
    md = _png_markdown("Predicted patches", patches_png(samples), caption)
    return str(
        create_markdown_artifact(md, key="boundaries", description="Predicted patches on held-out text")
    )


# ---------------------------------------------------------------- links


@task(name="artifact-links", **_ARTIFACT)
def mlflow_links(tracking_uri: str, run_id: str, model_url: str | None, model_uri: str | None) -> str:
    """Links to the MLflow run, its experiment's runs and the model version; returns the run's URL."""
    from . import tracking

    run_url = tracking.run_url(tracking_uri, run_id)
    exp = tracking.client(tracking_uri).get_run(run_id).info.experiment_id
    create_link_artifact(
        run_url, link_text="MLflow run", key="mlflow-run", description="This flow run in MLflow"
    )
    create_link_artifact(
        tracking.experiment_url(tracking_uri, exp),
        link_text="MLflow training runs",
        key="mlflow-experiment",
        description="Every run of this experiment",
    )
    if model_url:
        create_link_artifact(
            model_url,
            link_text=model_uri or "model version",
            key="mlflow-model",
            description=f"Registered {model_uri}",
        )
    return run_url
