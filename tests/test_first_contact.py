"""What a new user meets in the first minutes: quick answers to flags, and expected failures in one line.

The flow-level cases run the real command in a fresh process, on Prefect's temporary API, as a user runs it.
"""

import gzip
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import flow, task

from tapeline.cli import parse_train_args
from tapeline.config import RunConfig
from tapeline.data.fetch import SOURCE_HINT, ChecksumError
from tapeline.data.idx import parse_header
from tapeline.data.registry import DATASETS
from tapeline.tasks.failures import PREFECT_FAILURE_LOGGERS, log_expected_failures_without_traceback
from tests.helpers import HEAVY, run_with_imports, stored_under, tiny_arrays, write_idx_dir

REPO = Path(__file__).resolve().parents[1]
UNREACHABLE = "http://127.0.0.1:9/"  # the discard port: connection refused


@pytest.mark.parametrize(
    "flags, code, message",
    [
        (["--help"], 0, None),
        (["--epochs", "many"], 2, "flows/train.py: error: argument --epochs: invalid int value: 'many'"),
        (["--epochs", "0"], 2, "flows/train.py: error: epochs must be at least 1, got 0"),
        (["--storage", "/proc/nope"], 2, "flows/train.py: error: storage '/proc/nope': cannot create files in /proc"),
        (["--dataset", "idx"], 2, "flows/train.py: error: dataset idx needs a source: the directory of your four IDX files"),
        (["--batch-size", "60000"], 2,
         "flows/train.py: error: batch_size 60000 is larger than the training split's 55000 samples (60000 less validation_size 5000)"),
        (["--train-limit", "100", "--batch-size", "128"], 2,
         "flows/train.py: error: batch_size 128 is larger than train_limit 100, the samples training uses"),
        (["--validation-size", "60000"], 2, "flows/train.py: error: validation_size 60000 leaves no training samples: the training file has 60000"),
        (["--run-name", "r" * 129], 2, "flows/train.py: error: run_name is 129 characters; at most 128 are allowed"),
    ],
)  # fmt: skip
def test_flags_are_answered_before_tensorflow_and_prefect_load(flags, code, message):
    result, packages = run_with_imports(["flows/train.py", *flags])
    assert result.returncode == code, result.stderr
    assert not packages & HEAVY
    if message:
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(message), result.stderr
    else:
        assert "--storage" in result.stdout


def test_a_batch_larger_than_your_own_training_split_is_refused_from_the_headers(tmp_path):
    """--dataset idx: the split's size is the training file's header count less the validation hold-out."""
    write_idx_dir(tmp_path / "own", tiny_arrays(n_train=300, n_test=20))
    flags = ["--dataset", "idx", "--source", str(tmp_path / "own"), "--validation-size", "50", "--storage", str(tmp_path / "store")]
    result, packages = run_with_imports(["flows/train.py", *flags, "--batch-size", "251"])
    assert result.returncode == 2 and not packages & HEAVY
    assert result.stderr == "flows/train.py: error: batch_size 251 is larger than the training split's 250 samples (300 less validation_size 50)\n"
    assert parse_train_args([*flags, "--batch-size", "250"])["batch_size"] == 250  # a batch of the whole split goes
    assert not (tmp_path / "store").exists()


def test_the_registry_knows_the_training_split_sizes_before_any_download(fashion_mnist_dir):
    """The registry's count, which the batch size is checked against before any stage, is what the file's header says."""
    with gzip.open(fashion_mnist_dir / "train-images-idx3-ubyte.gz") as images:
        assert parse_header(images.read(16), 3, "train-images")[0] == DATASETS["fashion-mnist"].train_count


def test_the_console_script_reads_flags_before_tensorflow_and_prefect_load():
    entry = re.search(r'^tapeline = "(.+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    module, function = entry.split(":")
    result, packages = run_with_imports(["-c", f"import sys; from {module} import {function}; sys.exit({function}(['train', '--help']))"])
    assert result.returncode == 0 and "--storage" in result.stdout, result.stderr
    assert not packages & HEAVY


def test_storage_root_probe_leaves_nothing_behind(tmp_path):
    assert RunConfig(storage=str(tmp_path / "new" / "root")).validated().storage == str(tmp_path / "new" / "root")
    assert list(tmp_path.iterdir()) == []


# Run the command line in a new process with the registry's mirrors replaced (the registry is module data).
DRIVER = """
import dataclasses, sys
from tapeline.data.registry import DATASETS
DATASETS["mnist"] = dataclasses.replace(DATASETS["mnist"], mirrors=tuple(sys.argv[1].split()))
from tapeline.cli import train
sys.exit(train(sys.argv[2:], prog="flows/train.py"))
"""


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """The temporary API's database, not the user's; one for the module, so its migrations run once."""
    return tmp_path_factory.mktemp("prefect-home")


def run_cli(tmp_path: Path, prefect_home: Path, mirrors: list[str], flags: list[str], api: str | None = None) -> tuple[int, list[str]]:
    """Exit code and the output lines (stdout and stderr as one stream, as in a terminal), with the Prefect API `api`
    (default: none set, so the run starts a temporary one, as on a first contact)."""
    environment = {name: value for name, value in os.environ.items() if name != "PREFECT_API_URL"} | ({"PREFECT_API_URL": api} if api else {})
    environment.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",  # a new database's migrations, on a busy machine
        KERAS_HOME=str(tmp_path / "no-keras"),  # no Keras cache to fall back on
        PYTHONPATH=os.pathsep.join([str(REPO), environment.get("PYTHONPATH", "")]),
    )
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, " ".join(mirrors), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=environment, timeout=600,
    )  # fmt: skip
    return result.returncode, [line for line in result.stdout.splitlines() if line.strip()]


def test_offline_default_ends_in_one_line_saying_to_pass_source(tmp_path, prefect_home):
    """No flags, no mirror reachable: no traceback anywhere (Prefect's logs included), and the last line says what to do."""
    code, lines = run_cli(tmp_path, prefect_home, [UNREACHABLE], [])
    output = "\n".join(lines)
    assert code == 1, output
    assert "Traceback" not in output
    assert lines[-1].startswith("flows/train.py: error: could not get mnist train-images-idx3-ubyte.gz: no mirror was reachable")
    assert lines[-1].endswith(SOURCE_HINT)
    assert "Task run failed with exception: DownloadError" in output  # Prefect did log the failure, in one line


def test_checksum_mismatch_ends_in_one_line(tmp_path, prefect_home, prefect_api):
    """On the session's API: the test above shows a temporary one's logs, and another would cost a server's start."""
    from prefect.settings import PREFECT_API_URL

    source = tmp_path / "source"
    source.mkdir()
    (source / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"not the MNIST training images"))
    flags = ["--source", str(source), "--storage", str(tmp_path / "store")]
    code, lines = run_cli(tmp_path, prefect_home, [UNREACHABLE], flags, api=PREFECT_API_URL.value())
    output = "\n".join(lines)
    assert code == 1, output
    assert "Traceback" not in output
    assert lines[-1].startswith("flows/train.py: error: could not get mnist train-images-idx3-ubyte.gz from --source")
    assert "SHA-256 mismatch" in lines[-1]
    assert lines[-1].endswith("--source must be a directory or URL of the four files of --dataset mnist")
    assert (tmp_path / "store").is_dir() and stored_under(str(tmp_path / "store"), "runs") == []  # no lease, no empty run


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(logging.Formatter().format(record))


@pytest.fixture
def failure_logs():
    """What Prefect's task-run and flow-run loggers emit, formatted with any traceback."""
    log_expected_failures_without_traceback()  # as flows/train.py and flows/prepare.py do
    records = Records()
    loggers = [logging.getLogger(name) for name in PREFECT_FAILURE_LOGGERS]
    for logger in loggers:
        logger.addHandler(records)
    yield records.texts
    for logger in loggers:
        logger.removeHandler(records)


@task
def fails_with(kind: str):
    raise ChecksumError("t10k-labels-idx1-ubyte.gz: SHA-256 mismatch") if kind == "expected" else KeyError("a bug")


@flow
def runs_a_failing_task(kind: str):
    fails_with(kind)


@pytest.mark.parametrize("kind, error, traceback", [("expected", ChecksumError, False), ("unexpected", KeyError, True)])
def test_only_unexpected_errors_are_logged_with_a_traceback(prefect_api, failure_logs, kind, error, traceback):
    with pytest.raises(error):
        runs_a_failing_task(kind)
    failures = [text for text in failure_logs if "Task run failed" in text or "Encountered exception" in text]
    assert len(failures) == 2  # the task run's and the flow run's
    assert all(("Traceback" in text) == traceback for text in failures)


def test_a_store_without_conditional_writes_is_refused_unless_the_risk_is_accepted(tmp_path, capsys):
    import fsspec

    from tapeline.cli import parse_train_args
    from tapeline.flows.train import check_before_any_stage, main

    fsspec.filesystem("memory").mkdir("/unlocked")  # a real fsspec store, in this process
    flags = ["--storage", "memory://unlocked/root", "--train-limit", "64"]
    assert main(parse_train_args(flags), "tapeline train") == 2
    assert capsys.readouterr().err.splitlines() == [
        "tapeline train: error: storage 'memory://unlocked/root': memory:// has no conditional write here, so two writers of one run "
        "or two promotions would not be kept apart; use a local directory or s3://, or pass --accept-unlocked-storage to take that risk"
    ]
    assert fsspec.filesystem("memory").ls("/unlocked") == []  # nothing written
    accepted = RunConfig(**parse_train_args([*flags, "--accept-unlocked-storage"])).validated()
    check_before_any_stage(accepted)  # passes, and run.json records the choice with the parameters
    assert accepted.parameters()["accept_unlocked_storage"] is True
