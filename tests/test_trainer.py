"""The trainer's parts (schedule, DeepSpeed config, checkpoint pruning, metrics log) in-process,
and whole runs through `scripts/train.py`, `scripts/evaluate.py` and `scripts/export.py`.

    python -m pytest tests/test_trainer.py -q -m 'not slow'     # the in-process unit tests only

Resume and topology: test_trainer_resume.py, test_trainer_topology.py.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import pytest

from edge_glass.config import Config, OptimConfig, apply_overrides, config_from_dict, load_config
from edge_glass.utils.errors import UserError
from helpers.trainer_world import (
    LR,
    MAX_STEPS,
    MRL_DIMS,
    NAME,
    SHARED_DIM,
    TrainerWorld,
    assert_each_step_once,
    assert_finite_losses,
    assert_same_training,
    checkpoint,
    complete_steps,
    copy_run,
    eval_records,
    meta,
    run_script,
    train,
    train_records,
    trainer_world,
)

REPO = Path(__file__).resolve().parents[1]


# =====================================================================================================
# 8. Unit tests (in-process, fast)
# =====================================================================================================

# --- lr_factor ----------------------------------------------------------------------------------------


def _optim(**kw) -> OptimConfig:
    return OptimConfig(**{"lr": 1e-3, "warmup_steps": 4, "min_lr": 1e-4, "schedule": "cosine", **kw})


def test_lr_warmup_ramps_linearly_to_the_peak() -> None:
    from edge_glass.training.schedule import lr_factor

    for schedule in ("cosine", "linear", "constant"):
        cfg = _optim(schedule=schedule)
        assert [lr_factor(s, 20, cfg) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
        assert lr_factor(4, 20, cfg) == pytest.approx(1.0)  # the first step after warmup is at the peak


def test_lr_cosine_decays_to_min_lr_at_total_steps() -> None:
    from edge_glass.training.schedule import lr_factor

    cfg, total = _optim(), 20
    floor = cfg.min_lr / cfg.lr
    factors = [lr_factor(s, total, cfg) for s in range(4, total + 1)]
    assert factors == sorted(factors, reverse=True)  # never rises after warmup
    assert lr_factor(total, total, cfg) == pytest.approx(floor)
    assert lr_factor(total + 5, total, cfg) == pytest.approx(floor)  # stays at the floor
    assert lr_factor(12, total, cfg) == pytest.approx(floor + (1 - floor) * 0.5)  # half way
    q = 4 + (total - 4) * 3 // 4  # three quarters: cosine is below linear there
    assert lr_factor(q, total, cfg) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 0.75)))


def test_lr_linear_and_constant_variants() -> None:
    from edge_glass.training.schedule import lr_factor

    lin, total = _optim(schedule="linear"), 20
    floor = lin.min_lr / lin.lr
    assert lr_factor(8, total, lin) == pytest.approx(floor + (1 - floor) * 0.75)
    assert lr_factor(16, total, lin) == pytest.approx(floor + (1 - floor) * 0.25)
    assert lr_factor(total, total, lin) == pytest.approx(floor)
    const = _optim(schedule="constant")
    assert {lr_factor(s, total, const) for s in range(4, 40)} == {1.0}
    no_warmup = _optim(warmup_steps=0, min_lr=0.0)
    assert lr_factor(0, total, no_warmup) == pytest.approx(1.0)
    assert lr_factor(total, total, no_warmup) == pytest.approx(0.0)


# --- build_ds_config ------------------------------------------------------------------------------------


def _cfg(*overrides: str) -> Config:
    data = {
        "experiment": {"name": "unit"},
        "data": {"raw_dir": "raw", "features_dir": "features", "micro_batch_size": 8},
        "encoders": {"vision": {"model": "v"}, "text": {"model": "t"}},
        "model": {"adapters": {"vision": {"kind": "mlp"}, "text": {"kind": "mlp"}}},
        "loss": {"pairs": {"vision_text": 1.0}},
        "train": {"max_steps": 10, "grad_accum": 2, "grad_clip": 0.7},
        "optim": {"lr": 3e-4, "betas": [0.8, 0.95], "eps": 1e-7, "weight_decay": 0.05},
    }
    return config_from_dict(apply_overrides(data, list(overrides)))


def _autos(node, path=""):
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _autos(v, f"{path}.{k}")]
    return [path] if node == "auto" else []


@pytest.mark.parametrize("name", ["zero1.json", "zero2.json", "zero2_offload.json", "zero3.json"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_build_ds_config_fills_every_auto_of_the_shipped_configs(tmp_path: Path, name: str, precision: str) -> None:
    from edge_glass.training.ds_config import build_ds_config, zero_stage

    shipped = json.loads((REPO / "ds_configs" / name).read_text())
    ds = build_ds_config(_cfg(), REPO / "ds_configs" / name, 3, precision, tmp_path / "run")
    assert _autos(ds) == []
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 8 * 2 * 3
    assert ds["gradient_clipping"] == 0.7
    assert ds["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.8, 0.95], "eps": 1e-7, "weight_decay": 0.05,
                                         "torch_adam": True}
    assert ds["bf16"] == {"enabled": precision == "bf16"}
    assert ds["fp16"] == {"enabled": precision == "fp16"}
    # literal values are kept as the file has them
    assert ds["zero_optimization"] == shipped["zero_optimization"]
    assert ds["steps_per_print"] == shipped["steps_per_print"]
    assert zero_stage(ds) == shipped["zero_optimization"]["stage"]
    # The monitors are the trainer's (training/tracking.py, fed with the optimizer step), not the engine's.
    from edge_glass.training.tracking import monitor_sections

    assert "csv_monitor" not in ds
    assert monitor_sections(["csv"], ds, tmp_path / "run", "p") == {
        "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "run" / "monitor"), "job_name": "csv"}}
    assert json.loads((REPO / "ds_configs" / name).read_text()) == shipped  # the file is not modified


def _write(tmp_path: Path, ds: dict) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return path


def test_build_ds_config_keeps_literal_values(tmp_path: Path) -> None:
    from edge_glass.training.ds_config import build_ds_config

    path = _write(tmp_path, {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": 16,
        "gradient_clipping": 0.25, "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "betas": "auto", "eps": 1e-6,
                                                                               "weight_decay": "auto"}},
        "bf16": {"enabled": False}, "zero_optimization": {"stage": 1}, "steps_per_print": 5,
    })
    ds = build_ds_config(_cfg(), path, 1, "bf16", tmp_path)
    assert ds["gradient_clipping"] == 0.25
    assert ds["optimizer"]["params"] == {"lr": 0.01, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.05}
    assert ds["bf16"] == {"enabled": False}  # the user's literal choice, though precision says bf16
    assert "fp16" not in ds  # nothing added that the file does not have
    assert ds["steps_per_print"] == 5
    assert ds["train_batch_size"] == 16


def test_build_ds_config_without_monitor_adds_none(tmp_path: Path) -> None:
    from edge_glass.training.ds_config import build_ds_config

    ds = build_ds_config(_cfg("train.monitor=[]"), REPO / "ds_configs" / "zero2.json", 2, "fp32", tmp_path)
    assert "csv_monitor" not in ds and "tensorboard" not in ds


def test_build_ds_config_refuses_an_auto_it_cannot_fill(tmp_path: Path) -> None:
    from edge_glass.training.ds_config import build_ds_config

    path = _write(tmp_path, {"train_batch_size": "auto", "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}})
    with pytest.raises(UserError, match=r"zero_optimization\.reduce_bucket_size") as e:
        build_ds_config(_cfg(), path, 2, "fp32", tmp_path)
    assert "\n" not in str(e.value)


def test_build_ds_config_refuses_a_literal_train_batch_size_that_does_not_match(tmp_path: Path) -> None:
    from edge_glass.training.ds_config import build_ds_config

    path = _write(tmp_path, {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                             "train_batch_size": 64})
    with pytest.raises(UserError, match="train_batch_size 64") as e:
        build_ds_config(_cfg(), path, 2, "fp32", tmp_path)  # 8 x 2 x 2 = 32
    assert '"auto"' in str(e.value)
    assert build_ds_config(_cfg(), path, 4, "fp32", tmp_path)["train_batch_size"] == 64  # 8 x 2 x 4


def test_build_ds_config_refuses_missing_and_invalid_files(tmp_path: Path) -> None:
    from edge_glass.training.ds_config import build_ds_config

    with pytest.raises(UserError, match="file not found"):
        build_ds_config(_cfg(), tmp_path / "nope.json", 1, "fp32", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(UserError, match="not valid JSON"):
        build_ds_config(_cfg(), bad, 1, "fp32", tmp_path)


# --- checkpoint.prune / latest_checkpoint -----------------------------------------------------------


def _fake_checkpoints(root: Path, complete: list[int], incomplete: list[int]) -> None:
    for s in complete + incomplete:
        d = root / f"step{s}"
        d.mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if s in complete:
            (d / "COMPLETE").write_text("")
    (root / "universal" / "step1").mkdir(parents=True)
    (root / "zero_to_fp32.py").write_text("")


def _names(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


def test_prune_keeps_the_last_k_and_the_best_and_drops_stale_incomplete_ones(tmp_path: Path) -> None:
    from edge_glass.training import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    _fake_checkpoints(root, complete=[1, 2, 3, 5, 9, 10], incomplete=[4, 11])
    ckpt.prune(root, keep_last=2, keep={"step2"})
    # step9/step10: the newest two; step2: the best; step11: newer than every complete one
    # (a save in progress, or the leftover of a crash that a later save at that step replaces)
    assert _names(root) == {"step2", "step9", "step10", "step11", "universal", "zero_to_fp32.py"}
    assert (root / "universal" / "step1").is_dir()


def test_prune_with_fewer_checkpoints_than_keep_last_deletes_nothing_complete(tmp_path: Path) -> None:
    from edge_glass.training import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    _fake_checkpoints(root, complete=[3, 6], incomplete=[])
    ckpt.prune(root, keep_last=5, keep=set())
    assert {"step3", "step6"} <= _names(root)
    empty = tmp_path / "none"
    ckpt.prune(empty, keep_last=1, keep=set())  # no directory yet: nothing to do, no error


def test_latest_checkpoint_orders_by_step_number_and_skips_incomplete(tmp_path: Path) -> None:
    from edge_glass.training import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    _fake_checkpoints(root, complete=[9, 10, 100], incomplete=[1000])
    assert ckpt.latest_checkpoint(root) == root / "step100"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step9", "step10", "step100"]
    with pytest.raises(UserError, match="COMPLETE"):
        ckpt.read_meta(root / "step1000")
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None


# --- MetricsLog ---------------------------------------------------------------------------------------


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_log_truncate_after_keeps_records_up_to_the_step(tmp_path: Path) -> None:
    from edge_glass.training.run_log import MetricsLog

    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    for s in range(1, 7):
        log.write({"kind": "train", "step": s, "loss": float(s)})
        if s % 3 == 0:
            log.write({"kind": "eval", "step": s})
    log.truncate_after(4)
    assert [(r["kind"], r["step"]) for r in _lines(log.path)] == [
        ("train", 1), ("train", 2), ("train", 3), ("eval", 3), ("train", 4)]
    log.write({"kind": "train", "step": 5, "loss": -5.0})  # appends after the cut
    assert [r["step"] for r in _lines(log.path)][-2:] == [4, 5]
    assert not list(log.path.parent.glob("*.tmp"))
    log.truncate_after(0)
    assert log.path.read_text() == ""


def test_metrics_log_disabled_on_other_ranks_writes_nothing(tmp_path: Path) -> None:
    from edge_glass.training.run_log import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"kind": "train", "step": 9}) + "\n")
    log = MetricsLog(path, enabled=False)
    log.write({"kind": "train", "step": 10})
    log.truncate_after(1)
    assert _lines(path) == [{"kind": "train", "step": 9}]
    MetricsLog(tmp_path / "absent.jsonl").truncate_after(3)  # no file yet: nothing to do
    assert not (tmp_path / "absent.jsonl").exists()


def test_metrics_log_truncate_after_survives_a_torn_last_line(tmp_path: Path) -> None:
    """A crash in the middle of a write (power loss, a full disk) can leave half a line at the
    end; resuming must drop it rather than fail on it."""
    from edge_glass.training.run_log import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for s in (1, 2, 3):
        log.write({"kind": "train", "step": s})
    with open(log.path, "a") as f:
        f.write('{"kind": "train", "st')
    log.truncate_after(2)
    assert [r["step"] for r in _lines(log.path)] == [1, 2]


# =====================================================================================================
# Whole runs (subprocesses)
# =====================================================================================================


@pytest.fixture(scope="module")
def tw(tmp_path_factory: pytest.TempPathFactory) -> TrainerWorld:
    return trainer_world(tmp_path_factory)


# --- 10. plain `python scripts/train.py` ---------------------------------------------------------------

PLAIN = ["--set", "experiment.name=plain", "--set", "train.max_steps=4"]


@pytest.fixture(scope="module")
def plain_run(tw: TrainerWorld, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    place = tmp_path_factory.mktemp("plain")
    result = train(place, tw.config, *PLAIN)
    return tw.run_dir(place, "plain"), result


@pytest.mark.slow
def test_zero3_counts_the_parameters_zero2_counts(tw: TrainerWorld, plain_run, tmp_path: Path) -> None:
    """Under ZeRO-3 each rank holds a partition (numel() 0); the table uses DeepSpeed's full counts."""
    from helpers.trainer_world import ZERO3

    result = train(tmp_path, tw.config, "--set", "experiment.name=z3", "--set", "train.max_steps=1",
                   "--deepspeed", str(ZERO3), nproc=2)
    result.check()
    zero2 = json.loads((plain_run[0] / "parameters.json").read_text())
    zero3 = json.loads((tw.run_dir(tmp_path, "z3") / "parameters.json").read_text())
    assert zero3 == zero2 and sum(row["trainable"] for row in zero3) > 0


@pytest.mark.slow
def test_plain_python_train_writes_a_complete_run(tw: TrainerWorld, plain_run) -> None:
    run, result = plain_run
    result.check()
    assert "run directory: runs/plain" in result.stdout
    assert "Traceback" not in result.stderr
    assert_each_step_once(run, 4)
    assert_finite_losses(run)
    records = train_records(run)
    assert set(records[0]) >= {"kind", "step", "epoch", "loss", "lr", "samples_per_s", "data_wait"}
    assert all(r["samples_per_s"] > 0 and 0 <= r["data_wait"] for r in records)

    saved = load_config(run / "config.yaml")
    assert saved == load_config(tw.config, PLAIN[1::2])
    assert saved.experiment.name == "plain" and saved.train.max_steps == 4

    table = json.loads((run / "parameters.json").read_text())
    assert {row["module"] for row in table} >= {"adapters.vision", "adapters.audio", "adapters.text", "logit_scale"}
    assert all(row["trainable"] > 0 and row["frozen"] == 0 for row in table)

    assert complete_steps(run) == [3, 4]
    m = meta(checkpoint(run, 4))
    assert (m["step"], m["world_size"], m["zero_stage"], m["precision"]) == (4, 1, 2, "fp32")
    assert (checkpoint(run, 4) / "rng_state_0.pt").is_file()
    assert not (run / "checkpoints" / "latest").exists()  # DeepSpeed's pointer is never written


@pytest.mark.slow
def test_logged_lr_follows_the_schedule(tw: TrainerWorld) -> None:
    """`lr` of step s is the rate step s trained with: the peak times lr_factor(s - 1, total)
    (s - 1 scheduler steps taken before it); warmup starts at peak / warmup_steps."""
    from edge_glass.training.schedule import lr_factor

    cfg = load_config(tw.config)
    records = train_records(tw.reference_run)
    assert [r["lr"] for r in records] == pytest.approx([LR * lr_factor(r["step"] - 1, MAX_STEPS, cfg.optim) for r in records])
    assert records[0]["step"] == 1 and records[0]["lr"] == pytest.approx(LR / cfg.optim.warmup_steps)


@pytest.mark.slow
def test_best_checkpoint_tag_names_a_saved_checkpoint(tw: TrainerWorld, tmp_path: Path) -> None:
    """Evaluating more often than saving: the best evaluation may fall on a step that has no
    checkpoint, and then `--checkpoint best` (evaluate, export) silently uses the latest one."""
    args = ["--set", "experiment.name=evalmore", "--set", "train.max_steps=5", "--set", "train.eval_interval=1",
            "--set", "train.save_interval=5"]
    train(tmp_path, tw.config, *args).check()
    run = tw.run_dir(tmp_path, "evalmore")
    best = meta(checkpoint(run, 5))["best"]
    assert (run / "checkpoints" / best["tag"] / "COMPLETE").is_file(), (
        f"best tag {best['tag']} (mean R@1 {best['value']}) has no checkpoint; saved: {complete_steps(run)}")
    at_tag = [r for r in eval_records(run) if f"step{r['step']}" == best["tag"]]
    assert at_tag and at_tag[0]["val/mean_R@1"] == best["value"]


# --- 7. frozen parameters are not checkpointed -----------------------------------------------------------

FROZEN = ["--set", "experiment.name=frozen", "--set", "model.learn_temperature=false", "--set", "train.max_steps=4",
          "--set", "train.save_interval=2", "--set", "train.eval_interval=2"]


@pytest.fixture(scope="module")
def frozen_run(tw: TrainerWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    place = tmp_path_factory.mktemp("frozen")
    train(place, tw.config, *FROZEN).check()
    return tw.run_dir(place, "frozen")


@pytest.mark.slow
def test_checkpoints_hold_no_frozen_weights(frozen_run: Path) -> None:
    import torch

    states = torch.load(checkpoint(frozen_run, 4) / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    module = states["module"]
    assert "logit_scale.value" not in module
    for m in ("vision", "audio", "text"):
        assert f"adapters.{m}.body.mlp.0.weight" in module
    assert not states.get("frozen_param_shapes")
    table = {row["module"]: row for row in json.loads((frozen_run / "parameters.json").read_text())}
    assert table["logit_scale"] == {"module": "logit_scale", "trainable": 0, "frozen": 1}
    scale = [r["logit_scale"] for r in train_records(frozen_run)]
    assert scale == pytest.approx([1 / 0.07] * 4)  # fixed at the initial temperature


@pytest.mark.slow
def test_a_run_with_frozen_weights_resumes_exactly(tw: TrainerWorld, frozen_run: Path, tmp_path: Path) -> None:
    shutil.copytree(frozen_run.parent, tmp_path / "runs")
    run = tw.run_dir(tmp_path, "frozen")
    shutil.rmtree(checkpoint(run, 4))
    result = train(tmp_path, tw.config, *FROZEN)
    result.check()
    assert re.search(r"resumed from \S*checkpoints/step2 at step 2\b", result.stdout), f"{result}"
    assert_each_step_once(run, 4, eval_every=2)
    assert_same_training(run, frozen_run, range(1, 5))


@pytest.mark.slow
def test_export_and_evaluate_work_on_a_run_with_frozen_weights(frozen_run: Path) -> None:
    """The logit scale is frozen, so the checkpoint has no `logit_scale.value`: loading the run
    must take it from the model as configured instead of refusing the checkpoint."""
    import torch
    from safetensors.torch import load_file

    result = run_script(frozen_run.parent.parent, "export.py", "--run", "runs/frozen")
    result.check()
    exported = load_file(str(frozen_run / "export" / "model.safetensors"))
    assert torch.equal(exported["logit_scale.value"], torch.full((1,), math.log(1 / 0.07)))
    run_script(frozen_run.parent.parent, "evaluate.py", "--run", "runs/frozen", "--split", "test").check()


# --- 9. evaluate and export on a finished run -----------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tw: TrainerWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the reference run (2 ranks, ZeRO-2), so the scripts' outputs stay out of it."""
    place = tmp_path_factory.mktemp("finished")
    return copy_run(tw, place)


def _expected_best(run: Path) -> str:
    evals = eval_records(run)
    top = max(r["val/mean_R@1"] for r in evals)
    return f"step{next(r['step'] for r in evals if r['val/mean_R@1'] == top)}"  # the first to reach it


@pytest.mark.slow
def test_evaluate_writes_every_pair_direction_and_mrl_dim(finished: Path) -> None:
    result = run_script(finished.parent.parent, "evaluate.py", "--run", f"runs/{NAME}", "--split", "test")
    result.check()
    best = _expected_best(finished)
    assert meta(checkpoint(finished, MAX_STEPS))["best"]["tag"] == best
    for direction in ("vision -> text", "text -> vision", "audio -> text", "text -> audio"):
        assert direction in result.stdout
    assert "test (16 samples" in result.stdout

    stem = finished / "eval" / f"test-{best}"
    report = json.loads(stem.with_suffix(".json").read_text())
    assert report["split"] == "test" and report["num_samples"] == 16
    assert Path(report["checkpoint"]).name == best
    want = {(pair, dim, d) for pair, dirs in {"vision_text": ("vision->text", "text->vision"),
                                              "audio_text": ("audio->text", "text->audio")}.items()
            for dim in (*MRL_DIMS, SHARED_DIM) for d in dirs}
    rows = report["rows"]
    assert len(rows) == len(want) == 12
    assert {(r["pair"], r["dim"], r["direction"]) for r in rows} == want
    for r in rows:
        assert {"R@1", "R@5", "R@10", "MRR"} <= set(r)
        assert 0.0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 1.0

    with open(stem.with_suffix(".csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 12
    assert {(r["pair"], int(r["dim"]), r["direction"]) for r in table} == want
    by_key = {(r["pair"], r["dim"], r["direction"]): r for r in rows}
    for r in table:
        assert float(r["R@1"]) == by_key[(r["pair"], int(r["dim"]), r["direction"])]["R@1"]

    png = stem.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


@pytest.mark.slow
def test_export_writes_the_best_checkpoints_fp32_weights(finished: Path, tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from edge_glass.training.run_loading import fp32_state_dict

    out = tmp_path / "export"
    result = run_script(finished.parent.parent, "export.py", "--run", f"runs/{NAME}", "--out", str(out))
    result.check()
    best = checkpoint(finished, int(_expected_best(finished)[4:]))
    exported = load_file(str(out / "model.safetensors"))
    reference = fp32_state_dict(best)
    assert sorted(exported) == sorted(reference)
    different = [k for k in reference if not torch.equal(exported[k], reference[k])]
    assert not different, different
    assert all(t.dtype == torch.float32 for t in exported.values())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert Path(f.metadata()["checkpoint"]).name == best.name
    assert load_config(out / "config.yaml") == load_config(finished / "config.yaml")
    # the latest checkpoint differs from the best, so this really picked the best one
    if best.name != f"step{MAX_STEPS}":
        latest = fp32_state_dict(checkpoint(finished, MAX_STEPS))
        assert any(not torch.equal(latest[k], reference[k]) for k in reference)
