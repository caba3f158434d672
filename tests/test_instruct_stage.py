"""The instruct stage end to end through the trainer, as users launch it.

    python -m pytest tests/test_instruct_stage.py -q

Every run starts from the align reference run of helpers/trainer_world.py (its best checkpoint
is `train.init_from`), on the same tiny store, with the tiny random Qwen2 and LoRA: 2 ranks,
ZeRO-2, fp32, 12 steps, checkpoint + eval every 3 steps, LoRA dropout on (so the per-rank RNG
streams matter for an exact resume), examples packed several to a row (decoders/packing.py).
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest

from helpers.trainer_world import (
    HOOKED_TRAIN,
    INTERVAL,
    MAX_STEPS,
    OVERRIDES,
    Launched,
    TrainerWorld,
    assert_each_step_once,
    assert_one_line_error,
    assert_same_weights,
    checkpoint,
    complete_steps,
    env,
    eval_records,
    last_logged_step,
    meta,
    run_script,
    train,
    train_cmd,
    train_records,
    trainer_world,
    wait_until,
)

pytestmark = pytest.mark.slow

REPO_SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

NAME = "inst"


def instruct_overrides(tw: TrainerWorld, *extra: str) -> list[str]:
    qwen = tw.world.models / "qwen2-tiny"
    return [
        *OVERRIDES,
        f"experiment.name={NAME}",
        "train.stage=instruct",
        "loss.pairs.vision_text=0",
        "loss.pairs.audio_text=0",
        "decoder.kind=qwen",
        f"decoder.qwen={{model: {qwen}, tune: lora, max_length: 64, packing: true, "
        f"lora: {{r: 4, alpha: 8, dropout: 0.1}}}}",
        "decoder.prefix_modalities=[vision, audio]",
        "decoder.num_prefix_tokens=2",
        f"train.init_from={tw.reference_run}",
        "eval.max_new_tokens=4",
        "eval.num_samples_to_log=5",
        *extra,
    ]


@pytest.fixture(scope="module")
def tw(tmp_path_factory: pytest.TempPathFactory) -> TrainerWorld:
    return trainer_world(tmp_path_factory)


@pytest.fixture(scope="module")
def instruct(tw: TrainerWorld, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, place) of the uninterrupted 2-rank LoRA instruct run."""
    root = tmp_path_factory.mktemp("instruct")
    config = tw.world.write_config(root / "instruct.yaml", tw.world.store, instruct_overrides(tw))
    place = root / "reference"
    train(place, config, nproc=2).check()
    return config, place


def _run(place: Path) -> Path:
    return place / "runs" / NAME


def test_lora_run_trains_and_checkpoints_only_lora_and_the_connectors(tw: TrainerWorld, instruct) -> None:
    from edge_glass.training.instruct_task import load_instruct_model
    from edge_glass.training.run_loading import fp32_state_dict, resolve_checkpoint

    run = _run(instruct[1])
    assert_each_step_once(run, MAX_STEPS)
    assert complete_steps(run) == [3, 6, 9, 12]
    m = meta(checkpoint(run, MAX_STEPS))
    assert m["init_checkpoint"] == str(resolve_checkpoint(tw.reference_run, "best"))
    state = fp32_state_dict(checkpoint(run, MAX_STEPS))
    lora = [k for k in state if ".lora_" in k]
    connectors = [k for k in state if k.startswith("connectors.")]
    assert lora and {k.split(".")[1] for k in connectors} == {"vision", "audio"}
    # zero_to_fp32 adds the module's buffers (standardisation statistics, rotary tables)
    _, model, _ = load_instruct_model(run, "latest")
    buffers = {name for name, _ in model.named_buffers()}
    saved = sorted(k for k in state if k not in buffers)
    assert saved == sorted(lora + connectors), "only LoRA and connector weights are trained and saved"
    assert saved == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    # lora_B starts at zero; trained, it no longer is
    assert any(float(state[k].abs().max()) > 0 for k in lora if "lora_B" in k)
    records = train_records(run)
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    # Real tokens counted on every rank; packed rows leave little padding (one row's tail).
    assert all(r["tokens_per_s"] > 0 and 0.5 < r["useful_fraction"] <= 1.0 for r in records), records[0]


def test_lora_run_evaluates_generation_and_writes_samples(instruct) -> None:
    run = _run(instruct[1])
    evals = eval_records(run)
    assert [r["step"] for r in evals] == list(range(INTERVAL, MAX_STEPS + 1, INTERVAL))
    last = evals[-1]
    assert 0.0 <= last["val/exact_match"] <= 1.0 and math.isfinite(last["val/lm_loss"])
    assert last["val/num_examples"] == 16 * 5  # 16 val samples x (caption + 4 QA)
    for attribute in ("colour", "shape", "size", "position"):
        assert f"val/qa/{attribute}/exact_match" in last
    samples = [json.loads(x) for x in (run / "samples" / f"step-{MAX_STEPS:07d}.jsonl").read_text().splitlines()]
    assert len(samples) == 5 and all({"question", "answer", "prediction", "exact_match"} <= set(s) for s in samples)


def test_instruct_kill_9_then_resume_gives_identical_losses_and_weights(tw: TrainerWorld, instruct, tmp_path: Path) -> None:
    config, reference = instruct
    place = tmp_path / "killed"
    place.mkdir()
    run = _run(place)
    with Launched(train_cmd(config, nproc=2, script=HOOKED_TRAIN), place, env(TRAINER_TEST_STEP_DELAY="0.5")) as launched:
        wait_until(lambda: (checkpoint(run, 6) / "COMPLETE").is_file() and last_logged_step(run) >= 7,
                   launched, "checkpoint step6 and a later step")
        launched.kill(signal.SIGKILL)
        launched.proc.wait(timeout=60)
    newest = complete_steps(run)[-1]
    assert last_logged_step(run) > newest

    train(place, config, "--resume", "auto", nproc=2).check()
    assert_each_step_once(run, MAX_STEPS)
    mine, ref = {r["step"]: r for r in train_records(run)}, {r["step"]: r for r in train_records(_run(reference))}
    for step in range(1, MAX_STEPS + 1):
        for key in ("loss", "lr", "epoch"):
            assert mine[step][key] == ref[step][key], f"step {step} {key}: {mine[step][key]!r} != {ref[step][key]!r}"
    assert eval_records(run) == eval_records(_run(reference))
    assert_same_weights(checkpoint(run, MAX_STEPS), checkpoint(_run(reference), MAX_STEPS))


def test_init_from_with_another_model_section_is_refused(tw: TrainerWorld, tmp_path: Path) -> None:
    config = tw.world.write_config(tmp_path / "other.yaml", tw.world.store,
                                   instruct_overrides(tw, "model.adapters.vision.hidden_dim=16"))
    result = train(tmp_path, config)
    assert_one_line_error(result, "train.init_from", "model.adapters.vision.hidden_dim")


def test_evaluate_script_reports_exact_match_and_f1_of_an_instruct_run(instruct) -> None:
    run = _run(instruct[1])
    result = run_script(instruct[1], "evaluate.py", "--run", str(run), "--split", "test")
    assert result.returncode == 0, f"{result}"
    assert "exact match" in result.stdout and "qa/colour" in result.stdout
    (report_path,) = (run / "eval").glob("test-step*.json")  # named after the best checkpoint
    report = json.loads(report_path.read_text())
    metrics = report["metrics"]
    assert metrics["num_examples"] == 16 * 5
    assert {"exact_match", "token_f1", "lm_loss", "qa/shape/exact_match"} <= set(metrics)
    samples = report_path.with_name(f"{report_path.stem}-samples.jsonl").read_text().splitlines()
    assert len(samples) == 5


def test_an_exported_instruct_run_answers_in_a_fresh_process_as_the_run_does(tw, instruct, tmp_path, capsys):
    """scripts/export.py on the LoRA run, then scripts/predict.py on the export (a new process,
    no store, no DeepSpeed checkpoint) gives the run's own answers to a raw image and clip."""
    import subprocess
    import sys

    from edge_glass.data.raw_shards import iter_shard_raw
    from edge_glass.inference import Predictor

    _, place = instruct
    run = place / "runs" / NAME
    out = tmp_path / "export"
    run_script(place, "export.py", "--run", str(run), "--out", str(out), "--merge").check()
    assert (out / "decoder" / "adapter_config.json").is_file(), "the LoRA as a PEFT folder"
    assert (out / "decoder_merged" / "config.json").is_file(), "the merged model, save_pretrained"

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tw.world.models / "qwen2-tiny")
    assert isinstance(PeftModel.from_pretrained(base, out / "decoder"), PeftModel)

    predictor = Predictor(run, device="cpu")
    shard = sorted((tw.world.raw / "val").glob("shard-*.tar"))[0]
    answers = []
    for i, raw in enumerate(list(iter_shard_raw(shard))[:1]):
        image, audio = tmp_path / f"{i}.png", tmp_path / f"{i}.flac"
        image.write_bytes(raw["png"])
        audio.write_bytes(raw["flac"])
        question = "What colour is the shape?"
        ours = predictor.answer(question, image=image, audio=audio)
        cmd = [sys.executable, str(REPO_SCRIPTS / "predict.py"), "--run", str(out), "--device", "cpu",
               "--image", str(image), "--audio", str(audio), question]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.splitlines()[-1] == ours
        answers.append(ours)
    assert all(isinstance(a, str) for a in answers)
    # Streamed to the terminal, the same answer; sampled with a seed, the same draw twice.
    import importlib.util

    spec = importlib.util.spec_from_file_location("predict", REPO_SCRIPTS / "predict.py")
    predict = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(predict)
    base = ["--run", str(out), "--device", "cpu", "--image", str(image), "--audio", str(audio)]
    outputs = []
    for extra in (["--stream"], ["--temperature", "2.0", "--seed", "7"], ["--temperature", "2.0", "--seed", "7", "--stream"]):
        capsys.readouterr()
        assert predict.main(base + extra + [question]) == 0
        outputs.append(capsys.readouterr().out.splitlines()[-1])
    assert outputs[0] == ours
    assert outputs[1] == outputs[2]
