"""Run a config (default: Cora / SSGC), then render its run report to PNG with headless Chromium.

    python bench/render_report.py                                   # -> bench/results/report_cora.png
    python bench/render_report.py flows/configs/citeseer_ssgc.yaml --out bench/results/report_citeseer.png
    python bench/render_report.py --prefect --home data             # through Prefect, into the usual data folder

By default the run goes into a fresh temporary agcpipe home (its own store and MLflow DB), so every
stage is computed and the report shows a cold run. Besides the screenshot, the report folder
(report.html and its PNG figures) is copied next to it (``<out stem>/``). Needs ``chromium`` (Debian:
``apt-get install chromium``) or set ``--chromium``; real datasets come from ``AGCPIPE_DATASETS``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars",
)


def find_chromium(explicit: str | None = None) -> str | None:
    for cand in (explicit, os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def render(html: Path, png: Path, chromium: str, width: int = 1280, height: int = 6000, timeout: float = 120) -> Path:
    """Screenshot ``html`` at ``width`` x ``height`` CSS pixels, then crop the empty page background below
    the content (Chromium's --screenshot captures the window, not the document)."""
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="agcpipe-chromium-") as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={width},{height}", html.resolve().as_uri()]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0 or not png.is_file():
        raise RuntimeError(f"chromium failed ({out.returncode}): {out.stderr[-2000:]}")
    _crop_background(png)
    return png


def _crop_background(png: Path, margin: int = 24) -> None:
    try:
        import numpy as np
        from PIL import Image
    except ImportError:  # keep the full screenshot
        return
    img = Image.open(png).convert("RGB")
    a = np.asarray(img)
    bg = a[-1, 0]
    rows = np.nonzero((a != bg).any(axis=(1, 2)))[0]
    if rows.size:
        img.crop((0, 0, img.width, min(img.height, int(rows[-1]) + margin))).save(png)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=str(REPO / "flows" / "configs" / "cora_ssgc.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "report_cora.png"), help="PNG screenshot to write")
    ap.add_argument("--home", help="agcpipe home (store + MLflow); default: a fresh temporary one")
    ap.add_argument("--prefect", action="store_true", help="run through Prefect (default: in-process, same stages and cache)")
    ap.add_argument("--chromium", help="Chromium binary (default: chromium on PATH)")
    ap.add_argument("--width", type=int, default=1280)
    args = ap.parse_args(argv)

    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("render_report: no chromium found (apt-get install chromium, or --chromium PATH)", file=sys.stderr)
        return 2
    tmp_home = None
    if args.home:
        os.environ["AGCPIPE_HOME"] = str(Path(args.home).resolve())
    else:
        tmp_home = tempfile.mkdtemp(prefix="agcpipe-render-")
        os.environ["AGCPIPE_HOME"] = tmp_home
        os.environ.pop("AGCPIPE_STORE", None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        from mlflow import MlflowClient

        from agcpipe.config import load_config
        from agcpipe.settings import apply_stack_env

        apply_stack_env()
        cfg = load_config(args.config, args.overrides)
        t0 = time.perf_counter()
        if args.prefect:
            from agcpipe.orchestration import run_flow

            summary = run_flow(cfg)
        else:
            from agcpipe.pipeline import run_pipeline

            summary = run_pipeline(cfg)
        run_s = time.perf_counter() - t0
        if not summary.track:
            print("render_report: the config has tracking disabled, so no report was written", file=sys.stderr)
            return 2
        client = MlflowClient(tracking_uri=summary.track["tracking_uri"])
        tags = client.get_run(summary.track["run_id"]).data.tags
        if "agcpipe.report" not in tags:
            print(f"render_report: the run has no report: {tags.get('agcpipe.report.error', '?')}", file=sys.stderr)
            return 1
        html = Path(tags["agcpipe.report"])
        out = Path(args.out)
        copy = out.with_suffix("")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(html.parent, copy, ignore=shutil.ignore_patterns("_artifact.json"))
        t1 = time.perf_counter()
        render(copy / "report.html", out, chromium, width=args.width)
        import json

        built = json.loads((html.parent / "report.json").read_text())
        print(f"run: {run_s:.1f} s ({', '.join(f'{s.stage} {s.status} {s.seconds:.2f}s' for s in summary.stages)})")
        print(f"report: built in {built['seconds']:.2f} s; elements: {built['elements']}")
        print(f"MLflow run {summary.track['run_id']} ({summary.track['tracking_uri']}), artifacts report/")
        print(f"report folder: {copy}")
        print(f"screenshot: {out} (rendered in {time.perf_counter() - t1:.1f} s)")
        return 0
    finally:
        if tmp_home:
            shutil.rmtree(tmp_home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
