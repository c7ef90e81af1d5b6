"""Generate the example user tables of flows/configs/user_tables.yaml (deterministic; committed output).

A toy payments graph: 3,000 accounts with string ids in 6 behavioural segments, 8 numeric features whose
means depend on the segment, a segment label known for 70% of the accounts, and ~18,000 transfers
(repeated transfers between the same pair appear as separate rows with their own amount) that mostly
stay within a segment.

    python flows/examples/make_transactions.py [OUT_DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

N, K, D, E, P_IN = 3000, 6, 8, 18000, 0.8
SEGMENTS = ["retail", "student", "merchant", "payroll", "savings", "travel"]


def main(out: Path) -> None:
    rng = np.random.default_rng(7)
    seg = rng.integers(K, size=N)
    ids = np.array([f"acct-{i:05d}" for i in rng.permutation(100_000)[:N]])
    means = rng.normal(0, 1.2, size=(K, D))
    feats = means[seg] + rng.normal(0, 1, size=(N, D))
    label = np.array([SEGMENTS[s] for s in seg], dtype=object)
    label[rng.random(N) < 0.3] = None
    members = [np.flatnonzero(seg == c) for c in range(K)]
    u = rng.integers(N, size=E)
    within = rng.random(E) < P_IN
    v = rng.integers(N, size=E)
    for c in range(K):  # within-segment partner for edges that stay in the segment
        m = within & (seg[u] == c)
        v[m] = rng.choice(members[c], size=int(m.sum()))
    keep = u != v
    amount = np.round(rng.lognormal(3, 1, size=E), 2)
    out.mkdir(parents=True, exist_ok=True)
    nodes = {"account": ids, **{f"f_{j}": np.round(feats[:, j], 4) for j in range(D)}, "segment": pa.array(label, type=pa.string())}
    pacsv.write_csv(pa.table(nodes), out / "accounts.csv")
    edges = {"from_account": ids[u[keep]], "to_account": ids[v[keep]], "amount": amount[keep]}
    pacsv.write_csv(pa.table(edges), out / "edges.csv")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "transactions")
