"""The trainer's crash safety and exact resume, end to end, as users launch it.

    python -m pytest tests/test_trainer_resume.py -q

Every run compared here trains the same config (helpers/trainer_world.py): 2 ranks, ZeRO-2,
fp32, 12 steps, checkpoint + eval every 3 steps. The uninterrupted reference run is made once
per pytest process and shared with test_trainer.py and test_trainer_topology.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from helpers.feature_world import extract
from helpers.trainer_world import (
    MAX_STEPS,
    HOOKED_TRAIN,
    STEPS_PER_EPOCH_2_RANKS,
    TrainerWorld,
    Launched,
    assert_each_step_once,
    assert_finite_losses,
    assert_one_line_error,
    assert_same_training,
    assert_same_weights,
    checkpoint,
    complete_steps,
    copy_run,
    env,
    last_logged_step,
    logged_steps,
    meta,
    rank_pid,
    train,
    train_cmd,
    train_records,
    trainer_world,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tw(tmp_path_factory: pytest.TempPathFactory) -> TrainerWorld:
    return trainer_world(tmp_path_factory)


def _resumed_from(result, ckpt_rel: str, step: int) -> None:
    assert re.search(rf"resumed from \S*{re.escape(ckpt_rel)} at step {step}\b", result.stdout), f"{result}"


# --- 1. kill -9 mid-epoch, resume: identical losses --------------------------------------------------


def test_reference_run_is_sane(tw: TrainerWorld) -> None:
    run = tw.reference_run
    assert_each_step_once(run, MAX_STEPS)
    assert_finite_losses(run)
    assert complete_steps(run) == [3, 6, 9, 12]
    m = meta(checkpoint(run, 12))
    assert (m["step"], m["world_size"], m["zero_stage"], m["precision"]) == (12, 2, 2, "fp32")
    # 8 steps per epoch on 2 ranks: steps 9-12 are the second epoch
    assert [r["epoch"] for r in train_records(run)] == [0] * 8 + [1] * 4
    assert train_records(run)[0]["loss"] != train_records(run)[-1]["loss"]


def test_kill_9_mid_epoch_then_resume_gives_identical_losses_and_weights(tw: TrainerWorld, tmp_path: Path) -> None:
    place = tmp_path / "killed"
    place.mkdir()
    run = tw.run_dir(place)
    cmd = train_cmd(tw.config, nproc=2, script=HOOKED_TRAIN)
    with Launched(cmd, place, env(TRAINER_TEST_STEP_DELAY="0.8")) as launched:
        # Checkpoint 6 (mid-epoch: batch 6 of 8) is complete and the run has gone past it.
        wait_until(lambda: (checkpoint(run, 6) / "COMPLETE").is_file() and last_logged_step(run) >= 7,
                   launched, "checkpoint step6 and a later step")
        launched.kill(signal.SIGKILL)  # the launcher and both ranks, at once
        launched.proc.wait(timeout=60)
    killed_at = last_logged_step(run)
    newest = complete_steps(run)[-1]
    assert killed_at > newest, "the kill must leave metrics lines past the newest checkpoint"
    assert newest % STEPS_PER_EPOCH_2_RANKS != 0 and newest < MAX_STEPS

    result = train(place, tw.config, "--resume", "auto", nproc=2)
    result.check()
    _resumed_from(result, f"checkpoints/step{newest}", newest)
    assert_each_step_once(run, MAX_STEPS)  # the redone steps replaced the killed run's lines
    assert_same_training(run, tw.reference_run, range(1, MAX_STEPS + 1))
    assert_same_weights(checkpoint(run, MAX_STEPS), checkpoint(tw.reference_run, MAX_STEPS))


# --- 4. a half-written checkpoint is skipped ---------------------------------------------------------


def test_half_written_checkpoints_are_skipped(tw: TrainerWorld, tmp_path: Path) -> None:
    run = copy_run(tw, tmp_path)
    # step12 lost its marker (killed between the shards and COMPLETE) ...
    (checkpoint(run, 12) / "COMPLETE").unlink()
    # ... and step99 is a few partial files of a save that never finished.
    partial = checkpoint(run, 99)
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x02partial")
    (partial / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")

    result = train(tmp_path, tw.config, "--resume", "auto", nproc=2)
    result.check()
    _resumed_from(result, "checkpoints/step9", 9)
    assert_each_step_once(run, MAX_STEPS)
    assert_same_training(run, tw.reference_run, range(1, MAX_STEPS + 1))
    assert (checkpoint(run, 12) / "COMPLETE").is_file()
    assert_same_weights(checkpoint(run, 12), checkpoint(tw.reference_run, 12))


def test_explicit_resume_of_an_incomplete_checkpoint_is_refused(tw: TrainerWorld, tmp_path: Path) -> None:
    run = copy_run(tw, tmp_path)
    (checkpoint(run, 9) / "COMPLETE").unlink()
    result = train(tmp_path, tw.config, "--resume", str(checkpoint(run, 9)))
    assert_one_line_error(result, "step9", "COMPLETE")


# --- 5. SIGTERM leaves a loadable checkpoint ----------------------------------------------------------


def _long_run_args(name: str) -> list[str]:
    return ["--set", f"experiment.name={name}", "--set", "train.max_steps=100000"]


def _assert_stopped_cleanly(run: Path, output: str) -> int:
    """The stop message names the last logged step, and that step has a complete checkpoint."""
    step = last_logged_step(run)
    assert step >= 3
    assert f"stopped by signal after step {step}" in output, output
    assert complete_steps(run)[-1] == step
    m = meta(checkpoint(run, step))
    assert m["step"] == step
    assert logged_steps(run) == list(range(1, step + 1))
    return step


def test_sigterm_single_process_exits_0_with_a_checkpoint_that_resumes(tw: TrainerWorld, tmp_path: Path) -> None:
    name = "sigterm1"
    run = tw.run_dir(tmp_path, name)
    with Launched(train_cmd(tw.config, *_long_run_args(name)), tmp_path) as launched:
        wait_until(lambda: last_logged_step(run) >= 4, launched, "4 logged steps")
        launched.kill(signal.SIGTERM)
        result = launched.wait(120)
    assert result.returncode == 0, f"{result}"
    step = _assert_stopped_cleanly(run, result.stdout)
    assert meta(checkpoint(run, step))["world_size"] == 1

    resumed = train(tmp_path, tw.config, "--set", f"experiment.name={name}", "--set", f"train.max_steps={step + 2}")
    resumed.check()
    _resumed_from(resumed, f"checkpoints/step{step}", step)
    assert_each_step_once(run, step + 2, eval_every=None)
    assert_finite_losses(run)


def test_sigterm_to_the_launcher_stops_both_ranks_with_a_checkpoint_that_resumes(tw: TrainerWorld, tmp_path: Path) -> None:
    """`kill <torchrun pid>` (what a scheduler does): torchrun forwards SIGTERM to both ranks,
    which save and exit 0. torchrun itself then exits non-zero (it re-raises SignalException);
    that is torch's launcher, not the trainer, so its code is not checked here."""
    name = "sigterm2"
    run = tw.run_dir(tmp_path, name)
    with Launched(train_cmd(tw.config, *_long_run_args(name), nproc=2), tmp_path) as launched:
        wait_until(lambda: last_logged_step(run) >= 4, launched, "4 logged steps")
        launched.kill(signal.SIGTERM)  # the launcher and both ranks, as a scheduler signals a job
        result = launched.wait(120)
    step = _assert_stopped_cleanly(run, result.stdout + result.stderr)
    assert meta(checkpoint(run, step))["world_size"] == 2
    assert "Traceback" not in result.stdout

    resumed = train(tmp_path, tw.config, "--set", f"experiment.name={name}", "--set", f"train.max_steps={step + 2}",
                    nproc=2)
    resumed.check()
    _resumed_from(resumed, f"checkpoints/step{step}", step)
    assert_each_step_once(run, step + 2, eval_every=None)
    assert_finite_losses(run)


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tw: TrainerWorld, tmp_path: Path) -> None:
    """Only rank 1 is signalled; the ranks agree, both save the same step, and torchrun exits 0."""
    name = "sigterm3"
    run = tw.run_dir(tmp_path, name)
    with Launched(train_cmd(tw.config, *_long_run_args(name), nproc=2), tmp_path) as launched:
        wait_until(lambda: last_logged_step(run) >= 4, launched, "4 logged steps")
        os.kill(rank_pid(launched.pid, 1), signal.SIGTERM)
        result = launched.wait(120)
    assert result.returncode == 0, f"{result}"
    step = _assert_stopped_cleanly(run, result.stdout)
    ckpt = checkpoint(run, step)
    assert sorted(p.name for p in ckpt.glob("rng_state_*.pt")) == ["rng_state_0.pt", "rng_state_1.pt"]
    assert len(list(ckpt.glob("zero_pp_rank_*_optim_states.pt"))) == 2


# --- a crash before the first checkpoint --------------------------------------------------------------


def test_killed_before_its_first_checkpoint_a_rerun_logs_each_step_once(tw: TrainerWorld, tmp_path: Path) -> None:
    """Steps 1-2 are logged, then kill -9 before checkpoint 3. `--resume auto` finds no
    checkpoint and starts over; metrics.jsonl must not keep the dead run's lines."""
    name = "early"
    run = tw.run_dir(tmp_path, name)
    args = ["--set", f"experiment.name={name}", "--set", "train.max_steps=4"]
    with Launched(train_cmd(tw.config, *args, script=HOOKED_TRAIN), tmp_path, env(TRAINER_TEST_STEP_DELAY="2")) as launched:
        wait_until(lambda: last_logged_step(run) >= 2, launched, "2 logged steps")
        launched.kill(signal.SIGKILL)
        launched.proc.wait(timeout=60)
    assert complete_steps(run) == [] and logged_steps(run) == [1, 2]

    train(tmp_path, tw.config, *args, "--resume", "auto").check()
    assert_each_step_once(run, 4, eval_every=None)


# --- 6. mismatched store / config on resume ----------------------------------------------------------


@pytest.fixture(scope="module")
def other_store(tw: TrainerWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same data through the same encoders, but vision features from another layer."""
    store = tmp_path_factory.mktemp("store-vision-layer-1") / "store"
    extract(tw.world.config(store, ["encoders.vision.layer=-1"]), formats=["hdf5"])
    return store


@pytest.fixture(scope="module")
def refusals_place(tw: TrainerWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the reference run that the refusal tests try (and fail) to resume."""
    place = tmp_path_factory.mktemp("refusals")
    copy_run(tw, place)
    return place


def _fingerprint(store: Path) -> str:
    return json.loads((store / "train" / "manifest.json").read_text())["fingerprint"]


def test_resume_on_a_store_of_other_encoder_settings_is_refused(tw, refusals_place: Path, other_store: Path) -> None:
    assert _fingerprint(other_store) != _fingerprint(tw.world.store)
    before = (tw.run_dir(refusals_place) / "metrics.jsonl").read_bytes()
    result = train(refusals_place, tw.config, "--set", f"data.features_dir={other_store}")
    line = assert_one_line_error(result, "encoder fingerprint", "encoders.vision.layer")
    manifest = json.loads((other_store / "train" / "manifest.json").read_text())
    assert manifest["encoder_fingerprint"] in line
    assert (tw.run_dir(refusals_place) / "metrics.jsonl").read_bytes() == before  # nothing touched


def test_resume_with_the_encoder_change_in_the_config_too_is_refused(tw, refusals_place: Path, other_store: Path) -> None:
    result = train(refusals_place, tw.config, "--set", f"data.features_dir={other_store}",
                   "--set", "encoders.vision.layer=-1")
    assert_one_line_error(result, "encoders.vision.layer")


def test_resume_with_a_changed_training_field_is_refused(tw, refusals_place: Path) -> None:
    result = train(refusals_place, tw.config, "--set", "optim.lr=0.002")
    line = assert_one_line_error(result, "optim.lr")
    assert "train.max_steps" not in line


def test_resume_none_on_a_run_with_checkpoints_is_refused(tw, refusals_place: Path) -> None:
    result = train(refusals_place, tw.config, "--resume", "none")
    assert_one_line_error(result, "--resume auto")


def test_resume_may_change_max_steps(tw: TrainerWorld, tmp_path: Path) -> None:
    run = copy_run(tw, tmp_path)
    result = train(tmp_path, tw.config, "--set", "train.max_steps=14", nproc=2)
    result.check()
    _resumed_from(result, f"checkpoints/step{MAX_STEPS}", MAX_STEPS)
    assert logged_steps(run) == list(range(1, 15))
    assert_finite_losses(run)
    assert complete_steps(run)[-1] == 14


def test_resume_from_an_identical_store_at_another_path_is_accepted(tw: TrainerWorld, tmp_path: Path) -> None:
    """Moving the feature store (same encoders, same fingerprint) does not change what a run
    computes; the store fingerprint is the guard against a different store."""
    moved = tmp_path / "moved-store"
    shutil.copytree(tw.world.store, moved)
    assert _fingerprint(moved) == _fingerprint(tw.world.store)
    run = copy_run(tw, tmp_path / "place", keep_steps=[9])
    result = train(tmp_path / "place", tw.config, "--set", f"data.features_dir={moved}", nproc=2)
    result.check()
    _resumed_from(result, "checkpoints/step9", 9)
    assert_same_training(run, tw.reference_run, range(1, MAX_STEPS + 1))
