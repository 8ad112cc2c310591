"""A Geneva driver in a process of its own, as a user runs one against an existing cluster:

    python tests/cluster_driver.py DB TABLE COLUMN --cluster NAME --manifest NAME
        [--concurrency N]

It connects through the cluster and manifest defined in DB, backfills COLUMN with a
checkpoint per row (so that the tests know what a loss costs) and exits 0, or prints
``backfill failed: <error>`` on stderr and exits 1. Tests kill it to lose the driver;
its environment must carry the cluster's token.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("table")
    parser.add_argument("column")
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()

    import geneva

    warnings.filterwarnings("ignore", "Connection.context", DeprecationWarning)
    db = geneva.connect(args.db)
    tbl = db.open_table(args.table)
    try:
        with db.context(cluster=args.cluster, manifest=args.manifest):
            tbl.backfill(
                args.column,
                concurrency=args.concurrency,
                checkpoint_size=1,
                batch_checkpoint_flush_interval_seconds=0,
            )
    except Exception as e:
        print(f"backfill failed: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print("backfill done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
