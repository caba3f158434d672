"""The benchmarks run end to end at tiny sizes, so a figure in BENCHMARKS.md can always be
re-measured. Speed itself is never asserted here (BENCHMARKS.md holds the figures).

Run with: python -m pytest tests/test_benchmarks.py -q
"""

from __future__ import annotations

import math
import os
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


TINY = {"vision": (5, 8, 8), "audio": (5, 8, 8), "text": ((2, 6), 8, 8)}


def test_loader_benchmark_store_matches_what_open_store_reads(tmp_path):
    import loader

    loader.make_store(tmp_path, 40, 16, TINY, formats=("hdf5", "webdataset"))
    from edge_glass.features import open_store

    split = open_store(tmp_path, "train")
    assert len(split) == 40 and split.shard_sizes.tolist() == [16, 16, 8]
    assert loader.bare_hdf5(tmp_path / "train", 8) == 40
    assert loader.bare_wds(tmp_path / "train") == 40
    assert loader.through_loader(tmp_path, "hdf5", 8) == loader.through_loader(tmp_path, "webdataset", 8) == 40


def test_loader_benchmark_compares_the_same_batches_with_the_gather_limit(tmp_path):
    import loader
    import numpy as np
    import torch

    from edge_glass.features import FeatureLoader, open_store

    loader.make_store(tmp_path, 64, 16, {"vision": (5, 8, 8), "text": ((2, 6), 8, 8)})
    batches = loader.batch_rows(tmp_path, 8, seed=0)
    feature_loader = FeatureLoader(open_store(tmp_path, "train"), 8, seed=0, reuse_buffers=True)
    # The gather limit reads the very samples the loader's batches hold, batch for batch.
    for rows, batch in zip(batches, feature_loader):
        assert sorted(batch["keys"]) == sorted(f"train-{i:08d}" for i in rows)
    whole = open_store(tmp_path, "train").read(0, 64, ["vision", "text"])
    vision = torch.from_numpy(whole.modalities["vision"].tokens.reshape(64, -1))
    text = torch.zeros(64, 5 * 8, dtype=torch.float16)  # captions padded to the longest (5 rows)
    result = loader.measure([vision, text], batches, feature_loader, repeats=2, split_dir=tmp_path / "train")
    figures = (result["one"], result["default"], *result["loader"], result["ratio"], result["pread"],
               result["pread_ratio"], result["loader_of_pread"], result["loader_cpu"])
    assert all(np.isfinite(v) and v > 0 for v in figures)
    assert np.isfinite(result["pread_cpu"]) and result["pread_cpu"] >= 0


def test_loader_benchmark_pread_baseline_copies_each_samples_stored_rows(tmp_path):
    """The kernel-copy baseline moves the bytes the loader's batches hold: each sample's vision
    rows, then its caption rows, into the sample's slot."""
    import loader
    import numpy as np
    import torch

    from edge_glass.features import open_store
    from edge_glass.features.batch_buffers import host_buffer

    loader.make_store(tmp_path, 48, 16, {"vision": (5, 8, 8), "text": ((2, 6), 8, 8)})
    batches = loader.batch_rows(tmp_path, 8, seed=0)
    whole = open_store(tmp_path, "train").read(0, 48, ["vision", "text"])
    vision, text = whole.modalities["vision"], whole.modalities["text"]
    slot = (5 + 5) * 8 * 2  # vision rows, then room for the longest caption (5 rows of 8 fp16)
    with pytest.raises(ValueError, match="do not fit"):
        loader.sample_reads(tmp_path / "train", batches, slot - 2)  # no room for the longest caption
    fds, reads = loader.sample_reads(tmp_path / "train", batches, slot)
    try:
        for threads in (1, 2):
            outs = [host_buffer(8 * slot, torch.uint8).numpy() for _ in range(threads)]
            rate, cpu = loader.pread_ceiling(fds, reads[:threads], 8 * threads, slot, threads, outs)
            assert np.isfinite(rate) and rate > 0 and np.isfinite(cpu) and cpu >= 0
            for t in range(threads):
                got = outs[t].view(np.float16).reshape(8, 10, 8)
                for j, i in enumerate(batches[t].tolist()):
                    n = int(text.lengths[i])
                    np.testing.assert_array_equal(got[j, :5], vision.tokens[5 * i : 5 * i + 5])
                    np.testing.assert_array_equal(got[j, 5 : 5 + n], text.tokens[text.offsets[i] : text.offsets[i] + n])
    finally:
        for fd in fds:
            os.close(fd)


def test_scale_benchmark_measures_a_store_in_bounded_resources(tmp_path):
    import loader
    import scale

    loader.make_store(tmp_path, 400, 10, scale.SMALL)  # 40 shards, 8 open at most
    r = scale.measure(tmp_path, batch=16, seconds=0.5, max_open_shards=8)
    assert r["shards"] == 40 and r["samples"] == 400 and r["samples_per_s"] > 0
    assert 0 < r["open_files"] <= 8
    assert r["rss_anon_mb"] > 0 and r["first_batch_s"] > 0
    # the growth over the process before the store was opened, a fraction of the totals
    assert r["grew_anon_mb"] < r["rss_anon_mb"] and r["grew_file_mb"] < r["rss_file_mb"]
    assert r["released_pages"] is False  # the trainer's default: a store this small stays cached
    assert scale._row("400 idle", r).split()[-1] == "no"  # the printed row carries it


def test_search_benchmark_measures_exact_and_faiss_indexes():
    import search

    results = search.main(["--sizes", "2000", "--dim", "16", "--seconds", "0.05"])[2000]
    assert [r["index"] for r in results][:3] == ["exact (torch)", "faiss flat", "faiss HNSW32"]
    assert results[0]["recall@10"] == 1.0 and results[1]["recall@10"] == 1.0  # both exact
    assert all(0.0 <= r["recall@10"] <= 1.0 and r["ms_1"] > 0 for r in results)


def test_instruct_step_benchmark_compares_the_layouts_at_tiny_shapes(tmp_path):
    import instruct_step
    from _gpu_check_models import model_dir

    # Each variant's measurement in this process (the benchmark runs each in its own, for its
    # peak memory; main() and the table are exercised by the --find-batch test below).
    model = str(model_dir(tmp_path, "qwen", dry_run=True))
    rows = [instruct_step.one_variant(model, v, batch=12, seq=256, steps=1, device="cpu", dtype="fp32", groups=4)
            for v in instruct_step.BASIC]
    by = {r["variant"]: r for r in rows}
    assert list(by) == ["plain", "chunked", "grouped", "packed"]
    for r in rows:  # every layout computes the same mean loss over the same answer tokens
        assert r["loss"] == pytest.approx(by["plain"]["loss"], rel=1e-5), r["variant"]
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] >= 0
    assert 0 < by["plain"]["supervised_fraction"] < by["plain"]["useful_fraction"] < 1
    # Rows twice the longest example: packing leaves less padding than one example a row, in fewer rows.
    assert by["packed"]["useful_fraction"] > by["plain"]["useful_fraction"]
    assert by["grouped"]["useful_fraction"] > by["plain"]["useful_fraction"]
    assert by["packed"]["rows"] < by["plain"]["rows"] == 12


def test_instruct_step_find_batch_stops_at_the_memory_limit():
    import instruct_step

    # A limit no step fits under: the first size is measured, found too large, and doubling stops.
    rows = instruct_step.main(["--shapes", "tiny", "--find-batch", "--batch", "2", "--max-batch", "64", "--seq", "64",
                               "--steps", "1", "--memory-limit-gb", "0"])["tiny"]
    assert [r["batch"] for r in rows] == [2] and rows[0]["variant"] == "packed" and rows[0]["tokens_per_s"] > 0
