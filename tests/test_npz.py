"""The .npz reader against zip directories made to lie: whatever the directory says, the arrays
it returns never add up to more bytes than the file holds, and a bad structure is one ValueError."""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlecli.safe import npz

ARRAYS = {"W1": np.arange(32, dtype=np.float32).reshape(8, 4), "b1": np.ones(4, np.float32),
          "meta": np.array('{"format": 1}')}
CD = b"PK\x01\x02"
EOCD = b"PK\x05\x06"


def written(arrays=ARRAYS) -> bytes:
    buf = io.BytesIO()
    npz.write(buf, arrays)
    return buf.getvalue()


GOOD = written()


def directory(data: bytes) -> tuple[int, list[bytes]]:
    """(offset of the central directory, its records) of a zip written by npz.write."""
    start = zipfile.ZipFile(io.BytesIO(data)).start_dir
    records, at = [], start
    while data[at : at + 4] == CD:
        n, x, c = struct.unpack("<HHH", data[at + 28 : at + 34])
        records.append(data[at : at + 46 + n + x + c])
        at += 46 + n + x + c
    return start, records


def with_directory(data: bytes, entries: list[tuple[int, str | None, int, int]]) -> bytes:
    """`data` with its central directory replaced by `entries`: (which original record, a new
    name or None, a change of its local-header offset, a change of both its sizes)."""
    start, records = directory(data)
    out = []
    for index, name, offset_delta, size_delta in entries:
        rec = bytearray(records[index % len(records)])
        (n,) = struct.unpack("<H", rec[28:30])
        old_name = bytes(rec[46 : 46 + n])
        new_name = old_name if name is None else name.encode()
        csize, usize = struct.unpack("<II", rec[20:28])
        (offset,) = struct.unpack("<I", rec[42:46])
        rec[20:28] = struct.pack("<II", max(0, csize + size_delta), max(0, usize + size_delta))
        rec[42:46] = struct.pack("<I", max(0, offset + offset_delta))
        rec[28:30] = struct.pack("<H", len(new_name))
        out.append(bytes(rec[:46]) + new_name + bytes(rec[46 + n :]))
    cd = b"".join(out)
    eocd = EOCD + struct.pack("<HHHHIIH", 0, 0, len(out) & 0xFFFF, len(out) & 0xFFFF, len(cd), start, 0)
    return data[:start] + cd + eocd


def read_from(tmp_path, data: bytes, **kw):
    path = tmp_path / "x.npz"
    path.write_bytes(data)
    return npz.read(path, check_crc=kw.get("check_crc", True), names=kw.get("names"))


def test_written_files_round_trip_and_are_byte_identical(tmp_path):
    got = read_from(tmp_path, GOOD)
    assert got.keys() == ARRAYS.keys() and all(np.array_equal(got[k], ARRAYS[k]) for k in ARRAYS)
    assert written() == GOOD  # no timestamps: the same arrays, the same bytes
    with np.load(io.BytesIO(GOOD), allow_pickle=False) as z:  # numpy reads them as its own
        assert np.array_equal(z["W1"], ARRAYS["W1"])


def test_one_member_listed_200_times_is_refused(tmp_path):
    data = with_directory(GOOD, [(0, None, 0, 0)] * 200)
    with pytest.raises(ValueError, match=r"^member W1.npy is listed twice$"):
        read_from(tmp_path, data)


def test_200_names_for_one_members_bytes_are_refused(tmp_path):
    data = with_directory(GOOD, [(0, f"W{i}.npy", 0, 0) for i in range(200)])
    with pytest.raises(ValueError, match=r"^member W0.npy has another name in its local header$"):
        read_from(tmp_path, data)


def test_members_whose_bytes_overlap_are_refused(tmp_path):
    data = with_directory(GOOD, [(0, None, 0, 100), (1, None, 0, 0), (2, None, 0, 0)])
    with pytest.raises(ValueError, match=r"^members W1.npy and b1.npy overlap$"):
        read_from(tmp_path, data)


def test_a_size_beyond_the_file_is_refused(tmp_path):
    data = with_directory(GOOD, [(0, None, 0, 10_000), (1, None, 0, 0), (2, None, 0, 0)])
    with pytest.raises(ValueError, match=r"^member W1.npy runs past the start of the zip directory"):
        read_from(tmp_path, data)


def test_a_member_renamed_in_the_directory_is_refused(tmp_path):
    data = with_directory(GOOD, [(0, "b1.npy", 0, 0)])
    with pytest.raises(ValueError, match=r"^member b1.npy has another name in its local header$"):
        read_from(tmp_path, data)


def test_a_directory_of_thousands_of_entries_is_refused_before_it_is_parsed(tmp_path):
    data = with_directory(GOOD, [(i % 3, f"m{i}.npy", 0, 0) for i in range(1000)])
    with pytest.raises(ValueError, match=r"^the zip directory lists 1000 members in \d+ bytes; too many"):
        read_from(tmp_path, data)


entries = st.lists(
    st.tuples(st.integers(0, 2), st.one_of(st.none(), st.sampled_from(["W1.npy", "b1.npy", "meta.npy", "x.npy"])),
              st.one_of(st.just(0), st.integers(-200, 200)), st.one_of(st.just(0), st.integers(-64, 64))),
    min_size=1, max_size=12,
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("npz") / "x.npz"


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries, st.booleans(), st.one_of(st.none(), st.just(("W1",))))
def test_whatever_the_directory_says_the_arrays_fit_in_the_file_or_it_is_refused(scratch, entries, crc, names):
    data = with_directory(GOOD, entries)
    path = scratch
    path.write_bytes(data)
    try:
        got = npz.read(path, check_crc=crc, names=names)
    except ValueError:
        return
    assert sum(a.nbytes for a in got.values()) <= len(data)
    for k, a in got.items():
        if k in ARRAYS and crc:
            assert np.array_equal(a, ARRAYS[k])  # a member that reads under its CRC is the original
