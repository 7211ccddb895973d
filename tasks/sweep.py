"""Prefect tasks of the compression sweep (flows/sweep.py): what a Stage-1 checkpoint was made
from, the data's bytes per token, one MLflow run per point, the generation-speed measurement
of every point next to the source in one process, and the published result (table, Pareto
plot, JSON) as Prefect artifacts and files for the parent MLflow run.

The model math is bolmo_core's (`speed.measure`, `evaluate`); here are I/O, caching and the
presentation (the Pareto front is a property of the measured points, not of a model).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from bolmo_core import storage

from . import tracking
from .retries import RETRY

SPEED_FILE = "speed.json"


# ---------------------------------------------------------------- inputs


@task(name="sweep-stage1", cache_policy=None, **RETRY)
def stage1_info(checkpoint_uri: str) -> dict[str, Any]:
    """The committed Stage-1 checkpoint behind `checkpoint_uri` (a checkpoint or a stage folder):
    its URI and weights hash, its preset, and the data manifest it was trained on."""
    from bolmo_core import checkpoint as ckpt
    from bolmo_core.data import read_manifest

    uri = ckpt.resolve_checkpoint(checkpoint_uri)
    if storage.is_local(uri):  # lineage names it wherever the flow runs
        uri = os.path.abspath(storage.local_path(uri))
    cfg = ckpt.read_config(uri)
    if cfg.get("stage") != 1 or "preset" not in cfg or not cfg.get("manifest_uri"):
        raise ValueError(
            f"stage1_checkpoint '{checkpoint_uri}': not a Stage-1 checkpoint of byteify "
            f"(stage {cfg.get('stage')!r}, manifest {cfg.get('manifest_uri')!r})"
        )
    manifest = read_manifest(cfg["manifest_uri"])
    return {
        "uri": uri,
        "hash": ckpt.checkpoint_hash(uri),
        "preset": cfg["preset"],
        "manifest_uri": cfg["manifest_uri"],
        "manifest_hash": manifest["manifest_hash"],
        "bytes_per_token": bytes_per_token(manifest),
        "world_size": cfg.get("world_size", 1),
    }


def bytes_per_token(manifest: dict) -> float:
    """The source tokenizer's bytes per token on the training split (the source's patch ratio)."""
    train = (manifest.get("splits") or {}).get("train") or {}
    if not train.get("tokens"):
        shards = [s for s in manifest.get("shards", []) if s.get("split") == "train"]
        train = {"bytes": sum(s["bytes"] for s in shards), "tokens": sum(s["tokens"] for s in shards)}
    if not train.get("tokens"):
        raise ValueError("data manifest: no training tokens counted (cannot give the source's ratio)")
    return train["bytes"] / train["tokens"]


@task(name="sweep-point-run", **RETRY)
def start_point_run(tracking_uri: str, parent_run_id: str, point: str, params: dict[str, Any]) -> str:
    """A nested MLflow run for one sweep point under the sweep's run (its stages nest under it)."""
    return tracking.start_stage_run(tracking_uri, parent_run_id, f"point:{point}", params)


@task(name="sweep-point-end", **RETRY)
def end_point_run(tracking_uri: str, run_id: str, metrics: dict[str, float], tags: dict[str, Any]) -> None:
    tracking.log_to_run.fn(tracking_uri, run_id, metrics=metrics, tags=tags)
    tracking.end_run(tracking_uri, run_id)


@task(name="sweep-point-summary", cache_policy=None, **RETRY)
def point_summary(report_uri: str) -> dict[str, Any]:
    """A point's headline numbers from its evaluation report: bits per byte (causal where the
    report has it), bytes per patch reached (causal boundaries where reported), the source's bpb."""
    r = storage.read_json(report_uri)
    byt, src = r.get("byte_model") or {}, r.get("source") or {}
    return {
        "bits_per_byte": byt.get("bits_per_byte"),
        "bytes_per_patch": byt.get("bytes_per_patch_causal", byt.get("bytes_per_patch")),
        "source_bpb": src.get("bits_per_byte"),
        "source_bytes_per_token": src.get("bytes_per_token"),
    }


def run_metrics(rows: list[dict]) -> dict[str, float]:
    """The table as MLflow metrics of the sweep's run: ``<point>/<quantity>``."""
    out = {}
    for r in rows:
        for k, v in r.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[f"{_metric_name(r['point'])}/{k}"] = float(v)
    return out


def _metric_name(s: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.\- ]+", "_", s)


# ---------------------------------------------------------------- speed, all points in one process


def sweep_out_uri(storage_root: str, checkpoint_hashes: dict[str, str], options: dict) -> str:
    """The sweep's folder (speed.json, then the published table/plot): named by its points' weights."""
    key = json.dumps([sorted(checkpoint_hashes.items()), options], sort_keys=True)
    return storage.join(storage_root, "sweep", hashlib.sha256(key.encode()).hexdigest()[:16])


@task(name="sweep-speed", cache_policy=INPUTS + TASK_SOURCE, persist_result=True, **RETRY)
def measure_speed(
    checkpoints: dict[str, str],
    checkpoint_hashes: dict[str, str],
    manifest_uri: str,
    storage_root: str,
    options: dict[str, Any],
) -> str:
    """Generation bytes/s of every point and of the source, side by side in this one process
    (bolmo_core.speed); the JSON's URI (written once; its presence is the commit marker)."""
    import torch

    from bolmo_core.load import load_byte_model
    from bolmo_core.loader import split_texts
    from bolmo_core.source import load_source_model, load_tokenizer
    from bolmo_core.speed import SpeedConfig, measure

    out = storage.join(sweep_out_uri(storage_root, checkpoint_hashes, options), SPEED_FILE)
    if storage.exists(out):
        return out
    torch.manual_seed(0)
    models, preset = {}, None
    for name, uri in checkpoints.items():
        models[name], preset = load_byte_model(uri)
    src_cfg = preset.model.source
    n_prompts, prompt_bytes = options.get("prompts", 8), options.get("prompt_bytes", 160)
    docs = split_texts(manifest_uri, "validation", n_prompts * prompt_bytes * 4)
    prompts = [_cut_utf8(d, prompt_bytes) for d in docs[:n_prompts] if d]
    cfg = SpeedConfig(
        batches=tuple(options.get("batches", (1, 8))),
        new_bytes=options.get("new_bytes", 64),
        repeats=options.get("repeats", 2),
        precision=options.get("precision", "fp32"),
    )
    result = measure(models, load_source_model(src_cfg), load_tokenizer(src_cfg), prompts, cfg)
    storage.write_json_atomic(out, result)
    return out


def _cut_utf8(data: bytes, n: int) -> bytes:
    """The first <= n bytes, not ending inside a UTF-8 character (the source tokenizes text)."""
    return data[:n].decode("utf-8", "ignore").encode("utf-8")


# ---------------------------------------------------------------- the result


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (speed, bpb) pairs: True where no other point is at least as fast and at least as good,
    and strictly better in one (higher speed is better, lower bpb is better)."""
    front = []
    for i, (s, b) in enumerate(points):
        dominated = any(
            (s2 >= s and b2 <= b) and (s2 > s or b2 < b) for j, (s2, b2) in enumerate(points) if j != i
        )
        front.append(not dominated)
    return front


CLOCKS = {"wall": "bytes_per_s", "cpu": "bytes_per_cpu_s"}


def sweep_rows(points: list[dict], speed: dict, clock: str = "wall") -> list[dict[str, Any]]:
    """One row per point (and the source first): quality, patches, speed at each batch, Pareto flags.

    `clock`: "wall" (bytes per wall-clock second) or "cpu" (per second of the process's CPU time,
    steadier on a shared machine: time spent waiting for a core is not counted)."""
    rate = CLOCKS[clock]
    batches = [str(b) for b in speed["config"]["batches"]]
    src = speed["source"]
    src_bpb = next((p["source_bpb"] for p in points if p.get("source_bpb") is not None), None)
    rows = [
        {
            "point": "source",
            "stage1": "-",
            "changes": "the subword source model",
            "target_bytes_per_patch": None,
            "bytes_per_patch": src[batches[0]].get("bytes_per_token"),
            "bits_per_byte": src_bpb,
            **{f"bytes_per_s_b{b}": src[b][rate] for b in batches},
            "model_version": None,
        }
    ]
    for p in points:
        sp = speed[p["name"]]
        rows.append(
            {
                "point": p["name"],
                "stage1": p["stage1"],
                "changes": ", ".join(f"{k}={v}" for k, v in p["overrides"].items()) or "-",
                "target_bytes_per_patch": p["target"],
                "bytes_per_patch": p["bytes_per_patch"],
                "bits_per_byte": p["bits_per_byte"],
                **{f"bytes_per_s_b{b}": sp[b][rate] for b in batches},
                "gen_bytes_per_patch": sp[batches[0]].get("bytes_per_patch"),
                "model_version": p.get("model_uri"),
            }
        )
    for b in batches:
        pts = [(r[f"bytes_per_s_b{b}"], r["bits_per_byte"]) for r in rows]
        ok = [i for i, (_, y) in enumerate(pts) if y is not None]
        front = pareto_front([pts[i] for i in ok])
        for i, f in zip(ok, front):
            rows[i][f"pareto_b{b}"] = f
            rows[i][f"speed_vs_source_b{b}"] = rows[i][f"bytes_per_s_b{b}"] / rows[0][f"bytes_per_s_b{b}"]
    return rows


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else ""
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def to_markdown(rows: list[dict], batches: list[str]) -> str:
    head = ["point", "Stage 1", "changes", "target B/patch", "B/patch reached", "bits/byte"]
    for b in batches:
        head += [f"bytes/s b{b}", f"x source b{b}", f"Pareto b{b}"]
    head.append("model version")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["point"], r["stage1"], r["changes"], _f(r["target_bytes_per_patch"], 2)]
        cells += [_f(r["bytes_per_patch"], 2), _f(r["bits_per_byte"])]
        for b in batches:
            cells += [_f(r[f"bytes_per_s_b{b}"], 1), _f(r.get(f"speed_vs_source_b{b}"), 2)]
            cells.append(_f(r.get(f"pareto_b{b}")))
        cells.append(f"`{r['model_version']}`" if r.get("model_version") else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_png(rows: list[dict], batches: list[str], title: str, clock: str = "wall") -> bytes:
    """bits per byte vs generation bytes/s, one panel per batch size; the front joined, the source a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batches), figsize=(5.6 * len(batches), 4.4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        pts = [r for r in rows if r["bits_per_byte"] is not None]
        for r in pts:
            src = r["point"] == "source"
            ax.scatter(
                r[f"bytes_per_s_b{b}"],
                r["bits_per_byte"],
                marker="*" if src else "o",
                s=180 if src else 60,
                color="black" if src else ("C3" if r.get(f"pareto_b{b}") else "C0"),
                zorder=3,
            )
            ax.annotate(
                r["point"],
                (r[f"bytes_per_s_b{b}"], r["bits_per_byte"]),
                fontsize=8,
                xytext=(5, 4),
                textcoords="offset points",
            )
        front = sorted((r for r in pts if r.get(f"pareto_b{b}")), key=lambda r: r[f"bytes_per_s_b{b}"])
        if len(front) > 1:
            ax.plot(
                [r[f"bytes_per_s_b{b}"] for r in front],
                [r["bits_per_byte"] for r in front],
                color="C3",
                alpha=0.6,
                label="Pareto front",
            )
            ax.legend(fontsize=8)
        ax.set_xlabel(f"generated bytes per {'CPU ' if clock == 'cpu' else ''}second, batch {b}")
        ax.set_ylabel("bits per byte (lower is better)")
        ax.set_title(f"{title}: batch {b}", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


@task(name="sweep-publish", cache_policy=None, **RETRY)
def publish(points: list[dict], speed_uri: str, title: str, clock: str = "wall") -> dict[str, Any]:
    """Table + Pareto plot + JSON beside `speed_uri`, and as Prefect artifacts; their folder and the table."""
    out_uri = storage.dirname(speed_uri)
    speed = storage.read_json(speed_uri)
    batches = [str(b) for b in speed["config"]["batches"]]
    rows = sweep_rows(points, speed, clock)
    table = (
        to_markdown(rows, batches)
        + f"\n\nbytes/s: per second of {'CPU time' if clock == 'cpu' else 'wall-clock time'}."
    )
    png = pareto_png(rows, batches, title, clock)
    files = {
        "pareto.png": png,
        "table.md": (table + "\n").encode(),
        "sweep.json": json.dumps(
            {"rows": rows, "points": points, "speed": speed}, indent=1, default=str
        ).encode(),
    }
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(out_uri, name), data)
    create_table_artifact(rows, key="sweep-table", description=f"{title}: one row per point ({out_uri})")
    img = base64.b64encode(png).decode()
    create_markdown_artifact(
        f"# {title}\n\n![Pareto](data:image/png;base64,{img})\n\n{table}\n\n`{out_uri}`",
        key="sweep-pareto",
        description="bits per byte vs generation bytes/s (the source: a star)",
    )
    return {"folder": out_uri, "table": table, "rows": rows}
