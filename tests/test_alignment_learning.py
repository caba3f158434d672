"""AlignmentModel end to end: two ranks equal one process, and the adapters really learn.

1. Two gloo ranks, each on half a batch, with gradients averaged as DeepSpeed's data parallelism
   averages them, give the loss and gradients of one process on the whole batch
   (helpers/align_two_ranks.py).
2. On the synthetic set, embedded by the tiny random CLIP / Whisper / SBERT, AlignmentModel
   trained for a fixed small budget retrieves the right caption far above chance on val for
   every adapter kind, and from the store's int4 conversion; with the captions shuffled against
   the features it stays near chance.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import kill_tree
import torch

from helpers.align_two_ranks import build_model, global_batch, grads

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


# --- 1. two ranks == one process ---------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID"}
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu")
    return env


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    out = tmp_path / "two_ranks.pt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO / "tests" / "helpers" / "align_two_ranks.py"), str(out),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        stdout, stderr = proc.communicate()
        pytest.fail(f"two-rank run timed out\nstdout:\n{stdout}\nstderr:\n{stderr}")
    assert proc.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    two = torch.load(out)
    assert two["world_size"] == 2

    model = build_model()
    batch = global_batch()
    assert batch["captions"][1] == batch["captions"][6]  # a shared caption across the two halves
    loss, parts, _ = model(batch)
    loss.backward()
    one = grads(model)

    torch.testing.assert_close(two["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    assert set(two["grads"]) == set(one)
    assert "logit_scale.value" in one
    assert any(k.startswith("adapters.vision") for k in one) and any(k.startswith("fusion") for k in one)
    for name in one:
        torch.testing.assert_close(two["grads"][name], one[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    pairs = ("vision_text", "audio_text", "vision_audio", "fused_text")
    assert set(parts) >= {f"loss/{p}@{d}" for p in pairs for d in (4, 8, 16)}


# --- 2. learning on the synthetic set ----------------------------------------------------------

NUM_SAMPLES = 1500  # 1200 / 150 / 150
MAX_STEPS = 60  # about 6 epochs of 9 batches; measured R@1 ~ 0.5-0.7 at 60 steps (chance 1/150)
MAX_SECONDS = 25.0  # per model; a loaded machine gets fewer steps, not a longer test
BATCH = 128


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random encoders -> synthetic raw shards -> an HDF5 feature store, once per module."""
    from edge_glass.config import config_from_dict
    from edge_glass.data.raw_shards import prepare_raw_dataset, write_shards
    from edge_glass.data.synthetic import SyntheticSource
    from edge_glass.encoders.factory import build_encoders
    from edge_glass.features.extract import extract_store
    from edge_glass.local_models.build import build_local_models

    root = tmp_path_factory.mktemp("align-world")
    build_local_models(root / "models", include_real=False, seed=0)
    write_shards(prepare_raw_dataset(root / "raw", SyntheticSource(num_samples=NUM_SAMPLES, image_size=32), shard_size=500))
    cfg = config_from_dict({
        "experiment": {"name": "align-learning-test"},
        "data": {"raw_dir": str(root / "raw"), "features_dir": str(root / "store")},
        "encoders": {
            "batch_size": 128,
            "vision": {"model": str(root / "models" / "clip-vision-tiny")},
            "audio": {"model": str(root / "models" / "whisper-tiny-random"), "audio_seconds": 1.0},
            "text": {"model": str(root / "models" / "sbert-tiny-random")},
        },
        "model": {"adapters": {m: {"kind": "mlp"} for m in ("vision", "audio", "text")}},
        "loss": {"pairs": {"vision_text": 1.0, "audio_text": 1.0}},
        "train": {"max_steps": 1},
    })
    extract_store(cfg, build_encoders(cfg.encoders, torch.device("cpu")), ["hdf5"])
    return root / "store"


@pytest.fixture
def one_thread():
    """Two shared cores: one intra-op thread is several times faster than two under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def adapter(kind: str):
    from edge_glass.config import AdapterConfig

    if kind == "mlp":
        return AdapterConfig("mlp", hidden_dim=128)
    if kind == "attn_pool":
        return AdapterConfig("attn_pool", hidden_dim=128, num_heads=4)
    return AdapterConfig("perceiver", hidden_dim=128, num_heads=4, num_latents=8, depth=1)


def train_and_eval(store: Path, kind: str, shuffle_captions: bool = False) -> tuple[dict, float, float, int, float]:
    """(metrics, vision-text R@1, audio-text R@1, steps, seconds); R@1 averages both directions."""
    from edge_glass.config import AdaptersConfig, LossConfig, ModelConfig, PairWeightsConfig
    from edge_glass.features.loader import FeatureLoader
    from edge_glass.features.store import open_store
    from edge_glass.models.alignment import AlignmentModel, FeatureInfo
    from edge_glass.training.align_eval import alignment_metrics

    train, val = open_store(store, "train"), open_store(store, "val")
    torch.manual_seed(0)
    adapters = AdaptersConfig(vision=adapter(kind), audio=adapter(kind), text=adapter("mlp"))
    model_cfg = ModelConfig(shared_dim=64, adapters=adapters)
    loss_cfg = LossConfig(pairs=PairWeightsConfig(vision_text=1.0, audio_text=1.0), mrl=False)
    info = {m: FeatureInfo.from_manifest(train.manifest, m) for m in ("vision", "audio", "text")}
    model = AlignmentModel(model_cfg, loss_cfg, info)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = FeatureLoader(train, BATCH, seed=0)
    perm_gen = torch.Generator().manual_seed(1)
    steps, started = 0, time.perf_counter()
    while steps < MAX_STEPS and time.perf_counter() - started < MAX_SECONDS:
        for batch in loader:
            if shuffle_captions:  # every caption (and its text features) moves to another sample
                p = torch.randperm(len(batch["captions"]), generator=perm_gen)
                batch["text"] = {k: v[p] for k, v in batch["text"].items()}
                batch["captions"] = [batch["captions"][i] for i in p.tolist()]
            loss, _, _ = model(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps >= MAX_STEPS or time.perf_counter() - started >= MAX_SECONDS:
                break
    seconds = time.perf_counter() - started
    metrics = alignment_metrics(model, FeatureLoader(val, 50, shuffle=False, drop_last=False), ks=[1, 5])
    vt = (metrics["vision_text@64/vision->text/R@1"] + metrics["vision_text@64/text->vision/R@1"]) / 2
    at = (metrics["audio_text@64/audio->text/R@1"] + metrics["audio_text@64/text->audio/R@1"]) / 2
    print(f"\n{kind}{' (shuffled captions)' if shuffle_captions else ''}: {steps} steps in {seconds:.1f}s, "
          f"loss {float(loss.detach()):.3f}, R@1 vision-text {vt:.3f} audio-text {at:.3f} (chance {1 / len(val):.4f})")
    return metrics, vt, at, steps, seconds


@pytest.mark.parametrize("kind", ["mlp", "attn_pool", "perceiver"])
def test_adapters_learn_to_retrieve(store: Path, kind: str, one_thread) -> None:
    from edge_glass.features.store import open_store

    chance = 1 / len(open_store(store, "val"))
    metrics, vt, at, steps, _ = train_and_eval(store, kind)
    assert steps >= 20, f"only {steps} steps fit in {MAX_SECONDS}s: the machine is too loaded to judge learning"
    assert vt >= 20 * chance, f"{kind}: vision-text R@1 {vt:.3f} < 20x chance ({20 * chance:.3f})"
    assert at >= 20 * chance, f"{kind}: audio-text R@1 {at:.3f} < 20x chance ({20 * chance:.3f})"
    # evaluation on a real FeatureLoader: one set of metrics per pair, no MRL dims but the full one
    assert {k.split("/")[0] for k in metrics} == {"vision_text@64", "audio_text@64"}


def test_adapters_learn_from_the_int4_conversion_of_the_store(store: Path, tmp_path: Path, one_thread) -> None:
    """`python -m edge_glass.features convert` output (int4, the coarsest codes, 4x smaller
    tokens) teaches the same model as the float16 store does: the model dequantises the codes in
    its input path, and the budget that reaches 20x chance on float16 reaches it here."""
    from edge_glass.features.convert import convert_store
    from edge_glass.features.store import open_store

    from edge_glass.features.loader import FeatureLoader

    converted = tmp_path / "int4"
    convert_store(store, converted, "int4")
    batch = next(iter(FeatureLoader(open_store(converted, "train"), 8, prefetch_batches=0)))
    assert batch["vision"]["quant"] == batch["audio"]["quant"] == "int4"  # codes reach the model
    chance = 1 / len(open_store(converted, "val"))
    # Attention pooling reads the tokens (an MLP adapter reads the pooled vectors, which stay float16).
    _, vt, at, steps, _ = train_and_eval(converted, "attn_pool")
    assert steps >= 20, f"only {steps} steps fit in {MAX_SECONDS}s: the machine is too loaded to judge learning"
    assert vt >= 20 * chance and at >= 20 * chance, f"int4 store: R@1 vision-text {vt:.3f}, audio-text {at:.3f}"


def test_shuffled_captions_stay_at_chance(store: Path, one_thread) -> None:
    from edge_glass.features.store import open_store

    chance = 1 / len(open_store(store, "val"))
    _, vt, at, steps, _ = train_and_eval(store, "mlp", shuffle_captions=True)
    assert steps >= 20
    assert vt < 5 * chance and at < 5 * chance, f"learned from shuffled pairs: R@1 {vt:.3f} / {at:.3f}"
