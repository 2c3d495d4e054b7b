"""The IDX file format of (Fashion-)MNIST: parse with validation, and encode.

An IDX file is two zero bytes, a type code (0x08: unsigned byte), the number of
dimensions, each dimension as a big-endian uint32, then the data in C order.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from tapeline.errors import TapelineError

UBYTE = 0x08


class IdxError(TapelineError, ValueError):
    """An IDX file is malformed; the message names the file."""


def read_idx_gz(path: Path, ndim: int | tuple[int, ...]) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes with `ndim` dimensions (or any count of the tuple `ndim`)."""
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as error:
        raise IdxError(f"{path.name}: not a complete gzip file ({error})") from None
    return parse_idx(data, ndim, path.name)


def parse_idx(data: bytes, ndim: int | tuple[int, ...], name: str) -> np.ndarray:
    shape = parse_header(data, ndim, name)
    header = 4 + 4 * len(shape)
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise IdxError(f"{name}: {len(data)} bytes, but its header {list(shape)} needs {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def parse_header(data: bytes, ndim: int | tuple[int, ...], name: str) -> tuple[int, ...]:
    """The shape an IDX file's header declares, of `ndim` dimensions or any count of the tuple `ndim` (its first
    4 + 4 * dimensions bytes suffice)."""
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if len(data) < 4:
        raise IdxError(f"{name}: {len(data)} bytes is too short for an IDX header")
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != UBYTE:
        raise IdxError(f"{name}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000{UBYTE:02x}{allowed[0]:02x})")
    if dims not in allowed:
        raise IdxError(f"{name}: {dims} dimensions, expected {' or '.join(map(str, allowed))}")
    header = 4 + 4 * dims
    if len(data) < header:
        raise IdxError(f"{name}: truncated IDX header")
    return struct.unpack(f">{dims}I", data[4:header])


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX bytes of a uint8 array (the inverse of `parse_idx`)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return struct.pack(f">HBB{array.ndim}I", 0, UBYTE, array.ndim, *array.shape) + array.tobytes()
