"""Thin Prefect entry point: `python flows/agcpipe_flow.py [CONFIG] [--set key=value ...]`.

The flow itself lives in :mod:`agcpipe.orchestration` (the library's only Prefect module); deployments
(issue: scheduled runs) point at ``flows/agcpipe_flow.py:agcpipe_flow``.
"""
from __future__ import annotations

import sys

from agcpipe.orchestration import agcpipe_flow  # noqa: F401  (the deployable flow object)

if __name__ == "__main__":
    from agcpipe.cli import main

    sys.exit(main(["run", *sys.argv[1:]]))
