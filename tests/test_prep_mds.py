"""The prep job's own MDS writer must stay byte-compatible with mosaicml-streaming."""

import filecmp
import json

import numpy as np
import pytest

from m2train.data_prep.mds import TokenShardWriter, merge_indexes


def _samples(n, seed=0, dtype=np.uint16, ragged=True):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(1, 300)) if ragged else 257
        out.append(rng.integers(0, np.iinfo(dtype).max, size=length).astype(dtype))
    return out


@pytest.mark.parametrize("dtype,compression", [(np.uint16, "zstd"), (np.uint32, "zstd:1"), (np.uint16, None)])
def test_byte_identical_to_streaming_mdswriter(tmp_path, dtype, compression):
    from streaming import MDSWriter

    samples = _samples(400, dtype=dtype)
    enc = f"ndarray:{np.dtype(dtype).name}"
    # A small size limit forces several shards, so the flush rule is compared too.
    with MDSWriter(out=str(tmp_path / "ref"), columns={"tokens": enc}, compression=compression,
                   size_limit=20_000) as w:
        for s in samples:
            w.write({"tokens": s})
    ours = TokenShardWriter(tmp_path / "ours", {"tokens": enc}, compression=compression, size_limit=20_000)
    for s in samples:
        ours.write({"tokens": s})
    assert ours.finish() == 400
    ref_files = sorted(p.name for p in (tmp_path / "ref").iterdir())
    our_files = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert ref_files == our_files and len(ref_files) > 3
    for name in ref_files:
        if name == "index.json":
            assert json.loads((tmp_path / "ref" / name).read_text()) == \
                json.loads((tmp_path / "ours" / name).read_text())
        else:
            assert filecmp.cmp(tmp_path / "ref" / name, tmp_path / "ours" / name, shallow=False), name


def test_merged_subdirs_read_by_streaming(tmp_path):
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    root = tmp_path / "root"
    expected = []
    for k, sub in enumerate(["b-unit", "a-unit", "c-unit"]):
        w = TokenShardWriter(root / sub, {"tokens": "ndarray:uint16"}, size_limit=3000)
        for s in _samples(30 + k, seed=k):
            w.write({"tokens": s})
            expected.append(s)
        w.finish()
    # Order is the caller's, not alphabetical.
    assert merge_indexes(root, ["b-unit", "a-unit", "c-unit"]) == len(expected)
    ds = StreamingDataset(local=str(root), shuffle=False, batch_size=1)
    got = [ds[i]["tokens"] for i in range(len(ds))]
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
