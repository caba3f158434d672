"""Faults a hostile-yet-realistic user and a failing machine produce, end to end: the user gets one
clear line (or a counted skip), never a plausible wrong number, and nothing good is lost.

    python -m pytest tests/test_faults.py -q

RELIABILITY.md lists each fault, what the user sees, what is kept, and the test here that
proves it. Runs train the trainer tests' tiny config (helpers/trainer_world.py) on 2 ranks where
ranks matter.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds
import yaml

from edge_glass.utils.ports import free_port
from helpers.feature_world import encoders_for
from helpers.random_store import random_store
from helpers.trainer_world import (
    HOOKED_TRAIN,
    MAX_STEPS,
    REPO,
    TrainerWorld,
    Launched,
    assert_finite_losses,
    assert_one_line_error,
    assert_same_training,
    assert_same_weights,
    checkpoint,
    complete_steps,
    copy_run,
    descendants,
    env,
    error_lines,
    eval_records,
    last_logged_step,
    logged_steps,
    meta,
    run_script,
    train,
    train_cmd,
    train_records,
    trainer_world,
    wait_until,
)

from edge_glass.config import config_from_dict
from edge_glass.data.raw_shards import iter_shard_raw
from edge_glass.features.extract import extract_store
from edge_glass.training import checkpoint as ckpt
from edge_glass.training.metrics import NonFiniteEmbeddings, ranks
from edge_glass.utils.errors import UserError
from edge_glass.utils.locks import DirLock

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tw(tmp_path_factory) -> TrainerWorld:
    return trainer_world(tmp_path_factory)


# --- 1. non-finite and degenerate raw samples at extraction -----------------------------------------


def _raw_with_bad_samples(tw: TrainerWorld, dest: Path) -> Path:
    """The feature world's raw set, with train shard 0's samples 1-3 made bad: NaN audio, an
    empty caption, a one-sample clip."""
    shutil.copytree(tw.world.raw, dest)
    shard = dest / "train" / "shard-000000.tar"
    samples = list(iter_shard_raw(shard))

    def wav(audio: np.ndarray) -> bytes:
        buf = io.BytesIO()
        sf.write(buf, audio, 16000, format="WAV", subtype="FLOAT")  # float samples keep the NaN
        return buf.getvalue()

    for i, bad in ((1, "nan"), (2, "empty"), (3, "short")):
        s = samples[i]
        if bad == "empty":
            s["txt"] = b"   "
            continue
        s.pop("flac")
        s["wav"] = wav(np.full(16000, np.nan, np.float32) if bad == "nan" else np.zeros(1, np.float32))
    with open(shard, "wb") as f, wds.TarWriter(f, mtime=0, encoder=False) as sink:
        for s in samples:
            sink.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
    return dest


def test_nan_audio_stops_extraction_naming_the_shard_and_the_key(tw, tmp_path):
    raw = _raw_with_bad_samples(tw, tmp_path / "raw")
    cfg = tw.world.config(tmp_path / "store", raw_dir=raw)
    with pytest.raises(UserError, match=r"shard-000000\.tar: sample 'train-00000001': its audio holds NaN") as e:
        extract_store(cfg, encoders_for(cfg), ["hdf5"], splits=["train"], num_workers=0)
    assert "encoders.on_bad_sample: skip" in str(e.value)
    assert not (tmp_path / "store" / "train" / "manifest.json").exists()


def test_bad_samples_are_skipped_and_counted_with_skip(tw, tmp_path):
    raw = _raw_with_bad_samples(tw, tmp_path / "raw")
    cfg = tw.world.config(tmp_path / "store", ["encoders.on_bad_sample=skip"], raw_dir=raw)
    extract_store(cfg, encoders_for(cfg), ["hdf5"], splits=["train"], num_workers=2)
    manifest = json.loads((tmp_path / "store" / "train" / "manifest.json").read_text())
    assert manifest["skipped"] == {"empty_caption": 1, "nonfinite_audio": 1, "short_audio": 1}
    assert manifest["num_samples"] == 128 - 3
    assert all(np.isfinite(v).all() for f in manifest["stats"].values() for v in (f["mean"], f["std"]))
    record = json.loads((tmp_path / "store" / "train" / "shard-000000.json").read_text())
    assert record["num_samples"] == 24 - 3 and sum(record["skipped"].values()) == 3


def test_non_finite_encoder_output_is_refused_or_skipped(tw, tmp_path, monkeypatch):
    cfg = tw.world.config(tmp_path / "a")
    encoders = encoders_for(cfg)
    vision = encoders["vision"]
    original = vision.encode

    def poisoned(prepared):  # the 2nd sample of every batch comes out NaN, as a broken encoder would
        out = original(prepared)
        out.tokens = out.tokens.clone()
        out.tokens[1] = float("nan")
        return out

    monkeypatch.setattr(vision, "encode", poisoned)
    with pytest.raises(UserError, match=r"sample 'train-00000001': the encoders' output holds NaN or inf"):
        extract_store(cfg, encoders, ["hdf5"], splits=["train"], num_workers=0)
    skip = tw.world.config(tmp_path / "b", ["encoders.on_bad_sample=skip"])
    extract_store(skip, encoders, ["hdf5"], splits=["train"], num_workers=0)
    manifest = json.loads((tmp_path / "b" / "train" / "manifest.json").read_text())
    shard_sizes = [s["num_samples"] + sum(json.loads((tmp_path / "b" / "train" / f"{s['name']}.json").read_text())
                                          ["skipped"].values()) for s in manifest["shards"]]
    batches = sum(-(-n // 16) for n in shard_sizes)  # batches never span shards
    assert manifest["skipped"] == {"nonfinite_features": batches}
    assert all(np.isfinite(f["mean"]).all() for f in manifest["stats"].values())


# --- 2. non-finite training ------------------------------------------------------------------------


NAN_FROM_STEP = 5  # after checkpoint 3, so the run has a last good checkpoint to name


def _first_step_of_each_shard(cfg, shards: int, size: int, world: int = 2) -> dict[int, int]:
    """The optimizer step at which each shard is first read (epoch 0), from the loader's plan."""
    from edge_glass.features.epoch_plan import EpochPlan

    first: dict[int, int] = {}
    for rank in range(world):
        plan = EpochPlan(np.full(shards, size), cfg.data.read_block_size, cfg.data.shuffle_window_blocks,
                         cfg.data.micro_batch_size, seed=cfg.experiment.seed, epoch=0, rank=rank, world_size=world,
                         shuffle=True, drop_last=True)
        for k in range(plan.num_batches):
            which, rows = plan.batch(k)
            for shard in set((plan.blocks[which, 0] // size).tolist()):
                first[shard] = min(first.get(shard, k + 1), k + 1)
    return first


@pytest.fixture(scope="module")
def nan_store(tw, tmp_path_factory) -> tuple[Path, int]:
    """Random features in 64 train shards of 8, one shard's vision features all NaN (data that
    got past extraction, e.g. a store made by an older version), and the step that first reads
    it; a clean val split."""
    root = tmp_path_factory.mktemp("nan-store") / "store"
    cfg = config_from_dict(yaml.safe_load(tw.config.read_text()))
    # 64 shards of one block each: 4 shuffle windows per rank, so a shard of the second window
    # is first read after step 8.
    first = _first_step_of_each_shard(cfg, 64, 8)
    shard, step = min(((s, k) for s, k in first.items() if k >= NAN_FROM_STEP), key=lambda sk: sk[1])
    assert step <= MAX_STEPS
    return random_store(root, cfg, {"train": (64, 8), "val": (2, 8)}, nan_shards={"train": {shard}}), step


def assert_ranks_error(result, *needles: str) -> str:
    """A 2-rank run ended by a user error: exactly one `error:` line (rank 0's, every rank agreed)
    holding the needles. torchrun's own report of a failed child is torch's, not checked."""
    lines = error_lines(result)
    assert result.returncode != 0 and len(lines) == 1, f"{result}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def test_a_nan_loss_stops_the_run_with_no_checkpoint_after_it(tw, nan_store, tmp_path):
    store, bad_step = nan_store
    result = train(tmp_path, tw.config, "--set", f"data.features_dir={store}", "--set", "experiment.name=nan", nproc=2)
    run = tw.run_dir(tmp_path, "nan")
    saved = complete_steps(run)
    assert saved and all(s < bad_step for s in saved)  # nothing after the non-finite step was saved
    assert_ranks_error(result, "non-finite", f"at step {bad_step};", f"nan/checkpoints/step{saved[-1]} is saved")
    assert_finite_losses(run)  # nothing non-finite was logged, or picked as best
    assert all(r["best"] is None or np.isfinite(r["best"]) for r in eval_records(run))


def test_skip_mode_drops_the_nan_micro_batches_on_every_rank_and_finishes(tw, nan_store, tmp_path):
    result = train(tmp_path, tw.config, "--set", f"data.features_dir={nan_store[0]}", "--set", "experiment.name=skip",
                   "--set", "train.on_nonfinite=skip", nproc=2)
    result.check()
    run = tw.run_dir(tmp_path, "skip")
    assert logged_steps(run) == list(range(1, MAX_STEPS + 1))
    assert sum(r.get("skipped_nonfinite", 0) for r in train_records(run)) > 0
    assert_finite_losses(run)
    assert complete_steps(run)[-1] == MAX_STEPS


def test_retrieval_metrics_refuse_nan_embeddings_instead_of_scoring_them_perfect():
    keys = torch.randn(6, 4)
    with pytest.raises(NonFiniteEmbeddings, match="6 of 6 query embeddings are not finite"):
        ranks(torch.full((6, 4), float("nan")), keys)
    # A NaN score (never produced by finite unit vectors, but never trusted) ranks last.
    r = ranks(torch.eye(3), torch.eye(3))
    assert r.tolist() == [1, 1, 1]


# --- 3. store integrity at train time --------------------------------------------------------------


def _flip(path: Path, offset: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture()
def store_copy(tw, tmp_path) -> Path:
    dest = tmp_path / "store"
    shutil.copytree(tw.world.store, dest)
    return dest


def test_a_flipped_byte_in_a_shard_is_found_before_step_1_with_verify_sha256(tw, store_copy, tmp_path):
    h5 = store_copy / "train" / "shard-000003.h5"
    _flip(h5, h5.stat().st_size // 2)
    result = train(tmp_path, tw.config, "--set", f"data.features_dir={store_copy}", "--set", "data.verify=sha256")
    assert_one_line_error(result, str(h5), "sha256")
    assert not (tw.run_dir(tmp_path) / "metrics.jsonl").exists() or logged_steps(tw.run_dir(tmp_path)) == []


def test_a_flipped_npy_inside_a_tar_is_found_with_verify_sha256(tw, store_copy, tmp_path):
    tar = store_copy / "train" / "shard-000001.tar"
    _flip(tar, tar.stat().st_size // 3)
    result = train(tmp_path, tw.config, "--set", f"data.features_dir={store_copy}", "--set", "data.verify=sha256",
                   "--set", "data.store_format=webdataset")
    assert_one_line_error(result, str(tar), "sha256")


def test_a_truncated_shard_is_found_before_step_1_by_default(tw, store_copy, tmp_path):
    h5 = store_copy / "val" / "shard-000000.h5"
    with open(h5, "r+b") as f:
        f.truncate(h5.stat().st_size - 1000)
    result = train(tmp_path, tw.config, "--set", f"data.features_dir={store_copy}")
    assert_one_line_error(result, str(h5), "bytes, manifest says")


# --- 4. one writer per run directory and per store split -------------------------------------------


def test_a_second_training_of_the_same_run_is_refused_and_the_first_is_unharmed(tw, tmp_path):
    name = "twice"
    run = tw.run_dir(tmp_path, name)
    args = ["--set", f"experiment.name={name}", "--set", "train.max_steps=100000"]
    with Launched(train_cmd(tw.config, *args, nproc=2, script=HOOKED_TRAIN), tmp_path,
                  env(TRAINER_TEST_STEP_DELAY="0.3")) as first:
        wait_until(lambda: (checkpoint(run, 3) / "COMPLETE").is_file(), first, "the first run's checkpoint 3")
        second = train(tmp_path, tw.config, *args)
        line = assert_one_line_error(second, f"runs/{name} is being written by another training run", "pid", "host")
        assert f"pid {first.pid}" in line or any(f"pid {p}" in line for p in descendants(first.pid))
        wait_until(lambda: last_logged_step(run) >= 7, first, "the first run going on")
        os.kill(first.pid, signal.SIGTERM)
        result = first.wait(120)
    stopped = last_logged_step(run)
    assert "stopped by signal" in result.stdout + result.stderr
    assert logged_steps(run) == list(range(1, stopped + 1))  # one run's lines, each step once
    assert complete_steps(run)[-1] == stopped and 3 in complete_steps(run)
    assert ckpt.problems(checkpoint(run, stopped)) == []


def test_a_second_extraction_into_a_split_is_refused_and_the_first_is_unharmed(tw, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tw.world.store, store)
    inflight = store / "train" / ".tmp-shard-000002.h5.inflight"
    inflight.write_bytes(b"the first extraction is writing this")
    lock = DirLock(store / "train", "extraction").acquire()  # the first extraction, in this process
    try:
        config = tw.world.write_config(tmp_path / "config.yaml", store)
        result = run_script(tmp_path, "extract_features.py", "--config", str(config), "--format", "hdf5")
        line = assert_one_line_error(result, str(store / "train"), "another extraction", f"pid {os.getpid()}")
        assert "host" in line
        assert inflight.is_file(), "the refused extraction deleted the first one's temporary"
    finally:
        lock.release()


# --- 5. checkpoint integrity ---------------------------------------------------------------------


def test_corrupt_checkpoints_are_moved_aside_and_resume_falls_back_to_an_intact_one(tw, tmp_path):
    run = copy_run(tw, tmp_path)
    optim = next(checkpoint(run, 12).glob("zero_pp_rank_1_*optim_states.pt"))
    _flip(optim, optim.stat().st_size // 2, 8)  # a bit-level corruption: same size
    model = checkpoint(run, 9) / "mp_rank_00_model_states.pt"
    with open(model, "r+b") as f:
        f.truncate(model.stat().st_size // 2)
    (checkpoint(run, 6) / "meta.json").write_text('{"step": 6, "half-written')

    result = train(tmp_path, tw.config, "--resume", "auto", nproc=2)
    result.check()
    for step in (12, 9, 6):
        assert f"checkpoints/step{step} is corrupt" in result.stdout and (run / "checkpoints" / f"step{step}.corrupt").is_dir()
    assert "resumed from" in result.stdout and "checkpoints/step3 at step 3" in result.stdout
    assert_same_training(run, tw.reference_run, range(4, MAX_STEPS + 1))
    assert_same_weights(checkpoint(run, 12), checkpoint(tw.reference_run, 12))
    assert (run / "checkpoints" / "step12.corrupt" / optim.name).is_file()  # kept for inspection


class _Payload:
    """Unpickling this creates the marker file: code a crafted checkpoint runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _craft(run: Path, step: int, marker: Path) -> Path:
    """Checkpoint `step` with its model file replaced by a pickle that runs code, and meta.json's
    hashes updated (an attacker can compute them too): only safe loading stands in the way."""
    path = checkpoint(run, step)
    target = path / "mp_rank_00_model_states.pt"
    torch.save({"module": _Payload(marker)}, target)
    m = meta(path)
    m["files"] = ckpt.file_digests(path)
    (path / "meta.json").write_text(json.dumps(m))
    return path


def test_a_crafted_checkpoint_is_refused_on_every_path_and_runs_nothing(tw, tmp_path):
    run = copy_run(tw, tmp_path)
    marker = tmp_path / "PWNED"
    crafted = _craft(run, 12, marker)
    outcomes = {
        "--resume": train(tmp_path, tw.config, "--resume", "auto", "--set", "train.max_steps=13", nproc=2),
        "--weights-only": train(tmp_path, tw.config, "--resume", str(crafted), "--weights-only",
                                "--set", "train.max_steps=13"),
        "evaluate.py": run_script(tmp_path, "evaluate.py", "--run", str(run), "--checkpoint", str(crafted)),
        "export.py": run_script(tmp_path, "export.py", "--run", str(run), "--checkpoint", str(crafted)),
    }
    for path, result in outcomes.items():
        # (torchrun, which launches the 2-rank resume, reports its failed children with a
        # traceback of its own; the ranks' lines are the error lines.)
        assert result.returncode != 0 and (path == "--resume" or "Traceback" not in result.stderr), f"{path}: {result}"
        lines = error_lines(result)
        assert lines and all("refused to load" in line for line in lines), f"{path}: {result}"
    # In-process, as train.init_from, notebooks and scripts load runs.
    from edge_glass.training.run_loading import fp32_state_dict, load_alignment_model

    with pytest.raises(UserError, match="refused to load"):
        fp32_state_dict(crafted)
    with pytest.raises(UserError, match="refused to load"):
        load_alignment_model(run, str(crafted))
    assert not marker.exists(), "a crafted checkpoint ran code"


# --- 6. signals and orphans ------------------------------------------------------------------------


def _deepspeed_cmd(config: Path, *args: str) -> list[str]:
    launcher = Path(sys.executable).parent / "deepspeed"
    # A port of its own: the default 29500 may still be held by another job on the machine.
    return [sys.executable, str(launcher), "--num_accelerators", "2", "--master_port", str(free_port()),
            str(REPO / "scripts" / "train.py"),
            "--config", str(config), *args]


def _gone(pids: list[int], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and
                 Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        if not alive:
            return True
        time.sleep(0.2)
    return False


def _signal_launcher(tw, tmp_path: Path, launcher: str, sig: int, name: str) -> tuple[Path, list[int], Launched]:
    """Start a long 2-rank run under `launcher`, signal the launcher's PID alone at step 4;
    returns the run, the launcher's descendants (the ranks, and deepspeed's launch.py) and it."""
    run = tw.run_dir(tmp_path, name)
    args = ["--set", f"experiment.name={name}", "--set", "train.max_steps=100000"]
    cmd = _deepspeed_cmd(tw.config, *args) if launcher == "deepspeed" else train_cmd(tw.config, *args, nproc=2)
    launched = Launched(cmd, tmp_path)
    wait_until(lambda: last_logged_step(run) >= 4, launched, "4 logged steps")
    family = descendants(launched.pid)
    os.kill(launched.pid, sig)  # the PID the user's command started, nothing else
    return run, family, launched


def _no_half_checkpoint(run: Path) -> None:
    half = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step") and not (p / "COMPLETE").exists()]
    assert half == [], f"half-written checkpoints left: {half}"
    assert all(ckpt.problems(checkpoint(run, s)) == [] for s in complete_steps(run))


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_sigterm_to_the_launcher_pid_ends_in_a_checkpoint_and_no_process_left(tw, tmp_path, launcher):
    run, family, launched = _signal_launcher(tw, tmp_path, launcher, signal.SIGTERM, f"term-{launcher}")
    with launched:
        assert _gone(family + [launched.pid], 60), f"processes left: {launched.output()}"
    assert complete_steps(run)[-1] == last_logged_step(run)
    _no_half_checkpoint(run)


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_kill_9_of_the_launcher_ends_every_rank_within_seconds_without_a_half_checkpoint(tw, tmp_path, launcher):
    run, family, launched = _signal_launcher(tw, tmp_path, launcher, signal.SIGKILL, f"orphan-{launcher}")
    with launched:
        assert _gone(family, 10), f"ranks outlived their launcher: {launched.output()}"
    _no_half_checkpoint(run)


# --- 7. disk and paths -----------------------------------------------------------------------------


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_previous_checkpoint_is_intact(tw, tmp_path):
    name = "full"
    result = train(tmp_path, tw.config, "--set", f"experiment.name={name}", nproc=2, script=HOOKED_TRAIN,
                   environ=env(TRAINER_TEST_ENOSPC_STEP="6"))
    # Each rank that hits the full disk says so, in the same one line (torchrun adds its report of
    # the failed children; the ranks print no traceback).
    lines = error_lines(result)
    assert result.returncode != 0 and lines and len(set(lines)) == 1, f"{result}"
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr
    line = lines[0]
    for needle in ("no space left", "MiB free", "step3 is intact"):
        assert needle in line, line
    assert "unexpected pos" not in result.stderr
    run = tw.run_dir(tmp_path, name)
    assert complete_steps(run) == [3] and ckpt.problems(checkpoint(run, 3)) == []
    resumed = train(tmp_path, tw.config, "--set", f"experiment.name={name}", nproc=2)
    resumed.check()
    assert "checkpoints/step3 at step 3" in resumed.stdout


def test_a_run_name_that_escapes_output_dir_is_refused(tw, tmp_path):
    result = train(tmp_path, tw.config, "--set", "experiment.name=../../escaped")
    assert_one_line_error(result, "experiment.name", "plain directory name")
    assert not (tmp_path.parent / "escaped").exists()


def test_a_manifest_naming_a_file_outside_its_split_is_refused(store_copy):
    from edge_glass.features.store import open_store
    from edge_glass.features.verify import verify_store

    path = store_copy / "val" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][0]["files"]["hdf5"]["file"] = "../../../etc/passwd"
    path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="is not a plain file name"):
        open_store(store_copy, "val")
    assert any("not a plain file name" in p for p in verify_store(store_copy))
