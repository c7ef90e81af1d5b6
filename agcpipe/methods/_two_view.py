"""Shared base of the two-view self-supervised methods (CCA-SSG, G-BT, NS4GC): parameters of the two
augmentations, the batches, and the two encoded views of a batch. Not a method itself (the registry skips
modules whose name starts with ``_``).

* **full batch**: one ``Data`` of the whole graph with its *raw* edges (the encoder normalises each
  augmented view itself: GCN degrees of the dropped graph, self-loops added after dropping, as the papers'
  code does), so each step builds two normalised adjacencies, ``O(N + E)``.
* **mini-batch**: PyG's ``NodeLoader`` with the CSR fan-out sampler (``train.fanout`` per encoder layer);
  both views augment the *sampled subgraph* (its feature columns and its sampled edges), and the loss uses
  the seed rows (``batch_size`` first rows), whose embeddings the encoder computes from their sampled
  neighbourhoods.

Augmentations draw from the training engine's generator (:mod:`agcpipe.nn.augment`).
"""
from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field

from .trainable import TRAINABLE_CODE, TrainableMethod, TrainableParams, TrainRun, encode_batch, full_graph_data

#: the train-stage code of a two-view method: the engine, samplers, encoders, augmentations and this base
TWO_VIEW_CODE = (*TRAINABLE_CODE, "agcpipe.nn.augment", "agcpipe.methods._two_view")

Rate = Annotated[float, Field(ge=0.0, lt=1.0)]


class TwoViewParams(TrainableParams):
    """Augmentation rates of the two views (subclasses re-declare them with their published defaults)."""

    feature_mask: tuple[Rate, Rate] = Field((0.1, 0.1), description="feature-column masking rate of view 1 and view 2")
    edge_drop: tuple[Rate, Rate] = Field((0.4, 0.4), description="edge dropping rate of view 1 and view 2")


class TwoViewMethod(TrainableMethod):
    """Base class: ``batches`` and :meth:`encode_views`; subclasses implement ``build_model`` and ``loss``."""

    train_defaults: ClassVar[dict] = {"batch_size": 2048, "fanout": [10, 10], "patience": 0}

    def batches(self, run: TrainRun):
        if run.plan.mode == "full":
            # raw edges (not GCN-prepared): every view drops edges, then the encoder normalises
            return [full_graph_data(run.ctx.graph, run.x, run.device)]
        return run.neighbor_loader()

    def views(self, batch, run: TrainRun):
        from ..nn.augment import two_views

        return two_views(batch, self.params["feature_mask"], self.params["edge_drop"], run.generator)

    def encode_views(self, model, batch, run: TrainRun):
        """Encoder outputs of the two augmented views of ``batch``, seed rows only: ``(Z1, Z2)``, ``B x h``."""
        bs = int(batch.batch_size)
        v1, v2 = self.views(batch, run)
        return encode_batch(model.encoder, v1)[:bs], encode_batch(model.encoder, v2)[:bs]


def encoder_model(encoder):
    """A ``torch.nn.Module`` holding ``encoder`` as ``.encoder`` (what the engine and ``embed_model`` expect)."""
    import torch

    class TwoViewModel(torch.nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.encoder = enc

    return TwoViewModel(encoder)
