"""Browser check of the local stack: screenshots of a byteify flow run's artifacts in the
Prefect UI and of its MLflow run, experiment and model version, with headless Chromium.

    make screenshots          # installs chromium if missing, `make up`, runs this
    python scripts/screenshots.py [--flow-run ID] [--out var/screenshots]

Talks to the stack named by PREFECT_API_URL and MLFLOW_TRACKING_URI (``deployments/stack.sh
env``). Without --flow-run it takes the newest completed byteify flow run, running the
``byteify/tiny`` deployment first when there is none. Each page is loaded in Chromium over
the DevTools protocol and captured once the text that proves it rendered is on screen
(single-page apps draw after load), so a page that never renders fails the check.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Browser:
    """One headless Chromium page driven over the DevTools protocol (websocket, JSON messages)."""

    def __init__(self, width: int = 1440, height: int = 1000):
        from websockets.sync.client import connect

        exe = next(
            (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
            None,
        )
        if exe is None:
            sys.exit(
                "screenshots: no chromium on PATH (make screenshots installs it: apt-get install chromium)"
            )
        self.profile = tempfile.mkdtemp(prefix="byteify-chromium-")
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             f"--user-data-dir={self.profile}", "--remote-debugging-port=0", f"--window-size={width},{height}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        port = None
        for line in self.proc.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
            if m := re.search(r"ws://127\.0\.0\.1:(\d+)/", line):
                port = m.group(1)
                break
        if port is None:
            sys.exit("screenshots: chromium did not start its DevTools endpoint")
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
        page = next(p for p in pages if p["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20)
        self.next_id = 0
        self.call("Page.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive interleaved with the answer
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, texts: list[str], what: str, timeout: float = 60) -> None:
        deadline, text = time.time() + timeout, ""
        while time.time() < deadline:
            text = self.js("document.body ? document.body.innerText : ''") or ""
            if all(s in text for s in texts):
                return
            time.sleep(0.5)
        raise SystemExit(f"screenshots: {what} never showed {[s for s in texts if s not in text]}")

    def shoot(self, url: str, out: Path, must_show: list[str], then="", then_show=(), after="") -> None:
        """Load `url`, wait for `must_show`; run the script `then` (a click) and wait for `then_show`;
        run `after` (a scroll: once the click's navigation settled, or the router scrolls back); save a PNG."""
        self.call("Page.navigate", url=url)
        self.wait_for(must_show, url)
        if then:
            self.js(then)
            self.wait_for(list(then_show), f"{url} (after a click)")
        time.sleep(1.0)
        if after:
            self.js(after)
        time.sleep(2.0)  # let charts and images finish drawing
        out.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        print(f"{out}  <- {url}")

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


# MLflow's UI opens its assistant side panel on first visit; close it so the page is readable.
CLOSE_ASSISTANT = """
for (const b of document.querySelectorAll('button')) {
  const label = (b.getAttribute('aria-label') || '') + (b.getAttribute('data-component-id') || '');
  if (/assistant.*close|close.*assistant/i.test(label)) { b.click(); }
}
"""


def click_tab(name: str) -> str:
    """JS: click the tab labelled `name`."""
    return f"[...document.querySelectorAll('[role=tab], .p-tab, button, a')].find(e => e.innerText.trim() === {name!r}).click();"


def scroll_to_tab(name: str) -> str:
    """JS: scroll the page (it scrolls inside a container) so the tab labelled `name` is at the top."""
    return f"""
const tab = [...document.querySelectorAll('[role=tab], .p-tab')].find(e => e.innerText.trim() === {name!r});
for (let p = tab.parentElement; p; p = p.parentElement) {{
  if (p.scrollHeight > p.clientHeight + 10 && /auto|scroll/.test(getComputedStyle(p).overflowY)) {{
    p.scrollTop += tab.getBoundingClientRect().top - p.getBoundingClientRect().top - 8; break;
  }}
}}
"""


def _latest_flow_run(flow_run_id: str | None):
    """The flow run to show: the given one, the newest completed byteify run, or a new tiny run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.deployments import run_deployment

    with get_client(sync_client=True) as client:
        if flow_run_id:
            return client.read_flow_run(flow_run_id)
        done = FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))
        )
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["byteify"])),
            flow_run_filter=done,
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
    if runs:
        return runs[0]
    print("no completed byteify flow run: running byteify/tiny (a few minutes)")
    run = run_deployment("byteify/tiny", timeout=3600)
    if not run.state.is_completed():
        sys.exit(f"screenshots: byteify/tiny ended {run.state.name}")
    return run


def pages_of(flow_run_id: str | None) -> list[tuple]:
    """(file, URL, text that proves it rendered[, a click, what the click shows]) for one flow run."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    fr = _latest_flow_run(flow_run_id)
    prefect_ui = os.environ["PREFECT_API_URL"].rstrip("/").removesuffix("/api")
    with get_client(sync_client=True) as client:
        flt = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fr.id]))
        by_key = {a.key: a for a in client.read_artifacts(artifact_filter=flt) if a.key}
    mlflow_url = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
    mlc = MlflowClient(mlflow_url, registry_uri=mlflow_url)
    flt = f"tags.`byteify.flow_run_id` = '{fr.id}' and tags.`byteify.kind` = 'flow'"
    run = next(r for e in mlc.search_experiments() for r in mlc.search_runs([e.experiment_id], flt))
    name, version = re.search(r"#/models/([^/]+)/versions/(\d+)", by_key["mlflow-model"].data).groups()

    flow_page = f"{prefect_ui}/runs/flow-run/{fr.id}"
    pages = [
        ("prefect-flow-run", flow_page, [fr.name, "Artifacts"], "", ()),
        (
            "prefect-artifacts",
            flow_page,
            [fr.name],
            click_tab("Artifacts"),
            ["boundaries"],
            scroll_to_tab("Artifacts"),
        ),
    ]
    for key in ("data-progress", "stage-1-progress", "evaluation", "training-curves", "boundaries"):
        if key in by_key:
            pages.append(
                (f"prefect-{key}", f"{prefect_ui}/artifacts/artifact/{by_key[key].id}", [key], "", ())
            )
    runs, ml = f"{mlflow_url}/#/experiments/{run.info.experiment_id}/runs", "workflowType=machine_learning"
    rid = run.info.run_id
    return pages + [
        ("mlflow-run", f"{runs}/{rid}?{ml}", [run.info.run_name, "stage1"]),
        ("mlflow-run-metrics", f"{runs}/{rid}/model-metrics?{ml}", ["bits_per_byte"]),
        ("mlflow-experiment", f"{runs}?{ml}", [run.info.run_name]),
        (
            "mlflow-model-version",
            f"{mlflow_url}/#/models/{name}/versions/{version}?{ml}",
            [f"Version {version}"],
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flow-run", help="flow run id (default: the newest completed byteify run)")
    ap.add_argument("--out", default=str(ROOT / "var" / "screenshots"))
    ap.add_argument("--readme-images", help="also write the README's two images, small, into this folder")
    args = ap.parse_args(argv)
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        if not os.environ.get(var, "").startswith("http"):
            sys.exit(
                f'screenshots: {var} is not a server URL; run `make up`, then eval "$(deployments/stack.sh env)"'
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    browser = Browser()
    try:
        for stem, url, must_show, *then in pages_of(args.flow_run):
            # MLflow pages (no click of their own): close the assistant panel, then capture.
            browser.shoot(url, out / f"{stem}.png", must_show, *(then or [CLOSE_ASSISTANT, must_show]))
    finally:
        browser.close()
    if args.readme_images:
        for stem in README_IMAGES:
            small(out / f"{stem}.png", Path(args.readme_images) / f"{stem}.png")
    return 0


README_IMAGES = ("prefect-artifacts", "mlflow-run")


def small(src: Path, dest: Path, width: int = 900) -> None:
    """A downscaled, 64-colour copy (tens of kB) for the README."""
    from PIL import Image

    img = Image.open(src).convert("RGB")
    img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    dest.parent.mkdir(parents=True, exist_ok=True)
    img.quantize(colors=64, dither=Image.Dither.NONE).save(dest, optimize=True)
    print(f"{dest}: {dest.stat().st_size // 1024} kB")


if __name__ == "__main__":
    sys.exit(main())
