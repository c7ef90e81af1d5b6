"""The training engine shared by every trainable method.

A method hands the engine a model, its optimizer(s), a re-iterable of batches (one full-graph batch, or
mini-batches) and a ``step(batch) -> LossOutput``; the engine runs the epochs:

* **seeds**: the method seeds torch / numpy before building the model (:func:`seed_everything`); the engine
  owns ``engine.generator`` (CPU ``torch.Generator`` seeded from the run's seed) for samplers and
  shuffling, so a run is deterministic on CPU for a seed;
* **device** and **mixed precision**: batches are moved to ``device``; ``amp`` runs ``step`` under
  ``torch.autocast`` (bfloat16 on CPU, float16 with a ``GradScaler`` on CUDA);
* **early stopping** on the epoch-mean training loss (``patience`` epochs without a decrease of more than
  ``min_delta``), restoring the best epoch's weights when ``restore_best``;
* **checkpoints** every ``checkpoint_every`` epochs (or ``checkpoint_seconds``) into ``checkpoint_dir``:
  model, optimizers, schedulers, scaler, every RNG state, early-stopping state and history; a re-run with
  the same checkpoint folder resumes at the next epoch and ends with the same weights as an uninterrupted
  run (tested);
* **history**: epoch means of the loss and its components, written as ``history.parquet``
  (:mod:`.history`), logged to MLflow by the tracking step;
* **progress**: a tqdm bar on stderr (steps, speed, epoch, loss), shown only once a run has lasted a few
  seconds.

Methods with several optimizers (adversarial ones) pass ``manual_optimization=True``: their ``step`` calls
:meth:`Engine.backward` itself for each optimizer and returns the loss for logging.

Memory: the engine adds the optimizer states (Adam: 2 x parameters), one copy of the parameters when
early stopping restores the best weights, and one serialized checkpoint while it is written.
"""
from __future__ import annotations

import contextlib
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import StageError
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .history import History


@dataclass
class LossOutput:
    """The total loss (backpropagated) and its named parts (logged; tensors or floats)."""

    total: Tensor
    components: dict[str, Tensor | float] = field(default_factory=dict)


@dataclass
class TrainPlan:
    """The resolved settings that determine the trained weights (part of the train stage's cache key)."""

    mode: str  # "full" | "minibatch"
    epochs: int
    batch_size: int
    fanout: list[int]
    patience: int  # 0 = no early stopping
    min_delta: float = 0.0
    restore_best: bool = True
    amp: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_plan(cfg: Any, *, n_nodes: int, defaults: Mapping[str, Any], mode: str | None = None) -> TrainPlan:
    """Fill a :class:`~agcpipe.config.TrainConfig` (or None) with the method's ``defaults``.

    ``defaults``: ``epochs``, ``batch_size``, ``fanout``, ``patience``. ``mode``: the mode the method resolved
    (``auto`` decided by the method); default: full-batch up to ``max_full_batch_nodes`` nodes.
    """
    from ..config import TrainConfig

    cfg = cfg or TrainConfig()
    if mode is None:
        mode = cfg.mode if cfg.mode != "auto" else ("full" if n_nodes <= cfg.max_full_batch_nodes else "minibatch")
    return TrainPlan(
        mode=mode,
        epochs=int(cfg.epochs or defaults["epochs"]),
        batch_size=int(min(cfg.batch_size or defaults["batch_size"], max(n_nodes, 1))),
        fanout=[int(k) for k in (cfg.fanout if cfg.fanout is not None else defaults.get("fanout", []))],
        patience=int(cfg.patience if cfg.patience is not None else defaults.get("patience", 0)),
        min_delta=float(cfg.min_delta),
        restore_best=bool(cfg.restore_best),
        amp=bool(cfg.amp),
    )


@dataclass
class TrainResult:
    epochs_run: int
    final_loss: float
    best_loss: float
    best_epoch: int
    stopped_early: bool
    resumed_from_epoch: int | None
    seconds: float
    seconds_per_epoch: float
    steps: int
    history: History = field(repr=False, default_factory=History)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("history")
        return d


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (model initialisation, dropout, ...)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: Any, device: torch.device) -> Any:
    if device.type == "cpu":
        return batch
    if hasattr(batch, "to"):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class Engine:
    """Runs the epochs of one training run (see the module docstring)."""

    def __init__(
        self,
        plan: TrainPlan,
        *,
        device: str | torch.device = "cpu",
        seed: int = 0,
        checkpoint_dir: str | Path | None = None,
        history_path: str | Path | None = None,
        checkpoint_every: int = 10,
        checkpoint_seconds: float = 300.0,
        log_every: int = 1,
        progress: bool = True,
        desc: str = "train",
        log: Callable[[dict[str, float], int], None] | None = None,
        threads: int | None = None,
    ):
        self.plan = plan
        self.device = torch.device(device)
        self.seed = seed
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.history_path = Path(history_path) if history_path else None
        self.checkpoint_every, self.checkpoint_seconds = checkpoint_every, checkpoint_seconds
        self.log_every, self.progress, self.desc, self.log = log_every, progress, desc, log
        self.threads = threads
        #: CPU generator for samplers and shuffling (its state is checkpointed)
        self.generator = torch.Generator().manual_seed(seed + 1_000_003)
        self.scaler = torch.amp.GradScaler("cuda") if plan.amp and self.device.type == "cuda" else None

    @classmethod
    def from_context(cls, ctx: Any, plan: TrainPlan, desc: str = "train") -> "Engine":
        """An engine for a :class:`~agcpipe.methods.base.MethodContext` (device, seed, folders, settings)."""
        from ..config import TrainConfig

        cfg = ctx.train or TrainConfig()
        return cls(
            plan,
            device=ctx.device,
            seed=ctx.seed,
            checkpoint_dir=ctx.checkpoint_dir,
            history_path=ctx.history_path,
            checkpoint_every=cfg.checkpoint_every,
            checkpoint_seconds=cfg.checkpoint_seconds,
            log_every=cfg.log_every,
            progress=cfg.progress,
            desc=desc,
            log=ctx.log,
            threads=cfg.threads,
        )

    # ------------------------------------------------------------------------------ step helpers
    def autocast(self):
        if not self.plan.amp:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: Tensor, optimizer: torch.optim.Optimizer, *, retain_graph: bool = False) -> None:
        """Zero the gradients, backpropagate ``loss`` (scaled under float16 amp) and step ``optimizer``."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward(retain_graph=retain_graph)
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward(retain_graph=retain_graph)
            optimizer.step()

    # ------------------------------------------------------------------------------ the loop
    def fit(
        self,
        model: torch.nn.Module,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        batches: Iterable[Any],
        step: Callable[[Any], LossOutput],
        *,
        schedulers: Sequence[Any] = (),
        manual_optimization: bool = False,
        generators: Mapping[str, torch.Generator] | None = None,
        on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    ) -> TrainResult:
        """Train ``model`` for the plan's epochs; return the result (the model keeps the final/best weights).

        ``batches`` is iterated once per epoch (a list with one full-graph batch, or a loader).
        ``generators``: further generators whose state must survive a resume (``engine.generator`` is
        always included).
        """
        with self.thread_limit():
            return self._fit(model, optimizers, batches, step, schedulers, manual_optimization, generators, on_epoch_end)

    @contextlib.contextmanager
    def thread_limit(self):
        """``torch.set_num_threads(threads)`` inside the block (``threads`` None: unchanged).

        On a loaded 2-core machine one thread can be faster (measured: DGI on Cora, 0.72 s per epoch with
        one thread against 1.7 s with two while other jobs ran), because every parallel region waits for a
        descheduled thread.
        """
        if not self.threads:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _fit(self, model, optimizers, batches, step, schedulers, manual_optimization, generators, on_epoch_end) -> TrainResult:
        plan = self.plan
        optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        gens = {"engine": self.generator, **(generators or {})}
        model.to(self.device)
        history = History()
        best_loss, best_epoch, bad, best_state = math.inf, -1, 0, None
        start, resumed = 0, None
        ck = load_checkpoint(self.checkpoint_dir)
        if ck is not None and ck.get("plan") == plan.to_dict():
            model.load_state_dict(ck["model"])
            for opt, st in zip(optimizers, ck["optimizers"]):
                opt.load_state_dict(st)
            for sch, st in zip(schedulers, ck.get("schedulers", [])):
                sch.load_state_dict(st)
            if self.scaler is not None and ck.get("scaler"):
                self.scaler.load_state_dict(ck["scaler"])
            set_rng_state(ck["rng"], gens)
            history = History(ck["history"])
            best_loss, best_epoch, bad = ck["best_loss"], ck["best_epoch"], ck["bad_epochs"]
            best_state = ck.get("best_state")
            start = resumed = int(ck["epoch"])
        try:
            n_batches = len(batches)  # type: ignore[arg-type]
        except TypeError:
            n_batches = None
        bar = self._bar(plan.epochs, n_batches, start)
        t0 = time.perf_counter()
        last_ckpt = t0
        epoch_seconds: list[float] = []
        steps, stopped, epoch = 0, False, start - 1
        final: dict[str, float] = {}
        try:
            for epoch in range(start, plan.epochs):
                te = time.perf_counter()
                model.train()
                sums: dict[str, float] = {}
                nb = 0
                for batch in batches:
                    batch = to_device(batch, self.device)
                    if manual_optimization:
                        out = step(batch)
                    else:
                        with self.autocast():
                            out = step(batch)
                        self.backward(out.total, optimizers[0])
                    values = {"loss": out.total, **out.components}
                    for k, v in values.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, Tensor) else v)
                    nb += 1
                    steps += 1
                    if bar is not None and n_batches is not None:
                        bar.update(1)
                        if nb == 1 or nb % 10 == 0:
                            bar.set_postfix(epoch=epoch + 1, loss=f"{sums['loss'] / nb:.4g}", refresh=False)
                if nb == 0:
                    raise StageError("training got no batches (empty graph or loader)")
                for sch in schedulers:
                    sch.step()
                final = {k: v / nb for k, v in sums.items()}
                loss = final["loss"]
                if not math.isfinite(loss):
                    raise StageError(
                        f"training loss became {loss} at epoch {epoch + 1}; lower method.params.lr, or turn train.amp off"
                    )
                if (epoch + 1) % self.log_every == 0 or epoch + 1 == plan.epochs:
                    history.record(epoch + 1, final)
                    if self.log is not None:
                        self.log(final, epoch + 1)
                if loss < best_loss - plan.min_delta:
                    best_loss, best_epoch, bad = loss, epoch + 1, 0
                    if plan.patience and plan.restore_best:
                        best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                else:
                    bad += 1
                epoch_seconds.append(time.perf_counter() - te)
                if bar is not None:
                    if n_batches is None:
                        bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4g}", refresh=False)
                if on_epoch_end is not None:
                    on_epoch_end(epoch + 1, final)
                if plan.patience and bad >= plan.patience:
                    stopped = True
                    break
                now = time.perf_counter()
                due = (self.checkpoint_every and (epoch + 1) % self.checkpoint_every == 0) or (
                    self.checkpoint_seconds and now - last_ckpt >= self.checkpoint_seconds
                )
                if self.checkpoint_dir is not None and due and epoch + 1 < plan.epochs:
                    self._checkpoint(epoch + 1, model, optimizers, schedulers, gens, history, best_loss, best_epoch, bad, best_state)
                    last_ckpt = now
        finally:
            if bar is not None:
                bar.close()
        if plan.patience and plan.restore_best and best_state is not None:
            model.load_state_dict(best_state)
        if self.history_path is not None:
            history.write(self.history_path)
        return TrainResult(
            epochs_run=epoch + 1,
            final_loss=float(final.get("loss", history.series()[-1] if len(history) else math.nan)),
            best_loss=float(best_loss),
            best_epoch=int(best_epoch),
            stopped_early=stopped,
            resumed_from_epoch=resumed,
            seconds=time.perf_counter() - t0,
            seconds_per_epoch=statistics.median(epoch_seconds) if epoch_seconds else 0.0,
            steps=steps,
            history=history,
        )

    def _checkpoint(self, next_epoch, model, optimizers, schedulers, gens, history, best_loss, best_epoch, bad, best_state) -> None:
        save_checkpoint(
            self.checkpoint_dir,
            {
                "plan": self.plan.to_dict(),
                "epoch": next_epoch,
                "model": model.state_dict(),
                "optimizers": [o.state_dict() for o in optimizers],
                "schedulers": [s.state_dict() for s in schedulers],
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "rng": rng_state(gens),
                "history": [list(r) for r in history.rows],
                "best_loss": best_loss,
                "best_epoch": best_epoch,
                "bad_epochs": bad,
                "best_state": best_state,
            },
        )

    def _bar(self, epochs: int, n_batches: int | None, start: int):
        if not self.progress:
            return None
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm comes with the stack (prefect, mlflow)
            return None
        if n_batches is None:
            total, initial, unit = epochs, start, "epoch"
        else:
            total, initial, unit = epochs * n_batches, start * n_batches, "step"
        # disable=None: shown on a terminal only (no carriage-return spam in logs and captured output)
        return tqdm(total=total, initial=initial, unit=unit, desc=self.desc, file=sys.stderr, delay=5.0, mininterval=1.0, dynamic_ncols=True, leave=False, disable=None)
