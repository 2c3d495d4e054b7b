"""What an object-store root costs: one epoch with `--storage s3://…` on a local S3 server against a local directory.

The real command, `python flows/train.py … --epochs 1`, run as users run it, with the
two storage roots taking turns (local, s3, local, s3, …) so the machine's drift hits
both alike. Every turn starts from an empty root and an empty working copy, so
download and preprocess do their work too. The S3 server is moto's, in a process of
its own on loopback. Prints each turn's wall time and the ratio of the medians.

    python benchmarks/storage_overhead.py [--train-limit 20000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

ROOT = Path(__file__).resolve().parent.parent
DATA = "/usr/share/datasets/fashion-mnist"


def s3_server(environment: dict) -> ThreadedMotoServer:
    """moto's S3 server on a loopback port of its choosing (as the tests' `s3` fixture), and a bucket on it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request would bury the timings
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    environment.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{server._server.server_address[1]}", AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
    )  # fmt: skip
    os.environ.update(environment)
    boto3.client("s3").create_bucket(Bucket="bench")
    return server


def one_epoch(storage: str, workdir: Path, train_limit: int, environment: dict) -> float:
    command = [
        sys.executable, "flows/train.py", "--dataset", "fashion-mnist", "--source", DATA, "--storage", storage,
        "--epochs", "1", "--train-limit", str(train_limit),
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env={**environment, "TAPELINE_WORKDIR": str(workdir)}, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{storage}: exit {result.returncode}\n{result.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-limit", type=int, default=20000, help="training samples in the epoch")
    parser.add_argument("--repeats", type=int, default=2, help="turns per storage root")
    args = parser.parse_args()
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = s3_server(environment)
    seconds: dict[str, list[float]] = {"local": [], "s3": []}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for turn in range(args.repeats):
                for name in seconds:
                    root = f"{scratch}/local-{turn}" if name == "local" else f"s3://bench/run-{turn}"
                    seconds[name].append(one_epoch(root, Path(scratch) / f"work-{name}-{turn}", args.train_limit, environment))
                    print(f"turn {turn + 1}: {name:<6}{seconds[name][-1]:7.1f} s", flush=True)
    finally:
        server.stop()
    local, s3 = (statistics.median(seconds[name]) for name in ("local", "s3"))
    print(f"one epoch on {args.train_limit} samples, median of {args.repeats}: local {local:.1f} s, s3 {s3:.1f} s, s3 / local = {s3 / local:.3f}")


if __name__ == "__main__":
    main()
