"""Packing conserves tokens; shards round-trip through the reader; tampering is caught."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ChecksumError, ManifestError
from pipeline.manifest import FORMAT_VERSION, write_manifest
from pipeline.pack import Packer
from pipeline.reader import DatasetReader
from pipeline.writer import ShardWriter, token_dtype


def test_packer_never_loses_a_token_at_call_edges():
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 1000, size=1013).astype(np.uint32)
    packer = Packer(row_len=17, dtype=np.uint16)
    rows, start = [], 0
    for size in rng.integers(0, 60, size=200):
        rows.append(packer.add(stream[start : start + size]))
        start += size
    rows.append(packer.add(stream[start:]))
    packed = np.concatenate(rows)
    assert packed.shape == (1013 // 17, 17)
    assert packer.remainder == 1013 % 17
    np.testing.assert_array_equal(packed.reshape(-1), stream[: packed.size])


def test_token_dtype_follows_vocab():
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32


def write_dataset(root, rows_per_shard=4, total_rows=10, row_len=9, vocab=70000):
    dtype = token_dtype(vocab)
    writer = ShardWriter(str(root), "train", row_len, dtype, rows_per_shard)
    data = np.arange(total_rows * row_len, dtype=np.int64).reshape(total_rows, row_len)
    writer.add(data[:3])
    writer.add(data[3:])
    shards = writer.close()
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": "f" * 16,
        "seq_len": row_len - 1,
        "row_len": row_len,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "special_tokens": {"pad": 0, "bos": 1, "eos": 2},
        "splits": {"train": {"rows": total_rows, "shards": shards}},
    }
    write_manifest(str(root), manifest, None)
    return data, shards


def test_shards_round_trip_with_row_offsets(tmp_path):
    data, shards = write_dataset(tmp_path)
    assert [s["rows"] for s in shards] == [4, 4, 2]
    assert [s["tokens"] for s in shards] == [36, 36, 18]
    table = pq.read_table(tmp_path / shards[0]["path"])
    kind = table.schema.field("input_ids").type
    assert pa.types.is_fixed_size_list(kind) and kind.list_size == 9
    assert kind.value_type == pa.uint32()
    ds = DatasetReader(str(tmp_path))
    assert ds.num_rows("train") == 10 and ds.eos_token_id == 2
    assert ds.shard_row_offsets("train").tolist() == [0, 4, 8, 10]
    got = np.concatenate([ds.read_shard("train", i) for i in range(3)])
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, data)


def test_checksum_mismatch_names_the_shard(tmp_path):
    _, shards = write_dataset(tmp_path)
    target = tmp_path / shards[1]["path"]
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    ds = DatasetReader(str(tmp_path))
    ds.read_shard("train", 0)
    with pytest.raises(ChecksumError, match="train/part-00001.parquet"):
        ds.read_shard("train", 1)
    target.unlink()
    with pytest.raises(ChecksumError, match="part-00001.parquet .* missing"):
        ds.read_shard("train", 1)


def test_reader_refuses_a_folder_without_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest.json not found"):
        DatasetReader(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ManifestError, match="format_version 99"):
        DatasetReader(str(tmp_path))
