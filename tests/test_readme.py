"""The code of the README and docs/, run as a user pastes it, against a real run of the real CLI on Fashion-MNIST.

Convention for README and docs/ authors: every ```python block runs as its own script, from a
directory whose `artifacts/` is the default storage root holding one completed run;
the literal `<run-id>` stands for that run's id. A block that is not meant to run is
fenced as something else (```text, ```sh).
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.readers import assert_every_reader_agrees, dataset_paths

ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER = "<run-id>"
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.DOTALL | re.MULTILINE)


def python_blocks(markdown: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block, dedented as a list item's block is indented."""
    return [(markdown.count("\n", 0, match.start()) + 1, textwrap.dedent(match["code"])) for match in FENCE.finditer(markdown)]


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(f"{page.relative_to(ROOT)}:{line}", code) for page in PAGES for line, code in python_blocks(page.read_text())]


@pytest.fixture(scope="module")
def project(tmp_path_factory, fashion_mnist_dir, prefect_api) -> tuple[Path, str]:
    """A user's project directory after one small run with the default storage root: (directory, run id)."""
    from prefect.settings import get_current_settings

    directory = tmp_path_factory.mktemp("project")
    # The session's Prefect API, rather than an ephemeral server per command (slow to start on a busy machine).
    environment = os.environ | {"PREFECT_HOME": str(directory / ".prefect"), "PREFECT_API_URL": str(get_current_settings().api.url)}
    command = [
        sys.executable, str(ROOT / "flows" / "train.py"), "--dataset", "fashion-mnist", "--source", str(fashion_mnist_dir),
        "--train-limit", "300", "--epochs", "1",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=directory, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_json = Path(result.stdout.strip().splitlines()[-1])  # the CLI's last line: the run manifest
    assert run_json.is_relative_to(directory / "artifacts" / "runs"), run_json
    return directory, run_json.parent.name


def test_the_readme_has_python_blocks_to_run():
    readme = [code for where, code in BLOCKS if where.startswith("README.md:")]
    assert any("tapeline.reader" in code for code in readme) and any("model.json" in code for code in readme)
    assert len(BLOCKS) >= 3 and any("read_parquet" in code for _, code in BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("where, code", BLOCKS, ids=[where for where, _ in BLOCKS])
def test_python_block_runs_as_pasted(project, where, code):
    directory, run_id = project
    script = code.replace(PLACEHOLDER, run_id)
    result = subprocess.run([sys.executable, "-c", script], cwd=directory, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{where} failed:\n{script}\n{result.stderr[-3000:]}"


@pytest.mark.slow
def test_every_reader_reads_every_dataset_run_json_names(project):
    directory, run_id = project
    run_dir = directory / "artifacts" / "runs" / run_id
    run = json.loads((run_dir / "run.json").read_text())
    snapshots = json.loads((run_dir / "gradients.manifest.json").read_text())["steps"]
    steps = 10  # 300 samples in batches of 32
    expected = {"gradients": len(snapshots) * 6, "steps": steps, "stats": steps * 6, "preprocessed": 70_000}
    rows = {name: assert_every_reader_agrees(path) for name, path in dataset_paths(run).items()}
    assert rows == expected | {"train": 55_000, "validation": 5_000, "test": 10_000}
