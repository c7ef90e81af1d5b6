"""Reader of user tables: an edges table and a nodes table, Parquet or CSV.

Each table is a file, a folder (its files, recursively, in name order; names starting with '.' or '_'
are skipped; with ``format: auto`` only ``.parquet/.pq/.parq`` and ``.csv[.gz|.bz2|...]`` files) or a
glob. Files are streamed record batch by record batch with pyarrow (no pandas). Row numbers in errors
are 0-based data rows (CSV header excluded), counted across all files of a table in name order.

* **nodes**: one row per node; dense id = row number. ``id_column`` holds integer or string ids (CSV
  ids are integers when every id parses as one, else strings); they become ``nodes.parquet`` ``key``.
  Features: one list column (list / large_list / fixed_size_list of numbers) or numeric columns (names,
  a glob such as ``'f_*'``, or None = every numeric column but id and label). Labels: ints, strings or
  floats; text that is entirely numeric becomes numbers; nulls (and NaN) = unlabelled; codes follow
  the sorted class values.
* **edges**: ``source_column`` / ``target_column`` refer to node ids (``pyarrow.compute.index_in``);
  optional numeric ``weight_column``.

Edges are streamed: the reader hands the canonical writer chunks of :data:`EDGE_CHUNK_ROWS` rows with
dense ids (its external sort builds the CSR), so no E-sized array exists. Integer ids are looked up
by binary search in the sorted node ids (nothing at all when the ids are 0..N-1 in order), string ids
with ``pyarrow.compute.index_in`` per chunk.

Peak memory: ``N x (id bytes + 16)`` for ids and labels (``+ 16 N`` for the sorted integer ids), one
record batch, and one edge chunk: ``C x (2 id bytes + ~60)`` bytes for C = :data:`EDGE_CHUNK_ROWS` rows
(columns, probes, dense ids, weights). Features go straight to ``out_dir/features.npy`` (one batch
resident at a time).
"""
from __future__ import annotations

import difflib
import glob
import re
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from ..config import TableSource
from ..errors import MAX_SHOWN, InputError, first_rows
from .canonical import FeatureFile
from .graph import FEATURES
from .raw import RawGraph

PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
BATCH_ROWS = 65_536
#: edge rows mapped to dense ids at once (batches are gathered up to this size)
EDGE_CHUNK_ROWS = 1 << 22
CSV_BLOCK = 16 * 2**20
_INT_RE = r"^[+-]?[0-9]+$"
_NUM_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$|^[+-]?(?i:inf|infinity|nan)$"
_CONVERSION_RE = re.compile(r"In CSV column #(\d+): (?:Row #\d+: )?CSV conversion error to (\w+): invalid value '(.*)'", re.S)
_GLOB_CHARS = set("*?[")


# ------------------------------------------------------------------------------------------ files
def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if ".csv" in [s.lower() for s in path.suffixes]:
        return "csv"
    return None


def table_files(spec: str, fmt: str = "auto") -> tuple[list[Path], str]:
    """The files of a table (a file, a folder or a glob) in name order, and their format."""
    if _GLOB_CHARS & set(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise InputError("no file matches this pattern", file=spec)
    elif Path(spec).is_dir():
        root = Path(spec)
        files = sorted(
            p for p in root.rglob("*")
            if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(root).parts)
        )
        if fmt == "auto":
            files = [p for p in files if _format_of(p)]
        if not files:
            raise InputError("the folder holds no .parquet or .csv files", file=spec)
    elif Path(spec).is_file():
        files = [Path(spec)]
    else:
        raise InputError("file not found", file=spec)
    if fmt != "auto":
        return files, fmt
    kinds = {_format_of(p) for p in files}
    if None in kinds:
        bad = next(p for p in files if _format_of(p) is None)
        raise InputError(
            "cannot tell the format from the file name", file=bad,
            hint="Name it .parquet or .csv, or set source.format to parquet or csv",
        )
    if len(kinds) > 1:
        raise InputError(
            "the table mixes Parquet and CSV files", file=spec, hint="Set source.format or separate them"
        )
    return files, kinds.pop()


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


class _Table:
    """One logical table spread over files, read batch by batch; Arrow errors become InputErrors."""

    def __init__(self, spec: str, fmt: str, role: str) -> None:
        self.spec, self.role = spec, role
        self.files, self.fmt = table_files(spec, fmt)
        self.hint = "Rows are 0-based data rows" + (
            ", header excluded" if self.fmt == "csv" else ""
        ) + (f", counted across the {len(self.files)} files in name order" if len(self.files) > 1 else "")
        self._schemas: dict[Path, pa.Schema] = {}

    # ---- schema
    def schema(self, f: Path | None = None) -> pa.Schema:
        """Schema of a file (CSV: column types inferred from its first block)."""
        f = self.files[0] if f is None else f
        if f not in self._schemas:
            self._schemas[f] = self._guard(f, lambda: self._read_schema(f))
        return self._schemas[f]

    def _read_schema(self, f: Path) -> pa.Schema:
        if self.fmt == "parquet":
            return pq.read_schema(f)
        with pcsv.open_csv(f) as reader:
            return reader.schema

    def require(self, column: str | None, what: str) -> None:
        """Every file has ``column``; else an error listing the columns and the closest name."""
        if column is None:
            return
        for f in self.files:
            names = self.schema(f).names
            if column not in names:
                close = difflib.get_close_matches(column, names, n=1, cutoff=0.5)
                hint = f"Columns in the file: {names}" + (f"; did you mean '{close[0]}'?" if close else "")
                raise InputError(
                    f"no {what} column '{column}' in the {self.role} table", file=f, column=column, hint=hint
                )

    # ---- reading
    def count_rows(self, key_column: str) -> int:
        if self.fmt == "parquet":
            return sum(self._guard(f, lambda f=f: pq.ParquetFile(f).metadata.num_rows) for f in self.files)
        return sum(b.num_rows for _, b in self.batches([key_column], {key_column: pa.string()}))

    def batches(
        self, columns: list[str], csv_types: dict[str, pa.DataType], *, first_file: int = 0, start: int = 0
    ) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(first row, batch) over the files from ``first_file`` on (whose first row is ``start``)."""
        offset = start
        for i in range(first_file, len(self.files)):
            f, file_start = self.files[i], offset
            it = self._iter_file(f, columns, csv_types)
            while True:
                try:
                    batch = next(it)
                except StopIteration:
                    break
                except (pa.ArrowException, OSError) as e:
                    raise self._read_error(i, e, file_start) from None
                yield offset, batch
                offset += batch.num_rows

    def _iter_file(
        self, f: Path, columns: list[str], csv_types: dict[str, pa.DataType]
    ) -> Iterator[pa.RecordBatch]:
        if self.fmt == "parquet":
            yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=columns)
            return
        read = pcsv.ReadOptions(block_size=CSV_BLOCK)
        convert = pcsv.ConvertOptions(include_columns=columns, column_types=csv_types, strings_can_be_null=True)
        with pcsv.open_csv(f, read_options=read, convert_options=convert) as reader:
            yield from reader

    def _guard(self, f: Path, fn: Any) -> Any:
        try:
            return fn()
        except (pa.ArrowException, OSError) as e:
            raise self._unreadable(f, e) from None

    def _unreadable(self, f: Path, e: Exception) -> InputError:
        kind = "Parquet" if self.fmt == "parquet" else "CSV"
        return InputError(f"not a readable {kind} file ({str(e).splitlines()[0]})", file=f)

    def _read_error(self, i: int, e: Exception, start: int) -> InputError:
        m = _CONVERSION_RE.search(str(e)) if self.fmt == "csv" else None
        if m and m.group(2) in ("float", "double", "int32", "int64"):
            column = self.schema(self.files[i]).names[int(m.group(1))]
            return self.not_numeric(column, first_file=i, start=start)
        return self._unreadable(self.files[i], e)

    def not_numeric(self, column: str, *, first_file: int = 0, start: int = 0) -> InputError:
        """The error for a column that must be numeric, naming the first values that are not numbers."""
        rows: list[np.ndarray] = []
        values: list[Any] = []
        problem = "the column must hold numbers"
        try:
            for off, batch in self.batches([column], {column: pa.string()}, first_file=first_file, start=start):
                col = batch.column(column).cast(pa.large_string())
                bad = pc.and_(col.is_valid(), pc.invert(pc.match_substring_regex(col, _NUM_RE)))
                idx = np.flatnonzero(bad.to_numpy(zero_copy_only=False))
                rows.append(idx + off)
                if idx.size and len(values) < MAX_SHOWN:
                    values += col.take(pa.array(idx[: MAX_SHOWN - len(values)])).to_pylist()
        except (pa.ArrowException, InputError):  # not even castable to text (lists, structs)
            t = self.schema(self.files[first_file]).field(column).type
            return InputError(f"{problem}, not {t}", file=self.files[first_file], column=column)
        found = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
        if not found.size:
            t = self.schema(self.files[first_file]).field(column).type
            return InputError(
                f"{problem}, not {t}", file=self.spec, column=column, hint="Store the column as a number type"
            )
        return InputError(
            f"{problem}, but some values are not numbers", file=self.spec, column=column,
            rows=found.tolist(), values=values, count=int(found.size), hint=self.hint,
        )


# ------------------------------------------------------------------------------------------ reader
def read_tables(source: TableSource, out_dir: Path) -> RawGraph:
    """Read the tables of ``source`` (absolute paths); features are written to ``out_dir/features.npy``."""
    nodes = _Table(source.nodes, source.format, "nodes")
    edges = _Table(source.edges, source.format, "edges")
    id_col, label_col = source.id_column, source.label_column
    nodes.require(id_col, "id")
    nodes.require(label_col, "label")
    edges.require(source.source_column, "source")
    edges.require(source.target_column, "target")
    edges.require(source.weight_column, "weight")

    n = nodes.count_rows(id_col)
    if n == 0:
        raise InputError("the nodes table has no rows", file=nodes.spec)
    feats, list_col = _feature_columns(source.features, nodes, id_col, label_col)

    # ---- nodes: ids, labels, features (streamed into features.npy)
    columns = [id_col] + ([label_col] if label_col else []) + ([list_col] if list_col else feats)
    csv_types: dict[str, pa.DataType] = {id_col: pa.string()} | ({label_col: pa.string()} if label_col else {})
    csv_types |= {f: pa.float32() for f in feats}
    id_chunks, label_chunks = [], []
    out = None
    for off, batch in nodes.batches(columns, csv_types):
        if batch.num_rows == 0:
            continue
        id_chunks.append(_as_key(batch.column(id_col), nodes, id_col))
        if label_col:
            label_chunks.append(_plain(batch.column(label_col)))
        if list_col:
            block = _list_block(batch.column(list_col), off, nodes, list_col, None if out is None else out.d)
        else:
            block = _columns_block(batch, feats)
        if out is None:
            out = FeatureFile(Path(out_dir) / FEATURES, n, block.shape[1])
        out.write(off, block)
    ids = _node_ids(pa.chunked_array(id_chunks), nodes, id_col)
    labels, classes = (None, None)
    if label_col:
        labels, classes = _encode_labels(_combine(label_chunks), nodes, label_col)

    # ---- edges: streamed to the canonical writer in chunks
    csv_types = {source.source_column: pa.string(), source.target_column: pa.string()}
    columns = [source.source_column, source.target_column]
    if source.weight_column:
        _require_numeric(edges, [source.weight_column])
        columns.append(source.weight_column)
        csv_types[source.weight_column] = pa.float32()
    lookup = _IdLookup(ids.combine_chunks())
    keys = ids.cast(pa.string()) if pa.types.is_large_string(ids.type) else ids
    del ids, id_chunks

    def edge_chunks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        bad = {source.source_column: _Missing(), source.target_column: _Missing()}
        total = 0
        for off, batch in _gathered(edges.batches(columns, csv_types), EDGE_CHUNK_ROWS):
            ends = []
            for column, miss in bad.items():
                col = _as_key(batch.column(column), edges, column)
                idx = lookup.dense(col)
                missing = idx < 0
                if missing.any():
                    miss.add(np.flatnonzero(missing), col, off)
                ends.append(idx)
            total += batch.num_rows
            if any(m.count for m in bad.values()):
                continue  # only counting what is wrong from here on
            w = _to_float32(batch.column(source.weight_column)) if source.weight_column else None
            yield ends[0], ends[1], w
        for column, miss in bad.items():
            if miss.count:
                raise InputError(
                    f"edge endpoints that are not node ids of {nodes.spec}", file=edges.spec, column=column,
                    rows=miss.rows, values=miss.values, count=miss.count, hint=edges.hint,
                )
        if total == 0:
            raise InputError("the edges table has no rows", file=edges.spec)

    if edges.fmt == "parquet" and edges.count_rows(source.source_column) == 0:
        raise InputError("the edges table has no rows", file=edges.spec)
    return RawGraph(
        n_nodes=n,
        src=None,
        dst=None,
        edge_chunks=edge_chunks,
        weighted=source.weight_column is not None,
        features=out.array(),
        labels=labels,
        label_classes=classes,
        keys=keys,
        feature_names=None if list_col else feats,
        info={"format": nodes.fmt, "nodes_files": len(nodes.files), "edges_files": len(edges.files)},
    )


def _gathered(batches: Iterator[tuple[int, pa.RecordBatch]], rows: int) -> Iterator[tuple[int, pa.Table]]:
    """Consecutive record batches joined into tables of at least ``rows`` rows (the last may be smaller)."""
    pending: list[pa.RecordBatch] = []
    start = size = 0
    for off, batch in batches:
        if not pending:
            start = off
        pending.append(batch)
        size += batch.num_rows
        if size >= rows:
            yield start, pa.Table.from_batches(pending).combine_chunks()
            pending, size = [], 0
    if pending:
        yield start, pa.Table.from_batches(pending).combine_chunks()


class _Missing:
    """Edge rows whose endpoint is not a node id: the first few (rows, values) and the count."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.values: list[Any] = []
        self.count = 0

    def add(self, idx: np.ndarray, col: pa.Array, offset: int) -> None:
        shown = idx[: MAX_SHOWN - len(self.rows)]
        self.rows += (shown + offset).tolist()
        self.values += col.take(pa.array(shown)).to_pylist() if shown.size else []
        self.count += int(idx.size)


class _IdLookup:
    """Dense id (row in the nodes table) of endpoint ids; -1 where an id is not a node id.

    Integer ids: identity when they are 0..N-1 in order, else binary search in the sorted ids
    (``16 N`` bytes); string ids: ``pyarrow.compute.index_in``.
    """

    def __init__(self, ids: pa.Array) -> None:
        self.type = ids.type
        self.integer = pa.types.is_integer(ids.type)
        self.identity = False
        if self.integer:
            keys = ids.to_numpy().astype(np.int64, copy=False)
            n = keys.size
            self.n = n
            if n and keys[0] == 0 and keys[-1] == n - 1 and bool(np.all(np.diff(keys) == 1)):
                self.identity = True
            else:
                self.sorter = np.argsort(keys, kind="stable")
                self.sorted = keys[self.sorter]
        else:
            self.value_set = ids

    def dense(self, col: pa.Array) -> np.ndarray:
        if self.integer and not pa.types.is_integer(col.type):  # text endpoints of integer node ids
            as_int = pc.if_else(pc.match_substring_regex(col, _INT_RE), col, pa.scalar(None, col.type))
            try:
                probe = as_int.cast(pa.int64())
            except pa.ArrowInvalid:  # digits beyond int64: cannot be a node id
                probe = pa.nulls(len(col), pa.int64())
        else:
            probe = col.cast(self.type)
        if not self.integer:
            return pc.index_in(probe, value_set=self.value_set).fill_null(-1).to_numpy().astype(np.int64)
        valid = probe.is_valid().to_numpy(zero_copy_only=False)
        v = probe.fill_null(-1).to_numpy().astype(np.int64, copy=False)
        if self.identity:
            out = v.copy()
            out[~valid | (v < 0) | (v >= self.n)] = -1
            return out
        pos = np.searchsorted(self.sorted, v)
        pos[pos >= self.n] = 0
        found = valid & (self.sorted[pos] == v) if self.n else np.zeros(v.size, dtype=bool)
        out = self.sorter[pos] if self.n else np.full(v.size, -1, dtype=np.int64)
        out[~found] = -1
        return out


def _feature_columns(
    spec: str | list[str] | None, nodes: _Table, id_col: str, label_col: str | None
) -> tuple[list[str], str | None]:
    """(numeric feature columns, list column or None) chosen by the ``features`` setting."""
    schema = nodes.schema()
    names = schema.names
    others = [c for c in names if c not in (id_col, label_col)]
    if isinstance(spec, str) and _GLOB_CHARS & set(spec):
        chosen = [c for c in others if fnmatchcase(c, spec)]
        if not chosen:
            raise InputError(
                f"no column matches the feature pattern '{spec}'", file=nodes.files[0],
                hint=f"Columns in the file: {names}",
            )
    elif isinstance(spec, str):
        nodes.require(spec, "feature")
        if _is_list(schema.field(spec).type):
            if not _is_numeric(schema.field(spec).type.value_type):
                raise InputError(
                    f"feature lists must hold numbers, not {schema.field(spec).type.value_type}",
                    file=nodes.files[0], column=spec,
                )
            return [], spec
        chosen = [spec]
    elif spec is not None:
        chosen = list(spec)
    else:
        chosen = [c for c in others if _is_numeric(schema.field(c).type)]
    if not chosen:
        raise InputError(
            "the nodes table has no numeric feature columns", file=nodes.files[0],
            hint=f"Columns in the file: {names}; set source.features",
        )
    for c in chosen:  # in every file of the table
        nodes.require(c, "feature")
    _require_numeric(nodes, chosen)
    return chosen, None


def _require_numeric(table: _Table, columns: list[str]) -> None:
    """Parquet columns must have a number type in every file (CSV columns are parsed as numbers)."""
    if table.fmt != "parquet":
        return
    for f in table.files:
        for c in columns:
            if not _is_numeric(table.schema(f).field(c).type):
                raise table.not_numeric(c)


def _plain(col: pa.Array) -> pa.Array:
    return col.dictionary_decode() if pa.types.is_dictionary(col.type) else col


def _as_key(col: pa.Array, table: _Table, column: str) -> pa.Array:
    """An id column as int64 or large_string."""
    col = _plain(col)
    if pa.types.is_integer(col.type):
        return col.cast(pa.int64())
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.cast(pa.large_string())
    raise InputError(f"ids must be integers or strings, not {col.type}", file=table.spec, column=column)


def _to_float32(col: pa.Array) -> np.ndarray:
    return pc.cast(_plain(col), pa.float32(), safe=False).to_numpy(zero_copy_only=False)


def _columns_block(batch: pa.RecordBatch, feats: list[str]) -> np.ndarray:
    block = np.empty((batch.num_rows, len(feats)), dtype=np.float32)
    for j, c in enumerate(feats):
        block[:, j] = _to_float32(batch.column(c))
    return block


def _list_block(col: pa.Array, off: int, table: _Table, column: str, d: int | None) -> np.ndarray:
    """A batch of a list feature column as float32 rows of length ``d`` (None: the first list's length)."""
    if col.null_count:
        rows, count = first_rows(col.is_null().to_numpy(zero_copy_only=False))
        raise InputError(
            "missing feature lists", file=table.spec, column=column,
            rows=[r + off for r in rows], count=count, hint=table.hint,
        )
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    d = int(lengths[0]) if d is None else d
    if (lengths != d).any():
        rows, count = first_rows(lengths != d)
        raise InputError(
            f"every feature list must have {d} values (the length of the first)", file=table.spec, column=column,
            rows=[r + off for r in rows], values=[int(lengths[r]) for r in rows], count=count, hint=table.hint,
        )
    return _to_float32(col.flatten()).reshape(len(col), d)


def _node_ids(ids: pa.ChunkedArray, nodes: _Table, column: str) -> pa.ChunkedArray:
    """Checked ids: no nulls, no duplicates; CSV ids become int64 when every one is an integer."""
    if ids.null_count:
        rows, count = first_rows(ids.is_null().to_numpy(zero_copy_only=False))
        raise InputError(
            "missing node ids", file=nodes.spec, column=column, rows=rows, count=count, hint=nodes.hint
        )
    if nodes.fmt == "csv" and pc.all(pc.match_substring_regex(ids, _INT_RE)).as_py():
        try:
            ids = ids.cast(pa.int64())
        except pa.ArrowInvalid:  # beyond int64: keep the text
            pass
    enc = ids.combine_chunks().dictionary_encode()
    if len(enc.dictionary) < len(ids):
        codes = enc.indices.to_numpy(zero_copy_only=False)
        dup = np.ones(codes.size, dtype=bool)
        dup[np.unique(codes, return_index=True)[1]] = False
        rows, count = first_rows(dup)
        raise InputError(
            "duplicate node ids (each id may appear once)", file=nodes.spec, column=column,
            rows=rows, values=ids.take(rows).to_pylist(), count=count, hint=nodes.hint,
        )
    return ids


def _combine(chunks: list[pa.Array]) -> pa.ChunkedArray:
    """Label chunks of one type (files may differ: numbers -> float64, anything else -> text)."""
    types = {c.type for c in chunks}
    if len(types) > 1:
        target = pa.float64() if all(_is_numeric(t) for t in types) else pa.large_string()
        chunks = [c.cast(target) for c in chunks]
    return pa.chunked_array(chunks)


def _encode_labels(col: pa.ChunkedArray, nodes: _Table, column: str) -> tuple[np.ndarray, list[Any]]:
    """(int64 codes, -1 = no label; sorted original classes)."""
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        valid = col.is_valid().to_numpy(zero_copy_only=False)
        is_num = pc.match_substring_regex(col, _NUM_RE).to_numpy(zero_copy_only=False).astype(bool) & valid
        n_num, n_valid = int(is_num.sum()), int(valid.sum())
        if 0 < n_num < n_valid:
            odd = is_num if n_num <= n_valid - n_num else valid & ~is_num
            rows, count = first_rows(odd)
            raise InputError(
                f"label column mixes numbers ({n_num} values) and text ({n_valid - n_num} values)",
                file=nodes.spec, column=column, rows=rows, values=col.take(rows).to_pylist(), count=count,
                hint=nodes.hint + "; use one kind of label",
            )
        if n_num and n_num == n_valid:
            is_int = pc.match_substring_regex(col, _INT_RE).to_numpy(zero_copy_only=False).astype(bool)
            col = col.cast(pa.int64() if (is_int | ~valid).all() else pa.float64())
            t = col.type
    if pa.types.is_floating(t):
        col = pc.if_else(pc.is_nan(col), pa.scalar(None, t), col)
        values = col.drop_null()
        if pc.all(pc.equal(values, pc.floor(values))).as_py() is not False:
            col = col.cast(pa.int64())
    elif not (pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise InputError(
            f"labels must be integers, strings or numbers, not {t}", file=nodes.spec, column=column
        )
    classes = pc.unique(col).drop_null()
    classes = classes.take(pc.sort_indices(classes))
    codes = pc.index_in(col, value_set=classes).fill_null(-1).to_numpy().astype(np.int64)
    return codes, classes.to_pylist()
