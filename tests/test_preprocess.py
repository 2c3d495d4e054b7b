import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tapeline.data.fetch import fetch_dataset
from tapeline.data.idx import IdxError, encode_idx, parse_idx, read_idx_gz
from tapeline.data.splits import image_type, prepare, read_split
from tapeline.errors import ConfigError
from tapeline.storage.layout import manifest_path
from tapeline.storage.root import Storage
from tests.helpers import tiny_arrays


@pytest.fixture
def files(tiny, tmp_path):
    dataset, source = tiny
    return fetch_dataset(dataset, Storage(tmp_path / "store"), str(source))


def test_idx_round_trip():
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    assert np.array_equal(parse_idx(encode_idx(array), 3, "x"), array)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00\x00\x09\x03" + struct.pack(">3I", 1, 28, 28) + bytes(784), "bad IDX magic"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + bytes(5), "1 dimensions, expected 3"),
        (b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 28, 28) + bytes(784), "needs"),
        (b"\x00\x00", "too short"),
    ],
)
def test_malformed_idx_is_a_clear_error(data, message):
    with pytest.raises(IdxError, match=message):
        parse_idx(data, 3, "train-images-idx3-ubyte.gz")


def test_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(encode_idx(np.zeros((10, 28, 28), np.uint8)))[:-20])
    with pytest.raises(IdxError, match="train-images-idx3-ubyte.gz: not a complete gzip"):
        read_idx_gz(path, 3)


def test_splits_schema_and_manifest(files, tmp_path):
    data = prepare(files, Storage(tmp_path / "store"), seed=7, validation_size=50)
    assert data.counts == {"train": 250, "validation": 50, "test": 100} and not data.cached
    table = pq.read_table(data.uris["train"])
    assert table.schema.field("sample_id").type == pa.int64()
    assert table.schema.field("label").type == pa.uint8()
    assert table.schema.field("image").type == image_type((28, 28, 1))
    assert table.schema.field("image").type.shape == [28, 28, 1]
    assert sorted(p.name for p in Path(data.directory).iterdir()) == ["test.parquet", "train.parquet", "validation.parquet"]
    manifest = json.loads(manifest_path(Path(data.directory)).read_text())  # beside the splits' directory
    assert manifest["source_sha256"] == files.sha256
    assert sum(manifest["splits"]["train"]["class_counts"]) == 250
    assert 0 < manifest["pixel_mean"] < 1 and 0 < manifest["pixel_std"] < 1


def test_split_is_deterministic_disjoint_and_faithful(files, tmp_path):
    arrays = tiny_arrays()
    first = prepare(files, Storage(tmp_path / "a"), seed=7, validation_size=50)
    again = prepare(files, Storage(tmp_path / "b"), seed=7, validation_size=50)
    other = prepare(files, Storage(tmp_path / "c"), seed=8, validation_size=50)
    train_images, train_labels, train_ids = read_split(first.uris["train"])
    _, _, val_ids = read_split(first.uris["validation"])
    assert set(train_ids).isdisjoint(val_ids) and len(set(train_ids) | set(val_ids)) == 300
    assert np.array_equal(val_ids, read_split(again.uris["validation"])[2])
    assert not np.array_equal(val_ids, read_split(other.uris["validation"])[2])
    # Rows are the original samples, pixel for pixel.
    assert np.array_equal(train_images[..., 0], arrays["train_images"][train_ids])
    assert np.array_equal(train_labels, arrays["train_labels"][train_ids])


def test_same_inputs_are_served_from_cache(files, tmp_path):
    storage = Storage(tmp_path / "store")
    first = prepare(files, storage, seed=1, validation_size=10)
    second = prepare(files, storage, seed=1, validation_size=10)
    assert second.cached and second.uris == first.uris
    assert not prepare(files, storage, seed=1, validation_size=11).cached


def test_refresh_rebuilds_in_place(files, tmp_path):
    storage = Storage(tmp_path / "store")
    first = prepare(files, storage, seed=1, validation_size=10)
    Path(first.uris["test"]).write_bytes(b"damaged")
    again = prepare(files, storage, seed=1, validation_size=10, refresh=True)
    assert not again.cached and again.uris == first.uris
    assert len(read_split(again.uris["test"])[0]) == 100
    key = Path(again.directory).name
    assert sorted(p.name for p in Path(again.directory).parent.iterdir()) == [key, f"{key}.manifest.json"]  # no temporary left


def test_validation_size_too_large(files, tmp_path):
    with pytest.raises(ConfigError, match="leaves no training samples"):
        prepare(files, Storage(tmp_path / "store"), seed=1, validation_size=300)
    assert not list((tmp_path / "store" / "datasets").rglob("*manifest.json"))
