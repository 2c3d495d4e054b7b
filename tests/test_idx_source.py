"""`--dataset idx --source DIR`: a user's own directory of IDX files, trained on end to end, and every bad one refused."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from tapeline.cli import main, parse_train_args
from tapeline.data.idx import encode_idx
from tapeline.data.idx_source import FILE_NAMES, IDX, IdxSourceError
from tapeline.data.interface import DataRequest
from tapeline.data.registry import SPLIT_FILES
from tapeline.data.sources import fetch_files
from tapeline.data.splits import prepare, read_split
from tapeline.errors import ConfigError
from tapeline.flows import train  # noqa: F401  Prefect binds its log handlers to stderr on import: the session's, not a test's capsys
from tapeline.registry.promotion import promote_if_better
from tapeline.storage.root import Storage
from tests.helpers import stored_under, tiny_arrays, write_own_dir

CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.mark.usefixtures("prefect_api")
def test_cli_trains_on_an_idx_directory_and_records_its_digests(tmp_path, capsys):
    own = tmp_path / "own"
    digests = write_own_dir(own, tiny_arrays(), gzipped={"train_images"}, classes=CLASSES)
    storage = tmp_path / "store"
    code = main([
        "train", "--dataset", "idx", "--source", str(own), "--storage", str(storage), "--run-name", "own",
        "--epochs", "1", "--validation-size", "50", "--steps-per-call", "4", "--snapshot-every", "4",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((storage / "runs" / "own" / "run.json").read_text())
    assert manifest["dataset"]["name"] == IDX and manifest["dataset"]["sha256"] == digests
    assert manifest["dataset"]["classes"] == list(CLASSES)
    assert manifest["dataset"]["image_shape"] == [28, 28, 1] and manifest["dataset"]["test_split"] is None
    assert manifest["parameters"]["source"] == str(own.resolve())
    assert manifest["metrics"]["epochs"][0]["train_loss"] > 0  # 250 samples: 8 steps of 32
    card = json.loads(Path(manifest["uris"]["model_card"]).read_text())
    assert card["classes"] == list(CLASSES) and card["dataset"]["sha256"] == digests
    splits = json.loads(Path(manifest["dataset"]["preprocessed"] + ".manifest.json").read_text())
    assert splits["dataset"] == IDX and splits["source_sha256"] == digests
    assert splits["shape"] == {"image_shape": [28, 28, 1], "classes": list(CLASSES)}
    assert capsys.readouterr().out.strip().endswith(str(storage / "runs" / "own" / "run.json"))


def test_a_changed_directory_is_a_new_dataset_and_an_unchanged_one_is_cached(tmp_path):
    own, storage = tmp_path / "own", Storage(tmp_path / "store")
    arrays = tiny_arrays()
    write_own_dir(own, arrays)
    first = fetch_files(DataRequest(IDX, str(own)), storage)
    data = prepare(first, storage, seed=0, validation_size=50)
    assert not first.cached and first.classes == tuple("0123456789")

    # The same content gzipped is the same dataset: nothing is fetched or preprocessed again.
    write_own_dir(own, arrays, gzipped=set(SPLIT_FILES))
    for split in SPLIT_FILES:
        (own / FILE_NAMES[split]).unlink()
    again = fetch_files(DataRequest(IDX, str(own)), storage)
    assert again.cached and again.sha256 == first.sha256 and prepare(again, storage, 0, 50).cached

    # One label changed: that file's digest, the cache entry and the splits all follow it.
    labels = arrays["train_labels"].copy()
    labels[0] = (labels[0] + 1) % 10
    (own / (FILE_NAMES["train_labels"] + ".gz")).write_bytes(gzip.compress(encode_idx(labels), mtime=0))
    changed = fetch_files(DataRequest(IDX, str(own)), storage)
    assert not changed.cached
    assert {s for s in SPLIT_FILES if changed.sha256[s] != first.sha256[s]} == {"train_labels"}
    new_data = prepare(changed, storage, 0, 50)
    assert not new_data.cached and new_data.directory != data.directory
    train_images, train_labels, ids = read_split(new_data.uris["train"])
    validation_labels, validation_ids = read_split(new_data.uris["validation"])[1:]
    assert dict(zip([*ids, *validation_ids], [*train_labels, *validation_labels]))[0] == labels[0]


def test_the_classes_are_classes_txt_or_the_labels_up_to_the_largest(tmp_path):
    arrays = tiny_arrays()
    for split in ("train", "test"):
        arrays[f"{split}_labels"] = arrays[f"{split}_labels"] % 4  # labels 0-3 only: four classes
    write_own_dir(tmp_path / "own", arrays)
    assert fetch_files(DataRequest(IDX, str(tmp_path / "own")), Storage(tmp_path / "store")).classes == tuple("0123")
    write_own_dir(tmp_path / "named", arrays, classes=["cat", "dog", "cow", "hen", "owl"])  # a class no image has yet
    assert fetch_files(DataRequest(IDX, str(tmp_path / "named")), Storage(tmp_path / "store")).classes == ("cat", "dog", "cow", "hen", "owl")


def bad_magic(directory: Path) -> None:
    (directory / FILE_NAMES["train_images"]).write_bytes(b"\x00\x00\x09\x03" + b"\x00" * 12)


def count_mismatch(directory: Path) -> None:
    (directory / FILE_NAMES["train_labels"]).write_bytes(encode_idx(np.zeros(299, np.uint8)))


def wrong_shape(directory: Path) -> None:
    (directory / FILE_NAMES["test_images"]).write_bytes(encode_idx(np.zeros((100, 32, 32), np.uint8)))


def gzipped_under_raw_name(directory: Path) -> None:
    path = directory / FILE_NAMES["test_labels"]
    path.write_bytes(gzip.compress(path.read_bytes()))


def both_raw_and_gz(directory: Path) -> None:
    path = directory / FILE_NAMES["test_labels"]
    path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))


def one_class(directory: Path) -> None:
    (directory / "classes.txt").write_text("everything\n")


def blank_class(directory: Path) -> None:
    (directory / "classes.txt").write_text("a\n\nc\n")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / FILE_NAMES["test_labels"]).unlink(), "has no t10k-labels-idx1-ubyte (raw or .gz); dataset idx needs all four"),
        (bad_magic, "train-images-idx3-ubyte: bad IDX magic number 0x00000903"),
        (count_mismatch, "train-images-idx3-ubyte has 300 images but train-labels-idx1-ubyte has 299 labels"),
        (wrong_shape, "t10k-images-idx3-ubyte: images are 32x32x1, but train-images-idx3-ubyte's are 28x28x1 (height x width x channels)"),
        (gzipped_under_raw_name, "t10k-labels-idx1-ubyte is gzipped: name it t10k-labels-idx1-ubyte.gz"),
        (both_raw_and_gz, "has both t10k-labels-idx1-ubyte and t10k-labels-idx1-ubyte.gz; keep one"),
        (one_class, "classes.txt names 1 class; a classifier needs at least 2"),
        (blank_class, "classes.txt: line 2 is blank"),
    ],
    ids=["missing-file", "magic", "count", "shape", "gzip-named-raw", "raw-and-gz", "one-class", "blank-class"],
)
def test_a_bad_directory_is_one_line_and_exit_2_before_anything_runs(tmp_path, capsys, damage, message):
    own = tmp_path / "own"
    write_own_dir(own, tiny_arrays())
    damage(own)
    with pytest.raises(SystemExit) as stopped:
        parse_train_args(["--dataset", "idx", "--source", str(own), "--storage", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert err.startswith("tapeline train: error: ")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset", "idx"], "dataset idx needs a source: the directory of your four IDX files (--source DIR)"),
        (["--dataset", "idx", "--source", "https://example.org/mnist/"], "dataset idx reads a local directory"),
        (["--dataset", "idx", "--source", "/nonexistent/own"], "source '/nonexistent/own' is not a directory"),
    ],
)
def test_idx_needs_a_local_directory(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stopped:
        parse_train_args([*flags, "--storage", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def label_ten(directory: Path) -> None:
    """Ten classes named, and a label 10."""
    (directory / "classes.txt").write_text("".join(f"{name}\n" for name in CLASSES))
    labels = tiny_arrays()["test_labels"]
    labels[7] = 10
    (directory / FILE_NAMES["test_labels"]).write_bytes(encode_idx(labels))


def all_zero(directory: Path) -> None:
    for split in ("train_labels", "test_labels"):
        (directory / FILE_NAMES[split]).write_bytes(encode_idx(np.zeros(len(tiny_arrays()[split]), np.uint8)))


def truncated(directory: Path) -> None:
    path = directory / FILE_NAMES["train_images"]
    path.write_bytes(path.read_bytes()[:-5])


def too_few_classes(directory: Path) -> None:
    (directory / "classes.txt").write_text("a\nb\nc\n")


@pytest.mark.parametrize(
    "damage, message",
    [
        (label_ten, "classes.txt names 10 classes, but t10k-labels-idx1-ubyte has label 10"),
        (all_zero, "is 0: a classifier needs at least 2 classes"),
        (truncated, "train-images-idx3-ubyte: 235211 bytes, but its header [300, 28, 28] needs 235216"),
        (too_few_classes, "classes.txt names 3 classes, but train-labels-idx1-ubyte has label 9"),
    ],
)
def test_what_only_the_whole_file_shows_is_found_by_the_download_stage_as_bad_input(tmp_path, damage, message):
    own = tmp_path / "own"
    write_own_dir(own, tiny_arrays())
    damage(own)
    with pytest.raises(IdxSourceError, match="^[^\n]*$") as raised:
        fetch_files(DataRequest(IDX, str(own)), Storage(tmp_path / "store"))
    assert isinstance(raised.value, ConfigError) and message in str(raised.value)  # ConfigError: the CLI exits 2


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_flow_exits_2_on_a_file_the_header_check_passes_and_leaves_no_run(where, tmp_path, capsys, request, monkeypatch):
    """Refused once started (the download stage reads the whole file): no lease, no empty run directory is left."""
    own = tmp_path / "own"
    write_own_dir(own, tiny_arrays())
    path = own / FILE_NAMES["test_images"]  # read after the training files; its header is good: only reading
    path.write_bytes(path.read_bytes()[:-5])  # the whole file finds the missing bytes
    root = str(tmp_path / "store") if where == "local" else request.getfixturevalue("s3").uri(f"refused-{tmp_path.name}")
    monkeypatch.setenv("TAPELINE_WORKDIR", str(tmp_path / "work"))
    code = main(["train", "--dataset", "idx", "--source", str(own), "--storage", root, "--run-name", "bad", "--validation-size", "50"])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines()[-1].startswith("tapeline train: error: ") and "needs 78416" in err.splitlines()[-1], err
    assert stored_under(root, "runs") == []
    assert stored_under(root, "cache/idx")  # the stage did start: the files it read before are in the cache


def test_each_directory_is_its_own_test_set_for_promotion(tmp_path):
    """Every directory is dataset "idx": a champion tested on another directory's test split is no yardstick."""
    storage, arrays = Storage(tmp_path / "store"), tiny_arrays(seed=0)
    write_own_dir(tmp_path / "a", arrays)
    write_own_dir(tmp_path / "b", {**arrays, "train_labels": arrays["train_labels"][::-1].copy()})  # only training changed
    write_own_dir(tmp_path / "c", tiny_arrays(seed=1))
    test_set = {name: fetch_files(DataRequest(IDX, str(tmp_path / name)), storage).test_set for name in "abc"}
    assert test_set["a"] == test_set["b"] != test_set["c"]
    promote_if_better(storage, "a", IDX, test_set["a"], "m", 0.99, margin=0.0)
    assert not promote_if_better(storage, "b", IDX, test_set["b"], "m", 0.90, margin=0.0).promoted
    other = promote_if_better(storage, "c", IDX, test_set["c"], "m", 0.50, margin=0.0)
    assert other.promoted and "another test set" in other.reason
