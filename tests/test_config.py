import inspect
import os
import subprocess
import sys
from dataclasses import fields

import pytest

from tapeline.cli import parse_train_args as parse_args
from tapeline.config import RunConfig
from tapeline.errors import ConfigError
from tapeline.flows.train import train_flow


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"batch_size": -1}, "batch_size must be at least 1"),
        ({"snapshot_every": 0}, "snapshot_every must be at least 1"),
        ({"learning_rate": 0.0}, "learning_rate must be a number above 0"),
        ({"learning_rate": float("nan")}, "learning_rate must be a number above 0"),
        ({"epochs": "3"}, "epochs must be a whole number"),
        ({"dataset": "cifar"}, "unknown dataset 'cifar'"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"run_name": "../escape"}, "must be one path segment"),
        ({"run_name": "/abs/path"}, "must be one path segment"),
        ({"train_limit": 0}, "train_limit must be at least 1"),
        ({"prepare_on": "train-flow/on-demand"}, "must name a deployment of prepare-data"),
    ],
)
def test_bad_parameters(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        RunConfig(storage=str(tmp_path), **overrides).validated()


def test_storage_under_a_file_is_rejected_and_nothing_is_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        RunConfig(storage=str(blocker / "root")).validated()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_storage_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPELINE_STORAGE", str(tmp_path / "env-root"))
    assert RunConfig().validated().storage == str(tmp_path / "env-root")
    assert not (tmp_path / "env-root").exists()  # validation creates nothing


def test_flow_parameters_are_the_config_fields():
    """Deployments pass the flow's parameters by name: they must be exactly RunConfig's, same defaults."""
    signature = inspect.signature(train_flow.fn)
    assert [(p.name, p.default) for p in signature.parameters.values()] == [(f.name, f.default) for f in fields(RunConfig)]


def test_cli_flags(capsys, tmp_path):
    args = parse_args(["--dataset", "fashion-mnist", "--train-limit", "100", "--learning-rate", "0.01", "--storage", str(tmp_path)])
    assert args["train_limit"] == 100 and args["learning_rate"] == 0.01 and args["dataset"] == "fashion-mnist"
    with pytest.raises(SystemExit) as exited:
        parse_args(["--snapshot-every", "0", "--storage", str(tmp_path)])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == "tapeline train: error: snapshot_every must be at least 1, got 0"


def test_cli_rejects_bad_input_before_any_work(tmp_path):
    """The real script: exit 2, one line on stderr, no traceback, nothing written."""
    storage = tmp_path / "store"
    result = subprocess.run(
        [sys.executable, "flows/train.py", "--epochs", "many", "--storage", str(storage)],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120,
    )
    assert result.returncode == 2
    assert "argument --epochs: invalid int value: 'many'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not storage.exists()
