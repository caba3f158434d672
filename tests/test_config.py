"""The experiment schema: strict validation, one-line errors, overrides and round-trips.

Run with: python -m pytest tests/test_config.py -q
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_script
from edge_glass import config as C
from edge_glass.config import ConfigError, config_fingerprint, dump_config, load_config, save_config

QUICKSTART = REPO / "configs" / "cpu" / "quickstart.yaml"


def _write(tmp_path: Path, data: dict | str, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def _minimal() -> dict:
    return {
        "experiment": {"name": "t"},
        "data": {"raw_dir": "r", "features_dir": "f"},
        "train": {"max_steps": 10},
        "encoders": {"vision": {"model": "v"}, "text": {"model": "t"}},
        "model": {"adapters": {"vision": {"kind": "mlp"}, "text": {"kind": "mlp"}}},
        "loss": {"pairs": {"vision_text": 1.0}},
    }


def _error(tmp_path: Path, data: dict | str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, data), overrides)
    msg = str(e.value)
    assert "\n" not in msg, f"error message must be one line: {msg!r}"
    return msg


def test_every_shipped_config_validates():
    paths = sorted((REPO / "configs").rglob("*.yaml"))
    assert QUICKSTART in paths
    for p in paths:
        load_config(p)


def test_minimal_config_fills_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, _minimal()))
    assert cfg.train.stage == "align" and cfg.train.max_steps == 10 and cfg.train.epochs is None
    assert cfg.optim.lr == 1e-3 and cfg.data.splits.val == "val"
    assert cfg.encoders.enabled() == ["vision", "text"] and cfg.model.nested_dims() == [cfg.model.shared_dim]
    assert cfg.loss.pairs.active() == {"vision_text": 1.0} and cfg.model.adapters.audio is None


@pytest.mark.parametrize(
    "path, key, expected",
    [
        ((), "experimnt", "experimnt: unknown key; did you mean 'experiment'?"),
        (("optim",), "lrate", "optim.lrate: unknown key; did you mean 'lr'?"),
        (("data", "splits"), "vall", "data.splits.vall: unknown key; did you mean 'val'?"),
        (("train",), "zzz_qqq", "train.zzz_qqq: unknown key; valid keys: stage, epochs"),
    ],
)
def test_unknown_key_names_dotted_path_and_nearest(tmp_path, path, key, expected):
    data = _minimal()
    node = data
    for part in path:
        node = node.setdefault(part, {})
    node[key] = 1
    assert _error(tmp_path, data).startswith(expected)


def test_unknown_key_in_deep_optional_section(tmp_path):
    data = _minimal()
    data["encoders"]["vision"] = {"model": "m", "layr": -2}
    assert _error(tmp_path, data) == "encoders.vision.layr: unknown key; did you mean 'layer'?"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.max_steps=ten", "train.max_steps: expected int, got str 'ten'"),
        ("train.max_steps=2.5", "train.max_steps: expected int, got float 2.5"),
        ("optim.lr=fast", "optim.lr: expected float, got str 'fast'"),
        ("optim.lr=true", "optim.lr: expected float, got bool True"),
        ("data.splits=3", "data.splits: expected a mapping, got int 3"),
        ("model.mrl_dims=64", "model.mrl_dims: expected list of int, got int 64"),
        ("model.mrl_dims=[8, x]", "model.mrl_dims[1]: expected int, got str 'x'"),
        ("train.stage=allign", "train.stage: expected one of 'align', 'instruct', got 'allign'; did you mean 'align'?"),
        ("experiment.name=null", "experiment.name: expected str, got null"),
        ("loss.mrl=1", "loss.mrl: expected bool, got int 1"),
    ],
)
def test_wrong_type_names_path_expected_and_given(tmp_path, override, expected):
    assert _error(tmp_path, _minimal(), (override,)) == expected


@pytest.mark.parametrize(
    "drop, expected",
    [
        (("experiment", "name"), "experiment.name: missing required field (str)"),
        (("data", "raw_dir"), "data.raw_dir: missing required field (str)"),
        (("train",), "train: missing required field (a mapping)"),
    ],
)
def test_missing_required_field_is_named(tmp_path, drop, expected):
    data = _minimal()
    node = data
    for part in drop[:-1]:
        node = node[part]
    del node[drop[-1]]
    assert _error(tmp_path, data) == expected


def test_required_field_of_optional_section(tmp_path):
    data = _minimal()
    data["encoders"]["audio"] = {"layer": -1}
    assert _error(tmp_path, data) == "encoders.audio.model: missing required field (str)"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (("train.epochs=2",), "train: set exactly one of epochs and max_steps"),
        (("optim.betas=[0.9]",), "optim.betas: need two values in [0, 1)"),
        (("optim.min_lr=1.0",), "optim.min_lr: 1.0 is above lr 0.001"),
        (("model.mrl_dims=[64, 32]",), "model.mrl_dims: must be positive and strictly ascending"),
        (("model.mrl_dims=[32, 1024]",), "model.mrl_dims: 1024 exceeds shared_dim 512"),
        (("model.mrl_weights=[1.0]", "model.mrl_dims=[32]"), "model.mrl_weights: needs one weight per dim in [32, 512]"),
        (("data.micro_batch_size=0",), "data.micro_batch_size: must be > 0, got 0"),
        (("decoder.kind=qwen",), "decoder.qwen: required when decoder.kind is 'qwen'"),
        (("decoder.trm.tokenizer=t",), "decoder.trm: given, but decoder.kind is 'none'"),
        (("train.stage=instruct",), "decoder.kind: train.stage is 'instruct', which needs a decoder"),
        (("encoders.vision=null",), "model.adapters.vision: needs encoders.vision"),
        (("loss.pairs.vision_text=0",), "loss.pairs: train.stage is 'align', which needs at least one pair"),
        (("loss.pairs.audio_text=1.0",), "loss.pairs.audio_text: weight 1.0 needs model.adapters.audio"),
    ],
)
def test_cross_field_rules_name_the_field(tmp_path, overrides, expected):
    assert _error(tmp_path, _minimal(), overrides).startswith(expected)


def test_kind_specific_adapter_fields(tmp_path):
    base = ()
    msg = _error(tmp_path, _minimal(), base + ("model.adapters.vision.kind=mlp", "model.adapters.vision.num_latents=16"))
    assert msg == "model.adapters.vision.num_latents: only used by kind perceiver, but kind is 'mlp'"
    cfg = load_config(_write(tmp_path, _minimal()), base + ("model.adapters.vision.kind=perceiver",))
    assert (cfg.model.adapters.vision.num_latents, cfg.model.adapters.vision.depth, cfg.model.adapters.vision.num_heads) == (64, 2, 8)
    cfg = load_config(_write(tmp_path, _minimal()), base + ("model.adapters.vision.kind=attn_pool",))
    assert cfg.model.adapters.vision.num_latents is None and cfg.model.adapters.vision.num_heads == 8


def test_overrides_apply_and_parse_yaml_values(tmp_path):
    cfg = load_config(
        _write(tmp_path, _minimal()),
        ["optim.lr=3e-4", "model.mrl_dims=[16, 64]", "encoders.text.model=some/model", "train.max_steps=7", "train.max_steps=9"],
    )
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model.mrl_dims == [16, 64]
    assert cfg.encoders.text.model == "some/model"
    assert cfg.train.max_steps == 9, "the last override of a key wins"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr", "--set 'optim.lr': expected KEY=VALUE"),
        ("=3", "--set '=3': expected KEY=VALUE"),
        ("optim..lr=3", "--set 'optim..lr=3': expected KEY=VALUE"),
        ("train.max_steps.x=3", "--set train.max_steps.x: train.max_steps is not a section"),
        ("optim.lr=[1", "--set optim.lr:"),
    ],
)
def test_malformed_overrides(tmp_path, override, expected):
    assert _error(tmp_path, _minimal(), (override,)).startswith(expected)


def test_yaml_float_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads `1e-4` as a string; the schema still gives the float the user meant.
    text = yaml.safe_dump(_minimal()) + "optim: {lr: 1e-4}\n"
    assert load_config(_write(tmp_path, text)).optim.lr == pytest.approx(1e-4)


def test_round_trip_is_identical(tmp_path):
    cfg = load_config(QUICKSTART, ["model.adapters.audio.kind=perceiver", "model.adapters.audio.num_heads=2"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert dump_config(again) == dump_config(cfg)
    assert config_fingerprint(again) == config_fingerprint(cfg)
    assert not list((tmp_path / "run").glob(".tmp-*")), "atomic save leaves no temporary file"


def test_fingerprint_changes_with_any_field():
    a = load_config(QUICKSTART)
    b = load_config(QUICKSTART, ["optim.weight_decay=0.02"])
    assert config_fingerprint(a) != config_fingerprint(b)


def test_every_field_has_a_docstring():
    # The schema is the reference documentation: a field without a docstring is a bug.
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(C))
    missing = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config") and node.name != "ConfigError":
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign) and not stmt.target.id.startswith("_"):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    if not (isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)):
                        missing.append(f"{node.name}.{stmt.target.id}")
    # Fields generated from the modality table carry their docstrings in __field_docs__.
    from edge_glass.modalities import NAMES, pair_names

    for cls, names in ((C.EncodersConfig, NAMES), (C.AdaptersConfig, NAMES), (C.PairWeightsConfig, pair_names())):
        fields = {f.name for f in dataclasses.fields(cls)}
        missing += [f"{cls.__name__}.{n}" for n in names if n not in fields or not cls.__field_docs__.get(n, "").strip()]
    assert not missing, f"fields without a docstring: {missing}"


def test_schema_annotations_are_all_supported():
    # Walk every dataclass reachable from Config and check each annotation converts a value,
    # so a new field with an unsupported type fails here rather than on a user's machine.
    seen: set[type] = set()

    def walk(cls: type) -> None:
        if cls in seen:
            return
        seen.add(cls)
        for name, tp in typing.get_type_hints(cls).items():
            if typing.get_origin(tp) is typing.ClassVar:
                continue
            for arg in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(arg):
                    walk(arg)
            C._type_name(tp)

    walk(C.Config)
    assert len(seen) >= 15


def test_check_files_names_missing_deepspeed_json_and_model_dir(tmp_path):
    cfg = load_config(QUICKSTART, [f"train.deepspeed={tmp_path}/none.json"])
    with pytest.raises(ConfigError, match=r"train.deepspeed: file not found: .*none.json"):
        C.check_files(cfg)
    cfg = load_config(QUICKSTART, [f"encoders.vision.model={tmp_path}/no/such/model", f"train.deepspeed={REPO}/ds_configs/zero2.json"])
    with pytest.raises(ConfigError, match=r"encoders.vision.model: model directory not found: .*make_local_models.py"):
        C.check_files(cfg)
    assert C.looks_like_local_path("models/local/x") and not C.looks_like_local_path("openai/clip-vit-large-patch14")


# ------------------------------------------------------------------ the script, as a user runs it


def test_script_prints_resolved_config(tmp_path):
    p = _write(tmp_path, _minimal())
    r = run_script("check_config.py", "--config", str(p), "--set", "optim.lr=2e-3", "--no-files")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["optim"]["lr"] == pytest.approx(2e-3)


@pytest.mark.parametrize(
    "content, args, expected",
    [
        (None, ("--config", "does/not/exist.yaml"), "error: config file not found: does/not/exist.yaml"),
        ("experiment:\n  name: [unclosed\n", (), "YAML syntax error"),
        ({**_minimal(), "train": {"max_steps": 1, "stag": "align"}}, (), "error: train.stag: unknown key; did you mean 'stage'?"),
        (_minimal(), ("--set", "optim.lr=x"), "error: optim.lr: expected float, got str 'x'"),
    ],
)
def test_script_errors_are_one_line_without_traceback(tmp_path, content, args, expected):
    if content is not None:
        args = ("--config", str(_write(tmp_path, content)), *args)
    r = run_script("check_config.py", *args, "--no-files")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
