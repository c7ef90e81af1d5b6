"""ARGA: adversarially regularised graph auto-encoder (Pan et al., IJCAI 2018), then KMeans.

GAE (:mod:`agcpipe.methods.gae`: GCN encoder ``Z = E(X, A)``, inner-product decoder) whose embeddings are
pushed towards a prior by an adversary. An MLP discriminator ``D: R^h -> R`` (logit; ``discriminator``
hidden widths, ReLU) learns to tell prior samples ``z' ~ N(0, I)`` from encoder outputs; the encoder
learns to reconstruct the graph and to fool it. Each step alternates (two Adam optimisers):

    discriminator (``disc_steps`` times, encoder fixed):
        L_D = mean -log sigma(D(z'))  +  mean -log(1 - sigma(D(z_i)))
    encoder (discriminator fixed):
        L_E = L_rec + reg_weight * mean -log sigma(D(z_i))

with GAE's reconstruction loss ``L_rec`` (every edge against uniformly drawn pairs, negative sampling,
:func:`~agcpipe.methods.gae.recon_loss`) on GAE's batches (full graph, or seeds with a sampled neighbour
and in-batch negatives). The logged ``loss`` is ``L_E``; ``loss_disc`` is ``L_D`` of the last
discriminator step.

Paper settings (defaults): encoder GCN 32 -> 16 (ReLU, linear output), discriminator 16 -> 64 -> 32 ->
1 (the authors' code), Adam with lr 0.001 for both, 200 iterations, one discriminator step per encoder
step, Gaussian prior. The reconstruction is GAE's negative-sampling loss rather than the authors'
dense ``N x N`` weighted cross-entropy (that never scales), and the authors' code's Gaussian noise on
the hidden layer is left out (not in the paper).

* **full batch**: ``Z`` for the whole graph per step. Memory ~ ``4 N (d + widths) + 40 nnz`` (GAE's) plus
  ``4 N (h + sum(discriminator))`` for the prior samples and the discriminator activations.
* **mini-batch**: GAE's pair batches. Memory per step ~ ``4 S (d + widths)`` for ``S`` sampled nodes,
  ``S <= 2 B prod(1 + fanout)``, plus ``4 B' (h + sum(discriminator))`` for the ``B'`` scored rows.

Embeddings are the encoder's output ``Z``; clustering is post-hoc KMeans (the default ``cluster``).
"""
from __future__ import annotations

from pydantic import Field

from .gae import GAE, GAEParams, recon_loss
from .registry import register
from .trainable import TRAINABLE_CODE, EncoderParams, TrainRun, build_encoder, encode_batch


def _arga_encoder() -> EncoderParams:
    return EncoderParams(type="gcn", hidden=32, layers=2, out=16, activation="relu", last_activation=False)


class ARGAParams(GAEParams):
    encoder: EncoderParams = Field(default_factory=_arga_encoder)
    lr: float = Field(0.001, gt=0, description="encoder learning rate")
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(200, ge=1)
    discriminator: list[int] = Field(default_factory=lambda: [64, 32], min_length=1, description="hidden widths of the MLP discriminator")
    disc_lr: float = Field(0.001, gt=0, description="discriminator learning rate")
    disc_steps: int = Field(1, ge=1, description="discriminator updates per encoder update")
    reg_weight: float = Field(1.0, ge=0, description="weight of the adversarial term in the encoder loss")


@register(
    "arga",
    family="decoupled",
    params=ARGAParams,
    description="adversarially regularised graph auto-encoder (GAE + MLP discriminator against a Gaussian prior), then KMeans (Pan et al., 2018)",
    code=(*TRAINABLE_CODE, "agcpipe.methods.gae"),
)
class ARGA(GAE):
    train_defaults = {"batch_size": 1024, "fanout": [10, 10], "patience": 0}
    manual_optimization = True  # alternating encoder / discriminator steps

    def build_model(self, in_dim: int, ctx):
        import torch
        from torch import nn

        class ARGAModel(nn.Module):
            def __init__(self, encoder, widths: list[int]):
                super().__init__()
                self.encoder = encoder
                dims = [encoder.out_dim, *widths]
                layers: list[nn.Module] = []
                for a, b in zip(dims[:-1], dims[1:]):
                    layers += [nn.Linear(a, b), nn.ReLU()]
                layers.append(nn.Linear(dims[-1], 1))
                self.discriminator = nn.Sequential(*layers)

            def critic(self, z: torch.Tensor) -> torch.Tensor:
                return self.discriminator(z).squeeze(-1)

        return ARGAModel(build_encoder(in_dim, self.params["encoder"]), list(self.params["discriminator"]))

    def configure_optimizers(self, model):
        import torch

        p = self.params
        self._optimizers = [
            torch.optim.Adam(model.encoder.parameters(), lr=p["lr"], weight_decay=p["weight_decay"]),
            torch.optim.Adam(model.discriminator.parameters(), lr=p["disc_lr"]),
        ]
        return self._optimizers

    def loss(self, model, batch, run: TrainRun):
        import torch
        import torch.nn.functional as F

        from ..train.engine import LossOutput

        opt_enc, opt_disc = self._optimizers
        engine = run.engine
        with engine.autocast():
            z = encode_batch(model.encoder, batch)
        # discriminator: prior samples are "real", encoder outputs "fake" (encoder fixed)
        zd = z.detach().float()
        for _ in range(self.params["disc_steps"]):
            prior = torch.randn(zd.shape, generator=run.generator).to(zd.device)
            with engine.autocast():
                real, fake = model.critic(prior), model.critic(zd)
            loss_disc = F.softplus(-real.float()).mean() + F.softplus(fake.float()).mean()
            engine.backward(loss_disc, opt_disc)
        # encoder: reconstruct the graph and fool the (fixed) discriminator
        with engine.autocast():
            loss_pos, loss_neg = recon_loss(z, batch, self.params["neg_ratio"], run.generator)
            loss_reg = F.softplus(-model.critic(z).float()).mean()
        total = loss_pos + loss_neg + self.params["reg_weight"] * loss_reg
        engine.backward(total, opt_enc)
        return LossOutput(
            total.detach(),
            {"loss_pos": loss_pos.detach(), "loss_neg": loss_neg.detach(), "loss_reg": loss_reg.detach(), "loss_disc": loss_disc.detach()},
        )
