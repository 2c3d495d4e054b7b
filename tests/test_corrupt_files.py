"""A corrupt file in a storage root: one line names it, and everything else still reads.

The files are a real run's (tiny data, through train-flow), truncated or overwritten as a
full disk, a killed copy or a bad sector leaves them.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogHandler

from tapeline.cli import main
from tapeline.flows.train import train_flow
from tapeline.reader import CorruptFileError, read_gradients, read_samples, read_steps
from tests.helpers import tiny_arrays, write_own_dir

pytestmark = pytest.mark.usefixtures("prefect_api")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    own = tmp_path_factory.mktemp("own")
    write_own_dir(own, tiny_arrays())
    return own


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store")


def train(source: Path, storage: Path, run_name: str):
    """A tiny real run: 250 samples, 8 steps of 32, every step's gradients kept with their weights."""
    return train_flow(
        dataset="idx", source=str(source), storage=str(storage), run_name=run_name, epochs=1, validation_size=50,
        steps_per_call=4, snapshot_every=4, snapshot_weights=True, checkpoint_every=4, return_state=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def first(source, storage) -> Path:
    assert train(source, storage, "first").is_completed()
    return storage / "runs" / "first"


@pytest.fixture(scope="module")
def truncated_run_json(first, storage) -> Path:
    """Another run's run.json, cut off half-way."""
    broken = storage / "runs" / "broken" / "run.json"
    broken.parent.mkdir()
    text = (first / "run.json").read_text()
    broken.write_text(text[: len(text) // 2])
    return broken


def tapeline(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tapeline.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_models_skips_a_truncated_run_json_with_one_line(storage, truncated_run_json):
    listed = tapeline("models", str(storage))
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[1] for line in listed.stdout.splitlines()] == ["first"]
    (line,) = listed.stderr.splitlines()
    assert line.startswith(f"tapeline: skipped {truncated_run_json}: not a readable run manifest (JSONDecodeError: ")


def test_a_flow_run_lists_the_registry_past_a_truncated_run_json(source, storage, truncated_run_json):
    """The run finishes and publishes the model-registry artifact of the readable runs; its log names the file."""
    state = train(source, storage, "second")
    assert state.is_completed(), state.message
    APILogHandler().flush()
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    registry = next(artifact for artifact in artifacts if artifact.key == "model-registry")
    assert [row["run"] for row in json.loads(registry.data)] == ["second", "first"]
    assert [log.level for log in logs if str(truncated_run_json) in log.message] == [30]  # one WARNING


@pytest.fixture
def copy_of_first(first, tmp_path) -> Path:
    """The first run's directory, copied: each test breaks a file of its own copy."""
    return Path(shutil.copytree(first, tmp_path / "first"))


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def overwrite_middle(path: Path) -> Path:
    """Garbage over the middle of the file: the footer is intact, a page is not."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle - 512 : middle + 512] = b"\xff" * 1024
    path.write_bytes(bytes(data))
    return path


def a_file(directory: Path, pattern: str) -> Path:
    return sorted(directory.glob(pattern))[-1]


@pytest.mark.parametrize("damage", [truncate, overwrite_middle])
def test_the_reader_names_a_corrupt_parquet_file(copy_of_first, damage):
    broken = damage(a_file(copy_of_first, "steps/epoch=1/*.parquet"))
    with pytest.raises(CorruptFileError) as raised:
        read_steps(copy_of_first)
    assert str(raised.value).startswith(f"{broken}: cannot read it, the file is truncated or corrupt (")
    assert "\n" not in str(raised.value)
    assert read_samples(copy_of_first).num_rows == 250  # the other datasets of the run read as before


def test_samples_names_a_truncated_parquet_file(copy_of_first):
    broken = truncate(a_file(copy_of_first, "samples/epoch=1/*.parquet"))
    result = tapeline("samples", str(copy_of_first))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"tapeline samples: error: {broken}: cannot read it, the file is truncated or corrupt "
        "(Parquet magic bytes not found in footer. Either the file is corrupted or this is not a parquet file.)"
    ]


def test_verify_names_a_truncated_parquet_file(copy_of_first):
    assert read_gradients(copy_of_first, columns=["step"]).num_rows > 0
    broken = truncate(a_file(copy_of_first, "gradients/epoch=1/*.parquet"))
    result = tapeline("verify", str(copy_of_first))
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tapeline verify: error: {broken}: cannot read it, the file is truncated or corrupt (")
    assert "Traceback" not in result.stderr


def test_verify_names_a_truncated_run_json(copy_of_first):
    broken = truncate(copy_of_first / "run.json")
    result = tapeline("verify", str(copy_of_first))
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tapeline verify: error: {broken}: cannot read it, the file is truncated or corrupt (")
    assert "Traceback" not in result.stderr


def listing(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_a_torn_champion_pointer_is_named_in_one_line_and_nothing_is_deleted_or_trained(first, source, storage, tmp_path, capsys):
    """`models/current` cut off half-way: `models` and `gc` say so in one line, gc deletes nothing (it cannot tell
    which run is the champion), and `train` stops before any stage rather than at promotion, hours later."""
    root = Path(shutil.copytree(storage, tmp_path / "root"))
    pointer = truncate(root / "models" / "current")
    before = listing(root)
    expected = f"{pointer} is not valid JSON ("
    advice = "restore it from a backup, or remove it (then no model is current until a run is promoted)"
    for command, code in ((["models", str(root)], 2), (["gc", str(root), "--keep-last", "0", "--yes"], 1)):
        result = tapeline(*command)
        assert (result.returncode, result.stdout) == (code, ""), result.stderr[-3000:]
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"tapeline {command[0]}: error: {expected}") and line.endswith(advice)
    assert main(["train", "--dataset", "idx", "--source", str(source), "--storage", str(root), "--validation-size", "50"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"tapeline train: error: {expected}")
    assert listing(root) == before
