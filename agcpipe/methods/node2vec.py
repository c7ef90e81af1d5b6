"""Node2Vec (Grover & Leskovec, KDD 2016): skip-gram on (p, q)-biased random walks, then KMeans.

Our own model (PyG's ``Node2Vec`` needs torch-cluster): an embedding table ``N x dim`` trained with
:class:`~agcpipe.sampling.walks.RandomWalkSampler` walks and skip-gram with negative sampling, as in PyG:
each walk of ``walk_length`` steps gives ``walk_length + 2 - context_size`` windows; in a window the first
node is the centre and the others its context,

    L = mean -log sigma(e_v . e_c)  [context c of v]  +  mean -log(1 - sigma(e_v . e_u))  [u uniform]

with ``num_negative`` random "walks" of uniform nodes per positive walk. Adam on dense gradients for
small graphs (PyAGC's Cora setting), sparse gradients and SparseAdam above 100,000 nodes (only the rows a
batch touches are updated; ``sparse`` forces either). Early stopping on the loss with patience 20, as
PyAGC. Edge weights and node features are not used.

* **mini-batch** (the published protocol, and what ``train.mode: auto`` picks): batches of
  ``train.batch_size`` start nodes, ``walks_per_node`` walks each. Memory: the table and Adam's moments,
  ``12 N dim`` bytes (plus a dense ``4 N dim`` gradient without ``sparse``), plus per step
  ``~ 4 W (L + 1) (dim + L + 1)`` with ``W = 2 B walks_per_node`` walks (positive and negative; their
  embeddings and Gram matrices, see :func:`window_scores`) -- never ``N x N``.
* **full batch** (``train.mode: full``): one step per epoch with every node as a start node (memory per
  step as above with ``B = N``).

**Assign on another graph.** Node2Vec is transductive: it has an embedding for each training node only.
Nodes are matched to training nodes by their original id (``key``); a known node keeps its embedding. A
new node gets the mean embedding of its already-embedded neighbours, repeated ``unseen_hops`` rounds so
that new nodes attached only to new nodes are reached too; nodes still unreached (no path of
``unseen_hops`` edges to a known node) get the mean of all training embeddings and confidence 0.
``unseen: error`` refuses graphs with unseen nodes instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from .base import Clustering, MethodContext
from .registry import register
from .trainable import TRAINABLE_CODE, TrainableMethod, TrainableParams, TrainRun


#: ``sparse: null`` turns sparse gradients on above this many nodes (dense Adam touches every row per step)
SPARSE_ABOVE_NODES = 100_000


class Node2VecParams(TrainableParams):
    dim: int = Field(128, ge=1, description="embedding size")
    walk_length: int = Field(10, ge=1, description="steps per walk")
    context_size: int = Field(10, ge=2, description="window size (centre + context)")
    walks_per_node: int = Field(10, ge=1)
    num_negative: int = Field(1, ge=1, description="negative walks per positive walk")
    p: float = Field(1.0, gt=0, description="return parameter")
    q: float = Field(1.0, gt=0, description="in-out parameter")
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(100, ge=1)
    sparse: bool | None = Field(
        None,
        description="sparse gradients + SparseAdam (only the rows a batch touches are updated); "
        "False = dense Adam; None = sparse above 100,000 nodes",
    )
    unseen: Literal["neighbors", "error"] = Field("neighbors", description="assign: how to embed nodes not in the training graph")
    unseen_hops: int = Field(3, ge=1, description="assign: rounds of neighbour averaging for unseen nodes")


class TransductiveTable:
    """Mixin for methods with a learned per-node table (Node2Vec's embeddings, S3GC's node embeddings).

    Saves the training nodes' original ids (``keys.parquet``) and the training graph's size and
    fingerprint with the state, and gives :meth:`table_rows`: the table's rows for any graph -- the table
    itself on the training graph, else rows matched by key, new nodes filled from their neighbours (see the
    module docstring; ``unseen`` / ``unseen_hops`` parameters). After a call, ``self._unreached`` is the
    mask of nodes that got the table's mean (None when there were none).
    """

    def fit(self, ctx: MethodContext) -> dict[str, Any]:
        self._graph_keys = ctx.graph.keys()  # the training nodes' original ids, saved with the state
        return super().fit(ctx)

    def model_spec(self, in_dim: int, ctx: MethodContext) -> dict[str, Any]:
        return {**super().model_spec(in_dim, ctx), "n_nodes": ctx.graph.n_nodes, "graph_fingerprint": ctx.graph.fingerprint}

    def save_model(self, state_dir, model, spec, plan) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        super().save_model(state_dir, model, spec, plan)
        pq.write_table(pa.table({"key": self._graph_keys}), Path(state_dir) / "keys.parquet")

    def table_rows(self, ctx: MethodContext, table: np.ndarray) -> np.ndarray:
        """``table`` (training nodes x dim) on ``ctx.graph``: itself on the training graph, else matched by key."""
        spec = self.load_spec(ctx.state_dir)
        self._unreached = None
        if ctx.graph.fingerprint == spec["graph_fingerprint"]:
            return table
        return self._embed_other(ctx, table)

    def _embed_other(self, ctx: MethodContext, table: np.ndarray) -> np.ndarray:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from ..errors import InputError

        g = ctx.graph
        train_keys = pq.read_table(ctx.state_dir / "keys.parquet").column("key").combine_chunks()
        keys = g.keys().combine_chunks()
        if keys.type != train_keys.type:
            keys = keys.cast(train_keys.type)
        idx = pc.index_in(keys, value_set=train_keys).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        known = idx >= 0
        n_unseen = int((~known).sum())
        if n_unseen and self.params["unseen"] == "error":
            first = np.flatnonzero(~known)[:5]
            raise InputError(
                f"{self.name} is transductive and {n_unseen} nodes are not in its training graph",
                file=g.path,
                values=[keys[int(i)].as_py() for i in first],
                hint="train on a graph that contains them, or set method.params.unseen: neighbors",
            )
        emb = np.zeros((g.n_nodes, table.shape[1]), dtype=np.float32)
        emb[known] = table[idx[known]]
        if n_unseen:
            known = _fill_from_neighbors(g, emb, known, self.params["unseen_hops"])
            if not known.all():
                emb[~known] = table.mean(0)
                self._unreached = ~known
        return emb


@register(
    "node2vec",
    family="decoupled",
    params=Node2VecParams,
    description="node2vec random walks + skip-gram with negative sampling, then KMeans (Grover & Leskovec, 2016)",
    code=TRAINABLE_CODE,
)
class Node2Vec(TransductiveTable, TrainableMethod):
    train_defaults = {"batch_size": 128, "fanout": [], "patience": 20}
    auto_full_batch = False  # SGD over walk batches is the method; full batch only when asked for

    def precompute_ops(self) -> list[dict[str, Any]]:
        return []  # structure only

    def input_dim(self, ctx: MethodContext) -> int:
        return 0

    def sparse(self, n_nodes: int) -> bool:
        s = self.params["sparse"]
        return n_nodes > SPARSE_ABOVE_NODES if s is None else bool(s)

    def build_model(self, in_dim: int, ctx: MethodContext):
        import torch

        class Node2VecModel(torch.nn.Module):
            def __init__(self, n: int, dim: int, sparse: bool):
                super().__init__()
                self.embedding = torch.nn.Embedding(n, dim, sparse=sparse)
                torch.nn.init.normal_(self.embedding.weight)  # PyG's reset_parameters

        n = ctx.graph.n_nodes
        return Node2VecModel(n, self.params["dim"], self.sparse(n))

    def configure_optimizers(self, model):
        import torch

        params = list(model.parameters())
        if model.embedding.sparse:
            if self.params["weight_decay"]:
                from ..errors import ConfigError

                raise ConfigError("node2vec: weight_decay needs dense gradients (method.params.sparse: false)")
            return [torch.optim.SparseAdam(params, lr=self.params["lr"])]
        return [torch.optim.Adam(params, lr=self.params["lr"], weight_decay=self.params["weight_decay"])]

    def batches(self, run: TrainRun):
        return walk_pair_batches(run, self.params, p=self.params["p"], q=self.params["q"])

    def loss(self, model, batch, run: TrainRun):
        import torch.nn.functional as F

        from ..train.engine import LossOutput

        pos_walks, neg_walks = batch
        c = self.params["context_size"]
        loss_pos = F.softplus(-window_scores(model.embedding, pos_walks, c)).mean()
        loss_neg = F.softplus(window_scores(model.embedding, neg_walks, c)).mean()
        return LossOutput(loss_pos + loss_neg, {"loss_pos": loss_pos.detach(), "loss_neg": loss_neg.detach()})

    # ------------------------------------------------------------------------------ embedding
    def load_table(self, ctx: MethodContext) -> np.ndarray:
        from ..train.checkpoint import load_weights

        self.load_spec(ctx.state_dir)
        return load_weights(ctx.state_dir, "model")["embedding.weight"].float().numpy()

    def embed(self, ctx: MethodContext) -> np.ndarray:
        """The learned table for the training graph; on another graph, see the module docstring."""
        return self.table_rows(ctx, self.load_table(ctx))

    def assign(self, ctx: MethodContext, embeddings: np.ndarray, centers: np.ndarray, cfg) -> Clustering:
        result = super().assign(ctx, embeddings, centers, cfg)
        unreached = getattr(self, "_unreached", None)
        if unreached is not None:
            result.confidence = np.where(unreached, 0.0, result.confidence).astype(np.float32)
            result.info["unreached"] = int(unreached.sum())
        return result


def window_scores(embedding, walks, context_size: int):
    """Skip-gram scores ``e_v . e_c`` of every (centre, context) pair of every window of every walk.

    The pairs of :func:`~agcpipe.sampling.walks.context_windows` (centre at position ``j``, context at
    ``j + 1 .. j + C - 1``, for each of the ``L + 2 - C`` windows), read off each walk's Gram matrix
    ``H H^T`` (one ``bmm``) after a single embedding lookup per walk position: ``W x (L + 1) x dim``
    gathered instead of ``W x (L + 2 - C) x C x dim`` (about C times less memory traffic, C times fewer
    rows in the sparse gradient), and a backward of two ``bmm``. Returns ``W x ((L + 2 - C) (C - 1))``.
    """
    import torch

    h = embedding(walks)  # W x (L+1) x d
    n_win = walks.size(1) + 1 - context_size
    if n_win < 1:
        raise ValueError(f"context_size {context_size} is longer than the walks ({walks.size(1)} nodes)")
    centre = torch.arange(n_win, device=h.device).repeat_interleave(context_size - 1)
    context = centre + torch.arange(1, context_size, device=h.device).repeat(n_win)
    gram = torch.bmm(h, h.transpose(1, 2))  # W x (L+1) x (L+1)
    return gram[:, centre, context].float()


def _fill_from_neighbors(g, emb: np.ndarray, known: np.ndarray, hops: int) -> np.ndarray:
    """Give unknown nodes the mean embedding of their known neighbours, ``hops`` rounds; returns the new mask.

    Each round touches only the CSR rows of still-unknown nodes (memory ~ their entries + their rows of
    ``emb``).
    """
    import scipy.sparse as sp

    known = known.copy()
    ip = np.asarray(g.indptr, dtype=np.int64)
    for _ in range(hops):
        todo = np.flatnonzero(~known)
        if todo.size == 0:
            break
        counts = np.diff(ip)[todo]
        starts = ip[todo]
        total = int(counts.sum())
        if total == 0:
            break
        pos = np.arange(total) - np.repeat(np.cumsum(counts) - counts - starts, counts)
        nbr = np.asarray(g.indices[pos], dtype=np.int64)
        rows = np.repeat(np.arange(todo.size), counts)
        ok = known[nbr]
        m = sp.csr_matrix((np.ones(int(ok.sum()), dtype=np.float32), (rows[ok], nbr[ok])), shape=(todo.size, g.n_nodes))
        cnt = np.asarray(m.sum(1)).ravel()
        reached = cnt > 0
        if not reached.any():
            break
        sums = m[reached] @ emb
        emb[todo[reached]] = sums / cnt[reached, None]
        known[todo[reached]] = True
    return known


def walk_pair_batches(run: TrainRun, params: dict[str, Any], *, p: float = 1.0, q: float = 1.0):
    """Batches of ``(positive walks, negative walks)`` for skip-gram style losses (Node2Vec, S3GC).

    Each batch of start nodes (the whole graph in full-batch mode) starts ``walks_per_node`` walks of
    ``walk_length`` steps per node (node2vec ``p`` / ``q`` biased) and ``num_negative`` random negative walks
    per positive walk, drawn from the run's generator.
    """
    from ..sampling.neighbor import NodeBatches, map_batches
    from ..sampling.walks import RandomWalkSampler

    g = run.ctx.graph
    walker = RandomWalkSampler(g.indptr, g.indices, p=p, q=q, generator=run.generator)
    n = g.n_nodes
    nodes = NodeBatches(n, n if run.plan.mode == "full" else run.plan.batch_size, run.generator)
    length = params["walk_length"]

    def walks(start):
        start = start.repeat(params["walks_per_node"])
        return walker.walks(start, length), walker.negative_walks(start.repeat(params["num_negative"]), length)

    return map_batches(nodes, walks)
