"""The benchmarks run end to end at tiny sizes, so a figure in BENCHMARKS.md can always be
re-measured. Speed itself is never asserted here (BENCHMARKS.md holds the figures).

Run with: python -m pytest tests/test_benchmarks.py -q
"""

from __future__ import annotations

import math
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.mark.slow
def test_train_throughput_benchmark_runs_both_paths():
    import train_throughput

    result = train_throughput.main(["--encoders", "tiny", "--batch", "16", "--steps", "2"])
    assert set(result) == {"store", "online", "extract_s"}
    assert all(math.isfinite(v) and v > 0 for v in result.values())


def test_loader_benchmark_store_matches_what_open_store_reads(tmp_path):
    import loader

    loader.make_store(tmp_path, samples=40, shard_size=16, token_len=5, dim=8)
    from edge_glass.features import open_store

    split = open_store(tmp_path, "train")
    assert len(split) == 40 and split.shard_sizes.tolist() == [16, 16, 8]
    assert loader.bare_hdf5(tmp_path / "train", 8) == 40
    assert loader.bare_wds(tmp_path / "train") == 40
    assert loader.through_loader(tmp_path, "hdf5", 8) == loader.through_loader(tmp_path, "webdataset", 8) == 40
