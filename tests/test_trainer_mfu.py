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
