"""A decoder plug-in, as a user writes one: helpers/gru_decoder.py registers `decoder.kind: gru`
with an options dataclass, and the normal scripts train and evaluate it once it is imported.

    python -m pytest tests/test_decoder_plugin.py -q

The config tests run in-process (the plug-in is registered for the test and unregistered after,
so no other test sees it). The end-to-end test runs `scripts/train.py` and `scripts/evaluate.py`
unchanged, in subprocesses that import the plug-in first, on a store of random features
(helpers/random_store.py: no encoder runs) whose captions are the answers.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers.random_store import random_store
from helpers.trainer_world import Launched, Result, assert_one_line_error, eval_records, train, train_records

from edge_glass.config import ConfigError, apply_overrides, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
STEPS = 60
TIMEOUT = 240


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    """The tiny ChatML BPE tokenizer of the local qwen2-tiny (475 tokens), built alone."""
    from edge_glass.local_models.build import model_specs

    (spec,) = [s for s in model_specs(include_real=False) if s.name == "qwen2-tiny"]
    out = tmp_path_factory.mktemp("decoder-plugin") / "qwen2-tiny"
    out.mkdir()
    spec.build(out, 0)
    return str(out)


@pytest.fixture
def gru_registered():
    """`decoder.kind: gru` registered for one test; the registry and sys.modules restored after."""
    from edge_glass.decoders import registry

    before = dict(registry.DECODERS)
    module = importlib.import_module("helpers.gru_decoder")
    assert "gru" in registry.DECODERS
    yield module
    registry.DECODERS.clear()
    registry.DECODERS.update(before)
    sys.modules.pop("helpers.gru_decoder", None)


def config_dict(store: Path, tokenizer: str, *overrides: str) -> dict:
    """An instruct config on the random store: a vision prefix into the GRU, captions only."""
    data = {
        "experiment": {"name": "gru"},
        "data": {"raw_dir": "raw", "features_dir": str(store), "micro_batch_size": 8, "eval_batch_size": 8,
                 "read_block_size": 8, "prefetch_batches": 1, "reader_threads": 1},
        "encoders": {m: {"model": f"enc-{m}"} for m in ("vision", "audio", "text")},
        "model": {"shared_dim": 16,
                  "adapters": {m: {"kind": "mlp", "hidden_dim": 16} for m in ("vision", "audio", "text")}},
        "train": {"stage": "instruct", "max_steps": STEPS, "log_interval": 1, "eval_interval": STEPS,
                  "save_interval": STEPS, "precision": "fp32", "deepspeed": str(REPO / "ds_configs" / "zero2.json"),
                  "freeze_adapters": True},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "eval": {"max_new_tokens": 8, "num_samples_to_log": 4},
        "decoder": {"kind": "gru", "prefix_modalities": ["vision"], "num_prefix_tokens": 2,
                    "instructions": ["caption"], "options": {"tokenizer": tokenizer, "hidden_dim": 32}},
    }
    return apply_overrides(data, list(overrides))


# ---------------------------------------------------------------------------------------------
# Config errors
# ---------------------------------------------------------------------------------------------


def test_a_misspelt_plugin_option_is_one_line_with_its_dotted_path(gru_registered, tokenizer_dir, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(config_dict(tmp_path / "store", tokenizer_dir)))
    cfg = load_config(good)
    assert cfg.decoder.kind == "gru" and cfg.decoder.options == {"tokenizer": tokenizer_dir, "hidden_dim": 32}

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config_dict(tmp_path / "store", tokenizer_dir, "decoder.options.hiden_dim=32")))
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    message = str(e.value)
    assert message.startswith("decoder.options.hiden_dim: unknown key"), message
    assert "'hidden_dim'" in message and "\n" not in message, message

    # a wrong type and a missing required option name their paths too
    with pytest.raises(ConfigError, match=r"^decoder\.options\.hidden_dim: expected int, got str 'wide'$"):
        config_from_dict(config_dict(tmp_path, tokenizer_dir, "decoder.options.hidden_dim=wide"))
    data = config_dict(tmp_path, tokenizer_dir)
    del data["decoder"]["options"]["tokenizer"]
    with pytest.raises(ConfigError, match=r"^decoder\.options.*tokenizer"):
        config_from_dict(data)


def test_a_plugin_options_own_check_names_its_dotted_path(gru_registered, tokenizer_dir, tmp_path):
    # GRUOptions.__post_init__ raises ConfigError("{path}.max_answer_len: ..."), as built-in sections do
    with pytest.raises(ConfigError) as e:
        config_from_dict(config_dict(tmp_path, tokenizer_dir, "decoder.options.max_answer_len=0"))
    assert str(e.value) == "decoder.options.max_answer_len: must be > 0, got 0"


def test_an_unknown_decoder_kind_names_the_registered_kinds(gru_registered, tokenizer_dir, tmp_path):
    with pytest.raises(ConfigError) as e:
        config_from_dict(config_dict(tmp_path, tokenizer_dir, "decoder.kind=gruu"))
    message = str(e.value)
    assert message.startswith("decoder.kind: "), message
    assert "'gruu'" in message and "did you mean 'gru'?" in message, message
    from edge_glass.decoders.registry import DECODERS

    registered = message.split("registered:", 1)[1]
    assert [k.strip() for k in registered.split(",")] == list(DECODERS) and "gru" in DECODERS, message
    assert "\n" not in message


def test_options_are_refused_for_a_builtin_kind(gru_registered, tokenizer_dir, tmp_path):
    data = config_dict(tmp_path, tokenizer_dir, "decoder.kind=trm", f"decoder.trm={{tokenizer: {tokenizer_dir}}}")
    with pytest.raises(ConfigError, match=r"^decoder\.options: given, but decoder kind 'trm' takes no options"):
        config_from_dict(data)


def test_without_the_plugin_gru_is_an_unknown_kind(tokenizer_dir, tmp_path):
    from edge_glass.decoders.registry import DECODERS

    assert "gru" not in DECODERS  # the fixture above left nothing behind
    with pytest.raises(ConfigError, match=r"^decoder\.kind: unknown decoder 'gru'"):
        config_from_dict(config_dict(tmp_path, tokenizer_dir))


# ---------------------------------------------------------------------------------------------
# End to end: the normal scripts with the plug-in imported
# ---------------------------------------------------------------------------------------------


def run_with_plugin(place: Path, script: str, *args: str) -> Result:
    """`python scripts/<script> ...` in a process that imports helpers.gru_decoder first."""
    code = (
        "import sys, runpy; "
        f"sys.path.insert(0, {str(TESTS)!r}); "
        "import helpers.gru_decoder; "
        f"sys.argv = [{script!r}, *sys.argv[1:]]; "
        f"runpy.run_path({str(REPO / 'scripts' / script)!r}, run_name='__main__')"
    )
    with Launched([sys.executable, "-c", code, *args], place) as launched:  # no process outlives the test
        return launched.wait(TIMEOUT)


@pytest.mark.slow
def test_gru_plugin_trains_and_evaluates_through_the_normal_scripts(gru_registered, tokenizer_dir, tmp_path):
    from edge_glass.training.instruct_task import load_instruct_model
    from edge_glass.training.run_loading import fp32_state_dict

    store = tmp_path / "store"
    random_store(store, config_from_dict(config_dict(store, tokenizer_dir)),
                 {"train": (4, 8), "val": (1, 8), "test": (1, 8)})
    config = tmp_path / "gru.yaml"
    config.write_text(yaml.safe_dump(config_dict(store, tokenizer_dir)))

    result = run_with_plugin(tmp_path, "train.py", "--config", str(config)).check()
    run = tmp_path / "runs" / "gru"
    assert (run / "checkpoints" / f"step{STEPS}" / "COMPLETE").is_file(), f"{result}"
    records = train_records(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.8 * losses[0], losses
    assert all("gru/token_acc" in r for r in records), records[-1]  # the plug-in's logged_parts
    (last_eval,) = eval_records(run)  # at the last step
    assert math.isfinite(last_eval["val/lm_loss"]) and 0.0 <= last_eval["val/exact_match"] <= 1.0

    # The GRU's weights are trainable and saved, next to the connector's; the frozen adapters are
    # not (zero_to_fp32 adds the module's buffers: the adapters' standardisation statistics).
    state = fp32_state_dict(run / "checkpoints" / f"step{STEPS}")
    _, model, _ = load_instruct_model(run, "latest")  # in-process: the fixture registered gru here
    assert model.kind == "gru" and isinstance(model.decoder, gru_registered.GRUDecoder)
    buffers = {name for name, _ in model.named_buffers()}
    saved = sorted(k for k in state if k not in buffers)
    assert saved == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    gru = {"decoder.embed.weight", "decoder.gru.weight_ih_l0", "decoder.gru.weight_hh_l0", "decoder.head.weight"}
    assert gru <= set(saved) and all(k.startswith(("decoder.", "connectors.vision.")) for k in saved), saved
    for k in gru:  # what was loaded is what was saved
        assert torch.equal(model.state_dict()[k], state[k]), k

    run_with_plugin(tmp_path, "evaluate.py", "--run", str(run), "--split", "test").check()
    (report_path,) = (run / "eval").glob("test-step*.json")
    report = json.loads(report_path.read_text())
    assert report["decoder"] == "gru" and report["stage"] == "instruct", report
    metrics = report["metrics"]
    assert math.isfinite(metrics["exact_match"]) and 0.0 <= metrics["exact_match"] <= 1.0
    assert math.isfinite(metrics["lm_loss"]) and metrics["lm_loss"] > 0
    assert metrics["num_examples"] == 8  # 8 test samples x 1 caption each
    # Greedy answers stop at max_answer_len (8: 'caption' is 7 single-letter tokens + EOS), which
    # the GRU learns exactly; the sample numbers it cannot know, so: no exact match, F1 1/2.
    assert metrics["exact_match"] == 0.0 and metrics["token_f1"] == pytest.approx(0.5), metrics
    samples_path = report_path.with_name(f"{report_path.stem}-samples.jsonl")
    samples = [json.loads(line) for line in samples_path.read_text().splitlines()]
    assert len(samples) == 4 and all(s["prediction"] == "caption" for s in samples), samples


@pytest.mark.slow
def test_the_scripts_refuse_a_plugin_config_in_one_line(tokenizer_dir, tmp_path):
    config = tmp_path / "gru.yaml"
    config.write_text(yaml.safe_dump(config_dict(tmp_path / "store", tokenizer_dir)))
    # the plug-in imported: its misspelt option is named with its dotted path
    result = run_with_plugin(tmp_path, "train.py", "--config", str(config), "--set", "decoder.options.hiden_dim=32")
    line = assert_one_line_error(result, "did you mean 'hidden_dim'?")
    assert line.startswith("error: decoder.options.hiden_dim: unknown key"), line
    # not imported: gru is no decoder the plain script knows
    from edge_glass.decoders.registry import DECODERS

    result = train(tmp_path, config)
    line = assert_one_line_error(result, "unknown decoder 'gru'", f"registered: {', '.join(DECODERS)}")
    assert line.startswith("error: decoder.kind: ") and "gru" not in line.split("registered:")[1], line
    assert not (tmp_path / "runs").exists()
