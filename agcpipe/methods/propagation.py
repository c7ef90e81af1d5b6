"""Non-parametric baselines: KMeans on raw or propagated features (SGC, SSGC, PPR).

All operators use the symmetric normalised adjacency with self-loops, S = D^-1/2 (A + I) D^-1/2;
see :mod:`agcpipe.ops.propagate` for the kernels.
"""
from __future__ import annotations

from pydantic import Field

from .base import Method
from .registry import Params, register


class NoParams(Params):
    pass


@register("kmeans", family="baseline", params=NoParams, description="KMeans on the (preprocessed) raw features")
class RawKMeans(Method):
    def precompute_ops(self):
        return [{"name": "x", "op": "identity"}]


class SGCParams(Params):
    K: int = Field(2, ge=1, description="propagation steps")


@register("sgc", family="non-parametric", params=SGCParams, description="S^K X, then KMeans (Wu et al., ICML 2019)")
class SGC(Method):
    def precompute_ops(self):
        return [{"name": "x", "op": "sgc", "K": self.params["K"]}]


class SSGCParams(Params):
    K: int = Field(16, ge=1, description="propagation steps")
    alpha: float = Field(0.05, ge=0, le=1, description="teleport weight of the raw features")


@register(
    "ssgc",
    family="non-parametric",
    params=SSGCParams,
    description="1/K sum_k ((1-alpha) S^k X + alpha X), then KMeans (Zhu & Koniusz, ICLR 2021)",
)
class SSGC(Method):
    def precompute_ops(self):
        return [{"name": "x", "op": "ssgc", "K": self.params["K"], "alpha": self.params["alpha"]}]


class PPRParams(Params):
    alpha: float = Field(0.1, gt=0, le=1, description="teleport probability")
    K: int = Field(10, ge=1, description="power iterations")


@register(
    "ppr",
    family="non-parametric",
    params=PPRParams,
    description="personalised PageRank features, APPNP power form Z <- (1-alpha) S Z + alpha X, then KMeans",
)
class PPR(Method):
    def precompute_ops(self):
        return [{"name": "x", "op": "ppr", "K": self.params["K"], "alpha": self.params["alpha"]}]
