"""Model FLOPs utilisation in the trainer's log (issue 8): counted on the first micro-step, logged
with every train record where the device's peak is known, and consistent with samples/s."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.trainer_world import REPO, TrainerWorld, train, train_records, trainer_world

pytestmark = pytest.mark.slow

FAKE_PEAK = 1e12  # tests/helpers/trainer_fake_peak.py


@pytest.fixture(scope="module")
def tw(tmp_path_factory: pytest.TempPathFactory) -> TrainerWorld:
    return trainer_world(tmp_path_factory)


def test_mfu_is_logged_and_agrees_with_the_flops_of_one_step(tw: TrainerWorld, tmp_path: Path) -> None:
    from edge_glass.training.flops import count_flops

    script = REPO / "tests" / "helpers" / "trainer_fake_peak.py"
    train(tmp_path, tw.config, "--set", "train.max_steps=4", "--set", "train.log_interval=2", script=script).check()
    records = train_records(tmp_path / "runs" / "ref")
    assert [r["step"] for r in records] == [2, 4]
    assert all(0 < r["mfu"] < 1 for r in records)
    # The same ratio from first principles: FLOPs of a micro-batch x micro-batches per second / peak.
    # A micro-batch of 8 samples of this model: count it here on the same shapes.
    import torch

    from edge_glass.models.alignment import AlignmentModel, FeatureInfo
    from edge_glass.config import load_config
    from edge_glass.features.loader import FeatureLoader
    from edge_glass.features.store import open_store

    cfg = load_config(tw.config)
    split = open_store(cfg.data.features_dir, "train", cfg.data.store_format)
    model = AlignmentModel(cfg.model, cfg.loss, {m: FeatureInfo.from_manifest(split.manifest, m) for m in cfg.model.adapters.enabled()})
    batch = next(iter(FeatureLoader(split, cfg.data.micro_batch_size, modalities=cfg.model.adapters.enabled(), prefetch_batches=0)))
    flops = count_flops(lambda: model(batch)[0].backward())
    for r in records:
        expected = flops * r["samples_per_s"] / cfg.data.micro_batch_size / FAKE_PEAK
        assert r["mfu"] == pytest.approx(expected, rel=0.05), (r, expected)
    assert torch.isfinite(torch.tensor([r["loss"] for r in records])).all()


def test_train_record_counts_real_tokens_and_the_flops_they_took() -> None:
    import time

    import torch

    from edge_glass.training.run_log import train_record

    t0 = time.perf_counter() - 2.0  # a two-second window
    window = {"loss": torch.tensor(6.0), "finite": torch.tensor(3.0), "micro": 3, "wait": 0.5, "skipped": 0,
              "tokens": 3000, "positions": 4000, "flops": 3.0e12, "t0": t0}
    record = train_record(7, 0, window, 8, 1e-4, {}, 1, torch.device("cpu"), peak=1e12)
    assert record["loss"] == pytest.approx(2.0)
    assert record["useful_fraction"] == pytest.approx(0.75)
    assert record["tokens_per_s"] == pytest.approx(1500, rel=0.01)
    assert record["mfu"] == pytest.approx(1.5, rel=0.01)  # 3e12 FLOPs over ~2 s on a 1e12 peak
    align = dict(window, tokens=0, positions=0, flops=0.0)
    plain = train_record(7, 0, align, 8, 1e-4, {}, 1, torch.device("cpu"), peak=None)
    assert not {"tokens_per_s", "useful_fraction", "mfu"} & plain.keys(), "no tokens, no peak: neither is made up"


def test_instruct_mfu_counts_the_real_tokens_only(tw: TrainerWorld, tmp_path: Path) -> None:
    """Padded rows: MFU follows the real tokens (FLOPs per computed position x real tokens), so
    MFU per token/s is the same in every window, and the padding's share shows as useful_fraction."""
    from test_instruct_stage import NAME, instruct_overrides

    # One example per padded row here (packing off): there is padding to leave out.
    config = tw.world.write_config(tmp_path / "instruct.yaml", tw.world.store,
                                   instruct_overrides(tw, "decoder.qwen.packing=false", "train.max_steps=6",
                                                      "train.log_interval=2", "train.eval_interval=6",
                                                      "train.save_interval=6"))
    script = REPO / "tests" / "helpers" / "trainer_fake_peak.py"
    train(tmp_path, config, script=script).check()
    records = train_records(tmp_path / "runs" / NAME)
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(0 < r["useful_fraction"] < 1 for r in records), records
    per_token = [r["mfu"] * FAKE_PEAK / r["tokens_per_s"] for r in records]  # FLOPs per real token
    assert max(per_token) == pytest.approx(min(per_token), rel=1e-6)
