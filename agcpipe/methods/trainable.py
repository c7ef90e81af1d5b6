"""Base class of every trainable method (decoupled and joint): training, weights, embedding, assignment.

A trainable method subclasses :class:`TrainableMethod`, gives its parameters as a :class:`TrainableParams`
subclass (published defaults; ``lr``, ``weight_decay``, ``epochs`` are common to all) and implements:

* ``build_model(in_dim, ctx) -> nn.Module`` -- the model, with its :class:`~agcpipe.nn.encoders.Encoder`
  as ``model.encoder`` (the default embedding is that encoder's output);
* ``loss(model, batch, run) -> LossOutput`` -- the training loss of one batch (full graph or mini-batch);
* optionally ``batches(run)`` -- what one epoch iterates. Default: full mode -> one full-graph PyG ``Data``
  (``x``, ``edge_index`` GCN-prepared when the encoder is a GCN, ``edge_weight``, ``batch_size = N``);
  mini-batch mode -> PyG's ``NodeLoader`` with :class:`~agcpipe.sampling.neighbor.CSRNeighborSampler`
  sampling ``plan.fanout`` for the encoder's hops (``Data`` with the seeds first, ``batch_size`` seeds;
  an MLP encoder samples nothing: plain node batches over the precomputed features);
* optionally ``configure_optimizers(model)`` (default Adam with ``lr`` / ``weight_decay``),
  ``embed_model(model, ctx)`` (default: the encoder on the graph, full-batch when it fits, else layer-wise
  -- both exact) and ``manual_optimization = True`` with a ``loss`` that steps its own optimizers through
  ``run.engine.backward`` (adversarial methods).

Then register it with ``code=TRAINABLE_CODE`` so that edits to the engine, samplers or encoders retrain::

    @register("mymethod", family="decoupled", params=MyParams, code=TRAINABLE_CODE)
    class MyMethod(TrainableMethod):
        train_defaults = {"epochs": 200, "batch_size": 1024, "fanout": [10, 10], "patience": 0}
        def build_model(self, in_dim, ctx): ...
        def loss(self, model, batch, run): ...

What :meth:`fit` does: resolve the :class:`~agcpipe.train.engine.TrainPlan` from ``ctx.train`` and the
method's defaults, seed everything from ``ctx.seed``, build the model, run the
:class:`~agcpipe.train.engine.Engine` (checkpoints in ``ctx.checkpoint_dir``, history to
``ctx.history_path``), and write ``state/spec.json`` + ``state/model.safetensors``. :meth:`embed` loads
the state and embeds ``ctx.graph`` -- the training graph in the train stage, any graph with the same
feature columns at assign time -- so registered models of trainable methods assign clusters exactly like
non-parametric ones.

Heavy imports (torch, PyG) happen inside the methods: the registry imports every method module when a
config is validated.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from .base import Method, MethodContext
from .registry import Params

#: modules whose source is part of a trainable method's train-stage code version (pass as ``code=``)
TRAINABLE_CODE = ("agcpipe.methods.trainable", "agcpipe.train", "agcpipe.sampling", "agcpipe.nn.encoders")
STATE_FORMAT = "agcpipe-trainable/1"


class EncoderParams(Params):
    """Encoder architecture (see :mod:`agcpipe.nn.encoders`)."""

    type: Literal["gcn", "sage", "gat", "mlp"] = "gcn"
    hidden: int = Field(512, ge=1, description="width of the hidden layers (and of the output unless 'out')")
    layers: int = Field(1, ge=1)
    out: int | None = Field(None, ge=1, description="embedding size (last layer); None = hidden")
    activation: Literal["relu", "prelu", "elu", "selu", "leaky_relu", "tanh", "sigmoid", "identity"] = "prelu"
    last_activation: bool = Field(True, description="norm + activation after the last layer too")
    norm: Literal["none", "batch", "layer"] = "none"
    dropout: float = Field(0.0, ge=0, lt=1)
    heads: int = Field(1, ge=1, description="GAT attention heads (concatenated)")


class TrainableParams(Params):
    """Parameters every trainable method has (subclasses re-declare them with their published defaults)."""

    lr: float = Field(0.001, gt=0, description="learning rate")
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(200, ge=1, description="training epochs (train.epochs overrides)")


@dataclass
class TrainRun:
    """What a method's ``loss`` / ``batches`` see during one training run."""

    method: "TrainableMethod"
    ctx: MethodContext
    plan: Any  # agcpipe.train.engine.TrainPlan
    engine: Any  # agcpipe.train.engine.Engine
    model: Any  # torch.nn.Module
    #: generators (besides ``engine.generator``) whose state a resume must restore
    generators: dict[str, Any] = field(default_factory=dict)

    @property
    def generator(self):
        return self.engine.generator

    @property
    def device(self):
        return self.engine.device

    @cached_property
    def x(self) -> np.ndarray:
        """The precomputed input features (memory-mapped N x d)."""
        return self.ctx.features[self.method.feature_name]

    @property
    def encoder(self):
        return self.model.encoder

    @cached_property
    def full_data(self):
        """The whole graph as one PyG ``Data`` on the device (edges GCN-prepared for a GCN encoder)."""
        return full_graph_data(self.ctx.graph, self.x, self.device, encoder=getattr(self.model, "encoder", None))

    def fanout(self, hops: int | None = None) -> list[int]:
        """``plan.fanout`` sized to ``hops`` (default: the encoder's): cut, or padded with its last entry."""
        hops = self.encoder.num_hops if hops is None else hops
        f = list(self.plan.fanout) or [-1]
        return (f + [f[-1]] * hops)[:hops]

    def neighbor_sampler(self, hops: int | None = None):
        from ..sampling.neighbor import CSRNeighborSampler

        g = self.ctx.graph
        return CSRNeighborSampler(g.indptr, g.indices, self.fanout(hops), generator=self.generator)

    def neighbor_loader(self, hops: int | None = None):
        """PyG ``NodeLoader`` over all nodes with our CSR sampler (shuffled by the engine's generator)."""
        from ..sampling.neighbor import node_loader

        return node_loader(
            self.neighbor_sampler(hops), self.x, batch_size=self.plan.batch_size, generator=self.generator, edge_weight=self.ctx.graph.weights
        )

    def node_batches(self):
        from ..sampling.neighbor import NodeBatches

        return NodeBatches(self.ctx.graph.n_nodes, self.plan.batch_size, self.generator)


def full_graph_data(graph, x: np.ndarray, device, encoder=None):
    """``Data(x, edge_index, edge_weight, batch_size=N)`` of a whole graph; message edges ``j -> i`` per CSR entry.

    ``x`` becomes a sparse tensor when at most 10% of it is non-zero (bag-of-words features).
    Memory: ``4 N d`` (features; ``12 nnz(x)`` when sparse) ``+ 16 nnz`` (edge_index) ``+ 4 nnz``
    (weights), plus ``N`` self-loops for a GCN encoder.
    """
    import torch
    from torch_geometric.data import Data

    n = graph.n_nodes
    ip = np.asarray(graph.indptr, dtype=np.int64)
    rows = torch.repeat_interleave(torch.arange(n), torch.from_numpy(np.diff(ip)))
    edge_index = torch.stack([torch.from_numpy(np.asarray(graph.indices, dtype=np.int64)), rows])
    ew = torch.from_numpy(np.array(graph.weights, dtype=np.float32)) if graph.weights is not None else None
    prepared = False
    if encoder is not None:
        edge_index, ew = encoder.prepare(edge_index, ew, n)
        prepared = encoder.type == "gcn"
    from ..nn.encoders import maybe_sparse

    data = Data(x=maybe_sparse(torch.from_numpy(np.array(x, dtype=np.float32))), edge_index=edge_index, num_nodes=n)
    if ew is not None:
        data.edge_weight = ew
    data.batch_size = n
    data.prepared = prepared
    return data.to(device)


class TrainableMethod(Method):
    """Base of trainable methods (see the module docstring)."""

    seeded_training: ClassVar[bool] = True
    #: defaults of the generic training settings the config leaves null (``train:``)
    train_defaults: ClassVar[dict[str, Any]] = {"batch_size": 1024, "fanout": [10, 10], "patience": 0}
    #: whether ``train.mode: auto`` may pick full-batch (graphs up to ``max_full_batch_nodes``)
    auto_full_batch: ClassVar[bool] = True
    #: the precomputed matrix the model reads
    feature_name: ClassVar[str] = "x"
    #: the method's loss steps its optimizers itself (``run.engine.backward``)
    manual_optimization: ClassVar[bool] = False

    def precompute_ops(self) -> list[dict[str, Any]]:
        return [{"name": self.feature_name, "op": "identity"}]

    # ------------------------------------------------------------------------------ to implement
    def build_model(self, in_dim: int, ctx: MethodContext):
        raise NotImplementedError

    def loss(self, model, batch, run: TrainRun):
        raise NotImplementedError

    # ------------------------------------------------------------------------------ overridable
    def batches(self, run: TrainRun):
        if run.plan.mode == "full":
            return [run.full_data]
        return run.neighbor_loader()

    def configure_optimizers(self, model):
        import torch

        return [torch.optim.Adam(model.parameters(), lr=self.params["lr"], weight_decay=self.params.get("weight_decay", 0.0))]

    def model_spec(self, in_dim: int, ctx: MethodContext) -> dict[str, Any]:
        """What :meth:`load_model` needs besides the weights (JSON); extend in subclasses."""
        return {"in_dim": int(in_dim)}

    # ------------------------------------------------------------------------------ training
    def plan(self, train_cfg, n_nodes: int):
        """The resolved :class:`~agcpipe.train.engine.TrainPlan` for a graph of ``n_nodes`` nodes."""
        from ..config import TrainConfig
        from ..train.engine import resolve_plan

        cfg = train_cfg or TrainConfig()
        mode = cfg.mode
        if mode == "auto":
            mode = "full" if self.auto_full_batch and n_nodes <= cfg.max_full_batch_nodes else "minibatch"
        defaults = {"epochs": self.params["epochs"], **self.train_defaults}
        return resolve_plan(cfg, n_nodes=n_nodes, defaults=defaults, mode=mode)

    def fit(self, ctx: MethodContext) -> dict[str, Any]:
        from ..train.engine import Engine, seed_everything

        plan = self.plan(ctx.train, ctx.graph.n_nodes)
        seed_everything(ctx.seed)
        in_dim = self.input_dim(ctx)
        model = self.build_model(in_dim, ctx)
        engine = Engine.from_context(ctx, plan, desc=f"{self.name} ({plan.mode})")
        run = TrainRun(self, ctx, plan, engine, model)
        batches = self.batches(run)
        optimizers = self.configure_optimizers(model)
        result = engine.fit(
            model,
            optimizers,
            batches,
            lambda batch: self.loss(model, batch, run),
            manual_optimization=self.manual_optimization,
            generators=run.generators,
        )
        self.save_model(ctx.state_dir, model, self.model_spec(in_dim, ctx), plan)
        return {
            "trained": True,
            "plan": plan.to_dict(),
            "n_parameters": int(sum(p.numel() for p in model.parameters())),
            "device": str(engine.device),
            **result.summary(),
        }

    def input_dim(self, ctx: MethodContext) -> int:
        return int(ctx.features[self.feature_name].shape[1])

    # ------------------------------------------------------------------------------ state
    def save_model(self, state_dir: Path, model, spec: dict[str, Any], plan) -> None:
        from ..train.checkpoint import save_weights

        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        weights = save_weights(model.state_dict(), state_dir, "model")
        meta = {"format": STATE_FORMAT, "method": self.name, "params": self.params, "plan": plan.to_dict(), "weights": weights.name, **spec}
        (state_dir / "spec.json").write_text(json.dumps(meta, indent=1))

    def load_spec(self, state_dir: Path) -> dict[str, Any]:
        path = Path(state_dir) / "spec.json"
        spec = json.loads(path.read_text())
        if spec.get("format") != STATE_FORMAT or spec.get("method") != self.name:
            from ..errors import InputError

            raise InputError(f"not the trained state of method '{self.name}' (format {spec.get('format')!r}, method {spec.get('method')!r})", file=path)
        return spec

    def load_model(self, ctx: MethodContext):
        """The trained model from ``ctx.state_dir``, on ``ctx.device``, in eval mode."""
        from ..train.checkpoint import load_weights

        spec = self.load_spec(ctx.state_dir)
        model = self.build_model(int(spec["in_dim"]), ctx)
        model.load_state_dict(load_weights(ctx.state_dir, "model"))
        return model.to(ctx.device).eval()

    # ------------------------------------------------------------------------------ embedding
    def embed(self, ctx: MethodContext) -> np.ndarray:
        from ..config import TrainConfig
        from ..train.engine import Engine, TrainPlan

        threads = (ctx.train or TrainConfig()).threads
        with Engine(TrainPlan("full", 1, 1, [], 0), threads=threads).thread_limit():
            return self.embed_model(self.load_model(ctx), ctx)

    def embed_model(self, model, ctx: MethodContext) -> np.ndarray:
        """The encoder's output for every node of ``ctx.graph`` (float32 N x h).

        Full-graph forward when N <= ``train.max_full_batch_nodes``, else layer-wise inference over row
        blocks (:meth:`~agcpipe.nn.encoders.Encoder.inference`); both are exact.
        """
        import torch

        from ..config import TrainConfig

        cfg = ctx.train or TrainConfig()
        encoder = model.encoder
        x = ctx.features[self.feature_name]
        g = ctx.graph
        if g.n_nodes <= cfg.max_full_batch_nodes:
            data = full_graph_data(g, x, ctx.device, encoder=encoder)
            with torch.no_grad():
                z = encode_batch(encoder, data)
            return z.float().cpu().numpy()
        return encoder.inference(x, g.indptr, g.indices, g.weights, device=ctx.device)


def encode_batch(encoder, batch, x=None):
    """``encoder`` on a batch ``Data`` (full graph or sampled subgraph); ``x`` replaces ``batch.x`` (corruptions).

    A sampled batch (``num_sampled_nodes`` present) returns the seed rows only (``batch.batch_size``).
    """
    ew = batch.edge_weight if "edge_weight" in batch else None
    nsn = batch.num_sampled_nodes if "num_sampled_nodes" in batch else None  # sampled: seed rows only
    return encoder(batch.x if x is None else x, batch.edge_index, ew, prepared=bool(getattr(batch, "prepared", False)), num_sampled_nodes=nsn)


def build_encoder(in_dim: int, params: dict[str, Any]):
    from ..nn.encoders import Encoder

    return Encoder(in_dim, **params)
