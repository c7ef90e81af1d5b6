"""The loss history of a training run: one row per (epoch, component), written as ``history.parquet``.

``component`` is ``loss`` for the total training loss and the method's own names for its parts
(``loss_pos``, ``loss_neg``, ...). Values are epoch means over the epoch's batches. The tracking step logs
the table into the train stage's MLflow run as step metrics (step = epoch), so a cached re-run logs it
too.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HISTORY_FILE = "history.parquet"
SCHEMA = pa.schema([("epoch", pa.int32()), ("component", pa.string()), ("value", pa.float64())])


class History:
    """Rows ``(epoch, component, value)`` in recording order."""

    def __init__(self, rows: list[tuple[int, str, float]] | None = None):
        self.rows: list[tuple[int, str, float]] = [(int(e), str(c), float(v)) for e, c, v in (rows or [])]

    def record(self, epoch: int, values: Mapping[str, float]) -> None:
        self.rows.extend((int(epoch), str(k), float(v)) for k, v in values.items())

    def __len__(self) -> int:
        return len(self.rows)

    def series(self, component: str = "loss") -> list[float]:
        return [v for _, c, v in self.rows if c == component]

    def to_table(self) -> pa.Table:
        cols = list(zip(*self.rows)) if self.rows else ([], [], [])
        return pa.table({"epoch": pa.array(cols[0], pa.int32()), "component": pa.array(cols[1], pa.string()), "value": pa.array(cols[2], pa.float64())}, schema=SCHEMA)

    def write(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(self.to_table(), tmp)
        tmp.replace(path)


def read_history(path: str | Path) -> History:
    t = pq.read_table(path)
    return History(list(zip(t.column("epoch").to_pylist(), t.column("component").to_pylist(), t.column("value").to_pylist())))
