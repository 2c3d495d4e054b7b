import inspect
import os
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path

import pytest
from prefect.utilities.callables import parameter_schema

from tapeline.cli import parse_train_args as parse_args
from tapeline.config import GradientDtype, RunConfig, parameters_markdown, run_parameters
from tapeline.data.registry import DATASETS
from tapeline.data.sources import OWN_DATA
from tapeline.errors import ConfigError
from tapeline.flows.prepare import prepare_data
from tapeline.flows.train import train_flow
from tapeline.gradients.schema import GRADIENT_DTYPES

REPO = Path(__file__).resolve().parents[1]


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
        ({"gradient_dtype": "float64"}, "unknown gradient_dtype 'float64'; choose one of: float32, float16"),
        ({"precision": "float64"}, "unknown precision 'float64'; choose one of: float32, mixed_bfloat16, mixed_float16"),
        ({"warm_start": 1}, "warm_start must be true or false, got 1"),
        ({"promotion_margin": 1.0}, "promotion_margin must be a number from 0 to below 1, got 1.0"),
        ({"spike_factor": float("inf")}, "spike_factor must be a number above 1, got inf"),
        ({"seed": -1}, "seed must be at least 0, got -1"),
        ({"run_name": "a..b"}, "must be one path segment"),
        ({"run_name": "r" * 129}, "^run_name is 129 characters; at most 128 are allowed$"),
        ({"batch_size": 55_001}, "^batch_size 55001 is larger than the training split's 55000 samples"),
        ({"validation_size": 60_000}, "^validation_size 60000 leaves no training samples: the training file has 60000$"),
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


@pytest.mark.parametrize("flow", [train_flow, prepare_data], ids=lambda f: f.name)
def test_flows_annotate_their_parameters_as_the_config_does(flow):
    """Same types, constraints and help: the deployments' parameter schemas carry the rules validated() checks."""
    config = typing.get_type_hints(RunConfig, include_extras=True)
    signature = inspect.signature(flow.fn, eval_str=True)
    assert signature.parameters and all(p.annotation == config[p.name] for p in signature.parameters.values())
    assert all(p.default == getattr(RunConfig, p.name) for p in signature.parameters.values())
    schema = parameter_schema(flow).properties
    assert schema["dataset"]["enum"] == [*DATASETS, *OWN_DATA] and schema["seed"]["minimum"] == 0
    help_of = {p.name: p.help for p in run_parameters()}  # what the UI's run form shows under each field
    assert {name: field.get("description") for name, field in schema.items()} == {name: help_of[name] for name in schema}


def test_one_list_of_gradient_dtypes():
    assert typing.get_args(typing.get_args(GradientDtype)[0]) == tuple(GRADIENT_DTYPES)
    assert [p.choices for p in run_parameters() if p.name == "gradient_dtype"] == [tuple(GRADIENT_DTYPES)]


def test_parameters_doc_is_generated_from_the_config():
    """docs/parameters.md is `python -m tapeline.config > docs/parameters.md`: regenerate it when a parameter changes."""
    assert (REPO / "docs" / "parameters.md").read_text() == parameters_markdown()
    assert all(f"| `{p.name}` | `{p.flag}`" in parameters_markdown() for p in run_parameters())


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
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
        timeout=120,
    )
    assert result.returncode == 2
    assert "argument --epochs: invalid int value: 'many'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not storage.exists()


def test_roles_are_marked_on_the_declared_parameters():
    from tapeline.config import HPARAM, RESUME, parameters_with
    from tapeline.training.summaries import HPARAMS

    resume = [p.name for p in parameters_with(RESUME)]
    assert resume == [
        "dataset",
        "image_size",
        "channels",
        "model",
        "batch_size",
        "learning_rate",
        "seed",
        "train_limit",
        "validation_size",
        "exclude",
        "precision",
        "deterministic",
    ]
    assert [h.name for h in HPARAMS] == [p.name for p in parameters_with(HPARAM)]
    assert {"epochs", "warm_start"} <= {h.name for h in HPARAMS} and "jit_compile" not in {h.name for h in HPARAMS}
    assert HPARAMS[0].name == "dataset" and set(HPARAMS[0].domain.values) == {*DATASETS, *OWN_DATA}  # your own data too
