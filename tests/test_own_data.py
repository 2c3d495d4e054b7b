"""Your own data of any shape and any number of classes: an image folder, Hub Parquet files, IDX files of any size.

Every dataset here is real files written by the test (PNG by Pillow, Parquet by pyarrow, IDX bytes), taken through the
download and preprocess stages' library functions, and the Parquet splits read back.
"""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tapeline.cli import parse_train_args
from tapeline.config import RunConfig
from tapeline.data.decode import SourceError
from tapeline.data.hub_parquet import PARQUET
from tapeline.data.idx_source import IDX
from tapeline.data.images import IMAGES
from tapeline.data.interface import DataRequest
from tapeline.data.shape import DataShape
from tapeline.data.sources import data_shape, fetch_files
from tapeline.data.splits import prepare, read_split
from tapeline.errors import ConfigError
from tapeline.storage.layout import manifest_path
from tapeline.storage.root import Storage
from tests.helpers import hub_parquet, image_folder, pictures, tiny_arrays, write_own_dir, write_png


def prepared(request: DataRequest, storage: Storage, seed=0, validation_size=2):
    files = fetch_files(request, storage)
    return files, prepare(files, storage, seed, validation_size)


def split_arrays(data, split: str):
    table = pq.read_table(data.uris[split])
    return table, *read_split(data.uris[split])


def refused(tmp_path: Path, capsys, *flags: str) -> str:
    """The one line `tapeline train` stops with, before any stage (exit 2, the storage root untouched)."""
    with pytest.raises(SystemExit) as stopped:
        parse_train_args([*flags, "--storage", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("tapeline train: error: "), err
    assert not (tmp_path / "store").exists()
    return err


def test_an_image_folder_with_train_and_test_becomes_splits_of_its_shape_and_classes(tmp_path):
    written = image_folder(tmp_path / "pets", {"cat": 6, "dog": 5})
    request, storage = DataRequest(IMAGES, str(tmp_path / "pets")), Storage(tmp_path / "store")
    assert data_shape(request) == DataShape((12, 10, 3), ("cat", "dog"))  # before any stage: the tree and one image
    files, data = prepared(request, storage)
    assert data.shape == files.shape == DataShape((12, 10, 3), ("cat", "dog")) and files.test_split is None
    assert data.counts == {"train": 9, "validation": 2, "test": 4}
    table, images, labels, ids = split_arrays(data, "test")
    assert table.schema.field("image").type.shape == [12, 10, 3] and table.schema.field("label").type == pa.uint8()
    assert np.array_equal(images, np.stack(written["test"])) and labels.tolist() == [0, 0, 1, 1]  # the order of the paths
    manifest = json.loads(manifest_path(Path(data.directory)).read_text())
    assert manifest["shape"] == {"image_shape": [12, 10, 3], "classes": ["cat", "dog"]}
    assert manifest["splits"]["test"]["class_counts"] == [2, 2] and sum(manifest["splits"]["train"]["class_counts"]) == 9
    # The same folder again: read and digested, not decoded again, and the splits not written again.
    again, data_again = prepared(request, storage)
    assert again.cached and again.sha256 == files.sha256 and data_again.cached and data_again.shape == data.shape


def test_a_changed_image_is_a_new_dataset(tmp_path):
    image_folder(tmp_path / "pets", {"cat": 4, "dog": 4})
    request, storage = DataRequest(IMAGES, str(tmp_path / "pets")), Storage(tmp_path / "store")
    first = fetch_files(request, storage)
    write_png(tmp_path / "pets" / "train" / "dog" / "001.png", np.zeros((12, 10, 3), np.uint8))
    changed = fetch_files(request, storage)
    assert not changed.cached and changed.train_set != first.train_set and changed.test_set == first.test_set
    data = prepare(changed, storage, 0, 2)
    train, _, train_ids = read_split(data.uris["train"])
    validation, _, validation_ids = read_split(data.uris["validation"])
    by_id = dict(zip([*train_ids, *validation_ids], [*train, *validation]))
    assert not by_id[5].any()  # sample_id 5: cat 000-003 are 0-3, then dog 000, dog 001


def test_one_folder_holds_out_a_seeded_test_split_of_each_of_twelve_classes(tmp_path):
    classes = {f"class{i:02d}": 5 for i in range(12)}
    image_folder(tmp_path / "many", classes, shape=(9, 7, 1), split=False)
    storage = Storage(tmp_path / "store")
    request = DataRequest(IMAGES, str(tmp_path / "many"), seed=7)
    config = RunConfig(dataset=IMAGES, source=str(tmp_path / "many"), seed=7, validation_size=10, storage=str(tmp_path / "store"))
    assert config.training_split().train_count == 48  # 5 a class, 1 of them held out: known before any stage
    files, data = prepared(request, storage, seed=7, validation_size=10)
    assert files.test_split == {"seed": 7, "fraction": 0.2} and files.shape == DataShape((9, 7, 1), tuple(classes))
    assert data.counts == {"train": 38, "validation": 10, "test": 12}
    _, images, labels, _ = split_arrays(data, "test")
    assert images.shape == (12, 9, 7, 1) and labels.tolist() == list(range(12))  # one of each class
    assert fetch_files(request, storage).test_set == files.test_set  # the same seed holds out the same images
    assert fetch_files(DataRequest(IMAGES, str(tmp_path / "many"), seed=8), storage).test_set != files.test_set


def test_image_size_resizes_images_of_several_sizes_and_channels_converts_them(tmp_path):
    image_folder(tmp_path / "mixed", {"a": 3, "b": 3}, shape=(12, 10, 3))
    write_png(tmp_path / "mixed" / "train" / "b" / "big.png", pictures(1, (20, 30), 1, 0)[0])  # larger, and grey
    request = DataRequest(IMAGES, str(tmp_path / "mixed"), image_size="8x6", channels=1)
    assert data_shape(request) == DataShape((8, 6, 1), ("a", "b"))
    files, data = prepared(request, Storage(tmp_path / "store"))
    assert files.shape.image_shape == (8, 6, 1) and read_split(data.uris["train"])[0].shape[1:] == (8, 6, 1)
    rgb = fetch_files(DataRequest(IMAGES, str(tmp_path / "mixed"), image_size="8x6", channels=3), Storage(tmp_path / "store"))
    assert rgb.shape.image_shape == (8, 6, 3) and rgb.train_set != files.train_set  # other options: another dataset


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: write_png(d / "train" / "b" / "odd.png", pictures(1, (11, 10, 3), 1, 0)[0]),
         "odd.png is 11x10 pixels (height x width), but {d}/train/a/000.png is 12x10: resize them all with --image-size HxW"),
        (lambda d: write_png(d / "test" / "a" / "grey.png", pictures(1, (12, 10), 0, 0)[0]),
         "grey.png has 1 channels, but {d}/train/a/000.png has 3: make them one with --channels 1 or --channels 3"),
        (lambda d: (d / "train" / "b" / "notes.png").write_text("not an image"), "{d}/train/b/notes.png: cannot decode it as an image"),
        (lambda d: (d / "train" / "b" / "cut.png").write_bytes((d / "train" / "b" / "000.png").read_bytes()[:-60]),
         "{d}/train/b/cut.png: cannot decode it as an image"),
    ],
    ids=["other-size", "other-channels", "not-an-image", "truncated"],
)  # fmt: skip
def test_what_only_decoding_every_image_shows_is_one_line_from_the_download_stage(tmp_path, damage, message):
    folder = tmp_path / "pets"
    image_folder(folder, {"a": 3, "b": 3})
    damage(folder)
    RunConfig(dataset=IMAGES, source=str(folder), validation_size=1, batch_size=2, storage=str(tmp_path / "store")).validated()  # one image: fine
    with pytest.raises(SourceError, match="^[^\n]*$") as raised:
        fetch_files(DataRequest(IMAGES, str(folder)), Storage(tmp_path / "store"))
    assert isinstance(raised.value, ConfigError) and message.format(d=folder) in str(raised.value)  # ConfigError: exit 2


def test_hub_parquet_files_of_encoded_images_take_their_class_names_from_the_metadata(tmp_path):
    written = hub_parquet(tmp_path / "hub", ["apple", "pear", "plum", "fig"])
    request, storage = DataRequest(PARQUET, str(tmp_path / "hub")), Storage(tmp_path / "store")
    assert data_shape(request) == DataShape((8, 8, 3), ("apple", "pear", "plum", "fig"))
    assert RunConfig(dataset=PARQUET, source=str(tmp_path / "hub"), validation_size=2).training_split().train_count == 10
    files, data = prepared(request, storage)
    assert files.encoding == "npy" and data.shape == DataShape((8, 8, 3), ("apple", "pear", "plum", "fig"))
    _, images, labels, _ = split_arrays(data, "test")
    assert np.array_equal(images, written["test"][0]) and labels.tolist() == written["test"][1].tolist()
    again, data_again = prepared(request, storage)
    assert again.cached and data_again.cached and again.test_set == files.test_set


def test_hub_parquet_files_of_a_tensor_column_without_metadata_number_their_classes(tmp_path):
    written = hub_parquet(tmp_path / "hub", None, shape=(6, 5), tensor=True)
    files, data = prepared(DataRequest(PARQUET, str(tmp_path / "hub")), Storage(tmp_path / "store"))
    assert files.shape == DataShape((6, 5, 1), ("0", "1", "2"))
    _, images, labels, _ = split_arrays(data, "test")
    assert np.array_equal(images[..., 0], written["test"][0]) and labels.tolist() == written["test"][1].tolist()


def test_more_than_256_classes_have_uint16_labels(tmp_path):
    names = [f"c{i}" for i in range(300)]
    hub_parquet(tmp_path / "hub", names, shape=(2, 2), counts=(("train", 300), ("test", 300)), tensor=True)
    files, data = prepared(DataRequest(PARQUET, str(tmp_path / "hub")), Storage(tmp_path / "store"), validation_size=10)
    table, _, labels, _ = split_arrays(data, "test")
    assert data.shape.num_classes == 300 and table.schema.field("label").type == pa.uint16() and labels.max() == 299


@pytest.mark.parametrize(
    "shape, expected",
    [((300, 20, 16), (20, 16, 1)), ((300, 9, 11, 3), (9, 11, 3))],
    ids=["3-D-20x16", "4-D-RGB"],
)
def test_idx_files_of_any_size_and_channels(tmp_path, shape, expected):
    arrays = tiny_arrays()
    rng = np.random.default_rng(0)
    arrays["train_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
    arrays["test_images"] = rng.integers(0, 256, (100, *shape[1:]), dtype=np.uint8)
    arrays["train_labels"], arrays["test_labels"] = arrays["train_labels"] % 2, arrays["test_labels"] % 2  # 2 classes
    write_own_dir(tmp_path / "own", arrays, gzipped={"train_images"})
    request = DataRequest(IDX, str(tmp_path / "own"))
    assert data_shape(request) == DataShape(expected, ("0", "1"))
    files, data = prepared(request, Storage(tmp_path / "store"), validation_size=50)
    table, images, labels, ids = split_arrays(data, "train")
    assert table.schema.field("image").type.shape == list(expected) and data.shape == DataShape(expected, ("0", "1"))
    assert np.array_equal(images, arrays["train_images"][ids].reshape((-1, *expected))) and set(labels) == {0, 1}


@pytest.mark.parametrize(
    "make, flags, message",
    [
        (None, ["--dataset", "images"], "dataset images needs a source: the directory of your images, one folder per class (--source DIR)"),
        (lambda d: image_folder(d, {"a": 2, "b": 2}) and None, ["--dataset", "images", "--image-size", "32"],
         "image_size '32' must be HEIGHTxWIDTH in pixels, like 32x32"),
        (lambda d: image_folder(d, {"a": 2}), ["--dataset", "images"], "has 1 class folders; a classifier needs at least 2"),
        (lambda d: image_folder(d / "train", {"a": 2, "b": 2}, split=False), ["--dataset", "images"], "has train/ but no test/"),
        (lambda d: (image_folder(d, {"a": 2, "b": 2}), (d / "train" / "a" / "000.png").write_text("no")), ["--dataset", "images"],
         "train/a/000.png: cannot decode it as an image"),
        (lambda d: (image_folder(d, {"a": 2, "b": 2}), (d / "train" / "a" / "x.gif").write_text("")), ["--dataset", "images"],
         "train/a/x.gif: not a .png, .jpg, .jpeg file"),
        (lambda d: (image_folder(d, {"a": 2, "b": 2}), (d / "test" / "c").mkdir()), ["--dataset", "images"],
         "test/c has no"),
        (lambda d: (hub_parquet(d, ["x", "y"]), (d / "data" / "test-00000-of-00001.parquet").unlink()), ["--dataset", "parquet"],
         "has no test-*.parquet file"),
        (lambda d: (hub_parquet(d, ["x", "y"]), (d / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1")), ["--dataset", "parquet"],
         "train-00000-of-00001.parquet: not a Parquet file"),
        (None, ["--dataset", "mnist", "--channels", "3"], "image_size and channels apply to images that are decoded"),
        (lambda d: image_folder(d, {"a": 2, "b": 2}), ["--dataset", "images", "--validation-size", "4"],
         "validation_size 4 leaves no training samples: the training file has 4"),
    ],
    ids=["no-source", "bad-size", "one-class", "train-without-test", "bad-first-image", "not-an-image-file", "test-class-not-trained",
         "no-test-file", "not-parquet", "channels-for-mnist", "validation-takes-all"],
)  # fmt: skip
def test_a_bad_source_is_one_line_and_exit_2_before_any_stage(tmp_path, capsys, make, flags, message):
    source = tmp_path / "source"
    source.mkdir()
    if make:
        make(source)
    err = refused(tmp_path, capsys, *flags, *(["--source", str(source)] if flags[1] != "mnist" and make else []))
    assert message in err, err


def test_the_command_sizes_the_training_split_of_an_image_folder_before_tensorflow_and_prefect_load(tmp_path):
    from tests.test_first_contact import HEAVY, run_with_imports

    image_folder(tmp_path / "pets", {"cat": 2, "dog": 2})
    flags = ["--dataset", "images", "--source", str(tmp_path / "pets"), "--storage", str(tmp_path / "store"), "--validation-size", "1"]
    result, packages = run_with_imports(["flows/train.py", *flags, "--batch-size", "4"])
    assert result.returncode == 2 and not packages & HEAVY, result.stderr
    assert result.stderr == "flows/train.py: error: batch_size 4 is larger than the training split's 3 samples (4 less validation_size 1)\n"
    assert not (tmp_path / "store").exists()
