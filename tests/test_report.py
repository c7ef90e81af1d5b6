"""The run report: every element in the HTML, valid PNG figures, no confusion matrix without labels,
logged to MLflow by the track step, and never failing a run."""
from __future__ import annotations

import base64
import json
import re
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import yaml
from mlflow import MlflowClient

from agcpipe import report
from agcpipe.config import load_config
from agcpipe.pipeline import run_pipeline
from integration_support import small_synthetic

FIGURES = ("cluster_sizes", "confusion", "projection", "cluster_graph")


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, checking its signature and IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    w, h = struct.unpack(">II", data[16:24])
    assert data.endswith(b"IEND\xaeB`\x82"), "no IEND chunk (truncated)"
    return w, h


def _results(summary) -> dict:
    return {s.stage: s for s in summary.stages}


def _check_images(out: Path, names) -> None:
    for name in names:
        data = (out / f"{name}.png").read_bytes()
        w, h = _png_size(data)
        assert 400 < w < 2000 and 200 < h < 1500, (name, w, h)
        import matplotlib.image

        img = matplotlib.image.imread(out / f"{name}.png")  # decodes the whole file
        assert img.shape[:2] == (h, w) and img.std() > 0.01  # not blank


def test_report_has_every_element(home, tmp_path):
    cfg = load_config(None, small_synthetic(name="rep", **{"tracking.enabled": "false"}))
    results = _results(run_pipeline(cfg))
    out = tmp_path / "report"
    run = {"run_id": "abc123", "experiment_id": "7", "model_name": "agcpipe-rep", "model_version": "4", "model_status": "registered",
           "gate_passed": True, "gate_reason": "modularity=0.61 >= 0.2 -> pass", "alias": "champion", "alias_moved": True, "alias_previous": "3"}
    summary = report.build_report(out, results, cfg=cfg, run=run)
    assert summary["elements"] == {**{k: "ok" for k in ("metrics", "stages", *FIGURES, "clusters")}, "training": "absent: nothing trained (no history.parquet)"}
    assert sorted(summary["images"]) == sorted(f"{n}.png" for n in FIGURES)
    _check_images(out, FIGURES)
    html = (out / "report.html").read_text()
    for anchor in ("run", "metrics", "stages", *FIGURES, "clusters", "config"):
        assert f'<section id="{anchor}">' in html, anchor
    # metrics table and stage timings / cache status
    for m in ("acc", "nmi", "ari", "modularity", "conductance", "size_min"):
        assert f"<td>{m}</td>" in html
    assert f"{results['evaluate'].summary['nmi']:.4f}" in html
    for s in ("ingest", "precompute", "train", "cluster", "evaluate"):
        assert re.search(rf"<td>{s}</td><td><span class='badge (computed|cached)'>", html), s
        assert results[s].key in html
    # run facts
    assert "abc123" in html and "agcpipe-rep version 4" in html and "modularity=0.61 &gt;= 0.2 -&gt; pass" in html and "was version 3" in html
    # figures are embedded (self-contained page) and identical to the PNG files beside it
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(embedded) == 4
    assert {base64.b64decode(b) for b in embedded} == {(out / f"{n}.png").read_bytes() for n in FIGURES}
    assert json.loads((out / "report.json").read_text())["has_labels"] is True


def test_report_without_labels_has_no_confusion_matrix(home, tmp_path):
    d = tmp_path / "tables"
    d.mkdir()
    n = 200
    rng = np.random.default_rng(0)
    comm = np.arange(n) % 4
    pacsv.write_csv(pa.table({"id": np.arange(n), **{f"x{j}": comm * (j + 1.0) + rng.normal(0, 0.5, n) for j in range(5)}}), d / "nodes.csv")
    src = np.repeat(np.arange(n), 3)
    dst = (src + np.tile([4, 8, 12], n)) % n
    pacsv.write_csv(pa.table({"source": src, "target": dst}), d / "edges.csv")
    (d / "cfg.yaml").write_text(yaml.safe_dump({
        "name": "nolabels", "source": {"type": "tables", "edges": "edges.csv", "nodes": "nodes.csv"},
        "method": {"name": "sgc", "params": {"K": 2}}, "cluster": {"n_clusters": 4, "n_init": 2}, "tracking": {"enabled": False},
    }))
    cfg = load_config(d / "cfg.yaml")
    results = _results(run_pipeline(cfg))
    out = tmp_path / "report"
    summary = report.build_report(out, results, cfg=cfg)
    assert summary["has_labels"] is False
    assert summary["elements"]["confusion"].startswith("absent")
    assert all(summary["elements"][k] == "ok" for k in ("metrics", "stages", "cluster_sizes", "projection", "cluster_graph", "clusters"))
    assert not (out / "confusion.png").exists()
    _check_images(out, ("cluster_sizes", "projection", "cluster_graph"))
    html = (out / "report.html").read_text()
    assert 'id="confusion"' not in html and "by true class" not in (out / "report.html").read_text()
    assert len(re.findall(r"data:image/png;base64,", html)) == 3
    assert "<td>modularity</td>" in html and "<td>acc</td>" not in html  # no label metrics either


def test_report_shows_the_training_history_when_there_is_one(home, tmp_path):
    import dataclasses
    import shutil

    import pyarrow.parquet as pq

    cfg = load_config(None, small_synthetic(name="rep", **{"tracking.enabled": "false"}))
    results = _results(run_pipeline(cfg))
    train = tmp_path / "train"
    shutil.copytree(results["train"].path, train)
    rows = [(e, c, v) for e in range(20) for c, v in (("loss", 2.0 / (e + 1)), ("loss_pos", 1.0 / (e + 1)), ("loss_neg", 1.0 / (e + 2)))]
    pq.write_table(pa.table({"epoch": pa.array([r[0] for r in rows], pa.int32()), "component": [r[1] for r in rows], "value": [r[2] for r in rows]}), train / "history.parquet")
    results["train"] = dataclasses.replace(results["train"], path=str(train))
    summary = report.build_report(tmp_path / "r", results, cfg=cfg)
    assert summary["elements"]["training"] == "ok" and "training.png" in summary["images"]
    _check_images(tmp_path / "r", ("training",))
    assert '<section id="training">' in (tmp_path / "r" / "report.html").read_text()


def test_report_drawing_failure_loses_only_that_figure(home, tmp_path, monkeypatch):
    cfg = load_config(None, small_synthetic(name="rep", **{"tracking.enabled": "false"}))
    results = _results(run_pipeline(cfg))

    def boom(self):
        raise RuntimeError("no projection today")

    monkeypatch.setattr(report._Data, "plot_projection", boom)
    summary = report.build_report(tmp_path / "r", results, cfg=cfg)
    assert summary["elements"]["projection"].startswith("error: RuntimeError")
    assert summary["elements"]["cluster_graph"] == "ok" and summary["elements"]["confusion"] == "ok"
    assert "could not draw this figure: no projection today" in (tmp_path / "r" / "report.html").read_text()


def test_track_step_logs_the_report_and_never_fails_for_it(home, monkeypatch, caplog):
    cfg = load_config(None, small_synthetic(name="tracked-report"))
    first = run_pipeline(cfg)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = first.track["run_id"]
    arts = {a.path for a in client.list_artifacts(run_id, "report")}
    assert {f"report/{n}" for n in ("report.html", *(f"{f}.png" for f in FIGURES))} <= arts
    stored = Path(client.get_run(run_id).data.tags["agcpipe.report"])
    assert stored.name == "report.html" and stored.parent.parent.name == "report" and stored.is_file()  # <store>/report/<key>/
    html = stored.read_text()
    assert run_id in html and "agcpipe-tracked-report version 1" in html and "passed" in html
    downloaded = Path(client.download_artifacts(run_id, "report/report.html", str(home)))
    assert downloaded.read_text() == html
    meta = json.loads((stored.parent / "_artifact.json").read_text())
    assert meta["run_id"] == run_id and meta["summary"]["elements"]["confusion"] == "ok"
    assert meta["summary"]["seconds"] < 10  # ~0.5 s here; generous for a loaded CI machine

    # a broken report: the run still finishes, with a warning and a tag
    def boom(*a, **k):
        raise RuntimeError("matplotlib exploded")

    monkeypatch.setattr(report, "build_report", boom)
    with caplog.at_level("WARNING", logger="agcpipe"):
        second = run_pipeline(cfg)
    run = client.get_run(second.track["run_id"])
    assert run.info.status == "FINISHED" and second.track["model_version"] == "1"
    assert "matplotlib exploded" in run.data.tags["agcpipe.report.error"]
    assert "run report skipped" in caplog.text
    assert not client.list_artifacts(run.info.run_id, "report")


def test_report_renders_in_headless_chromium(home, tmp_path):
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("render_report", Path(__file__).resolve().parents[1] / "bench" / "render_report.py")
    rr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rr)
    chromium = rr.find_chromium()
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    cfg = load_config(None, small_synthetic(name="rendered", **{"tracking.enabled": "false"}))
    out = tmp_path / "report"
    report.build_report(out, _results(run_pipeline(cfg)), cfg=cfg)
    png = rr.render(out / "report.html", tmp_path / "shot.png", chromium, height=5000)
    data = png.read_bytes()
    w, h = _png_size(data)
    assert w == 1280 and 2500 < h < 5000  # cropped to the content: every section laid out
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img[: h // 2].std() > 0.05 and img[h // 2 :].std() > 0.05  # content in both halves (the figures loaded)
    assert shutil.which(chromium)
