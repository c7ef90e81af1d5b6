"""The run report: one HTML page per tracked run, with PNG figures drawn by matplotlib (Agg, no pyplot).

Contents: the run (model, gate, alias), the graph, the metrics table, stage timings and cache status,
the cluster-size distribution, the confusion matrix against the labels (only when the graph has
labels), a 2-D PCA projection of the embeddings coloured by cluster (and by label) on a sample of at
most :data:`MAX_PROJECTION_NODES` nodes, the coarsened cluster graph (share of each cluster's edge
weight going to every cluster, as a heatmap and a node-link drawing) and a per-cluster table (size,
internal share, most distinctive features, representative nodes).

Figures are written as PNG files beside ``report.html`` *and* embedded in it as base64 data URIs: the
page is self-contained, so it renders in MLflow's artifact preview (a sandboxed iframe that cannot load
relative files) and when downloaded alone; the PNG files stay individually viewable and reusable.

Cost: O(N + E_k + k^2 + S d) with S <= 20,000 sampled nodes for the projection (a randomised PCA);
about 0.5 s on Cora besides importing matplotlib. Each element is drawn independently: one that fails
is replaced by a note, the rest of the report is still written.
"""
from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .stages.base import StageResult

REPORT_FILE = "report.html"
MAX_PROJECTION_NODES = 20_000
#: clusters drawn individually in the cluster graph / confusion matrix (the largest ones beyond this)
MAX_CLUSTERS_DRAWN = 40
MAX_TABLE_CLUSTERS = 50
DPI = 110

_METRIC_GROUPS = (
    ("labels", ("acc", "nmi", "ari", "f1_macro", "n_labelled", "n_unlabelled")),
    ("graph", ("modularity", "conductance", "mean_cluster_conductance", "cluster_graph_internal_weight_fraction")),
    ("cluster sizes", ("size_n_clusters_requested", "size_n_clusters_found", "size_n_empty", "size_min", "size_max", "size_mean", "size_median", "size_std", "size_largest_fraction", "size_balance")),
)


# ------------------------------------------------------------------------------------------ entry point
def build_report(out: str | Path, results: dict[str, StageResult], *, cfg: Any = None, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``report.html`` and its PNG figures into ``out``; return a summary (also ``report.json``).

    ``results``: the StageResults of ingest .. evaluate; ``cfg``: the run's Config (optional);
    ``run``: what the tracker knows (run_id, experiment_id, tracking_uri, model_name, model_version,
    model_status, gate_passed, gate_reason, alias, alias_moved, alias_previous).
    """
    t_import = time.perf_counter()
    import matplotlib.backends.backend_agg  # noqa: F401  (timed apart: ~0.3-1 s once per process)
    import matplotlib.figure  # noqa: F401

    t0 = time.perf_counter()
    import_seconds = t0 - t_import
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = _Data(results, cfg)
    sections: list[str] = []
    elements: dict[str, str] = {}  # element -> "ok" | "absent: why" | "error: ..."
    images: list[str] = []

    def figure(name: str, title: str, draw: Callable[[], Any], caption: str = "") -> None:
        try:
            fig = draw()
        except Exception as e:  # noqa: BLE001 - one figure failing must not lose the report
            elements[name] = f"error: {type(e).__name__}: {e}"
            sections.append(_section(title, f'<p class="note">could not draw this figure: {html.escape(str(e))}</p>', name))
            return
        if fig is None:
            return
        png = _png(fig)
        (out / f"{name}.png").write_bytes(png)
        images.append(f"{name}.png")
        elements[name] = "ok"
        b64 = base64.b64encode(png).decode()
        body = f'<a href="{name}.png"><img alt="{html.escape(title)}" src="data:image/png;base64,{b64}"></a>'
        if caption:
            body += f'<p class="caption">{caption}</p>'
        sections.append(_section(title, body, name))

    sections.append(_section("Metrics", _metrics_table(data.metrics), "metrics"))
    elements["metrics"] = "ok"
    sections.append(_section("Stages", _stages_table(results), "stages"))
    elements["stages"] = "ok"
    figure("cluster_sizes", "Cluster sizes", data.plot_sizes, data.sizes_caption())
    if data.has_labels:
        figure("confusion", "Confusion matrix (labelled nodes)", data.plot_confusion, data.confusion_caption())
    else:
        elements["confusion"] = "absent: the graph has no labels"
    figure("projection", "Embeddings, 2-D PCA projection", data.plot_projection, data.projection_caption())
    figure("cluster_graph", "Cluster graph (coarsened)", data.plot_cluster_graph, data.cluster_graph_caption())
    if data.history is not None:
        figure("training", "Training losses", data.plot_training, "Per-epoch means of the training loss and its components (the train stage's history.parquet).")
    else:
        elements["training"] = "absent: nothing trained (no history.parquet)"
    try:
        sections.append(_section("Clusters", data.clusters_table(), "clusters"))
        elements["clusters"] = "ok"
    except Exception as e:  # noqa: BLE001
        elements["clusters"] = f"error: {type(e).__name__}: {e}"
    if cfg is not None:
        import yaml

        cfg_text = yaml.safe_dump(cfg.resolved(), sort_keys=False)
        sections.append(_section("Configuration", f"<details><summary>resolved config</summary><pre>{html.escape(cfg_text)}</pre></details>", "config"))

    seconds = time.perf_counter() - t0
    page = _page(data, run or {}, sections, seconds, import_seconds)
    (out / REPORT_FILE).write_text(page, encoding="utf-8")
    summary = {"elements": elements, "images": images, "seconds": round(seconds, 4), "import_seconds": round(import_seconds, 4), "n_nodes": data.n, "n_clusters": data.k, "has_labels": data.has_labels}
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    return summary


# ------------------------------------------------------------------------------------------ data
class _Data:
    def __init__(self, results: dict[str, StageResult], cfg: Any):
        import pyarrow.parquet as pq

        from .data.graph import Graph

        self.results = results
        self.cfg = cfg
        g, c, e = results["ingest"], results["cluster"], results["evaluate"]
        self.graph = Graph.open(g.path)
        self.n = self.graph.n_nodes
        self.metrics = dict(e.summary)
        self.labels = np.load(Path(c.path) / "labels.npy", mmap_mode="r")
        self.k = int(c.summary.get("n_clusters") or (int(np.max(self.labels)) + 1))
        self.sizes = np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=self.k)
        self.has_labels = bool(self.graph.manifest.get("has_labels"))
        cdir = Path(c.path)
        self.cg = pq.read_table(cdir / "cluster_graph.parquet").to_pandas() if (cdir / "cluster_graph.parquet").exists() else None
        self.cf = pq.read_table(cdir / "cluster_features.parquet").to_pandas() if (cdir / "cluster_features.parquet").exists() else None
        self.reps = pq.read_table(cdir / "representatives.parquet").to_pandas() if (cdir / "representatives.parquet").exists() else None
        hist = Path(results["train"].path) / "history.parquet" if "train" in results else None
        self.history = pq.read_table(hist).to_pandas() if hist is not None and hist.is_file() else None
        self.colors = _palette(self.k)
        self._share: np.ndarray | None = None
        self._proj_info: dict[str, Any] = {}

    # ---- sizes
    def plot_sizes(self):
        fig, ax = _figure(10, 3.3, left=0.8, bottom=0.65)
        order = np.argsort(-self.sizes, kind="stable")
        if self.k <= 200:
            x = np.arange(self.k)
            ax.bar(x, self.sizes[order], color=[self.colors[i] for i in order], width=0.8)
            if self.k <= 30:
                ax.set_xticks(x, [str(i) for i in order], fontsize=8 if self.k > 15 else 9)
                for xi, s in zip(x, self.sizes[order]):
                    ax.annotate(f"{s:,}", (xi, s), ha="center", va="bottom", fontsize=7 if self.k > 15 else 8, xytext=(0, 2), textcoords="offset points")
            else:
                ax.set_xticks([])
            ax.set_xlabel("cluster (largest first)")
            ax.set_ylabel("nodes")
            ax.axhline(self.n / self.k, color="0.35", ls="--", lw=1, label=f"balanced: {self.n / self.k:,.0f}")
            ax.legend(frameon=False, fontsize=8, loc="upper right")
            ax.margins(y=0.12)
        else:
            ax.hist(self.sizes, bins=min(60, max(10, self.k // 10)), color="#4c72b0")
            ax.set_xlabel("cluster size (nodes)")
            ax.set_ylabel("clusters")
            ax.set_yscale("log")
        _tidy(ax)
        return fig

    def sizes_caption(self) -> str:
        s = self.sizes
        empty = int((s == 0).sum())
        return (
            f"{self.k} clusters over {self.n:,} nodes: smallest {s.min():,}, median {int(np.median(s)):,}, largest {s.max():,} "
            f"({s.max() / max(self.n, 1):.1%} of the nodes){f'; {empty} empty' if empty else ''}."
        )

    # ---- confusion
    def _confusion(self):
        from scipy.optimize import linear_sum_assignment

        y = np.asarray(self.graph.labels, dtype=np.int64)
        mask = y >= 0
        n_cls = max(int(y[mask].max()) + 1 if mask.any() else 0, len(self.graph.label_classes))
        pred = np.asarray(self.labels, dtype=np.int64)[mask]
        cm = np.bincount(y[mask] * self.k + pred, minlength=n_cls * self.k).reshape(n_cls, self.k)
        rows, cols = linear_sum_assignment(-cm)
        matched = [int(c) for _, c in sorted(zip(rows, cols))]
        rest = [int(c) for c in np.argsort(-cm.sum(0), kind="stable") if c not in set(matched)]
        order = matched + rest
        self.class_to_cluster = {int(r): int(c) for r, c in zip(rows, cols)}
        return cm, order, int(mask.sum())

    def class_colors(self, n_cls: int) -> list:
        """A class takes the colour of the cluster matched to it (same colour = agreement)."""
        self._confusion()
        extra = iter(_palette(n_cls + self.k)[self.k:])
        return [self.colors[self.class_to_cluster[i]] if i in self.class_to_cluster else next(extra) for i in range(n_cls)]

    def plot_confusion(self):
        cm, order, _ = self._confusion()
        n_cls = cm.shape[0]
        class_rows = np.arange(n_cls)
        if n_cls > MAX_CLUSTERS_DRAWN:
            class_rows = np.sort(np.argsort(-cm.sum(1), kind="stable")[:MAX_CLUSTERS_DRAWN])
        cols = order[:MAX_CLUSTERS_DRAWN]
        sub = cm[np.ix_(class_rows, cols)]
        frac = sub / np.maximum(cm[class_rows].sum(1, keepdims=True), 1)
        w = min(12, 3.2 + 0.42 * len(cols))
        h = min(11, 2.2 + 0.36 * len(class_rows))
        names = [_short(str(v)) for v in self.graph.label_classes] or [str(i) for i in range(n_cls)]
        names += [str(i) for i in range(len(names), n_cls)]
        ylab = max((len(names[i]) for i in class_rows), default=2)
        fig, ax = _figure(max(w, 6), max(h, 3.4), left=0.55 + 0.065 * ylab, right=1.0, bottom=0.7, top=0.2)
        im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_yticks(np.arange(len(class_rows)), [names[i] for i in class_rows], fontsize=8)
        ax.set_xticks(np.arange(len(cols)), [str(c) for c in cols], fontsize=8)
        ax.set_xlabel("cluster (matched to classes first)")
        ax.set_ylabel("true class")
        if sub.size <= 600:
            for i in range(sub.shape[0]):
                for j in range(sub.shape[1]):
                    if sub[i, j]:
                        ax.text(j, i, f"{sub[i, j]:,}", ha="center", va="center", fontsize=7, color="white" if frac[i, j] > 0.55 else "#222")
        cb = fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02)
        cb.set_label("share of the class", fontsize=8)
        cb.ax.tick_params(labelsize=7)
        return fig

    def confusion_caption(self) -> str:
        cm, order, n_lab = self._confusion()
        matched = sum(cm[i, c] for i, c in enumerate(order[: cm.shape[0]]) if i < cm.shape[0])
        acc = self.metrics.get("acc")
        parts = [f"{n_lab:,} labelled nodes, {cm.shape[0]} classes x {self.k} clusters; counts in the cells, colour = share of the class (row)."]
        parts.append("Columns: the cluster matched to each class by the Hungarian assignment, then the unmatched clusters.")
        if isinstance(acc, float):
            parts.append(f"Matched diagonal: {matched:,} nodes (ACC {acc:.4f}).")
        if cm.shape[0] > MAX_CLUSTERS_DRAWN or self.k > MAX_CLUSTERS_DRAWN:
            parts.append(f"Only the {MAX_CLUSTERS_DRAWN} largest classes / first {MAX_CLUSTERS_DRAWN} clusters are drawn.")
        return " ".join(parts)

    # ---- projection
    def plot_projection(self):
        from .stages.common import load_embeddings

        if "precompute" not in self.results or "train" not in self.results:
            return None
        emb = load_embeddings(self.results["precompute"], self.results["train"])
        n = emb.shape[0]
        rng = np.random.default_rng(0)
        idx = np.sort(rng.choice(n, size=MAX_PROJECTION_NODES, replace=False)) if n > MAX_PROJECTION_NODES else np.arange(n)
        X = np.asarray(emb[idx], dtype=np.float32).reshape(len(idx), -1)
        normalize = bool(getattr(getattr(self.cfg, "cluster", None), "normalize", True))
        if normalize:
            X /= np.maximum(np.sqrt(np.einsum("ij,ij->i", X, X)), 1e-12)[:, None]
        xy, ratio = _pca2(X)
        self._proj_info = {"sampled": len(idx), "of": n, "ratio": ratio, "normalized": normalize, "dim": X.shape[1]}
        lab = np.asarray(self.labels, dtype=np.int64)[idx]
        panels = [("by cluster", lab, self.colors, [str(i) for i in range(self.k)])]
        if self.has_labels:
            y = np.asarray(self.graph.labels, dtype=np.int64)[idx]
            n_cls = max(int(y.max()) + 1 if y.size else 0, len(self.graph.label_classes), 1)
            names = [_short(str(v), 14) for v in self.graph.label_classes] + [str(i) for i in range(len(self.graph.label_classes), n_cls)]
            panels.append(("by true class", y, self.class_colors(n_cls), names))
        fig, axes = _figure(12 if len(panels) == 2 else 7, 5.4, ncols=len(panels), left=0.7, right=1.2, bottom=0.6, top=0.35, wspace=0.45)
        axes = np.atleast_1d(axes)
        size = float(np.clip(20000 / max(len(idx), 1), 1.5, 14))
        for ax, (title, codes, colors, names) in zip(axes, panels):
            cols = np.array([colors[c] if c >= 0 else (0.75, 0.75, 0.75, 1.0) for c in codes])
            ax.scatter(xy[:, 0], xy[:, 1], c=cols, s=size, linewidths=0, alpha=0.8, rasterized=True)
            ax.set_title(f"coloured {title}", fontsize=11)
            ax.set_xlabel(f"PC1 ({ratio[0]:.1%} of variance)", fontsize=9)
            ax.set_ylabel(f"PC2 ({ratio[1]:.1%})", fontsize=9)
            ax.tick_params(labelsize=8)
            present = np.unique(codes[codes >= 0])
            if len(present) <= 12:
                from matplotlib.lines import Line2D

                handles = [Line2D([], [], marker="o", ls="", color=colors[c], markersize=5, label=names[c] if c < len(names) else str(c)) for c in present]
                ax.legend(handles=handles, fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5), handletextpad=0.2, markerscale=1.3)
            _tidy(ax)
        return fig

    def projection_caption(self) -> str:
        i = self._proj_info
        if not i:
            return ""
        sample = f"all {i['of']:,} nodes" if i["sampled"] == i["of"] else f"a random sample of {i['sampled']:,} of {i['of']:,} nodes"
        space = "L2-normalised embeddings (the space KMeans clusters)" if i["normalized"] else "embeddings"
        text = f"First two principal components of the {i['dim']}-dimensional {space}; {sample}."
        if self.has_labels:
            text += " Each true class is drawn in the colour of the cluster matched to it (see the confusion matrix), so matching colours mean agreement."
        return text

    # ---- cluster graph
    def share(self) -> np.ndarray:
        """k x k: share of cluster i's edge-endpoint weight that lands in cluster j (rows sum to 1)."""
        if self._share is None:
            k = self.k
            W = np.zeros((k, k))
            if self.cg is not None and len(self.cg):
                np.add.at(W, (self.cg["src"].to_numpy(), self.cg["dst"].to_numpy()), self.cg["weight"].to_numpy())
            M = W + W.T  # edge ends: an internal edge counts for both of its ends
            self._share = M / np.maximum(M.sum(1, keepdims=True), 1e-300)
        return self._share

    def plot_cluster_graph(self):
        if self.cg is None:
            return None
        share = self.share()
        keep = np.sort(np.argsort(-self.sizes, kind="stable")[:MAX_CLUSTERS_DRAWN])
        S = share[np.ix_(keep, keep)]
        m = len(keep)
        fig, (ax1, ax2) = _figure(12, 5.8, ncols=2, width_ratios=(1.15, 1), left=0.7, right=0.1, bottom=0.6, top=0.35, wspace=0.12)
        im = ax1.imshow(S, cmap="viridis", vmin=0, vmax=1)
        ticks = np.arange(m)
        fs = 8 if m <= 20 else 6
        ax1.set_xticks(ticks, [str(c) for c in keep], fontsize=fs)
        ax1.set_yticks(ticks, [str(c) for c in keep], fontsize=fs)
        ax1.set_xlabel("to cluster")
        ax1.set_ylabel("from cluster")
        ax1.set_title("share of each cluster's edge weight", fontsize=10)
        if m <= 15:
            for i in range(m):
                for j in range(m):
                    ax1.text(j, i, f"{S[i, j]:.0%}" if S[i, j] >= 0.005 else "", ha="center", va="center", fontsize=7, color="black" if S[i, j] > 0.6 else "white")
        cb = fig.colorbar(im, ax=ax1, fraction=0.04, pad=0.02)
        cb.ax.tick_params(labelsize=7)
        # node-link drawing: clusters on a circle, area ~ size, width ~ inter-cluster share
        ang = 2 * np.pi * np.arange(m) / m + np.pi / 2
        pos = np.c_[np.cos(ang), np.sin(ang)]
        sym = (S + S.T) / 2
        np.fill_diagonal(sym, 0)
        iu = np.triu_indices(m, 1)
        wts = sym[iu]
        if wts.size and wts.max() > 0:
            top = np.argsort(-wts)[: 3 * m]
            for t in top[::-1]:
                w = wts[t] / wts.max()
                if w < 0.02:
                    continue
                a, b = iu[0][t], iu[1][t]
                ax2.plot(*pos[[a, b]].T, color="0.3", lw=0.4 + 5 * w, alpha=0.25 + 0.6 * w, zorder=1, solid_capstyle="round")
        sizes = self.sizes[keep].astype(float)
        area = 80 + 1400 * sizes / max(sizes.max(), 1)
        ax2.scatter(pos[:, 0], pos[:, 1], s=area, c=[self.colors[c] for c in keep], edgecolors="white", linewidths=1.2, zorder=2)
        for (x, y), c, inner in zip(pos, keep, np.diag(S)):
            ax2.annotate(f"{c}\n{inner:.0%}" if m <= 20 else str(c), (x * 1.17, y * 1.17), ha="center", va="center", fontsize=7 if m <= 20 else 6)
        ax2.set_xlim(-1.35, 1.35)
        ax2.set_ylim(-1.35, 1.35)
        ax2.set_aspect("equal")
        ax2.axis("off")
        ax2.set_title("clusters (area = size; line = shared edges; % = internal)", fontsize=10)
        return fig

    def cluster_graph_caption(self) -> str:
        if self.cg is None:
            return ""
        inner = np.diag(self.share())
        frac = self.metrics.get("cluster_graph_internal_weight_fraction")
        text = (
            "Row i: where the edges of cluster i's nodes go (each internal edge counts for both of its ends); "
            f"the diagonal is the internal share (median {np.median(inner):.0%})."
        )
        if isinstance(frac, float):
            text += f" {frac:.1%} of the total edge weight is inside clusters."
        if self.k > MAX_CLUSTERS_DRAWN:
            text += f" The {MAX_CLUSTERS_DRAWN} largest of {self.k} clusters are drawn."
        return text

    # ---- training
    def plot_training(self):
        h = self.history
        fig, ax = _figure(10, 3.3, left=0.8, right=1.8, bottom=0.6)
        for comp, grp in h.groupby("component", sort=False):
            grp = grp.sort_values("epoch")
            ax.plot(grp["epoch"], grp["value"], lw=2.2 if comp == "loss" else 1.2, label=str(comp), marker="o" if len(grp) <= 30 else None, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend(frameon=False, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
        _tidy(ax)
        return fig

    # ---- table
    def clusters_table(self) -> str:
        inner = np.diag(self.share()) if self.cg is not None else np.full(self.k, np.nan)
        feats = {}
        if self.cf is not None:
            for row in self.cf.itertuples():
                feats[int(row.cluster)] = ", ".join(f"{html.escape(_short(str(f), 24))} <span class=dim>({s:+.1f})</span>" for f, s in list(zip(row.top_features, row.top_scores))[:5])
        reps = {}
        if self.reps is not None and len(self.reps):
            for cl, grp in self.reps.sort_values(["cluster", "rank"]).groupby("cluster"):
                reps[int(cl)] = ", ".join(html.escape(_short(str(k), 20)) for k in grp["key"].head(3))
        label_note = ""
        majority: dict[int, str] = {}
        if self.has_labels:
            cm, _, _ = self._confusion()
            names = [str(v) for v in self.graph.label_classes] or [str(i) for i in range(cm.shape[0])]
            names += [str(i) for i in range(len(names), cm.shape[0])]
            for c in range(self.k):
                col = cm[:, c]
                if col.sum():
                    majority[c] = f"{html.escape(_short(names[int(col.argmax())], 22))} <span class=dim>({col.max() / col.sum():.0%})</span>"
            label_note = "<th>majority class</th>"
        order = np.argsort(-self.sizes, kind="stable")[:MAX_TABLE_CLUSTERS]
        rows = []
        for c in order:
            sw = f'<span class="swatch" style="background:{_hex(self.colors[c])}"></span>'
            cells = [f"{sw}{c}", f"{self.sizes[c]:,}", f"{self.sizes[c] / max(self.n, 1):.1%}", "" if np.isnan(inner[c]) else f"{inner[c]:.0%}"]
            if self.has_labels:
                cells.append(majority.get(int(c), ""))
            cells += [feats.get(int(c), ""), reps.get(int(c), "")]
            rows.append("<tr>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
        more = f'<p class="note">{self.k - MAX_TABLE_CLUSTERS} smaller clusters not listed.</p>' if self.k > MAX_TABLE_CLUSTERS else ""
        head = f"<tr><th>cluster</th><th>nodes</th><th>share</th><th>internal</th>{label_note}<th>most distinctive features (z)</th><th>representatives</th></tr>"
        return f'<table class="clusters">{head}{"".join(rows)}</table>{more}'


# ------------------------------------------------------------------------------------------ html
_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1d2330;background:#f5f6f8;margin:0}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:26px;margin:0 0 4px} h2{font-size:19px;margin:0 0 12px;border-bottom:2px solid #e3e6eb;padding-bottom:6px}
.sub{color:#5a6270;font-size:14px;margin-bottom:18px}
section{background:#fff;border:1px solid #e3e6eb;border-radius:8px;padding:18px 20px;margin:16px 0}
table{border-collapse:collapse;font-size:14px} td,th{padding:5px 12px;text-align:left;border-bottom:1px solid #eceef2;vertical-align:top}
th{background:#f0f2f5;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:18px 28px;align-items:flex-start} .grid table{min-width:300px}
.kv td:first-child{color:#5a6270;white-space:nowrap}
.badge{display:inline-block;padding:1px 9px;border-radius:10px;font-size:12px;font-weight:600}
.computed{background:#fff1cc;color:#7a5300} .cached{background:#d9f2e1;color:#17643a}
.pass{background:#d9f2e1;color:#17643a} .fail{background:#fde0e0;color:#8a1f1f}
img{max-width:100%;height:auto;display:block} .caption{color:#5a6270;font-size:13px;margin:6px 0 0}
.note{color:#8a5a00;font-size:13px} .dim{color:#8a919c} code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:6px;vertical-align:-1px}
table.clusters td{font-size:13px} pre{font-size:12px;background:#f7f8fa;padding:10px;overflow:auto}
"""


def _page(data: _Data, run: dict[str, Any], sections: list[str], seconds: float, import_seconds: float = 0.0) -> str:
    cfg = data.cfg
    name = getattr(cfg, "name", "") or "run"
    method = getattr(getattr(cfg, "method", None), "name", "") or data.results["train"].summary.get("method", "")
    params = getattr(getattr(cfg, "method", None), "params", None) or {}
    m = data.graph.manifest
    graph_rows = [
        ("nodes", f"{data.n:,}"),
        ("edges", f"{data.graph.n_edges:,} ({'directed' if data.graph.directed else 'undirected'}{', weighted' if data.graph.weighted else ''})"),
        ("features", f"{data.graph.n_features:,}"),
        ("labels", f"{m.get('n_classes') or 0} classes, {m.get('n_labelled', 0) or 0:,} labelled nodes" if data.has_labels else "none"),
        ("source", html.escape(_source_text(m, cfg))),
        ("fingerprint", f'<span class="mono">{html.escape(str(data.graph.fingerprint)[:16])}</span>'),
    ]
    run_rows = [
        ("method", f"{html.escape(method)} <span class=dim>{html.escape(', '.join(f'{k}={v}' for k, v in params.items()))}</span>"),
        ("clusters", f"{data.k}"),
    ]
    if run.get("run_id"):
        run_rows.append(("MLflow run", f'<span class="mono">{html.escape(run["run_id"])}</span> <span class=dim>(experiment {html.escape(str(run.get("experiment_id", "")))})</span>'))
    if run.get("model_version"):
        run_rows.append(("model", f"{html.escape(str(run.get('model_name')))} version {html.escape(str(run['model_version']))} <span class=dim>({html.escape(str(run.get('model_status')))})</span>"))
    if run.get("gate_passed") is not None:
        badge = '<span class="badge pass">passed</span>' if run["gate_passed"] else '<span class="badge fail">failed</span>'
        run_rows.append(("gate", f"{badge} <span class=dim>{html.escape(str(run.get('gate_reason') or ''))}</span>"))
        moved = "moved to this version" if run.get("alias_moved") else "not moved"
        prev = f" (was version {run['alias_previous']})" if run.get("alias_previous") else ""
        run_rows.append(("alias", f"'{html.escape(str(run.get('alias')))}' {moved}{html.escape(prev)}"))
    overview = f'<div class="grid"><table class="kv">{_kv(run_rows)}</table><table class="kv">{_kv(graph_rows)}</table></div>'
    created = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<meta name=viewport content='width=device-width, initial-scale=1'><title>agcpipe report: {html.escape(name)}</title>"
        f"<style>{_CSS}</style></head><body><main>"
        f"<h1>agcpipe run report: {html.escape(name)}</h1>"
        f'<div class="sub">{html.escape(method)} on {data.n:,} nodes, {data.k} clusters &middot; written {created} in {seconds:.2f} s{f" (+ {import_seconds:.2f} s importing matplotlib)" if import_seconds >= 0.05 else ""}</div>'
        f"{_section('Run', overview, 'run')}{''.join(sections)}"
        "</main></body></html>\n"
    )


def _metrics_table(metrics: dict[str, Any]) -> str:
    tables, seen = [], set()
    for group, keys in _METRIC_GROUPS:
        rows = [(k, metrics[k]) for k in keys if k in metrics]
        seen.update(keys)
        if rows:
            tables.append(f"<table><tr><th colspan=2>{group}</th></tr>{''.join(f'<tr><td>{k}</td><td class=num>{_fmt(v)}</td></tr>' for k, v in rows)}</table>")
    other = [(k, v) for k, v in metrics.items() if k not in seen and isinstance(v, (int, float, str))]
    if other:
        tables.append(f"<table><tr><th colspan=2>other</th></tr>{''.join(f'<tr><td>{html.escape(k)}</td><td class=num>{_fmt(v)}</td></tr>' for k, v in other)}</table>")
    return f'<div class="grid">{"".join(tables)}</div>'


def _stages_table(results: dict[str, StageResult]) -> str:
    rows = []
    total = 0.0
    for r in results.values():
        total += r.seconds
        rows.append(
            f"<tr><td>{html.escape(r.stage)}</td><td><span class='badge {html.escape(r.status)}'>{html.escape(r.status)}</span></td>"
            f"<td class=num>{r.seconds:.2f}</td><td class=mono>{html.escape(r.key)}</td></tr>"
        )
    rows.append(f"<tr><td><b>total</b></td><td></td><td class=num><b>{total:.2f}</b></td><td class=dim>track: this report is written during it</td></tr>")
    return f"<table><tr><th>stage</th><th>cache</th><th>seconds</th><th>key</th></tr>{''.join(rows)}</table>"


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def _kv(rows: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return html.escape(str(v))
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4f}"


def _source_text(manifest: dict[str, Any], cfg: Any) -> str:
    src = getattr(cfg, "source", None)
    if src is not None:
        t = getattr(src, "type", "")
        if t == "planetoid":
            return f"planetoid {src.name}"
        if t == "synthetic":
            return f"synthetic SBM ({src.n_communities} communities, seed {src.seed})"
        if t == "tables":
            return f"tables {Path(src.edges).name} / {Path(src.nodes).name}"
        if t == "npz":
            return f"npz {Path(src.path).name}"
    s = manifest.get("source")
    return str(s.get("type", "")) if isinstance(s, dict) else ""


def _short(s: str, n: int = 18) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


# ------------------------------------------------------------------------------------------ drawing
def _figure(w: float, h: float, ncols: int = 1, width_ratios=None, *, left: float = 0.75, right: float = 0.25, bottom: float = 0.6, top: float = 0.35, wspace: float = 0.3):
    """A figure with fixed margins in inches (constrained layout costs ~0.2 s per figure)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI)
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h, wspace=wspace)
    if ncols == 1:
        return fig, fig.add_subplot()
    axes = fig.subplots(1, ncols, gridspec_kw={"width_ratios": width_ratios} if width_ratios else None)
    return fig, axes


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


def _tidy(ax) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _palette(k: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    if k <= 10:
        return [colormaps["tab10"](i) for i in range(k)]
    if k <= 20:
        return [colormaps["tab20"](i) for i in range(k)]
    cmap = colormaps["turbo"]
    golden = (np.arange(k) * 0.618033988749895) % 1.0  # neighbours get distant hues
    return [cmap(0.05 + 0.9 * g) for g in golden]


def _hex(c) -> str:
    return "#" + "".join(f"{int(round(255 * x)):02x}" for x in c[:3])


def _pca2(X: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """First two principal components by a randomised range finder (O(n d), exact enough for a plot)."""
    X = X - X.mean(0, keepdims=True)
    n, d = X.shape
    total = float(np.einsum("ij,ij->", X, X, dtype=np.float64)) or 1.0
    if d <= 2:
        xy = np.zeros((n, 2), dtype=np.float32)
        xy[:, :d] = X
        var = (xy.astype(np.float64) ** 2).sum(0) / total
        return xy, (float(var[0]), float(var[1]))
    rng = np.random.default_rng(0)
    Q = _orth(X @ rng.standard_normal((d, min(d, 12))).astype(np.float32))
    for _ in range(2):
        Q = _orth(X @ (X.T @ Q))
    B = (Q.T @ X).astype(np.float64)  # q x d: X ~ Q B
    w, V = np.linalg.eigh(B @ B.T)  # q x q: the top eigenvectors give B's top right singular vectors
    top = np.argsort(-w)[:2]
    comps = (V[:, top].T @ B) / np.sqrt(np.maximum(w[top], 1e-300))[:, None]
    xy = X @ comps.T.astype(np.float32)
    ratio = np.maximum(w[top], 0) / total
    return xy, (float(ratio[0]), float(ratio[1]))


def _orth(Y: np.ndarray) -> np.ndarray:
    """Orthonormal basis of Y's columns through the eigen-decomposition of the small Gram matrix
    (no LAPACK QR on the tall matrix: it is slow next to torch's thread pool)."""
    w, V = np.linalg.eigh((Y.T @ Y).astype(np.float64))
    keep = w > max(w.max(), 1e-300) * 1e-9
    return (Y @ (V[:, keep] / np.sqrt(w[keep])).astype(np.float32)).astype(np.float32)


def write_run_report(cfg: Any, results: dict[str, StageResult], run: dict[str, Any]) -> Path:
    """Build the report of one run as a ``report`` store artifact (keyed on the run's stage keys and
    run id: timings and cache status are per run) and return its folder."""
    from .settings import store_root
    from .store import Store, stage_key

    store = Store(store_root(cfg.store))
    key = stage_key("report", ("agcpipe.report",), {"stages": {s: r.key for s, r in results.items()}, "run_id": run.get("run_id")})
    if store.get("report", key) is None:
        info: dict[str, Any] = {"inputs": {s: r.key for s, r in results.items()}, "run_id": run.get("run_id")}
        with store.build("report", key, info) as tmp:
            info["summary"] = build_report(tmp, results, cfg=cfg, run=run)
    return store.path("report", key)
