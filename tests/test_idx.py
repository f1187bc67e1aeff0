import gzip
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlecli.data.idx import CHUNK, IdxDecoder, gunzip, idx_bytes, parse_idx, read_idx, write_idx
from mlecli.safe.errors import DataError


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


# ---------------------------------------------------------------------------
# The streaming decoder, searched with hypothesis: fed in any pieces, it agrees with the
# one-shot parser; it never hands out more than the header declares.

SEARCH = settings(max_examples=200, deadline=None, derandomize=True, database=None)
arrays = st.builds(
    lambda shape, seed, kind: np.random.default_rng(seed).integers(0, 256, size=shape).astype(kind),
    st.lists(st.integers(0, 6), min_size=1, max_size=3).map(tuple), st.integers(0, 99),
    st.sampled_from([np.uint8, np.int16, np.float64]),
)


def decode_in_pieces(data: bytes, cuts: list[int], limit: int | None = None) -> bytes:
    decoder = IdxDecoder("f", *([limit] if limit is not None else []))
    out, start = [], 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        out += decoder.feed(data[start:cut])
        start = cut
    out += decoder.finish()
    return b"".join(out)


def one_shot(data: bytes) -> bytes:
    """The reference: decompress whole (gzip or raw), then parse whole."""
    content = gunzip(data, "f") if data[:2] == b"\x1f\x8b" else data
    parse_idx(content, "f")
    return content


@st.composite
def encoded(draw):
    content = idx_bytes(draw(arrays))
    if draw(st.booleans()):
        return content
    cut = draw(st.integers(0, len(content)))
    members = [content[:cut], content[cut:]] if draw(st.booleans()) else [content]
    data = b"".join(gzip.compress(m, compresslevel=draw(st.integers(0, 9)), mtime=0) for m in members)
    return data + b"\0" * draw(st.sampled_from([0, 0, 1, 7]))


@st.composite
def damaged(draw):
    data = bytearray(draw(encoded()))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "cut", "append", "insert"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[i:]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=9))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=9))
    return bytes(data)


@SEARCH
@given(encoded(), st.lists(st.integers(0, 1 << 16), max_size=6))
def test_any_split_of_a_good_file_decodes_to_its_content(data, cuts):
    assert decode_in_pieces(data, cuts) == one_shot(data)


@SEARCH
@given(damaged(), st.lists(st.integers(0, 1 << 16), max_size=6))
def test_a_damaged_file_decodes_as_the_one_shot_parser_says_or_is_refused(data, cuts):
    try:
        expected = one_shot(data)
    except DataError:
        expected = None
    try:
        got = decode_in_pieces(data, cuts)
    except DataError as exc:
        assert str(exc).startswith("f: ")
        got = None
    assert got == expected


ZERO_MEMBERS = [gzip.compress(b"\0" * size, compresslevel=level, mtime=0)
                for size, level in ((1 << 10, 0), (1 << 20, 1), (1 << 20, 9), (16 << 20, 9))]


@SEARCH
@given(st.integers(0, 20), st.integers(1, 40), st.sampled_from(ZERO_MEMBERS), st.integers(1, 8), st.booleans())
def test_a_bomb_is_refused_at_most_one_piece_past_its_header(n, side, zeros, copies, same_member):
    header = idx_bytes(np.zeros((n, side), np.uint8))
    if same_member:  # the zeros inside the header's own gzip member
        bomb = gzip.compress(header + b"\0" * (copies << 20), compresslevel=1, mtime=0)
    else:
        bomb = gzip.compress(header, mtime=0) + zeros * copies
    decoder = IdxDecoder("f")
    with pytest.raises(DataError, match=rf"^f: decompresses to more than the {len(header):,} bytes its IDX header"):
        for _ in decoder.feed(bomb):
            pass
    assert decoder.produced <= len(header) + CHUNK


def test_a_header_declaring_more_than_the_limit_is_refused_before_its_data():
    decoder = IdxDecoder("f", limit=1000)
    with pytest.raises(DataError, match=r"^f: its IDX header declares 100x100 of uint8 \(10,012 bytes\), more than the 1,000"):
        list(decoder.feed(idx_bytes(np.zeros((100, 100), np.uint8))[:12]))
