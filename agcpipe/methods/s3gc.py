"""S3GC: scalable self-supervised graph clustering (Devvrit et al., NeurIPS 2022), then KMeans.

The encoder reads two precomputed matrices (precompute stage, :mod:`agcpipe.ops.propagate`) and a learned
per-node table ``I`` (N x h):

    ax = S X                       (op ``ax``,  S = D^-1/2 (A + I) D^-1/2)
    sx = PPR diffusion of X        (op ``ppr``: Z_0 = X, Z_{k+1} = (1 - alpha) S Z_k + alpha X, K steps)
    h_v = normalize( f(ax_v) + g(sx_v) + I_v )

``scale``: ``small`` -- ``f``, ``g`` linear; ``medium`` / ``large`` -- ``Linear -> PReLU -> Linear`` each
(``large`` also keeps ``I`` as a sparse embedding updated by SparseAdam); ``auto`` picks small below
50,000 nodes, medium below 3M, else large (the paper's / PyAGC's split).

Contrastive loss (SimCLR-style, as PyAGC's S3GC): for every start node ``v`` of a batch, ``walks_per_node``
uniform random walks of ``walk_length`` steps (:class:`~agcpipe.sampling.walks.RandomWalkSampler`) give
windows ``[v, c_1 .. c_{C-1}]`` of positives; the same number of "walks" of uniform random nodes give the
negatives ``r``; per window

    pos = logsumexp_c h_v . h_c,   neg = logsumexp_r h_v . h_r,
    L = -mean_windows exp(pos - logaddexp(pos, neg)) = -mean_windows sigmoid(pos - neg)

(:func:`window_logits`). Each step embeds only the unique nodes of its walks.

Paper / PyAGC settings (defaults): hidden 256, walks of 3 nodes (``walk_length`` 2 steps, window 3),
10 walks per node, one negative walk, PPR alpha 0.2 with K = 2 (Cora: 3), Adam lr 0.01, 200 epochs,
early stopping with patience 20 (best epoch kept), batches of 512 start nodes (Cora: the whole graph).
The diffusion is the APPNP power form of :mod:`agcpipe.ops.propagate` (its last term keeps weight
``(1 - alpha)^K`` where PyAGC truncates the series); features are the preprocessed raw features.

* **full batch** (``train.mode: auto`` up to 50,000 nodes): every node is a start node, one step per
  epoch. Memory: ``8 N d`` (ax, sx) ``+ 16 N h`` (I and Adam's moments; + ``4 N h`` dense gradient)
  ``+ 4 U (2 d + 3 h)`` for the ``U <= N`` embedded nodes, plus ``~100 W L`` for ``W = N walks_per_node``
  walks.
* **mini-batch**: batches of ``train.batch_size`` start nodes. Memory: the table and its optimizer state
  (``12 N h`` bytes: I and two moments; sparse gradients) plus per step ``4 U (2 d + 3 h)`` for the
  ``U <= B walks_per_node (2 L + 1)`` unique nodes; ``ax`` / ``sx`` are read row by row from the
  memory-mapped precomputed files. The node table dominates at scale: 1M nodes x 256 = 1 GiB, 3 GiB
  with SparseAdam's moments.

**Assign on another graph**: ``f`` and ``g`` apply to the new graph's own ``ax`` / ``sx``; ``I`` is
transductive -- nodes are matched to training nodes by key, a new node gets the mean ``I`` of its
embedded neighbours (``unseen_hops`` rounds, :class:`~agcpipe.methods.node2vec.TransductiveTable`, as
Node2Vec), a node with no path to a known node the mean ``I`` (so its features alone decide);
``unseen: error`` refuses graphs with unseen nodes.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from .base import MethodContext
from .node2vec import SPARSE_ABOVE_NODES, TransductiveTable, walk_pair_batches
from .registry import register
from .trainable import TRAINABLE_CODE, TrainableMethod, TrainableParams, TrainRun

#: ``scale: auto`` boundaries (PyAGC): small below, medium up to, large above
SMALL_BELOW, MEDIUM_BELOW = 50_000, 3_000_000
#: ``train.mode: auto`` trains full-batch (every node a start node per step) only up to this many nodes
FULL_BATCH_MAX_NODES = SMALL_BELOW


class S3GCParams(TrainableParams):
    hidden: int = Field(256, ge=1, description="embedding size")
    scale: Literal["auto", "small", "medium", "large"] = Field("auto", description="encoder size (see the module docstring)")
    K: int = Field(2, ge=1, description="PPR diffusion steps of sx")
    alpha: float = Field(0.2, gt=0, le=1, description="PPR teleport probability of sx")
    walk_length: int = Field(2, ge=1, description="steps per random walk (PyAGC's walk_length 3 = 3 nodes = 2 steps)")
    context_size: int = Field(3, ge=2, description="window size (start + positives), at most walk_length + 1")
    walks_per_node: int = Field(10, ge=1)
    num_negative: int = Field(1, ge=1, description="negative walks per positive walk")
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="on f and g (the node table takes none)")
    epochs: int = Field(200, ge=1)
    sparse: bool | None = Field(
        None, description="node table with sparse gradients + SparseAdam; None = when scale is large or above 100,000 nodes"
    )
    unseen: Literal["neighbors", "error"] = Field("neighbors", description="assign: how to embed nodes not in the training graph")
    unseen_hops: int = Field(3, ge=1, description="assign: rounds of neighbour averaging of I for unseen nodes")


@register(
    "s3gc",
    family="decoupled",
    params=S3GCParams,
    description="S3GC: f(SX) + g(PPR X) + node embeddings, random-walk contrastive loss, then KMeans (Devvrit et al., 2022)",
    code=(*TRAINABLE_CODE, "agcpipe.methods.node2vec"),
)
class S3GC(TransductiveTable, TrainableMethod):
    train_defaults = {"batch_size": 512, "fanout": [], "patience": 20}

    def __init__(self, params: dict[str, Any]):
        super().__init__(params)
        if self.params["context_size"] > self.params["walk_length"] + 1:
            from ..errors import ConfigError

            raise ConfigError(
                f"s3gc: context_size {self.params['context_size']} is longer than the walks "
                f"({self.params['walk_length'] + 1} nodes); lower method.params.context_size or raise walk_length"
            )

    def precompute_ops(self) -> list[dict[str, Any]]:
        return [{"name": "ax", "op": "ax"}, {"name": "sx", "op": "ppr", "K": self.params["K"], "alpha": self.params["alpha"]}]

    def input_dim(self, ctx: MethodContext) -> int:
        return int(ctx.features["ax"].shape[1])

    def plan(self, train_cfg, n_nodes: int):
        from ..config import TrainConfig

        cfg = train_cfg or TrainConfig()
        if cfg.mode == "auto" and n_nodes > min(FULL_BATCH_MAX_NODES, cfg.max_full_batch_nodes):
            cfg = cfg.model_copy(update={"mode": "minibatch"})
        return super().plan(cfg, n_nodes)

    def scale(self, n_nodes: int) -> str:
        s = self.params["scale"]
        if s != "auto":
            return s
        return "small" if n_nodes < SMALL_BELOW else "medium" if n_nodes < MEDIUM_BELOW else "large"

    def sparse(self, n_nodes: int) -> bool:
        s = self.params["sparse"]
        if s is not None:
            return bool(s)
        return self.scale(n_nodes) == "large" or n_nodes > SPARSE_ABOVE_NODES

    # ------------------------------------------------------------------------------ model
    def build_model(self, in_dim: int, ctx: MethodContext, n_nodes: int | None = None, scale: str | None = None):
        import torch
        import torch.nn.functional as F
        from torch import nn

        n = ctx.graph.n_nodes if n_nodes is None else n_nodes
        scale = scale or self.scale(n)
        h = self.params["hidden"]

        def branch() -> nn.Module:
            layers = [nn.Linear(in_dim, h)] if scale == "small" else [nn.Linear(in_dim, h), nn.PReLU(h), nn.Linear(h, h)]
            for m in layers:
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)
            return nn.Sequential(*layers)

        class S3GCModel(nn.Module):
            def __init__(self, sparse: bool):
                super().__init__()
                self.f, self.g = branch(), branch()
                self.iden = nn.Embedding(n, h, sparse=sparse)
                nn.init.normal_(self.iden.weight)

            def forward(self, ax: torch.Tensor, sx: torch.Tensor, iden: torch.Tensor) -> torch.Tensor:
                return F.normalize(self.f(ax) + self.g(sx) + iden, p=2, dim=1)

        model = S3GCModel(self.sparse(n))
        model.scale = scale
        return model

    def model_spec(self, in_dim: int, ctx: MethodContext) -> dict[str, Any]:
        return {**super().model_spec(in_dim, ctx), "scale": self.scale(ctx.graph.n_nodes)}

    def load_model(self, ctx: MethodContext):
        from ..train.checkpoint import load_weights

        spec = self.load_spec(ctx.state_dir)
        model = self.build_model(int(spec["in_dim"]), ctx, n_nodes=int(spec["n_nodes"]), scale=spec["scale"])
        model.load_state_dict(load_weights(ctx.state_dir, "model"))
        return model.to(ctx.device).eval()

    def configure_optimizers(self, model):
        import torch

        p = self.params
        dense = [prm for name, prm in model.named_parameters() if not name.startswith("iden.")]
        if model.iden.sparse:
            self.manual_optimization = True  # two optimizers, stepped in loss()
            self._optimizers = [
                torch.optim.Adam(dense, lr=p["lr"], weight_decay=p["weight_decay"]),
                torch.optim.SparseAdam(list(model.iden.parameters()), lr=p["lr"]),
            ]
        else:
            self.manual_optimization = False
            self._optimizers = [
                torch.optim.Adam(
                    [{"params": dense, "weight_decay": p["weight_decay"]}, {"params": list(model.iden.parameters()), "weight_decay": 0.0}],
                    lr=p["lr"],
                )
            ]
        return self._optimizers

    # ------------------------------------------------------------------------------ training
    def batches(self, run: TrainRun):
        return walk_pair_batches(run, self.params)  # uniform walks (p = q = 1)

    def loss(self, model, batch, run: TrainRun):
        import torch

        from ..sampling.neighbor import gather_rows
        from ..train.engine import LossOutput

        pos_walks, neg_walks = batch
        c = self.params["context_size"]
        uniq = torch.unique(torch.cat([pos_walks.flatten(), neg_walks.flatten()]))
        feats = run.ctx.features
        dev = run.device
        with run.engine.autocast():
            h = model(gather_rows(feats["ax"], uniq).to(dev), gather_rows(feats["sx"], uniq).to(dev), model.iden(uniq.to(dev)))

            n_pos = pos_walks.size(0)
            ipos = torch.searchsorted(uniq, pos_walks).to(dev)
            ineg = torch.searchsorted(uniq, neg_walks).to(dev)
            n_pairs = (ipos.size(0) + ineg.size(0)) * (ipos.size(1) + 1 - c) * (c - 1)
            gram = h @ h.t() if uniq.numel() ** 2 <= n_pairs * h.size(1) else None  # see window_logits
            pos = torch.logsumexp(window_logits(h, ipos, c, gram), dim=-1)  # W x windows
            neg = window_logits(h, ineg, c, gram).view(self.params["num_negative"], n_pos, -1, c - 1)
            neg = torch.logsumexp(neg.permute(1, 2, 0, 3).flatten(2), dim=-1)
            total = -torch.sigmoid(pos - neg).mean()  # = -mean exp(pos - logaddexp(pos, neg))
        if self.manual_optimization:
            dense_opt, sparse_opt = self._optimizers
            sparse_opt.zero_grad(set_to_none=True)
            run.engine.backward(total, dense_opt)
            sparse_opt.step()
            total = total.detach()
        return LossOutput(total, {"pos": pos.mean().detach(), "neg": neg.mean().detach()})

    # ------------------------------------------------------------------------------ embedding
    def embed_model(self, model, ctx: MethodContext) -> np.ndarray:
        """``h`` for every node of ``ctx.graph`` in row blocks: its own ``ax`` / ``sx``, ``I`` matched by key."""
        import torch

        from ..sampling.neighbor import gather_rows

        table = self.table_rows(ctx, model.iden.weight.detach().cpu().numpy())
        n = ctx.graph.n_nodes
        out = np.empty((n, self.params["hidden"]), dtype=np.float32)
        block = max(1, (1 << 24) // max(1, int(ctx.features["ax"].shape[1])))
        with torch.no_grad():
            for s in range(0, n, block):
                idx = torch.arange(s, min(n, s + block))
                ax = gather_rows(ctx.features["ax"], idx).to(ctx.device)
                sx = gather_rows(ctx.features["sx"], idx).to(ctx.device)
                iden = torch.from_numpy(np.ascontiguousarray(table[s : s + block])).to(ctx.device)
                out[s : s + block] = model(ax, sx, iden).float().cpu().numpy()
        return out


def window_logits(h, walks, context_size: int, gram=None):
    """``h_v . h_c`` for every window of every walk: ``W x n_win x (C - 1)``, ``n_win = L + 2 - C``.

    ``walks``: ``W x (L + 1)`` row ids into ``h``; window ``j`` has centre ``walks[:, j]`` and context
    ``walks[:, j + 1 .. j + C - 1]`` (the windows of :func:`~agcpipe.sampling.walks.context_windows`).
    With ``gram = h h^T`` given, the scores are read off it (``U x U`` for ``U`` rows of ``h``: cheaper
    than gathering ``h`` rows when walks revisit few nodes many times, as full-batch epochs do); else one
    elementwise product per context offset, only the needed pairs (S3GC's walks of 3 nodes have a single
    window; a Gram matrix per walk, as Node2Vec's ``window_scores``, runs ~30k tiny ``bmm`` per step).
    """
    import torch

    n_win = walks.size(1) + 1 - context_size
    if n_win < 1:
        raise ValueError(f"context_size {context_size} is longer than the walks ({walks.size(1)} nodes)")
    centre = walks[:, :n_win]
    if gram is not None:
        return torch.stack([gram[centre, walks[:, k : k + n_win]] for k in range(1, context_size)], dim=-1).float()
    hc = h[centre]  # W x n_win x d
    return torch.stack([(hc * h[walks[:, k : k + n_win]]).sum(-1) for k in range(1, context_size)], dim=-1).float()
