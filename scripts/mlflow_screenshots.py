"""Screenshots of the MLflow UI for docs/mlflow.md, taken with headless Chromium.

Usage: python scripts/mlflow_screenshots.py --store P/mlflow.db --url http://127.0.0.1:PORT --out docs/img

The store must hold a pipeline run (`dvc repro`) and a comparison (`mrpo compare`); `mlflow ui` must serve it.
The runs-table view (columns and sort) is saved as a shared view, the experiment tag
`mlflow.sharedViewState.<key>` that the UI's Share button writes, so one URL opens the table with the columns.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
from websockets.sync.client import connect

SHARE_KEY = "mrpo-compare"
REFERENCE_SET = "mrpo.reference_set"
COLUMNS = [
    "tags.`mrpo.kind`",
    "tags.`mrpo.reference_set`",
    "metrics.`pref/reward_accuracy_vs_anchor`",
    "params.`train.objective`",
    "params.`train.strategy`",
    "params.`train.beta`",
    "params.`seed`",
    "attributes.`Source`",
]


def share_view(client: mlflow.MlflowClient, experiment: str, order_by: str, ascending: bool, key: str) -> str:
    """Save the runs-table view (columns, sort) as the shared view `key`; return the key."""
    state = {"selectedColumns": COLUMNS, "orderByKey": order_by, "orderByAsc": ascending}
    client.set_experiment_tag(experiment, f"mlflow.sharedViewState.{key}", json.dumps(state))
    return key


ML = "&workflowType=machine_learning"  # the UI opens experiments in its GenAI layout otherwise
# the assistant panel opens over the page on a first visit from localhost
ASSISTANT_CLOSE = "mlflow.assistant.chat_panel.close"


class Browser:
    """Headless Chromium driven over the DevTools protocol: set local storage, open a page, screenshot it."""

    def __init__(self, width: int = 1600, height: int = 900):
        port = free_port()
        self.proc = subprocess.Popen(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--remote-debugging-port={port}", f"--window-size={width},{height}",
             f"--user-data-dir={tempfile.mkdtemp(prefix='mrpo-chromium-')}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.size = (width, height)
        self.ws = connect(page_socket(port), max_size=None)
        self.next_id = 0
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.call("Emulation.setDeviceMetricsOverride", **metrics)

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                return reply.get("result", {})

    def js(self, expression: str):
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return reply.get("result", {}).get("value")

    def open(self, url: str, ready_text: str, timeout: float = 60.0) -> None:
        self.call("Page.navigate", url=url)
        deadline = time.time() + timeout
        while ready_text not in (self.js("document.body ? document.body.innerText : ''") or ""):
            if time.time() > deadline:
                raise TimeoutError(f"{url}: {ready_text!r} never appeared")
            time.sleep(0.5)
        self.js(f"document.querySelector('[data-component-id=\"{ASSISTANT_CLOSE}\"]')?.click()")
        time.sleep(3)  # let the grid finish laying out its columns

    def click_text(self, text: str, selector: str = "div") -> None:
        """Click the innermost `selector` element whose whole text is `text` (a section header)."""
        self.js(
            f"Array.from(document.querySelectorAll({json.dumps(selector)}))"
            f".filter(e => e.innerText && e.innerText.trim() === {json.dumps(text)}).pop()?.click()"
        )
        time.sleep(1)

    def scroll_to_row(self, text: str) -> None:
        """Scroll the page and its tables so that the row named `text` is in view."""
        self.js(
            f"Array.from(document.querySelectorAll('th,td')).find(e => e.innerText"
            f" && e.innerText.trim() === {json.dumps(text)})?.scrollIntoView({{block: 'nearest'}})"
        )
        time.sleep(1)

    def shot(self, png: Path, clip: tuple[int, int, int, int] | None = None) -> None:
        params = {"format": "png"}
        if clip:
            x, y, w, h = clip
            params["clip"] = {"x": x, "y": y, "width": w, "height": h, "scale": 1}
            params["captureBeyondViewport"] = True
        png.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_socket(port: int, timeout: float = 30.0) -> str:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as r:
                pages = [t for t in json.load(r) if t["type"] == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        if time.time() > deadline:
            raise TimeoutError("chromium's DevTools endpoint did not answer")
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="path of the sqlite MLflow store")
    ap.add_argument("--url", required=True, help="where `mlflow ui` serves that store")
    ap.add_argument("--experiment", default="mrpo")
    ap.add_argument("--out", default="docs/img")
    args = ap.parse_args()
    client = mlflow.MlflowClient(f"sqlite:///{Path(args.store).resolve()}")
    exp = client.get_experiment_by_name(args.experiment)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    browser = Browser(1600, 1100)
    try:
        for name, order_by, ascending in [
            ("accuracy", "metrics.`pref/reward_accuracy_vs_anchor`", False),
            ("reference-set", "tags.`mrpo.reference_set`", True),
        ]:
            key = share_view(client, exp.experiment_id, order_by, ascending, f"{SHARE_KEY}-{name}")
            runs_page = f"{args.url}/#/experiments/{exp.experiment_id}/runs?viewStateShareKey={key}{ML}"
            browser.open(runs_page, "reward_accuracy")
            browser.shot(out / f"mlflow-runs-{name}.png")
        pipeline = client.search_runs([exp.experiment_id], "tags.`mrpo.kind` = 'pipeline'", max_results=1)
        member = client.search_runs(
            [exp.experiment_id],
            "tags.`mrpo.kind` = 'compare-member' and params.`train.objective` = 'mrpo' "
            "and params.`train.strategy` = 'uniform' and params.seed = '0'",
            max_results=1,
        )
        if pipeline and member:
            ids = json.dumps([pipeline[0].info.run_id, member[0].info.run_id])
            experiments = json.dumps([exp.experiment_id])
            browser.open(f"{args.url}/#/compare-runs?runs={ids}&experiments={experiments}{ML}", "Run details")
            # hundreds of params; the metrics grid scrolls its names and values apart, so it is left out
            for section in ("Visualizations", "Parameters", "Metrics", "Artifacts"):
                browser.click_text(section)
            browser.scroll_to_row(REFERENCE_SET)
            browser.shot(out / "mlflow-compare-runs.png")
    finally:
        browser.close()


if __name__ == "__main__":
    main()
