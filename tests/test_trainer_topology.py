"""Resuming on another ZeRO stage or another number of processes, and what one rank's
trouble does to the others.

    python -m pytest tests/test_trainer_topology.py -q

A copy of the reference run (helpers/trainer_world.py: 2 ranks, ZeRO-2, fp32) with its later
checkpoints deleted is what a run stopped at that checkpoint leaves on disk.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import pytest

from helpers.trainer_world import (
    HOOKED_TRAIN,
    MAX_STEPS,
    NAME,
    ZERO1,
    ZERO3,
    TrainerWorld,
    assert_each_step_once,
    assert_finite_losses,
    assert_one_line_error,
    assert_same_training,
    assert_same_weights,
    checkpoint,
    complete_steps,
    copy_run,
    env,
    error_lines,
    eval_records,
    losses,
    meta,
    run_module,
    train,
    trainer_world,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tw(tmp_path_factory: pytest.TempPathFactory) -> TrainerWorld:
    return trainer_world(tmp_path_factory)


# --- 2. ZeRO-2 -> ZeRO-1 ------------------------------------------------------------------------------


def test_zero2_checkpoint_resumes_under_zero1_with_identical_losses(tw: TrainerWorld, tmp_path: Path) -> None:
    run = copy_run(tw, tmp_path, keep_steps=[3])
    result = train(tmp_path, tw.config, "--resume", "auto", "--deepspeed", str(ZERO1), nproc=2)
    result.check()
    assert re.search(r"resumed from \S*checkpoints/step3 at step 3\b", result.stdout), f"{result}"
    assert_each_step_once(run, MAX_STEPS)
    assert_same_training(run, tw.reference_run, range(1, MAX_STEPS + 1))
    assert meta(checkpoint(run, MAX_STEPS))["zero_stage"] == 1
    assert meta(checkpoint(run, MAX_STEPS))["config"]["train"]["deepspeed"] == str(ZERO1)
    assert_same_weights(checkpoint(run, MAX_STEPS), checkpoint(tw.reference_run, MAX_STEPS))


def test_zero2_checkpoint_under_zero3_is_refused_pointing_at_weights_only(tw: TrainerWorld, tmp_path: Path) -> None:
    copy_run(tw, tmp_path, keep_steps=[3])
    result = train(tmp_path, tw.config, "--deepspeed", str(ZERO3), nproc=2)
    assert result.returncode != 0
    lines = error_lines(result)
    # one line per rank (torchrun may stop the second rank before it prints its own)
    assert 1 <= len(lines) <= 2 and len(set(lines)) == 1, f"{result}"
    assert "ZeRO-3" in lines[0] and "--weights-only" in lines[0]


def test_weights_only_moves_a_zero2_run_to_zero3_and_trains_on(tw: TrainerWorld, tmp_path: Path) -> None:
    """The path the refusal points at: the step-3 weights load under ZeRO-3 with a fresh
    optimizer, and training continues from step 4 (the first resumed loss is the step-3 model's,
    so it is far below the loss of a fresh start)."""
    run = copy_run(tw, tmp_path, keep_steps=[3])
    result = train(tmp_path, tw.config, "--deepspeed", str(ZERO3), "--weights-only", nproc=2)
    result.check()
    assert "weights only, fresh optimizer" in result.stdout, f"{result}"
    assert meta(checkpoint(run, MAX_STEPS))["zero_stage"] == 3
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, MAX_STEPS + 1))
    assert_finite_losses(run)
    reference = losses(tw.reference_run)
    assert resumed[4] < reference[1], "the resumed run starts from the trained weights, not from scratch"


# --- 3. 2 processes -> 1 process ------------------------------------------------------------------------


def test_two_rank_checkpoint_resumes_on_one_process_after_universal_conversion(tw: TrainerWorld, tmp_path: Path) -> None:
    run = copy_run(tw, tmp_path, keep_steps=[3, 6])

    refused = train(tmp_path, tw.config, "--resume", "auto")  # python scripts/train.py: world size 1
    line = assert_one_line_error(refused, "python -m edge_glass.training.convert")
    assert "2 process" in line and "step6" in line
    assert complete_steps(run) == [3, 6]

    converted = run_module(tmp_path, "edge_glass.training.convert", f"runs/{NAME}", "--universal")
    converted.check()
    universal = run / "checkpoints" / "universal" / "step6"
    assert (universal / "COMPLETE").is_file()
    assert meta(universal)["step"] == 6

    resumed = train(tmp_path, tw.config, "--resume", "auto")
    resumed.check()
    assert re.search(r"resumed from \S*checkpoints/universal/step6 at step 6\b", resumed.stdout), f"{resumed}"
    assert_each_step_once(run, MAX_STEPS)
    assert_finite_losses(run)
    assert_same_training(run, tw.reference_run, range(1, 7))  # the 2-rank part is kept as it was
    new = meta(checkpoint(run, MAX_STEPS))
    assert (new["step"], new["world_size"]) == (MAX_STEPS, 1)
    # it really trained on: the loss moves, and differs from the 2-rank run (other batches)
    resumed_losses = [losses(run)[s] for s in range(7, MAX_STEPS + 1)]
    assert all(math.isfinite(v) for v in resumed_losses) and len(set(resumed_losses)) > 1


# --- failures on one rank ------------------------------------------------------------------------------

HANG = 120  # seconds; a healthy run here takes ~10 s once DeepSpeed's op is built (the reference run did that)


def test_evaluation_with_fewer_val_blocks_than_ranks_completes(tw: TrainerWorld, tmp_path: Path) -> None:
    """val has 16 samples: read in blocks of 16 it is one block, so rank 1 holds no evaluation
    sample. It must still join the gathers with zero rows (align_eval.embed_split), and the
    evaluation covers all 16 samples."""
    args = ["--set", "experiment.name=oneblock", "--set", "data.read_block_size=16", "--set", "train.max_steps=2",
            "--set", "train.eval_interval=2"]
    result = train(tmp_path, tw.config, *args, nproc=2, timeout=HANG)
    result.check()
    run = tw.run_dir(tmp_path, "oneblock")
    evals = eval_records(run)
    assert [r["step"] for r in evals] == [2]
    assert len([k for k in evals[0] if k.endswith("/R@1")]) == 12  # 2 pairs x 2 directions x 3 dims
    assert all(0.0 <= v <= 1.0 for k, v in evals[0].items() if "/R@" in k)
    assert complete_steps(run) == [2]


def test_a_failure_on_one_rank_ends_the_whole_job(tw: TrainerWorld, tmp_path: Path) -> None:
    """Rank 1 raises after step 3 while rank 0 goes on into the next step's collectives. The job
    must exit (non-zero, the error in its output), not wait for gloo's 30-minute timeout."""
    args = ["--set", "experiment.name=onefails", "--set", "train.max_steps=8"]
    start = time.monotonic()
    result = train(tmp_path, tw.config, *args, nproc=2, script=HOOKED_TRAIN, timeout=HANG,
                   environ=env(TRAINER_TEST_FAIL_AT="1:3"))
    assert result.returncode != 0
    assert "injected test failure on rank 1 after step 3" in result.stdout + result.stderr
    assert time.monotonic() - start < HANG
