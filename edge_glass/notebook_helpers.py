"""What the notebooks call: find the working directory, load a run by its config, plot and tabulate.

The notebooks in `notebooks/` hold no logic of their own: every cell is a call into the package,
and what the training and evaluation modules do not already offer for a notebook lives here. A notebook runs in a *working directory* that holds `configs/`, `data/` and
`runs/`, as the scripts do:

    from edge_glass import notebook_helpers as nb
    from edge_glass.training.trainer import read_metrics
    nb.use_workdir()                                    # the nearest folder up with configs/
    cfg, model, checkpoint = nb.load_align_run("configs/cpu/vision_text_align.yaml")
    batches = nb.align_batches(cfg, nb.eval_split(cfg), model=model)
    fig = nb.plot_training_curves(read_metrics(nb.run_dir(cfg)))

Every `plot_*` function draws with pyplot and returns the figure (a notebook shows it with
`plt.show()`, a script saves it with `fig.savefig(...)`). Models load on the GPU when there is
one (`default_device`), and batches follow the model's device.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from edge_glass.config import Config, load_config
from edge_glass.utils.errors import UserError

WORKDIR_ENV = "EDGE_GLASS_WORKDIR"
"""Environment variable naming the working directory (configs/, data/, runs/) of the notebooks."""

CURVE_KEYS = ("loss", "lr", "samples_per_s")
"""Training-record fields `plot_training_curves` draws by default (one panel each)."""

EVAL_KEYS = ("val/mean_R@1", "val/exact_match")
"""Evaluation-record fields drawn as a last panel when the run logged one (align, instruct)."""


# ---------------------------------------------------------------------------------------------
# Where things are


def use_workdir(path: str | os.PathLike | None = None) -> Path:
    """Change into the notebooks' working directory and return it.

    `path`, else `$EDGE_GLASS_WORKDIR`, else the current directory or the nearest parent that
    holds `configs/` (a notebook opened from `notebooks/` of a checkout runs in the checkout).
    """
    path = path or os.environ.get(WORKDIR_ENV)
    if path:
        target = Path(path).expanduser()
        if not target.is_dir():
            raise UserError(f"working directory {target} does not exist")
    else:
        here = Path.cwd()
        target = next((p for p in (here, *here.parents) if (p / "configs").is_dir()), None)
        if target is None:
            raise UserError(
                f"no configs/ in {here} or above; run the notebook from a folder holding configs/, data/ "
                f"and runs/, or set {WORKDIR_ENV}"
            )
    os.chdir(target)
    return target.resolve()


def as_config(config: str | os.PathLike | Config) -> Config:
    """A loaded config, from a YAML path or an already loaded `Config`."""
    return config if isinstance(config, Config) else load_config(config)


def run_dir(config: str | os.PathLike | Config) -> Path:
    """The run directory a config trains into: `<output_dir>/<experiment.name>`."""
    cfg = as_config(config)
    return Path(cfg.experiment.output_dir) / cfg.experiment.name


def eval_split(cfg: Config, split: str | None = None) -> str:
    """`split`, else the config's test split, else its val split (as scripts/evaluate.py chooses)."""
    return split or cfg.data.splits.test or cfg.data.splits.val


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide the chatter of checkpoint loading (DeepSpeed's prints, progress bars); show it again
    if loading fails, since it may say why."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    except BaseException:
        sys.stdout.write(out.getvalue())
        sys.stderr.write(err.getvalue())
        raise


def _train_hint(config, cfg: Config, script: str = "scripts/train.py") -> str:
    source = config if not isinstance(config, Config) else f"<config of {cfg.experiment.name}>"
    return f"python {script} --config {source}"


def _existing_run(config, cfg: Config) -> Path:
    run = run_dir(cfg)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run directory (no config.yaml); train it with: {_train_hint(config, cfg)}")
    return run


class MissingInputs(UserError):
    """What a notebook needs and did not find, with the commands that make it. A notebook shows
    it as those lines alone, not a traceback (IPython renders `_render_traceback_`)."""

    def _render_traceback_(self) -> list[str]:
        return str(self).splitlines()


def config_commands(config: str | os.PathLike) -> list[str]:
    """The commands a config's header comment lists (`#   python ...`, continuation lines
    joined, and "Needs ...: python ..."), in order: how its inputs and its run are made."""
    lines = Path(config).read_text().splitlines()
    header = list(itertools.takewhile(lambda ln: ln.startswith("#") or not ln.strip(), lines))
    out: list[str] = []
    continued = False
    for line in header:
        body = line.lstrip("#").strip()
        if continued:
            out[-1] = out[-1].rstrip("\\").rstrip() + " " + body
        elif body.startswith(("python ", "deepspeed ")):
            out.append(re.sub(r"\s{2,}\(.*\)$", "", body))  # a trailing "(why)" is the header's, not the command's
        elif ": python " in body:
            out.append("python " + body.split(": python ", 1)[1])
        else:
            continue
        continued = body.endswith("\\")
    return out


def require(*configs: str | os.PathLike, run: bool = True) -> None:
    """Stop the notebook with the commands to run when a config's raw data, feature store or
    trained run (a sweep's runs, for a config with a `sweep` section) is not there yet.
    `run=False` asks only for the data and the store."""
    from edge_glass.features.manifest import MANIFEST

    missing, commands = [], []
    for config in configs:
        cfg = as_config(config)
        lacks = []
        splits = [s for s in (cfg.data.splits.train, cfg.data.splits.val, cfg.data.splits.test) if s]
        if not all((Path(cfg.data.raw_dir) / s).is_dir() for s in splits):
            lacks.append(f"raw data {cfg.data.raw_dir}")
        if not (Path(cfg.data.features_dir) / cfg.data.splits.train / MANIFEST).is_file():
            lacks.append(f"feature store {cfg.data.features_dir}")
        if run:
            runs = [run_dir(v) for _, v in _variants(cfg)]
            if not all((r / "metrics.jsonl").is_file() for r in runs):
                lacks.append(f"run {runs[0] if len(runs) == 1 else ', '.join(map(str, runs))}")
        if lacks:
            missing.append(f"{config}: {'; '.join(lacks)}")
            commands += [c for c in config_commands(config) if c not in commands]
    if missing:
        raise MissingInputs("\n".join(["This notebook needs what these configs make and does not find it:",
                                         *(f"  {m}" for m in missing), "Make it with (from the working directory):",
                                         *(f"  {c}" for c in commands)]))


def _variants(cfg: Config):
    from edge_glass.training.sweep import variant_configs

    return list(variant_configs(cfg)) if cfg.sweep is not None else [(cfg.experiment.name, cfg)]


# ---------------------------------------------------------------------------------------------
# Loading runs and their evaluation batches


def load_run(config: str | os.PathLike | Config, which: str = "best", device: str | torch.device | None = None):
    """(config, model in eval mode on `device`, checkpoint) of the run `config` trains, whatever
    its stage (the stage registry, training/task.py, knows how to load it)."""
    from edge_glass.training.task import load_run as load

    run = _existing_run(config, as_config(config))
    with _quiet():
        cfg, model, checkpoint = load(run, which)
    return cfg, model.to(device or default_device()), checkpoint


# The notebooks' names: the same loader, whichever stage the run has.
load_align_run = load_instruct_run = load_run


def align_batches(cfg: Config, split: str, *, model: torch.nn.Module | None = None,
                  max_samples: int | None = None) -> list[dict]:
    """The split's feature batches in store order (every sample once), on `model`'s device.

    `max_samples` keeps the first eval batches that hold that many samples (whole batches of
    `data.eval_batch_size`, so possibly a few more); retrieval over fewer samples is easier.
    """
    from edge_glass.features.store import open_checked_split
    from edge_glass.training.align_task import eval_loader, to_device

    loader = eval_loader(cfg, open_checked_split(cfg, split))
    batches: Iterable[dict] = loader
    if max_samples is not None:
        batches = itertools.islice(loader, -(-max_samples // cfg.data.eval_batch_size))
    device = _model_device(model) if model is not None else torch.device("cpu")
    return [to_device(b, device) for b in batches]


def batch_captions(batches: Sequence[dict], rows: Sequence[int] | None = None) -> list[str]:
    """The captions of the batches' samples in order (the rows of `embed_split`'s embeddings),
    or of the samples at `rows`."""
    captions = [c for b in batches for c in b["captions"]]
    return captions if rows is None else [captions[i] for i in rows]


def batch_keys(batches: Sequence[dict], rows: Sequence[int] | None = None) -> list[str]:
    """The sample keys of the batches in order, or of the samples at `rows`."""
    keys = [k for b in batches for k in b["keys"]]
    return keys if rows is None else [keys[i] for i in rows]


def instruct_batches(cfg: Config, model, split: str) -> Iterator[dict]:
    """The split's instruction evaluation batches (scripts/evaluate.py's), on `model`'s device."""
    from edge_glass.features.store import open_checked_split
    from edge_glass.training.task import stage_of

    yield from stage_of(cfg).eval_batches(cfg, model, open_checked_split(cfg, split))


def evaluate_instruct(cfg: Config, model, split: str, *, max_samples: int | None = None,
                      num_samples_to_log: int = 12) -> tuple[dict[str, float], list[dict]]:
    """(metrics, logged generations) of `instruct_metrics` on the split, at most `max_samples`
    samples (default: the config's `eval.max_samples`)."""
    from edge_glass.training.instruct_eval import instruct_metrics

    return instruct_metrics(
        model, instruct_batches(cfg, model, split), max_new_tokens=cfg.eval.max_new_tokens,
        max_samples=cfg.eval.max_samples if max_samples is None else max_samples, num_samples_to_log=num_samples_to_log,
    )


def raw_samples(cfg: Config, split: str, n: int | None = None, keys: Sequence[str] | None = None) -> list[dict]:
    """Decoded raw samples (image, audio, caption, json) of the split: the first `n`, or those of `keys`
    in that order."""
    from edge_glass.data.raw_shards import iter_raw_samples

    split_dir = Path(cfg.data.raw_dir) / split
    if not split_dir.is_dir():
        raise UserError(f"{split_dir} not found; write the raw shards with scripts/download_datasets.py (see the config's header)")
    samples = iter_raw_samples(split_dir)
    if keys is None:
        return list(itertools.islice(samples, n))
    wanted, found = set(keys), {}
    for s in samples:
        if s["key"] in wanted:
            found[s["key"]] = s
            if len(found) == len(wanted):
                break
    missing = [k for k in keys if k not in found]
    if missing:
        raise UserError(f"{split_dir} has no sample {missing[0]!r}; the feature store and the raw shards differ")
    return [found[k] for k in keys]


def sweep_metrics(config: str | os.PathLike | Config) -> dict[str, list[dict]]:
    """Each sweep variant's metrics.jsonl records, by variant name, in the sweep's order."""
    from edge_glass.training.sweep import variant_configs
    from edge_glass.training.trainer import read_metrics

    cfg = as_config(config)
    out = {}
    for name, variant in variant_configs(cfg):
        run = run_dir(variant)
        if not (run / "metrics.jsonl").is_file():
            raise UserError(f"{run} has no metrics.jsonl; train the sweep with: {_train_hint(config, cfg, 'scripts/sweep.py')}")
        out[name] = read_metrics(run)
    return out


# ---------------------------------------------------------------------------------------------
# The feature store itself


def open_split(cfg: Config, split: str):
    """The split of the config's store (checked against the config's encoders)."""
    from edge_glass.features.store import open_checked_split

    return open_checked_split(cfg, split)


def store_summary(data, max_samples: int = 2000) -> list[dict]:
    """Per modality of an open split: its encoder, widths, stored dtype and tokens per sample
    (min / mean / max over the first `max_samples` samples, which are read)."""
    block = data.read(0, min(len(data), max_samples), with_meta=False, dequantize=False)
    rows = []
    for m in data.modalities:
        enc = data.manifest["encoders"].get(m, {})
        lengths = block.modalities[m].lengths
        rows.append({
            "modality": m, "encoder": enc.get("model", "?"), "layer": enc.get("layer", ""),
            "token width": data.field_dim(f"{m}.tokens"), "pooled width": data.field_dim(f"{m}.pooled"),
            "tokens": data.token_dtype, "min len": int(lengths.min()), "mean len": round(float(lengths.mean()), 1),
            "max len": int(lengths.max()),
        })
    return rows


def print_store_summary(data, max_samples: int = 2000) -> None:
    """`store_summary` as a table, titled with the split's size, shards and fingerprints."""
    from rich.table import Table

    rows = store_summary(data, max_samples)
    table = Table(title=f"{data.path}: {len(data):,} samples in {len(data.shard_files)} {data.backend} shard(s) · "
                        f"encoders {data.encoder_fingerprint[:12]} · format v{data.manifest.get('format_version')}")
    for column in rows[0]:
        table.add_column(column, justify="right" if isinstance(rows[0][column], (int, float)) else "left")
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    _console().print(table)


def plot_token_lengths(data, max_samples: int = 2000):
    """A histogram of tokens per sample for each modality (the first `max_samples` samples)."""
    plt = _pyplot()
    block = data.read(0, min(len(data), max_samples), with_meta=False, dequantize=False)
    mods = data.modalities
    fig, axes = plt.subplots(1, len(mods), figsize=(4 * len(mods), 3), squeeze=False)
    for ax, m in zip(axes[0], mods):
        lengths = block.modalities[m].lengths
        ax.hist(lengths, bins=min(30, max(1, int(lengths.max() - lengths.min()) + 1)))
        ax.set_title(f"{m}: tokens per sample")
        ax.set_xlabel("tokens")
    fig.tight_layout()
    return fig


def plot_feature_stats(data, field: str = "tokens"):
    """The manifest's per-dimension mean and std of each modality's `field` (tokens or pooled),
    sorted by std: what standardisation divides by, and how many dimensions carry anything."""
    import numpy as np

    plt = _pyplot()
    mods = data.modalities
    fig, axes = plt.subplots(1, len(mods), figsize=(4 * len(mods), 3), squeeze=False)
    for ax, m in zip(axes[0], mods):
        mean, std = data.stats(f"{m}.{field}")
        order = np.argsort(std)[::-1]
        ax.plot(std[order], label="std")
        ax.plot(mean[order], label="mean", alpha=0.7)
        ax.set_title(f"{m}.{field}: {len(std)} dims")
        ax.set_xlabel("dimension (by std)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def print_neighbours(queries: torch.Tensor, keys: torch.Tensor, captions: Sequence[str], rows: Sequence[int],
                     k: int = 3, title: str = "nearest captions") -> None:
    """For each query row: its own caption and the captions of its `k` nearest keys (cosine)."""
    import torch.nn.functional as F
    from rich.table import Table

    sims = F.normalize(queries[list(rows)].float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T
    top = sims.topk(min(k, keys.shape[0]), dim=1)
    table = Table(title=title)
    table.add_column("sample")
    table.add_column("its caption")
    for j in range(top.indices.shape[1]):
        table.add_column(f"#{j + 1} (cosine)")
    for i, row in enumerate(rows):
        cells = [f"{captions[idx]} ({val:.2f})" + (" *" if idx == row else "")
                 for val, idx in zip(top.values[i].tolist(), top.indices[i].tolist())]
        table.add_row(str(row), captions[row], *cells)
    _console().print(table)


# ---------------------------------------------------------------------------------------------
# Tables (rich, as the scripts print them; rendered as HTML in Jupyter)


def _console():
    from rich.console import Console

    console = Console()
    console.width = max(console.width, 90)
    return console


def print_generations(samples: Sequence[dict], title: str = "generations") -> None:
    """Logged generations of `instruct_metrics` (question, gold answer, prediction, EM, F1)."""
    from rich.table import Table

    table = Table(title=title)
    for name in ("sample", "kind", "question", "answer", "prediction", "EM", "F1"):
        table.add_column(name, justify="right" if name in ("EM", "F1") else "left")
    for s in samples:
        kind = s["kind"] + (f"/{s['attribute']}" if s.get("attribute") else "")
        style = None if s["exact_match"] else "red"
        table.add_row(s["key"], kind, s["question"], s["answer"], s["prediction"],
                      f"{s['exact_match']:.0f}", f"{100 * s['token_f1']:.0f}", style=style)
    _console().print(table)


def print_sweep_report(report: dict, metric: str = "R@1") -> None:
    """A sweep report (`load_sweep_report`): the variants and their overrides, then `metric` (%)
    per variant and MRL dim, one table per retrieval direction."""
    from rich.table import Table

    rows = report["rows"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    overrides = Table(title=f"{report['experiment']} · variants")
    overrides.add_column("variant")
    overrides.add_column("overrides of the base config")
    overrides.add_column("checkpoint")
    checkpoints = {r["variant"]: r.get("checkpoint", "") for r in rows}
    for v in variants:
        overrides.add_row(v, "; ".join(report.get("variants", {}).get(v, [])) or "(none)", checkpoints[v])
    console = _console()
    console.print(overrides)
    dims = sorted({r["dim"] for r in rows})
    for direction in sorted({r["direction"] for r in rows}):
        table = Table(title=f"{metric} (%) · {direction.replace('->', ' -> ')} · {report['split']}")
        table.add_column("variant")
        for d in dims:
            table.add_column(f"dim {d}", justify="right")
        for v in variants:
            values = {r["dim"]: r[metric] for r in rows if r["variant"] == v and r["direction"] == direction}
            table.add_row(v, *(f"{100 * values[d]:.1f}" if d in values else "–" for d in dims))
        console.print(table)


def print_sweep_tables(report: dict) -> None:
    """Every metric of every variant: `report.print_table` once per variant."""
    from edge_glass.training.report import print_table

    for v in dict.fromkeys(r["variant"] for r in report["rows"]):
        rs = [{k: x for k, x in r.items() if k not in ("variant", "checkpoint")} for r in report["rows"] if r["variant"] == v]
        print_table(rs, f"{report['experiment']} · {v} · {report['split']}")


def print_sweep_costs(config: str | os.PathLike | Config) -> None:
    """What each sweep variant costs: trainable parameters per module (the run's parameters.json),
    median training throughput and the last logged training loss."""
    import json
    import statistics

    from rich.table import Table

    from edge_glass.training.sweep import variant_configs

    cfg = as_config(config)
    metrics = sweep_metrics(cfg)
    params = {}
    for name, variant in variant_configs(cfg):
        path = run_dir(variant) / "parameters.json"
        params[name] = {r["module"]: r["trainable"] for r in json.loads(path.read_text())} if path.is_file() else {}
    # The adapters are what the sweeps vary; the rest (logit scale, fusion) goes into the total.
    modules = list(dict.fromkeys(m for p in params.values() for m in p if m.startswith("adapters.")))
    table = Table(title=f"{cfg.experiment.name} · cost per variant")
    table.add_column("variant")
    for m in modules:
        table.add_column(f"{m.removeprefix('adapters.')} adapter params", justify="right")
    table.add_column("trainable total", justify="right")
    table.add_column("samples / s (median)", justify="right")
    table.add_column("last train loss", justify="right")
    for name, recs in metrics.items():
        train = [r for r in recs if r.get("kind") == "train"]
        speed = [r["samples_per_s"] for r in train if "samples_per_s" in r]
        table.add_row(
            name, *(f"{params[name][m]:,}" if m in params[name] else "–" for m in modules),
            f"{sum(params[name].values()):,}" if params[name] else "–", f"{statistics.median(speed):,.0f}" if speed else "–", f"{train[-1]['loss']:.3f}" if train else "–",
        )
    _console().print(table)


# ---------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def plot_raw_samples(samples: Sequence[dict], ncols: int = 4, width: int = 28) -> "object":
    """The samples' images with their captions (wrapped to `width` characters)."""
    plt = _pyplot()
    with_image = [s for s in samples if s.get("image") is not None]
    if not with_image:
        raise UserError("these samples have no images")
    nrows = -(-len(with_image) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.9 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, with_image):
        ax.imshow(s["image"], interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(s["caption"], width)[:4]), fontsize=8)
    fig.tight_layout()
    return fig


def plot_audio(samples: Sequence[dict], width: int = 60):
    """Waveform and spectrogram of each sample's audio, titled with its caption."""
    import numpy as np

    plt = _pyplot()
    with_audio = [s for s in samples if s.get("audio") is not None]
    if not with_audio:
        raise UserError("these samples have no audio")
    fig, axes = plt.subplots(len(with_audio), 2, figsize=(11, 2.4 * len(with_audio)), squeeze=False)
    for (wave_ax, spec_ax), s in zip(axes, with_audio):
        audio, sr = np.asarray(s["audio"], dtype=np.float32), s["sample_rate"]
        t = np.arange(len(audio)) / sr
        wave_ax.plot(t, audio, linewidth=0.5)
        wave_ax.set_xlim(0, t[-1] if len(t) else 1)
        wave_ax.set_xlabel("time (s)")
        wave_ax.set_ylabel("amplitude")
        wave_ax.set_title(textwrap.shorten(f"{s['key']}: {s['caption']}", width), fontsize=9)
        nfft = 512 if sr >= 16000 else 256
        spec_ax.specgram(audio, NFFT=nfft, Fs=sr, noverlap=nfft * 3 // 4, cmap="magma")
        spec_ax.set_xlabel("time (s)")
        spec_ax.set_ylabel("frequency (Hz)")
        spec_ax.set_title("spectrogram", fontsize=9)
    fig.tight_layout()
    return fig


def plot_training_curves(runs: dict[str, list[dict]] | list[dict], keys: Sequence[str] = CURVE_KEYS,
                         eval_keys: Sequence[str] = EVAL_KEYS, title: str | None = None, max_cols: int = 4):
    """One panel per training-record field (`read_metrics` records), one line per run; plus the
    run's evaluation metric (mean R@1 or exact match) when it logged one. At most `max_cols`
    panels a row."""
    plt = _pyplot()
    if not isinstance(runs, dict):
        runs = {"": runs}
    train = {name: [r for r in recs if r.get("kind") == "train"] for name, recs in runs.items()}
    evals = {name: [r for r in recs if r.get("kind") == "eval"] for name, recs in runs.items()}
    keys = [k for k in keys if any(k in r for recs in train.values() for r in recs)]
    eval_key = next((k for k in eval_keys if any(k in r for recs in evals.values() for r in recs)), None)
    panels = keys + ([eval_key] if eval_key else [])
    if not panels:
        raise UserError("the metrics hold no training records yet")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ncols = min(len(panels), max_cols)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, panels):
        source = evals if key == eval_key else train
        for name, recs in source.items():
            points = [(r["step"], r[key]) for r in recs if key in r]
            if points:
                ax.plot(*zip(*points), marker="o" if key == eval_key else None, markersize=4, label=name or None)
        ax.set_title(key.replace("samples_per_s", "samples / s"), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        values = [r[key] for recs in source.values() for r in recs if key in r]
        if key == "loss" and min(values) > 0 and max(values) / min(values) > 10:  # a log scale for a falling loss
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
    if len(runs) > 1:
        axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_recall_vs_dim(rs: list[dict], metric: str = "R@1", title: str | None = None):
    """`metric` against MRL prefix dim, one line per retrieval direction (`report.rows` rows):
    the same plot the eval script writes next to its report."""
    from edge_glass.training.report import plot_recall_vs_dim as plot

    return plot(rs, metric=metric, title=title)


def distinct_rows(captions: Sequence[str], n: int) -> list[int]:
    """Indices of the first `n` samples whose captions differ from each other (a heatmap of
    repeated captions would show ties, not retrieval)."""
    seen, out = set(), []
    for i, c in enumerate(captions):
        if c not in seen:
            seen.add(c)
            out.append(i)
            if len(out) == n:
                break
    return out


def plot_similarity(queries: torch.Tensor, keys: torch.Tensor, captions: Sequence[str], rows: Sequence[int], *,
                    dim: int | None = None, query_name: str = "vision", images: Sequence | None = None,
                    width: int = 30, title: str | None = None):
    """Cosine similarity of the `rows` samples' query embeddings (one row each) against their
    captions' text embeddings (one column each), at MRL prefix `dim` (default: all of it);
    the matching pairs lie on the diagonal. With `images` (PIL images or raw samples, one per
    row), each row is labelled by its image."""
    import torch.nn.functional as F

    plt = _pyplot()
    idx = torch.as_tensor(list(rows))
    q, k = queries[idx].float(), keys[idx].float()
    if dim is not None:
        q, k = q[:, :dim], k[:, :dim]
    sim = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T).numpy()
    n = len(idx)
    fig, ax = plt.subplots(figsize=(1.0 * n + 3, 0.75 * n + 2.5))
    im = ax.imshow(sim, cmap="viridis", vmin=min(0.0, float(sim.min())), vmax=1.0)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if sim[i, j] > 0.6 * sim.max() else "white")
    ax.set_xticks(range(n), ["\n".join(textwrap.wrap(captions[r], width // 2)[:5]) for r in rows], fontsize=7)
    ax.set_xlabel("caption (text embedding)")
    if images is not None:
        from matplotlib.offsetbox import AnnotationBbox, OffsetImage
        import numpy as np

        ax.set_yticks(range(n), [""] * n)
        for i, img in enumerate(images):
            arr = np.asarray(img["image"] if isinstance(img, dict) else img)
            zoom = 44 / max(arr.shape[:2])
            ax.add_artist(AnnotationBbox(OffsetImage(arr, zoom=zoom), (0, i), xybox=(-30, 0), xycoords=("axes fraction", "data"),
                                         boxcoords="offset points", frameon=False, annotation_clip=False))
        ax.set_ylabel(f"{query_name} embedding", labelpad=50)
    else:
        ax.set_yticks(range(n), [f"{query_name} {r}" for r in rows], fontsize=8)
        ax.set_ylabel(f"{query_name} embedding")
    fig.colorbar(im, ax=ax, fraction=0.04, label="cosine similarity")
    ax.set_title(title or f"{query_name} vs text, cosine similarity" + (f" @ dim {dim}" if dim else ""), fontsize=10)
    fig.tight_layout()
    return fig


def plot_qa_rows(qa: list[dict], title: str | None = None):
    """Exact match and token F1 (%) per group of `instruct_report.qa_rows` (all, kinds, QA attributes)."""
    import numpy as np

    plt = _pyplot()
    groups = [r["group"] for r in qa]
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(groups) + 2), 3.4))
    for offset, metric, label in ((-0.2, "exact_match", "exact match"), (0.2, "token_f1", "token F1")):
        values = [100 * r.get(metric, float("nan")) for r in qa]
        bars = ax.bar(x + offset, values, width=0.4, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# The TRM's halting


@torch.no_grad()
def trm_halting(model, batches: Iterable[dict], max_examples: int | None = None,
                forced_steps: Sequence[int] | None = None) -> dict:
    """Per-example halting of a TRM instruct model, which `instruct_metrics` reports only as a mean.

    Returns `halt_step` (the supervision step at which each example stopped, 1-based), `correct`
    (its exact match), `attribute` (its QA attribute or kind), and `exact_by_step`: exact match
    when every example is forced to run k supervision steps without halting, for k in
    `forced_steps` (default 1..n_sup): what more recursion buys.
    """
    from edge_glass.decoders.generation import exact_match
    from edge_glass.decoders.trm import TRM

    if not isinstance(getattr(model, "decoder", None), TRM):
        raise UserError(f"trm_halting needs a TRM instruct run (decoder.kind trm), not {getattr(model, 'kind', type(model).__name__)!r}")
    was_training = model.training
    model.eval()
    decoder = model.decoder
    n_sup = decoder.cfg.n_sup
    forced = list(forced_steps) if forced_steps is not None else list(range(1, n_sup + 1))
    out = {"halt_step": [], "correct": [], "attribute": [], "n_sup": n_sup}
    forced_hits: dict[int, list[float]] = {k: [] for k in forced}
    for batch in batches:
        if max_examples is not None and len(out["halt_step"]) >= max_examples:
            break
        prefix = model.prefix(batch)[batch["example_sample"]]
        qids, qmask = batch["question_ids"], batch["question_mask"]
        answer_ids, halts = decoder.predict(prefix, qids, qmask)
        preds = [p.strip() for p in decoder.decode(answer_ids)]
        golds = batch["answers"]
        out["halt_step"] += [int(h) for h in halts.cpu()]
        out["correct"] += [bool(exact_match(p, g)) for p, g in zip(preds, golds)]
        out["attribute"] += [a or k for a, k in zip(batch["attributes"], batch["kinds"])]
        for k in forced:
            ids, _ = decoder.predict(prefix, qids, qmask, n_sup=k, halting=False)
            forced_hits[k] += [float(exact_match(p.strip(), g)) for p, g in zip(decoder.decode(ids), golds)]
    model.train(was_training)
    if max_examples is not None:
        for key in ("halt_step", "correct", "attribute"):
            out[key] = out[key][:max_examples]
        forced_hits = {k: v[:max_examples] for k, v in forced_hits.items()}
    out["exact_by_step"] = {k: sum(v) / len(v) for k, v in forced_hits.items() if v}
    return out


def plot_halting(halting: dict):
    """Histogram of the halt steps (correct and wrong answers stacked) and exact match against the
    number of supervision steps forced without halting (`trm_halting`'s result)."""
    import numpy as np

    plt = _pyplot()
    steps = np.asarray(halting["halt_step"])
    correct = np.asarray(halting["correct"], dtype=bool)
    bins = np.arange(1, halting["n_sup"] + 2) - 0.5
    fig, (hist_ax, step_ax) = plt.subplots(1, 2, figsize=(10, 3.4))
    hist_ax.hist([steps[correct], steps[~correct]], bins=bins, stacked=True, label=["correct", "wrong"],
                 color=["tab:green", "tab:red"])
    hist_ax.set_xticks(range(1, halting["n_sup"] + 1))
    hist_ax.set_xlabel("halt step (supervision steps run)")
    hist_ax.set_ylabel("examples")
    hist_ax.set_title(f"where {len(steps)} examples halted (mean {steps.mean():.2f})", fontsize=10)
    hist_ax.legend(fontsize=8)
    by_step = halting["exact_by_step"]
    step_ax.plot(list(by_step), [100 * v for v in by_step.values()], marker="o", label="forced k steps")
    step_ax.axhline(100 * correct.mean(), color="tab:gray", linestyle="--", label="with halting")
    shown = [100 * v for v in by_step.values()] + [100 * correct.mean()]
    step_ax.set_ylim(max(0.0, min(shown) - 5), min(100.0, max(shown) + 5) + 0.5)  # small gaps stay small
    step_ax.set_xticks(list(by_step))
    step_ax.set_xlabel("supervision steps k (no halting)")
    step_ax.set_ylabel("exact match (%)")
    step_ax.set_title("exact match against recursion depth", fontsize=10)
    step_ax.grid(True, alpha=0.3)
    step_ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
