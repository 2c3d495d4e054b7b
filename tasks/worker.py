"""A non-chief worker of multi-worker training: `python -m tasks.worker --storage ROOT --run-name RUN`.

Run one per non-chief task of the cluster, with its own `TF_CONFIG`; the chief is
the flow run (`flows/train.py --run-name RUN …` with the chief's `TF_CONFIG`). The
worker waits for the chief's `runs/RUN/cluster.json` in the storage root, joins
the cluster, and trains that job in step with the others; it writes nothing to
the run (see tasks/cluster.py).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tasks.cluster import cluster_from_env, wait_for_job  # noqa: E402
from tasks.config import STORAGE_ENV, ConfigError, RunConfig, TapelineError  # noqa: E402
from tasks.storage import Storage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", default=None, help=f"the chief's storage root (default ${STORAGE_ENV})")
    parser.add_argument("--run-name", required=True, help="the run id the chief trains (its --run-name)")
    parser.add_argument("--wait", type=float, default=3600.0, help="seconds to wait for the chief's job (default: 3600)")
    args = parser.parse_args(argv)
    try:
        cluster = cluster_from_env()
        if cluster is None or cluster.chief:
            raise ConfigError("TF_CONFIG must name this process as a non-chief worker of a cluster of two or more")
        storage = Storage(RunConfig(storage=args.storage, run_name=args.run_name).validated().storage)
        print(f"{cluster.task_type} {cluster.task_id}: waiting for run {args.run_name}'s job from the chief")
        job = wait_for_job(storage, args.run_name, args.wait)

        from tasks.preprocess import PreparedData
        from tasks.train import train_model

        trained = train_model(RunConfig(**job["config"]), PreparedData(**job["data"]), job["run_id"], job["warm_start"])
    except TapelineError as error:
        print(f"tasks.worker: error: {error}", file=sys.stderr)
        return 1
    print(f"{cluster.task_type} {cluster.task_id}: trained {trained.steps} steps of run {trained.run_id} ({trained.role})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
