"""Runs `train_model` in a process of its own, so a test can kill it: `python -m tests.train_worker job.json`."""

import json
import sys

from tasks.config import RunConfig
from tasks.preprocess import PreparedData
from tasks.train import train_model

if __name__ == "__main__":
    job = json.loads(open(sys.argv[1]).read())
    train_model(RunConfig(**job["config"]), PreparedData(**job["data"]), job["run_id"])
