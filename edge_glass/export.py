"""Export a run (align or instruct) as files that need neither DeepSpeed nor the feature store.

    <out>/export.json          what this is: stage, decoder, source checkpoint
    <out>/config.yaml          the run's config
    <out>/manifest.json        the store manifest the modules were built from (shapes, encoder
                               descriptions for the fingerprint check), without its shard list
    <out>/model.safetensors  every trained module in fp32: adapters with their
                               standardisation buffers, connectors, a trained decoder's weights
                               (the TRM; Qwen's LoRA or fully tuned weights)
    <out>/decoder/             Qwen: the LoRA adapter as a PEFT folder (`PeftModel.from_pretrained`),
                               or the fully tuned model (`from_pretrained`), with its tokenizer
    <out>/decoder_merged/      with merge=True: the LoRA merged into the base, `save_pretrained`

`load_export` rebuilds the model from these files exactly as training built it (a Qwen base is
loaded from the id in the config, then the exported weights), so an exported run answers as the
run does; `edge_glass.inference.Predictor` opens an export as well as a run directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from edge_glass.config import Config, load_config
from edge_glass.features.store import open_store
from edge_glass.training.task import load_run
from edge_glass.utils.errors import UserError
from edge_glass.utils.io import atomic_path, write_text_atomic

FORMAT = "edge_glass.export"
VERSION = 1


def is_export(path: str | Path) -> bool:
    return (Path(path) / "export.json").is_file()


def export_run(run: str | Path, which: str = "best", out: str | Path | None = None, merge: bool = False) -> Path:
    """Write the export of `run`'s `which` checkpoint to `out` (default `<run>/export`)."""
    from safetensors.torch import save_file

    run = Path(run)
    cfg, model, checkpoint = load_run(run, which)
    out = Path(out) if out else run / "export"
    out.mkdir(parents=True, exist_ok=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # The decoder's frozen base comes from its hub id or directory; everything else is saved.
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
             if not k.startswith("decoder.") or k in trainable}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "checkpoint": str(checkpoint)})
    manifest = {k: v for k, v in _model_manifest(cfg, checkpoint).items() if k != "shards"}
    write_text_atomic(out / "manifest.json", json.dumps(manifest))
    shutil.copy2(run / "config.yaml", out / "config.yaml")
    decoder = getattr(model, "decoder", None)
    if decoder is not None and hasattr(decoder, "model") and cfg.decoder.qwen is not None:
        _save_qwen(decoder, cfg, out, merge)
    write_text_atomic(out / "export.json", json.dumps({
        "format": FORMAT, "version": VERSION, "stage": cfg.train.stage, "checkpoint": str(checkpoint),
        "decoder": getattr(model, "kind", None), "tensors": len(state),
    }, indent=1))
    return out


def load_export(path: str | Path) -> tuple[Config, torch.nn.Module, Path]:
    """(config, model in eval mode with the exported weights, the export folder)."""
    from safetensors.torch import load_file

    path = Path(path)
    info = json.loads((path / "export.json").read_text())
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise UserError(f"{path}: not an Edge Glass export of version {VERSION} (export.json says {info.get('format')!r} "
                        f"{info.get('version')!r})")
    cfg = load_config(path / "config.yaml")
    manifest = json.loads((path / "manifest.json").read_text())
    model = build_model(cfg, manifest)
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in missing if not k.startswith("decoder.") or k in trainable]
    if missing or unexpected:
        raise UserError(f"{path}: model.safetensors does not fit the config's model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return cfg, model.eval(), path


def export_manifest(path: str | Path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


def build_model(cfg: Config, manifest: dict) -> torch.nn.Module:
    """The run's model, with untrained weights, shaped from `manifest`."""
    from edge_glass.models.alignment import AlignmentModel, FeatureInfo

    features = {m: FeatureInfo.from_manifest(manifest, m) for m in cfg.model.adapters.enabled()}
    if cfg.train.stage == "align":
        return AlignmentModel(cfg.model, cfg.loss, features)
    from edge_glass.training.instruct_model import InstructModel

    return InstructModel(cfg, features)


def _model_manifest(cfg: Config, checkpoint: Path) -> dict:
    """The manifest the run's modules were shaped from: an instruct run's adapters come from its
    align run's store (training/instruct_task.py), everything else from its own train split."""
    from edge_glass.training import checkpoint as ckpt
    from edge_glass.training.instruct_task import align_manifest

    init = ckpt.read_meta(checkpoint).get("init_checkpoint")
    if cfg.train.stage == "instruct" and init:
        return align_manifest(Path(init))
    return open_store(cfg.data.features_dir, cfg.data.splits.train, cfg.data.store_format).manifest


def _save_qwen(decoder, cfg: Config, out: Path, merge: bool) -> None:
    """Qwen's trained part for the HF ecosystem: a PEFT folder (LoRA) or the tuned model."""
    if cfg.decoder.qwen.tune == "frozen":
        return
    for name in ("decoder", "decoder_merged"):
        shutil.rmtree(out / name, ignore_errors=True)
    decoder.model.save_pretrained(out / "decoder")
    decoder.tokenizer.save_pretrained(out / "decoder")
    if merge and cfg.decoder.qwen.tune == "lora":
        import copy

        merged = copy.deepcopy(decoder.model).merge_and_unload()
        merged.save_pretrained(out / "decoder_merged")
        decoder.tokenizer.save_pretrained(out / "decoder_merged")
