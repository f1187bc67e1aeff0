import gzip
import struct

import numpy as np
import pytest

from mlecli.errors import DataError
from mlecli.idx import gunzip, idx_bytes, parse_idx, read_idx, write_idx


@pytest.mark.parametrize(
    "dtype, code",
    [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)],
)
def test_every_type_code_round_trips_big_endian(dtype, code):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if np.dtype(dtype).kind == "u":
        arr = np.arange(24, dtype=dtype).reshape(2, 3, 4)
    data = idx_bytes(arr)
    assert data[:4] == bytes([0, 0, code, 3])
    assert struct.unpack(">3I", data[4:16]) == (2, 3, 4)
    assert data[16:] == arr.astype(np.dtype(dtype).newbyteorder(">")).tobytes()
    back = parse_idx(data)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    np.testing.assert_array_equal(back, arr)


@pytest.mark.parametrize("shape", [(0,), (7,), (3, 1), (2, 2, 2, 2), (1, 1, 1, 1, 1)])
def test_any_number_of_dimensions(shape):
    arr = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    np.testing.assert_array_equal(parse_idx(idx_bytes(arr)), arr)


def test_known_bytes_of_a_label_file():
    # magic 0x00000801, 3 items, then the bytes themselves
    assert parse_idx(b"\x00\x00\x08\x01\x00\x00\x00\x03\x07\x02\x01").tolist() == [7, 2, 1]


def test_bad_magic_names_the_file():
    with pytest.raises(DataError, match=r"^f.idx: not an IDX file \(magic number 01000801"):
        parse_idx(b"\x01\x00\x08\x01\x00\x00\x00\x00", "f.idx")


def test_unknown_type_code():
    with pytest.raises(DataError, match=r"^f: unknown IDX type code 0x07"):
        parse_idx(b"\x00\x00\x07\x01\x00\x00\x00\x00", "f")


def test_truncated_header():
    with pytest.raises(DataError, match=r"^f: truncated IDX header \(6 bytes, 1 dimensions need 8\)"):
        parse_idx(b"\x00\x00\x08\x01\x00\x00", "f")


def test_truncated_data():
    data = idx_bytes(np.zeros((2, 3), np.uint8))[:-1]
    with pytest.raises(DataError, match=r"^f: truncated IDX data: the header says 2x3 \(18 bytes in all\), the file has 17"):
        parse_idx(data, "f")


def test_trailing_bytes():
    with pytest.raises(DataError, match=r"^f: 2 trailing bytes after the IDX data \(expected 18 bytes\)"):
        parse_idx(idx_bytes(np.zeros((2, 3), np.uint8)) + b"xx", "f")


def test_huge_header_claim_is_refused_without_allocating():
    data = b"\x00\x00\x0e\x02" + struct.pack(">2I", 2**32 - 1, 2**32 - 1)
    with pytest.raises(DataError, match="truncated IDX data"):
        parse_idx(data, "f")


def test_read_idx_accepts_gzip_and_raw(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(tmp_path / "a.gz", arr)
    write_idx(tmp_path / "a", arr)
    assert (tmp_path / "a.gz").read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), arr)


def test_read_idx_of_a_truncated_gzip_names_the_file(tmp_path):
    p = tmp_path / "cut.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.zeros(100, np.uint8)))[:-12])
    with pytest.raises(DataError, match=rf"^{p}: the gzip stream is truncated"):
        read_idx(p)


def test_read_idx_of_a_missing_file(tmp_path):
    with pytest.raises(DataError, match=rf"^cannot read {tmp_path / 'nope'}: No such file"):
        read_idx(tmp_path / "nope")


def test_gunzip_joins_members_and_refuses_a_bomb():
    assert gunzip(gzip.compress(b"ab") + gzip.compress(b"cd"), "f") == b"abcd"
    with pytest.raises(DataError, match="decompresses to more than 1000 bytes"):
        gunzip(gzip.compress(b"\0" * 5000), "f", limit=1000)
