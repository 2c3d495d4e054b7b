"""The read commands as a user runs them, each in a fresh process: `tapeline samples` and `tapeline verify` by run
id or by path, `tapeline models`, and what each says when what it was asked for is not there (one line, exit 2).

One tiny run serves them all, trained by `tapeline train` in a fresh process as a user would: their own IDX
directory, whose training labels are all one class, with a --train-limit above its training split.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tapeline.storage.layout import remote_filesystem
from tests.helpers import tiny_arrays, write_idx_dir

RUN = "r1"
LABEL = 3  # every training label
SPLIT = 100  # 120 training images less --validation-size 20
SNAPSHOTS = "1, 3, 6, 9, 12, 14"  # 7 steps of 16 a epoch, 2 epochs, every 3rd step and the first and last


def tapeline(args: list[str], cwd: Path, **environment: str) -> subprocess.CompletedProcess:
    """The command line in a new process, as a user runs it: no Prefect API and no TAPELINE_STORAGE unless given."""
    env = {name: value for name, value in os.environ.items() if name not in ("PREFECT_API_URL", "TAPELINE_STORAGE")}
    return subprocess.run([sys.executable, "-m", "tapeline.cli", *args], capture_output=True, text=True, cwd=cwd, env=env | environment, timeout=600)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A user's directory: their IDX files in own/, and the run in ./artifacts, the default storage root."""
    home = tmp_path_factory.mktemp("home")
    arrays = tiny_arrays(n_train=120, n_test=20)
    arrays["train_labels"][:] = LABEL
    write_idx_dir(home / "own", arrays)
    return home


@pytest.fixture(scope="module")
def trained(home, prefect_api) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    result = tapeline(
        ["train", "--dataset", "idx", "--source", "own", "--run-name", RUN, "--epochs", "2", "--validation-size", "20",
         "--batch-size", "16", "--train-limit", "500", "--snapshot-every", "3", "--snapshot-weights", "--steps-per-call", "4",
         "--no-jit-compile"],
        home, PREFECT_API_URL=PREFECT_API_URL.value(),  # the session's test API: no temporary one to start
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def output_lines(result: subprocess.CompletedProcess) -> list[str]:
    return (result.stdout + result.stderr).splitlines()


def test_a_train_limit_above_the_split_is_said_once_and_the_count_used_recorded(trained, home):
    note = f"train_limit 500 is above the training split's {SPLIT} samples (120 less validation_size 20): training on all {SPLIT}"
    assert [line for line in output_lines(trained) if "train_limit 500" in line][0].endswith(note)
    assert sum("train_limit 500" in line for line in output_lines(trained)) == 1
    manifest = json.loads((home / "artifacts" / "runs" / RUN / "run.json").read_text())
    assert manifest["parameters"]["train_limit"] == 500  # what was asked, and what was used
    assert manifest["dataset"]["train_samples"] == SPLIT


def test_a_single_label_is_one_warning_line(trained):
    warning = f"warning: all {SPLIT} training samples have label {LABEL}: the model can learn only to answer {LABEL}"
    assert [line for line in output_lines(trained) if "warning: all" in line][0].endswith(warning)
    assert sum("warning: all" in line for line in output_lines(trained)) == 1


def test_samples_takes_a_run_id_under_the_storage_root_or_a_path(trained, home, tmp_path):
    by_default = tapeline(["samples", RUN, "--top", "3"], home)  # ./artifacts
    assert by_default.returncode == 0 and by_default.stderr == "", by_default.stderr
    assert len(by_default.stdout.splitlines()) == 1 + 3
    storage = str(home / "artifacts")
    forms = [
        tapeline(["samples", RUN, "--top", "3", "--storage", storage], tmp_path),
        tapeline(["samples", RUN, "--top", "3"], tmp_path, TAPELINE_STORAGE=storage),
        tapeline(["samples", RUN, "--top", "3", "--storage", storage], tmp_path, TAPELINE_STORAGE=str(tmp_path)),  # the flag wins
        tapeline(["samples", f"{storage}/runs/{RUN}", "--top", "3"], tmp_path),
        tapeline(["samples", f"artifacts/runs/{RUN}/run.json", "--top", "3"], home),
    ]
    assert [(result.returncode, result.stdout) for result in forms] == [(0, by_default.stdout)] * len(forms)


def test_verify_takes_a_run_id(trained, home):
    result = tapeline(["verify", RUN], home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("step 14: agrees")


@pytest.mark.parametrize(
    "args, message",
    [
        (["samples", "nope"], "tapeline samples: error: no run nope under ./artifacts"),
        (["samples", RUN, "--storage", "elsewhere"], "tapeline samples: error: no run r1 under elsewhere"),
        (["samples", "artifacts/runs/nope"], "tapeline samples: error: no run at artifacts/runs/nope"),
        (["samples", RUN, "--epoch", "7"], "tapeline samples: error: run r1 has no epoch 7; its epochs are 1–2"),
        (["samples", RUN, "--label", "4"], "tapeline samples: error: run r1 has no example of label 4 in epoch 2; its labels there are 3"),
        (["verify", "nope"], "tapeline verify: error: no run nope under ./artifacts"),
        (["verify", RUN, "--tolerance", "-1"], "tapeline verify: error: --tolerance must be a number of at least 0, got -1"),
        (["verify", RUN, "--step", "2"], f"tapeline verify: error: run r1 has no snapshot with weights at step 2; the steps that have one: {SNAPSHOTS}"),
        (["models", "no-such-root"], "tapeline models: error: no storage root at no-such-root"),
    ],
)  # fmt: skip
def test_what_is_not_there_is_one_line_and_exit_2(trained, home, args, message):
    result = tapeline(args, home)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", message + "\n")


def test_a_run_id_not_under_the_root_points_at_a_directory_of_that_name_here(trained, home):
    runs = home / "artifacts" / "runs"
    missing = tapeline(["samples", RUN], runs)
    assert missing.returncode == 2
    assert missing.stderr == f"tapeline samples: error: no run {RUN} under ./artifacts (for the directory {RUN} here, write ./{RUN})\n"
    assert tapeline(["samples", f"./{RUN}"], runs).returncode == 0


def test_models_says_what_it_found(trained, home, tmp_path):
    listed = tapeline(["models"], home)
    assert listed.returncode == 0 and listed.stdout.startswith(f"* {RUN} "), listed.stderr
    empty = tapeline(["models", str(tmp_path)], home)
    assert (empty.returncode, empty.stdout) == (0, f"no model versions under {tmp_path} yet: a run is listed once it has finished\n")


def test_a_run_id_is_looked_up_in_a_bucket_too(trained, home, s3, tmp_path):
    """The run, uploaded as it is to the S3 test server: found by its id under `--storage s3://…`, read in place."""
    root = s3.uri(f"read-{tmp_path.name}")
    bucket, prefix = remote_filesystem(root)
    pafs.copy_files(str(home / "artifacts" / "runs" / RUN), f"{prefix}/runs/{RUN}", destination_filesystem=bucket)
    local = tapeline(["samples", RUN, "--top", "3", "--epoch", "1"], home)
    remote = tapeline(["samples", RUN, "--top", "3", "--epoch", "1", "--storage", root], tmp_path)
    assert (remote.returncode, remote.stdout) == (0, local.stdout), remote.stderr
    missing = tapeline(["samples", "nope", "--storage", root], tmp_path)
    assert (missing.returncode, missing.stderr) == (2, f"tapeline samples: error: no run nope under {root}\n")
