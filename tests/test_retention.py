"""Retention, for real: completed runs drop their checkpoints, and `tapeline gc` deletes what no rule keeps, never the
champion, its lineage or a run being written; on a local root and on the S3 test server, killed and run again.

Five real runs (tiny IDX data, one epoch) are trained once per kind of root; every test that deletes works on a copy.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from tapeline.cli import main
from tapeline.evaluation import evaluate_model
from tapeline.flows.gc import gc_flow
from tapeline.flows.train import train_flow
from tapeline.registry.retention import lineage
from tapeline.storage.lease import live_holder
from tapeline.storage.root import Storage
from tests.helpers import fill, holder_process, kill_when, tiny_arrays, write_idx_dir

ROOT = Path(__file__).resolve().parent.parent
WHERE = ["local", "s3"]
# (run id, IDX source, flow parameters): two champions on two test sets, a warm-start chain, runs never promoted.
SCENARIO = (
    ("r1", "b", {}),  # the first champion, tested on the other data
    ("r2", "a", {"snapshot_weights": True}),  # champion: the first tested on this test set
    ("r3", "a", {"warm_start": True}),  # from r2's weights; champion when it scores as well
    ("r4", "a", {"promotion_margin": 0.99}),  # never promoted
    ("r5", "a", {"warm_start": True, "promotion_margin": 0.99, "keep_checkpoints": True}),  # from r3; the last
)
KEPT = {"r5", "r3", "r2"}  # under --keep-last 1: the last run, the champion, the champion's warm-start ancestors
GC = [sys.executable, "-m", "tapeline.cli", "gc"]


@dataclass(frozen=True)
class History:
    """A storage root holding the five runs, left as they made it: tests copy it."""

    where: str
    root: str
    directory: Path  # the test's own directory: IDX sources, copies, working copies

    def copy(self, name: str) -> str:
        """A new root holding what the five runs wrote, byte for byte."""
        return copy_root(self.root, str(self.directory / name) if self.where == "local" else f"{self.root}-{name}")

    def run(self, root: str, run_id: str) -> dict:
        return Storage(root).read_json(Storage(root).layout.run(run_id).run_json)


def copy_root(root: str, target: str) -> str:
    """Copy every file of a root to `target`, a directory or a prefix of the same bucket."""
    filesystem, source = pafs.FileSystem.from_uri(root)
    for path in stored(root):
        destination = f"{pafs.FileSystem.from_uri(target)[1]}/{path}"
        filesystem.create_dir(destination.rsplit("/", 1)[0])
        filesystem.copy_file(f"{source}/{path}", destination)
    return target


def stored(root: str) -> dict[str, int]:
    """Every file under a root, local or in the bucket, by its path under the root: its size."""
    filesystem, base = pafs.FileSystem.from_uri(root)
    listing = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {info.path.removeprefix(base + "/"): info.size for info in listing if info.type == pafs.FileType.File}


def runs_in(files) -> set[str]:
    return {path.split("/")[1] for path in files if path.startswith("runs/")}


def data_of(run: dict) -> set[str]:
    """The files of the cache entries and the prepared dataset a run.json names, as paths under the root."""
    name, key = run["dataset"]["name"], run["dataset"]["preprocessed"].rsplit("/", 1)[1]
    splits = {f"datasets/{name}/{key}/{split}.parquet" for split in ("train", "validation", "test")}
    return {f"cache/{name}/{sha}.gz" for sha in run["dataset"]["sha256"].values()} | splits | {f"datasets/{name}/{key}.manifest.json"}


def warm_start_ancestors(root: str, run_id: str) -> set[str]:
    """The run a run warm-started from, and its, and so on: read from the run.json files as a user would."""
    ancestors, run = set(), json.loads(Storage(root).fetch(Storage(root).layout.run(run_id).run_json).read_text())
    while source := (run["warm_start"] or {}).get("from"):
        ancestors.add(source)
        run = json.loads(Storage(root).fetch(Storage(root).layout.run(source).run_json).read_text())
    return ancestors


@pytest.fixture(scope="module", params=WHERE)
def history(request, tmp_path_factory, prefect_api) -> History:
    where = request.param
    directory = tmp_path_factory.mktemp(f"retention-{where}")
    with pytest.MonkeyPatch.context() as patch:
        if where == "s3":
            root = request.getfixturevalue("s3").uri(f"retention-{directory.name}")
            patch.setenv("TAPELINE_WORKDIR", str(directory / "work"))
        else:
            root = str(directory / "store")
        for name, seed in (("a", 0), ("b", 1)):
            write_idx_dir(directory / name, tiny_arrays(n_train=600, n_test=100, seed=seed))
        for run_id, source, parameters in SCENARIO:
            train_flow(
                dataset="idx", source=str(directory / source), storage=root, run_name=run_id, epochs=1, validation_size=100,
                deterministic=True, jit_compile=False, **parameters,  # no XLA: it takes longer to compile than 16 steps take
            )  # fmt: skip
        yield History(where, root, directory)


def test_the_scenario_has_a_warm_start_chain_and_promotions(history):
    """What the other tests rely on: r3 beat r2, from r2's weights, and is the champion; r5 started from r3."""
    champion = Storage(history.root).read_json(Storage(history.root).layout.champion)
    assert champion["run_id"] == "r3" and warm_start_ancestors(history.root, "r5") == {"r3", "r2"}
    promoted = {run_id for run_id, _, _ in SCENARIO if history.run(history.root, run_id)["promotion"]["promoted"]}
    assert promoted == {"r1", "r2", "r3"}


def test_a_completed_run_drops_its_checkpoints_and_still_verifies(history, capsys):
    files = stored(history.root)
    with_checkpoints = {path.split("/")[1] for path in files if "/checkpoints/" in path}
    assert with_checkpoints == {"r5"}  # the one run trained with keep_checkpoints
    run = history.run(history.root, "r2")
    for name, uri in run["uris"].items():  # everything run.json names is still there
        relative = uri.removeprefix(history.root + "/")
        assert any(path == relative or path.startswith(relative + "/") for path in files), name
    assert main(["verify", f"{history.root}/runs/r2", "--step", "1"]) == 0  # later, the toy set is learnt: gradients ~0
    assert "step 1: agrees (largest relative difference" in capsys.readouterr().out
    assert main(["models", history.root]) == 0
    lines = {line.split()[1] if line.startswith("*") else line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert {run_id: line.endswith("checkpoints dropped") for run_id, line in lines.items()} == {
        "r1": True, "r2": True, "r3": True, "r4": True, "r5": False,
    }  # fmt: skip


def test_gc_keeps_the_last_run_the_champion_and_its_warm_start_ancestors(history, capsys):
    root = history.copy("keep-last")
    before = stored(root)
    assert main(["gc", root, "--keep-last", "1"]) == 0  # a dry run
    dry_run = capsys.readouterr().out
    assert stored(root) == before
    listed = re.findall(r"^delete  run +(\S+) +([\d.]+) days +([\d,]+) bytes", dry_run, re.MULTILINE)
    assert {run_id for run_id, _, _ in listed} == {"r1", "r4"}
    for run_id, _, size in listed:
        assert int(size.replace(",", "")) == sum(n for path, n in before.items() if path.startswith(f"runs/{run_id}/"))
    would_free = int(re.search(r"^dry run: would free ([\d,]+) bytes", dry_run, re.MULTILINE)[1].replace(",", ""))

    assert main(["gc", root, "--keep-last", "1", "--yes"]) == 0
    out = capsys.readouterr().out
    after = stored(root)
    champion = Storage(root).read_json(Storage(root).layout.champion)["run_id"]
    assert runs_in(after) == {"r5"} | {champion} | warm_start_ancestors(root, champion) == KEPT
    freed = int(re.search(r"^freed ([\d,]+) bytes", out, re.MULTILINE)[1].replace(",", ""))
    assert freed == would_free == sum(before.values()) - sum(after.values())
    # The data only r1 used went with it; what the kept runs use stayed.
    kept_data = set().union(*(data_of(history.run(root, run_id)) for run_id in KEPT))
    gone_data = data_of(history.run(history.root, "r1")) - kept_data
    assert kept_data <= set(after) and gone_data and not gone_data & set(after)

    run = history.run(root, champion)
    model = Storage(root).fetch(Storage(root).layout.run(champion).model)
    test_split = f"{root}/datasets/idx/{run['dataset']['preprocessed'].rsplit('/', 1)[1]}/test.parquet"
    assert evaluate_model(model, test_split)["accuracy"] == pytest.approx(run["metrics"]["test_accuracy"], abs=1e-9)
    assert main(["models", root]) == 0
    assert {line.split()[1] if line.startswith("*") else line.split()[0] for line in capsys.readouterr().out.splitlines()} == KEPT


def test_older_than_keeps_the_young_and_without_keep_last_the_champion_and_its_ancestors_stay(history, capsys):
    if history.where == "s3":
        pytest.skip("the rule reads run.json alone: the local root shows it")
    root = history.copy("older-than")
    before = stored(root)
    assert main(["gc", root, "--keep-last", "0", "--older-than", "1", "--yes"]) == 0  # every run finished minutes ago
    assert "finished 0.0 days ago (--older-than)" in capsys.readouterr().out and stored(root) == before
    assert main(["gc", root, "--keep-last", "0", "--older-than", "0", "--yes"]) == 0
    assert runs_in(stored(root)) == {"r3", "r2"}  # the champion and its warm-start source: no rule deletes them


def test_gc_frees_a_full_disk(history, request, capsys):
    """The root on a real tmpfs with no byte left: taking a run's lease and marking its deletion need no free space."""
    if history.where == "s3":
        pytest.skip("a bucket does not fill up")
    root = copy_root(history.root, str(request.getfixturevalue("small_disk")(256) / "store"))
    filler = fill(Path(root).parent, leave=0)
    assert main(["gc", root, "--keep-last", "1", "--yes"]) == 0
    assert runs_in(stored(root)) == KEPT and "freed " in capsys.readouterr().out
    filler.unlink()


def test_a_run_being_written_is_never_deleted_nor_the_data_runs_use(history, capsys):
    """Another process holds the leases of r4 (which gc would delete) and of r6, a run that has only begun."""
    root = history.copy("leased")
    before = stored(root)
    holder = holder_process(root, "r4", "r6")
    try:
        assert main(["gc", root, "--keep-last", "1", "--yes"]) == 0
    finally:
        holder.kill()
        holder.wait()
    out = capsys.readouterr().out
    for run_id in ("r4", "r6"):
        assert re.search(rf"^keep +run +{run_id} +being written by \S+ pid {holder.pid}$", out, re.MULTILINE), out
    after = stored(root)
    assert runs_in(after) == KEPT | {"r4", "r6"}
    assert {path: size for path, size in before.items() if path.startswith("runs/r4/") and path != "runs/r4/.lease"}.items() <= after.items()
    # r6 has no run.json yet to say what data it uses: all of it stays, r1's too.
    assert "keep    cache/ and datasets/: run r6 is kept, and has no readable run.json to say what it uses" in out
    assert {path for path in before if path.startswith(("cache/", "datasets/"))} <= set(after)


def test_a_gc_killed_at_random_points_then_run_again_finishes_the_job(history):
    """A real `tapeline gc --yes` process SIGKILLed just before its K-th file deletion, K at random; run again, and killed
    again; then one finishes. No run ever has its run.json without all its other files, nor a dataset its manifest
    without its splits. (The process kills itself from an audit hook: a killer polling from outside is outrun by gc on a
    busy machine, and a run's files go in a millisecond.)"""
    root = history.copy("killed")
    before = stored(root)
    kept_data = set().union(*(data_of(history.run(root, run_id)) for run_id in KEPT))
    doomed = {path for path in before if runs_in([path]) - KEPT} | data_of(history.run(root, "r1")) - kept_data
    environment = {**os.environ, "TAPELINE_LEASE_SECONDS": "1"}  # on S3, a killed gc's lease of a run expires in a second
    rng, cut_short, kills = random.Random(7), 0, 0
    while kills < 4 and (left := doomed & set(stored(root))):
        deletion = rng.randint(1, len(left))
        killed = subprocess.run([sys.executable, "-c", KILLED_AT, str(deletion), root, "--keep-last", "1", "--yes"], cwd=ROOT, env=environment)
        if killed.returncode != -signal.SIGKILL:
            break
        kills += 1
        files = stored(root)
        for run_id in runs_in(files):
            if f"runs/{run_id}/run.json" in files:  # a whole run, every file as it was (its lease aside, which gc takes)
                assert {p for p in before if p.startswith(f"runs/{run_id}/") and not p.endswith("/.lease")} <= set(files), run_id
            else:
                cut_short += run_id not in KEPT
        for manifest in [path for path in files if path.startswith("datasets/") and path.endswith(".manifest.json")]:
            directory = manifest.removesuffix(".manifest.json")
            assert {f"{directory}/{split}.parquet" for split in ("train", "validation", "test")} <= set(files), directory
        time.sleep(1.5 if history.where == "s3" else 0)
    finished = subprocess.run([*GC, root, "--keep-last", "1", "--yes"], cwd=ROOT, env=environment, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    after = stored(root)
    assert kills >= 2 and cut_short >= 1, (kills, cut_short)  # killed mid-run at least once
    assert runs_in(after) == KEPT and not doomed & set(after)
    assert not [path for path in after if path.endswith(".deleting")]


# `tapeline gc ARGS` that SIGKILLs itself just before its Nth file deletion (Python audits every os.remove).
KILLED_AT = """
import os, signal, sys
from tapeline.cli import main
deletions = int(sys.argv[1])
def kill_at(event, args):
    global deletions
    if event == "os.remove":
        deletions -= 1
        if deletions == 0:
            os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(kill_at)
sys.exit(main(["gc", *sys.argv[2:]]))
"""


def test_the_run_whose_flagged_examples_a_kept_run_left_out_is_kept(history, capsys):
    """Curated runs will record `curation.source_run`; until they are written, r5's run.json is given one by hand."""
    if history.where == "s3":
        pytest.skip("the rule reads run.json alone: the local root shows it")
    root = history.copy("curated")
    run_json = Path(root) / "runs" / "r5" / "run.json"
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "curation": {"source_run": "r4"}}))
    assert main(["gc", root, "--keep-last", "1", "--yes"]) == 0
    assert "keep    run         r4                                   flagged examples left out by r5" in capsys.readouterr().out
    assert runs_in(stored(root)) == KEPT | {"r4"}


@pytest.mark.parametrize(
    "run, parents",
    [
        ({"warm_start": None}, {}),
        ({"warm_start": {"from": None, "model": None, "reason": "no champion yet"}}, {}),
        ({"warm_start": {"from": "a", "model": "m", "reason": "named run"}}, {"a": "warm-start source of"}),
        ({"warm_start": {"run_id": "a", "dataset": "mnist", "model": "m", "test_accuracy": 0.9}}, {"a": "warm-start source of"}),
        ({"warm_start": None, "curation": {"source_run": "b"}}, {"b": "flagged examples left out by"}),
    ],
)
def test_lineage_reads_the_warm_start_and_the_curation_source(run, parents):
    assert lineage(run) == parents


def test_the_gc_flow_shows_what_it_removed_and_the_registry_that_is_left(history):
    if history.where == "s3":
        pytest.skip("the flow runs the library the other tests run on S3")
    root = history.copy("flow")
    before = stored(root)
    state = gc_flow(storage=root, keep_last=1, delete=True, return_state=True)
    result = state.result()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    artifacts = {artifact.key: json.loads(artifact.data) for artifact in artifacts}
    table = artifacts["storage-gc"]
    assert [(row["removed"], row["name"]) for row in table if row["removed"] == "run"] == [("run", "r1"), ("run", "r4")]
    assert {row["removed"] for row in table} == {"run", "cache", "dataset", "total"}
    assert table[-1]["bytes"] == result["bytes"] == sum(before.values()) - sum(stored(root).values())
    assert {row["run"]: row["checkpoints"] for row in artifacts["model-registry"]} == {"r5": "kept", "r3": "dropped", "r2": "dropped"}


@pytest.mark.parametrize("where", WHERE)
def test_a_killed_run_keeps_its_checkpoints_through_gc_and_resumes(where, tmp_path, request, prefect_api, capsys, caplog, monkeypatch):
    """A real `tapeline train` SIGKILLed after its first checkpoint: gc keeps it (and deletes it only under
    --older-than), and the rerun, on S3 from another machine's working copy, resumes from the checkpoint, completes,
    and drops it."""
    from prefect.settings import PREFECT_API_URL

    write_idx_dir(tmp_path / "a", tiny_arrays(n_train=2000, n_test=100))
    root = str(tmp_path / "store") if where == "local" else request.getfixturevalue("s3").uri(f"killed-run-{tmp_path.name}")
    flags = dict(
        dataset="idx", source=str(tmp_path / "a"), storage=root, run_name="killed", epochs=1, validation_size=100, checkpoint_every=20,
        jit_compile=False,
    )  # fmt: skip
    command = [sys.executable, "-m", "tapeline.cli", "train", "--no-jit-compile"]
    command += [f"--{name.replace('_', '-')}={value}" for name, value in flags.items() if name != "jit_compile"]
    environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "TAPELINE_LEASE_SECONDS": "2", "TAPELINE_WORKDIR": str(tmp_path / "trainer")}
    trainer = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_when(trainer, lambda: "runs/killed/checkpoints/checkpoint" in stored(root), poll=0.05) == -signal.SIGKILL
    while live_holder(Storage(root), "killed") is not None:  # on S3, until the dead trainer's 2-second lease expires
        time.sleep(0.1)
    files = stored(root)
    assert "runs/killed/checkpoints/checkpoint" in files and "runs/killed/run.json" not in files

    assert main(["gc", root, "--keep-last", "0", "--older-than", "1", "--yes"]) == 0
    assert "keep    run         killed                               never completed: it can resume from its checkpoints" in capsys.readouterr().out
    assert stored(root) == files
    elsewhere = copy_root(root, str(tmp_path / "copy") if where == "local" else f"{root}-copy")
    assert main(["gc", elsewhere, "--keep-last", "0", "--older-than", "0", "--yes"]) == 0
    assert re.search(r"^deleted run +killed .* never completed, and too old$", capsys.readouterr().out, re.MULTILINE)
    assert runs_in(stored(elsewhere)) == set()

    monkeypatch.setenv("TAPELINE_WORKDIR", str(tmp_path / "resumer"))  # on S3: another machine, nothing shared but the bucket
    manifest = train_flow(**flags)
    assert "resuming from checkpoint" in caplog.text  # the train task's print, in Prefect's log
    assert manifest["status"] == "completed" and not [path for path in stored(root) if "/checkpoints/" in path]


def test_an_unfinished_prepared_dataset_is_left_until_it_has_been_idle_an_hour(tmp_path, capsys):
    """prepare-data takes no run lease: a dataset directory without its manifest may be being written."""
    split = tmp_path / "datasets" / "idx" / "0123456789abcdef" / "train.parquet"
    split.parent.mkdir(parents=True)
    split.write_bytes(b"PAR1")
    assert main(["gc", str(tmp_path), "--yes"]) == 0
    assert split.exists() and "freed 0 bytes" in capsys.readouterr().out
    hour_ago = time.time() - 3601
    os.utime(split, (hour_ago, hour_ago))
    assert main(["gc", str(tmp_path), "--yes"]) == 0
    assert "deleted dataset     datasets/idx/0123456789abcdef" in capsys.readouterr().out
    assert not split.parent.exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--keep-last", "-1"], "keep_last must be at least 0, got -1"),
        (["--older-than", "-2"], "older_than must be a number at least 0, got -2.0"),
        (["--keep-last", "many"], "argument --keep-last: invalid int value: 'many'"),
        (["missing"], "no storage root at {root}/missing"),
    ],
)
def test_bad_input_is_refused_in_one_line_before_anything_is_deleted(arguments, message, tmp_path, capsys):
    arguments = [str(tmp_path / argument) if argument == "missing" else argument for argument in arguments]
    try:
        code = main(["gc", str(tmp_path), *arguments] if "missing" not in message else ["gc", *arguments])
    except SystemExit as stopped:  # argparse's own refusals
        code = stopped.code
    assert code == 2 and capsys.readouterr().err == f"tapeline gc: error: {message.format(root=tmp_path)}\n"
