"""`python -m edge_glass.training.convert RUN --universal`: make a run resumable on another
number of processes, through DeepSpeed's universal checkpoint format.

A ZeRO-1/2 checkpoint partitions the optimizer state by data-parallel rank, so it only loads on
the world size that wrote it. DeepSpeed's `ds_to_universal` rewrites it per parameter; the
trainer then loads it with `"checkpoint": {"load_universal": true}`. The converted copy goes to
`<run>/checkpoints/universal/step<N>` with the original's metadata and completion marker, and
`--resume auto` picks it up when the world size differs from the one that wrote step<N>.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from edge_glass.training import checkpoint as ckpt
from edge_glass.training.safe_load import safe_torch_load
from edge_glass.utils.cli import run_main
from edge_glass.utils.errors import UserError


def to_universal(run_dir: Path, checkpoint: Path | None = None) -> Path:
    """Convert `checkpoint` (default: the run's newest complete one); returns the universal copy."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    root = Path(run_dir) / "checkpoints"
    source = checkpoint or ckpt.latest_checkpoint(root)
    if source is None:
        raise UserError(f"{run_dir} has no complete checkpoint to convert")
    meta = ckpt.read_meta(source)
    if meta["zero_stage"] == 3:
        raise UserError(f"{source} is a ZeRO-3 checkpoint; universal conversion here supports ZeRO-1/2 runs")
    target = root / "universal" / source.name
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-") as tmp:
        out = Path(tmp) / source.name
        args = argparse.Namespace(
            input_folder=str(source), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=True,
        )
        with safe_torch_load():
            ds_to_universal(args)
        for name in [p.name for p in source.glob("rng_state_*.pt")] + [ckpt.META]:
            shutil.copy2(source / name, out / name)
        (out / ckpt.COMPLETE).write_text("")
        out.rename(target)  # complete before it becomes visible
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_glass.training.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run directory (runs/<name>)")
    parser.add_argument("--universal", action="store_true", required=True, help="write a DeepSpeed universal checkpoint")
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the newest complete one)")
    args = parser.parse_args(argv)
    target = to_universal(Path(args.run), Path(args.checkpoint) if args.checkpoint else None)
    print(f"universal checkpoint: {target}\nresume on any number of processes with --resume auto")
    return 0


if __name__ == "__main__":
    run_main(main)
