"""Dask (``dask.distributed``) for the blocked stages: the cluster, the session, and file references.

When ``dask.enabled`` is true, the precompute stage runs each propagation hop as row-block tasks
(:class:`agcpipe.ops.propagate.DistributedAdjacency`), KMeans runs its assignment steps as row-range tasks
(:mod:`agcpipe.cluster.kmeans`) and the evaluate stage sums per-range contingency tables and edge sums
(:func:`agcpipe.metrics.evaluate`). Tasks exchange **file paths** (:class:`ArrayRef`), never arrays: every
matrix already is a ``.npy`` file in the store or in the stage's temporary folder, and workers map it.
So workers must see the store at the same path: one machine (the local cluster, or ``agcpipe infra up``),
or a shared filesystem. Results equal the single-process ones within float32 rounding.

:func:`session` is entered by the stages (see :meth:`agcpipe.stages.base.Stage.run`); a library function
asks :func:`current_client` whether it should distribute. The cluster is started lazily, on the first
request, and reused by every later stage of the process: a local cluster (``n_workers`` processes on
loopback, no dashboard) or a :class:`distributed.Client` of the scheduler at ``dask.address`` (else
``DASK_SCHEDULER_ADDRESS``, which ``agcpipe infra up`` exports).
Dask is imported only then, so the library runs without it.
"""
from __future__ import annotations

import atexit
import contextvars
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import DaskConfig
from .errors import ConfigError

_current: contextvars.ContextVar[_Session | None] = contextvars.ContextVar("agcpipe_dask_session", default=None)
_clients: dict[tuple, Any] = {}  # (settings) -> (client, cluster or None); one per process
_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class ArrayRef:
    """A whole ``.npy``-style array in a file: what a task gets instead of the array itself."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    def open(self, mode: str = "r") -> np.memmap:
        return np.memmap(self.path, dtype=np.dtype(self.dtype), mode=mode, offset=self.offset, shape=self.shape)

    @classmethod
    def of_npy(cls, path: str | Path) -> "ArrayRef":
        arr = np.load(path, mmap_mode="r")
        return cls(str(Path(path).resolve()), arr.dtype.str, tuple(arr.shape), int(arr.offset))


def file_ref(arr: np.ndarray) -> ArrayRef | None:
    """The file behind ``arr`` when it is a whole, C-contiguous memory-mapped array (else None)."""
    if not isinstance(arr, np.memmap) or arr.filename is None or not arr.flags.c_contiguous:
        return None
    try:
        size = os.path.getsize(arr.filename)
    except OSError:
        return None
    if size - int(arr.offset) != arr.nbytes:  # a slice of a larger mapping: offsets would be wrong
        return None
    return ArrayRef(str(Path(arr.filename).resolve()), arr.dtype.str, tuple(arr.shape), int(arr.offset))


def shared(arr: np.ndarray, work_dir: Path, name: str) -> ArrayRef:
    """A reference to ``arr``: its own file when it has one, else a ``.npy`` copy written to ``work_dir``."""
    ref = file_ref(arr)
    if ref is not None:
        return ref
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / f"{name}.npy"
    np.save(path, np.ascontiguousarray(arr))
    return ArrayRef.of_npy(path)


def ranges(n: int, parts: int, cost: np.ndarray | None = None) -> list[tuple[int, int]]:
    """``parts`` consecutive ranges of ``0..n`` of about equal size (or equal ``cost``: a cumulative
    array of length n + 1, e.g. CSR row pointers + row numbers)."""
    parts = max(1, min(parts, n)) if n else 1
    if cost is None:
        bounds = np.linspace(0, n, parts + 1).astype(np.int64)
    else:
        cost = np.asarray(cost, dtype=np.int64)
        targets = np.linspace(0, int(cost[-1]), parts + 1)[1:-1]
        bounds = np.concatenate([[0], np.searchsorted(cost, targets, side="left"), [n]])
    bounds = np.unique(np.clip(bounds, 0, n))
    if bounds.size < 2:
        bounds = np.array([0, n])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a] or [(0, n)]


# ---------------------------------------------------------------------------------------------- client
class _Session:
    def __init__(self, cfg: DaskConfig, scratch: Path | None) -> None:
        self.cfg, self.scratch = cfg, scratch

    def client(self) -> Any:
        return get_client(self.cfg)


@contextmanager
def session(cfg: DaskConfig | None, scratch: str | Path | None = None) -> Iterator[None]:
    """Make ``cfg`` the Dask settings of the code run inside (no-op when Dask is not enabled).

    ``scratch``: a folder the workers can see, for files a step shares with its tasks (labels,
    per-row outputs); default the system's temporary folder.
    """
    active = cfg is not None and cfg.enabled
    token = _current.set(_Session(cfg, Path(scratch) if scratch else None) if active else None)
    try:
        yield
    finally:
        _current.reset(token)


def current_client() -> Any | None:
    """The Dask client of the active :func:`session`, started on first use; None without one."""
    s = _current.get()
    return None if s is None else s.client()


def current_config() -> DaskConfig | None:
    s = _current.get()
    return None if s is None else s.cfg


def tasks_for(client: Any) -> int:
    """Tasks per step: ``dask.tasks_per_worker`` x workers."""
    cfg = current_config()
    return (cfg.tasks_per_worker if cfg is not None else 2) * n_workers(client)


def scratch_dir() -> Path:
    """A new private folder under the session's scratch folder (remove it when done)."""
    import tempfile

    s = _current.get()
    base = s.scratch if s is not None and s.scratch is not None else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="agcpipe-dask-", dir=base))


def n_workers(client: Any) -> int:
    """Workers of the cluster (at least 1)."""
    return max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))


def scheduler_address(cfg: DaskConfig) -> str | None:
    """``dask.address``, else the ``DASK_SCHEDULER_ADDRESS`` environment variable (``agcpipe infra up``
    writes it to ``data/infra/env.sh``), else None (a local cluster)."""
    return cfg.address or os.environ.get("DASK_SCHEDULER_ADDRESS") or None


def _key(cfg: DaskConfig) -> tuple:
    return (scheduler_address(cfg), cfg.n_workers, cfg.threads_per_worker, cfg.memory_limit)


def get_client(cfg: DaskConfig) -> Any:
    """The process's client for these settings: connected to :func:`scheduler_address`, or to a local
    cluster started now (and closed at interpreter exit or by :func:`close_all`)."""
    try:
        from distributed import Client, LocalCluster, get_worker
    except ImportError as e:  # pragma: no cover - dask[distributed] is a dependency
        raise ConfigError("dask.enabled needs dask[distributed]: pip install 'dask[distributed]'") from e
    with _lock:
        key = _key(cfg)
        entry = _clients.get(key)
        if entry is not None and entry[0].status == "running":
            return entry[0]
        try:  # inside a Dask worker (Prefect's DaskTaskRunner): submit to the same cluster
            worker = get_worker()
        except ValueError:
            worker = None
        if worker is not None:
            from distributed import worker_client

            return _WorkerClient(worker_client)
        address = scheduler_address(cfg)
        if address:
            try:
                client = Client(address, timeout="30s", set_as_default=False)
            except OSError as e:
                where = "dask.address" if cfg.address else "DASK_SCHEDULER_ADDRESS"
                raise ConfigError(f"cannot reach the Dask scheduler at {where}={address}: {e}") from None
            _close_at_exit()
            _clients[key] = (client, None)
            return client
        _close_at_exit()
        cluster = LocalCluster(
            n_workers=cfg.n_workers,
            threads_per_worker=cfg.threads_per_worker,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            memory_limit=0 if cfg.memory_limit == "0" else cfg.memory_limit,
        )
        client = Client(cluster, set_as_default=False)
        _clients[key] = (client, cluster)
        return client


class _WorkerClient:
    """A client usable from inside a task: each call runs in ``worker_client()`` (seceding from the
    worker's thread pool while it waits, so nested tasks cannot deadlock)."""

    def __init__(self, factory: Callable) -> None:
        self._factory = factory

    def map_gather(self, fn: Callable, args: Sequence[tuple]) -> list[Any]:
        with self._factory() as c:
            return c.gather([c.submit(fn, *a, pure=False) for a in args])

    def scheduler_info(self, **kw: Any) -> dict:
        with self._factory() as c:
            return c.scheduler_info(**kw)


def map_gather(client: Any, fn: Callable, args: Sequence[tuple]) -> list[Any]:
    """Run ``fn(*a)`` for every ``a`` in ``args`` as Dask tasks; their results in order (raises the first error)."""
    if isinstance(client, _WorkerClient):
        return client.map_gather(fn, args)
    return client.gather([client.submit(fn, *a, pure=False) for a in args])


def close_all() -> None:
    """Close every client and local cluster this process started."""
    with _lock:
        for client, cluster in list(_clients.values()):
            try:
                client.close()
                if cluster is not None:
                    cluster.close()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        _clients.clear()


_registered = False


def _close_at_exit() -> None:
    """Register :func:`close_all` at exit once, after ``distributed`` is imported: exit handlers run last
    registered first, so ours closes the clusters while distributed's own machinery (event loop, comms)
    still runs, instead of after it (which printed ``CommClosedError`` tracebacks at interpreter exit)."""
    global _registered
    if not _registered:
        atexit.register(close_all)
        _registered = True
