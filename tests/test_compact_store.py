"""int8 / int4 token stores: the converter, extraction straight to int8, the loader and the model.

    python -m pytest tests/test_compact_store.py -q

- `python -m edge_glass.features convert` rewrites every split with the codes of quantize.py:
  read back they are within the stated error of the float16 store, the token bytes shrink as
  stated, the encoder fingerprint is kept and the store fingerprint changes, `verify` passes, and
  a re-run converts only what is missing, to the same bytes.
- Extraction with `features.token_dtype: int8` calibrates once per store and records how to
  dequantise; its statistics equal those of the float16 extraction of the same features.
- The loader hands over codes; dequantised on the model's side they are the float16 batch.
- A model trained on the float16 store embeds the int8/int4 stores' samples almost exactly as
  its own (evaluate.py --features_dir), and a model trains on a converted store.
- A model trained on the int8 store reads the float16 one (nothing to dequantise).
- A manifest that says int8 but not how to dequantise is refused: by the loader, naming the
  store's setting, and by evaluate.py, naming both the store's and the run's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.feature_world import encoders_for, feature_world, manifests, records, shard_digests
from helpers.trainer_world import (
    assert_finite_losses,
    assert_one_line_error,
    eval_records,
    run_script,
    train,
    trainer_world,
)

from edge_glass.features.extract import extract_store
from edge_glass.features.loader import FeatureLoader
from edge_glass.features.quantize import TokenLayout, dequantize_features
from edge_glass.features.store import open_store
from edge_glass.features.verify import verify_store
from edge_glass.training.align_eval import embed_split
from edge_glass.training.run_loading import load_alignment_model
from edge_glass.utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
BOUND = {"int8": 0.01, "int4": 0.10}  # mean per-token relative error (BENCHMARKS.md: 0.1-0.6 % and 2-8 % measured)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return feature_world(tmp_path_factory)


def convert(src: Path, dst: Path, dtype: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_glass.features", "convert", str(src), str(dst),
                           "--token_dtype", dtype, *extra], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def converted(world, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for dtype in ("int8", "int4"):
        proc = convert(world.store, root / dtype, dtype)
        assert proc.returncode == 0, proc.stderr
        out[dtype] = root / dtype
    return out


def _relative_error(x: np.ndarray, y: np.ndarray) -> float:
    return float((np.linalg.norm(y - x, axis=1) / np.maximum(np.linalg.norm(x, axis=1), 1e-12)).mean())


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_converted_store_reads_back_within_the_stated_error(world, converted, dtype):
    for split in ("train", "val", "test"):
        src, dst = open_store(world.store, split), open_store(converted[dtype], split)
        a, b = src.read(0, len(src)), dst.read(0, len(dst))
        assert a.keys == b.keys and a.captions == b.captions and a.meta == b.meta
        for m in a.modalities:
            assert np.array_equal(a.modalities[m].offsets, b.modalities[m].offsets)
            assert np.array_equal(a.modalities[m].pooled, b.modalities[m].pooled)
            assert b.modalities[m].tokens.dtype == np.float32
            assert _relative_error(a.modalities[m].tokens.astype(np.float32), b.modalities[m].tokens) < BOUND[dtype], m
        for backend in ("hdf5", "webdataset"):  # both formats hold the same codes
            h, w = open_store(converted[dtype], split, backend).read(0, 8), dst.read(0, 8)
            assert all(np.array_equal(h.modalities[m].tokens, w.modalities[m].tokens) for m in h.modalities)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_converted_manifest_says_how_it_stores_and_keeps_the_encoders(world, converted, dtype):
    src = json.loads((world.store / "train" / "manifest.json").read_text())
    dst = json.loads((converted[dtype] / "train" / "manifest.json").read_text())
    assert dst["token_dtype"] == dtype and dst["fields"]["vision.tokens"]["dtype"] == dtype
    assert dst["encoder_fingerprint"] == src["encoder_fingerprint"] and dst["fingerprint"] != src["fingerprint"]
    assert dst["encoders"] == src["encoders"]
    for m in ("vision", "audio", "text"):
        center = np.asarray(dst["quantization"][m]["center"])
        assert np.allclose(center, src["stats"][f"{m}.tokens"]["mean"], rtol=1e-6, atol=1e-7)
        # The statistics are the float16 values' own: unchanged by the conversion.
        assert np.allclose(dst["stats"][f"{m}.tokens"]["mean"], src["stats"][f"{m}.tokens"]["mean"], atol=1e-9)
    assert verify_store(converted[dtype]) == []
    # The token rows: int8 one byte a value plus a scale a token; int4 half a byte plus a scale
    # per group. What the files shrink by also depends on strings and pooled vectors.
    for m in ("vision", "audio", "text"):
        dim = src["fields"][f"{m}.tokens"]["dim"]
        ratio = TokenLayout("float16", dim).bytes_per_token / TokenLayout(dtype, dim).bytes_per_token
        assert ratio > {"int8": 1.8, "int4": 3.0}[dtype]
    h5 = lambda store: sum(p.stat().st_size for p in (store / "train").glob("*.h5"))  # noqa: E731
    assert h5(converted[dtype]) < {"int8": 0.7, "int4": 0.5}[dtype] * h5(world.store)


def test_a_rerun_of_the_converter_redoes_only_what_is_missing(world, converted, tmp_path):
    dst = tmp_path / "int8"
    shutil.copytree(converted["int8"], dst)
    (dst / "train" / "shard-000002.json").unlink()
    (dst / "train" / "shard-000002.h5").unlink()
    kept = (dst / "train" / "shard-000001.h5").stat().st_mtime_ns
    proc = convert(world.store, dst, "int8")
    assert proc.returncode == 0, proc.stderr
    assert (dst / "train" / "shard-000001.h5").stat().st_mtime_ns == kept
    assert shard_digests(dst) == shard_digests(converted["int8"])
    assert records(dst) == records(converted["int8"]) and manifests(dst) == manifests(converted["int8"])


def test_converting_into_a_store_of_other_settings_is_refused(world, converted, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(converted["int8"], dst)
    proc = convert(world.store, dst, "int4")
    assert proc.returncode == 2
    assert proc.stderr.count("error:") == 1 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr


def test_extraction_straight_to_int8_calibrates_once_and_keeps_the_float16_statistics(world, tmp_path):
    store = tmp_path / "store"
    cfg = world.config(store, ["features.token_dtype=int8", "features.calibration_samples=40"])
    extract_store(cfg, encoders_for(cfg), ["hdf5"], num_workers=0)
    record = json.loads((store / "quantization.json").read_text())
    assert "first 40 samples" in record["calibration"]
    for split in ("train", "val", "test"):
        ours = json.loads((store / split / "manifest.json").read_text())
        ref = json.loads((world.store / split / "manifest.json").read_text())
        assert ours["quantization"] == record["modalities"]  # every split shares the store's statistics
        assert ours["stats"] == ref["stats"]
        assert ours["encoder_fingerprint"] == ref["encoder_fingerprint"]
        a, b = open_store(world.store, split).read(0, 16), open_store(store, split).read(0, 16)
        for m in a.modalities:
            assert _relative_error(a.modalities[m].tokens.astype(np.float32), b.modalities[m].tokens) < BOUND["int8"]
    # A second extraction (resumed, or another split later) reuses the calibration.
    before = (store / "quantization.json").read_bytes()
    extract_store(cfg, encoders_for(cfg), ["hdf5"], num_workers=0)
    assert (store / "quantization.json").read_bytes() == before


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_loader_hands_over_codes_that_dequantise_to_the_float16_batch(world, converted, dtype):
    kw = dict(batch_size=12, block_size=8, seed=5, reader_threads=2)
    ref = list(FeatureLoader(open_store(world.store, "train"), **kw))
    ours = list(FeatureLoader(open_store(converted[dtype], "train"), **kw))
    assert len(ref) == len(ours) > 0
    for a, b in zip(ref, ours):
        assert a["keys"] == b["keys"]
        for m in ("vision", "audio", "text"):
            assert b[m]["tokens"].dtype == (torch.int8 if dtype == "int8" else torch.uint8)
            assert b[m]["quant"] == dtype and torch.equal(a[m]["mask"], b[m]["mask"])
            x = a[m]["tokens"][a[m]["mask"]].float().numpy()
            y = dequantize_features(b[m])[b[m]["mask"]].numpy()
            assert _relative_error(x, y) < BOUND[dtype]


@pytest.fixture(scope="module")
def tw(tmp_path_factory):
    return trainer_world(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_a_model_trained_on_float16_reads_the_quantised_store(tw, converted, dtype, tmp_path):
    run = tw.reference_run
    cfg, model, _ = load_alignment_model(run)

    def embeddings(store: Path) -> dict[str, torch.Tensor]:
        split = open_store(store, "val")
        with torch.no_grad():
            emb, _ = embed_split(model, FeatureLoader(split, 16, modalities=cfg.model.adapters.enabled(), shuffle=False,
                                                      drop_last=False))
        return emb

    ref, ours = embeddings(tw.world.store), embeddings(converted[dtype])
    for m in ref:
        cos = torch.nn.functional.cosine_similarity(ref[m], ours[m], dim=-1)
        assert float(cos.min()) > {"int8": 0.999, "int4": 0.98}[dtype], (m, float(cos.min()))
    result = run_script(tmp_path, "evaluate.py", "--run", str(run), "--split", "val", "--features_dir", str(converted[dtype]))
    assert result.returncode == 0, result
    assert f"{converted[dtype]}" in result.stdout


@pytest.mark.slow
def test_a_model_trains_on_a_converted_store_and_reads_the_float16_one(tw, converted, tmp_path):
    """scripts/train.py on the int8 conversion (that the codes teach the adapters as much as the
    float16 tokens do is test_alignment_learning.py's), then the reverse of the test above: the
    int8-trained run evaluated on the float16 store, which needs no dequantisation, embeds its
    samples almost exactly as the int8 store's."""
    result = train(tmp_path, tw.config, "--set", f"data.features_dir={converted['int8']}", "--set", "experiment.name=int8")
    result.check()
    run = tmp_path / "runs" / "int8"
    assert_finite_losses(run)
    assert eval_records(run) and all(0 <= r["val/mean_R@1"] <= 1 for r in eval_records(run))
    cfg, model, _ = load_alignment_model(run)

    def embeddings(store: Path) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            emb, _ = embed_split(model, FeatureLoader(open_store(store, "val"), 16, modalities=cfg.model.adapters.enabled(),
                                                      shuffle=False, drop_last=False))
        return emb

    ours, fp16 = embeddings(converted["int8"]), embeddings(tw.world.store)
    for m in ours:
        assert float(torch.nn.functional.cosine_similarity(ours[m], fp16[m], dim=-1).min()) > 0.999, m
    result = run_script(tmp_path, "evaluate.py", "--run", str(run), "--split", "val", "--features_dir", str(tw.world.store))
    assert result.returncode == 0, result
    assert f"{tw.world.store}" in result.stdout and "float16 tokens" in result.stdout


def _without_quantization(converted: dict, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(converted["int8"], store)
    for path in store.glob("*/manifest.json"):
        manifest = json.loads(path.read_text())
        del manifest["quantization"]
        path.write_text(json.dumps(manifest))
    return store


def test_a_quantised_manifest_without_its_statistics_is_refused_by_the_loader(converted, tmp_path):
    store = _without_quantization(converted, tmp_path)
    with pytest.raises(UserError, match=r"tokens are int8 but .*no quantization\.vision"):
        FeatureLoader(open_store(store, "val"), 4, modalities=["vision"], drop_last=False)


@pytest.mark.slow
def test_a_float16_run_on_a_quantised_store_without_its_statistics_is_refused_naming_both(tw, converted, tmp_path):
    store = _without_quantization(converted, tmp_path)
    result = run_script(tmp_path, "evaluate.py", "--run", str(tw.reference_run), "--split", "val",
                        "--features_dir", str(store))
    assert_one_line_error(result, str(store / "val"), "holds int8 tokens", "no quantization.",
                          "trained on float16 tokens", str(tw.world.store))


def test_evaluating_on_a_store_of_other_encoders_is_refused(tw, world, tmp_path):
    other = tmp_path / "other"
    cfg = world.config(other, ["encoders.vision.layer=-1"])
    extract_store(cfg, encoders_for(cfg), ["hdf5"], splits=["val"], num_workers=0)
    result = run_script(tmp_path, "evaluate.py", "--run", str(tw.reference_run), "--split", "val", "--features_dir", str(other))
    assert_one_line_error(result, "encoder fingerprint", str(other))


@pytest.mark.parametrize("rows_read", ["per block", "per sample"])
def test_reused_buffers_hand_over_zero_codes_and_scales_past_each_length(world, converted, rows_read, monkeypatch):
    """A quantised batch made into a buffer that held an earlier batch of other lengths: past each
    sample's length its codes and scales are zero (written, not found), and the rest equals the
    batch made into fresh buffers. Both HDF5 read paths: a block's rows read whole, and one
    read per sample (forced at these tiny shapes)."""
    from edge_glass.features import hdf5_shard

    if rows_read == "per sample":
        monkeypatch.setattr(hdf5_shard, "STAGE_BYTES_PER_SAMPLE", 0)
    kw = dict(batch_size=12, block_size=8, seed=5, reader_threads=2, drop_last=False)
    reused = FeatureLoader(open_store(converted["int4"], "train"), reuse_buffers=True, **kw)
    for _ in reused:  # dirties the ring
        pass
    fresh = FeatureLoader(open_store(converted["int4"], "train"), **kw)
    fresh.set_epoch(1)
    padded = 0
    for a, b in zip(fresh, reused):
        assert a["keys"] == b["keys"]
        for m in ("vision", "audio", "text"):
            mask = b[m]["mask"]
            for name in ("tokens", "scales"):
                assert torch.equal(a[m][name], b[m][name]), (m, name)
                assert not b[m][name][~mask].any(), (m, name)
            padded += int((~mask).sum())
    assert padded > 0  # lengths vary: padding was exercised
