"""Shared helpers for the benchmarks: run a case in a fresh process, measure time and peak memory, print.

Peak memory is the child's peak resident set size (``VmHWM`` of /proc/self/status: ``ru_maxrss`` would
be wrong, it carries the parent's peak across fork+exec), which includes the interpreter and
imported libraries (torch alone is ~300 MB); ``baseline_rss`` (the RSS after imports, before the case)
is reported beside it so the case's own footprint can be read off.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def _child(conn, fn, args, kwargs):
    try:
        base = _rss_now()
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
        peak = peak_rss()
        conn.send(("ok", result, seconds, peak, base))
    except BaseException as e:  # report, never hang the parent
        import traceback

        conn.send(("error", traceback.format_exc(), 0.0, 0, 0))
        raise SystemExit(1) from e


def measure(fn: Callable, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run ``fn(*args, **kwargs)`` in a fresh spawned process; return its result, seconds and peak RSS."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, fn, args, kwargs))
    p.start()
    child.close()
    status, result, seconds, peak, base = parent.recv()
    p.join()
    if status != "ok":
        raise RuntimeError(f"benchmark case failed in its subprocess:\n{result}")
    return {"result": result, "seconds": seconds, "peak_rss": peak, "baseline_rss": base}


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f}"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], command: str | None = None) -> str:
    """Print a Markdown table (copy-paste into notes) and return it."""
    widths = [max(len(str(c)), *(len(_fmt(r[i])) for r in rows)) for i, c in enumerate(columns)]
    lines = [f"### {title}", ""]
    if command:
        lines += [f"command: `{command}`", ""]
    lines.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(columns, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_fmt(v).ljust(w) for v, w in zip(r, widths)) + " |")
    lines.append("")
    lines.append(machine_line())
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def machine_line() -> str:
    import torch

    return (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), python {sys.version.split()[0]}"
    )


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
