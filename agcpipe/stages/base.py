"""The stage protocol shared by every stage: key, cached lookup, atomic build."""
from __future__ import annotations

import importlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .. import distributed
from ..config import Config
from ..settings import store_root
from ..store import Store, stage_key

STAGE_ORDER = ("ingest", "precompute", "train", "cluster", "evaluate")


@dataclass
class StageResult:
    """What a stage hands to the next one and to tracking: small and JSON-able (Prefect persists it)."""

    stage: str
    key: str
    path: str
    status: str  # "computed" | "cached"
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: "StageResult | dict[str, Any]") -> "StageResult":
        return d if isinstance(d, StageResult) else cls(**d)


class Stage:
    """A stage: ``payload`` (what the key hashes besides code), ``compute`` (writes the artifact)."""

    name: ClassVar[str]
    #: modules whose source is this stage's code version (besides agcpipe.stages.base)
    code: ClassVar[tuple[str, ...]] = ()

    def code_modules(self, cfg: Config) -> tuple[str, ...]:
        return ("agcpipe.stages.base", type(self).__module__, *self.code)

    def payload(self, cfg: Config, *upstream: StageResult) -> dict[str, Any]:
        raise NotImplementedError

    def compute(self, cfg: Config, out: Path, *upstream: StageResult) -> dict[str, Any]:
        """Write the artifact into ``out`` (a private temp folder); return a small JSON-able summary."""
        raise NotImplementedError

    def key(self, cfg: Config, *upstream: StageResult) -> str:
        return stage_key(self.name, self.code_modules(cfg), self.payload(cfg, *upstream))

    def run(self, cfg: Config, *upstream: StageResult) -> StageResult:
        """Return the cached artifact for this key, or compute and publish it atomically."""
        upstream = tuple(StageResult.from_dict(u) for u in upstream)
        t0 = time.perf_counter()
        store = Store(store_root(cfg.store))
        key = self.key(cfg, *upstream)
        art = store.get(self.name, key)
        if art is not None:
            return StageResult(self.name, key, str(art.path), "cached", time.perf_counter() - t0, art.meta.get("summary", {}))
        info: dict[str, Any] = {"inputs": {u.stage: u.key for u in upstream}}
        # dask.enabled: blocked work inside compute may run on the cluster (agcpipe.distributed)
        with store.build(self.name, key, info) as tmp, distributed.session(cfg.dask, scratch=store.root / ".scratch"):
            info["summary"] = self.compute(cfg, tmp, *upstream)
        return StageResult(self.name, key, str(store.path(self.name, key)), "computed", time.perf_counter() - t0, info["summary"])


def get_stage(name: str) -> Stage:
    if name not in STAGE_ORDER:
        raise KeyError(f"unknown stage {name!r}; stages: {STAGE_ORDER}")
    module = importlib.import_module(f"agcpipe.stages.{name}")
    return module.STAGE
