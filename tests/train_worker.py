"""Runs `train_model` in a process of its own, so a test can kill it: `python -m tests.train_worker job.json [result.json]`.

With a second argument the train result (`TrainedModel`) is written there as JSON.
"""

import dataclasses
import json
import sys

from tapeline.config import RunConfig
from tapeline.results import PreparedData
from tapeline.training.loop import train_model

if __name__ == "__main__":
    job = json.loads(open(sys.argv[1]).read())
    trained = train_model(RunConfig(**job["config"]), PreparedData.from_json(job["data"]), job["run_id"])
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as result:
            json.dump(dataclasses.asdict(trained), result)
