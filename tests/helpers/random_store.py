"""Feature stores of random values with many shards, in the store's real format, for tests of
the loader's resources and the trainer at scale (no encoders run: extraction of 1,000 shards
would take minutes; what these tests exercise is the reading).

`random_store(root, cfg, shards={"train": (1000, 8), "val": (4, 8)})` writes HDF5 shards and
manifests whose `encoders` section matches `cfg` (so training accepts the store), with the
statistics of the values written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_glass.config import Config
from edge_glass.features.block import FeatureBlock, ModalityArrays
from edge_glass.features.hdf5_shard import write_hdf5_shard
from edge_glass.features.manifest import FORMAT_VERSION, encoder_fingerprint, fingerprint
from edge_glass.features.stats import RunningMoments

# modality -> (token length, or (min, max + 1) for variable lengths; token width; pooled width)
TINY_SHAPES = {"vision": (6, 16, 16), "audio": ((3, 9), 16, 16), "text": ((2, 7), 16, 16)}


def random_store(root: Path, cfg: Config, shards: dict[str, tuple[int, int]], shapes: dict = TINY_SHAPES,
                 seed: int = 0, nan_shards: dict[str, set[int]] | None = None) -> Path:
    """Splits of `num_shards` shards of `shard_size` samples each, under `root`. Shards listed
    in `nan_shards[split]` hold NaN vision tokens and pooled vectors (statistics over the finite values only, as
    extraction computes them): a store whose bad values got past extraction."""
    rng = np.random.default_rng(seed)
    encoders = {}
    for m in shapes:
        enc = getattr(cfg.encoders, m)
        encoders[m] = {"model": enc.model, "revision": enc.revision, "layer": getattr(enc, "layer", "last"), "random": True}
    storage = {"token_dtype": "float16", "pooled_dtype": "float16", "quantization": None}
    fp, efp = fingerprint(encoders, storage), encoder_fingerprint(encoders)
    for split, (num_shards, shard_size) in shards.items():
        out = Path(root) / split
        out.mkdir(parents=True, exist_ok=True)
        moments: dict[str, RunningMoments] = {}
        records = []
        for s in range(num_shards):
            mods = {}
            for m, (length, width, pooled) in shapes.items():
                lengths = np.full(shard_size, length) if isinstance(length, int) else rng.integers(*length, size=shard_size)
                offsets = np.zeros(shard_size + 1, dtype=np.int64)
                np.cumsum(lengths, out=offsets[1:])
                # Per-dimension offsets, as encoders have: standardisation has work to do.
                tokens = (rng.standard_normal((int(offsets[-1]), width)) + np.arange(width) / width).astype(np.float16)
                vectors = rng.standard_normal((shard_size, pooled)).astype(np.float16)
                for field, rows in ((f"{m}.tokens", tokens), (f"{m}.pooled", vectors)):
                    moments.setdefault(field, RunningMoments(rows.shape[1])).update(rows)
                if m == "vision" and s in (nan_shards or {}).get(split, ()):
                    tokens[:] = np.nan
                    vectors[:] = np.nan
                mods[m] = ModalityArrays(tokens, offsets, vectors)
            start = s * shard_size
            keys = [f"{split}-{start + i:08d}" for i in range(shard_size)]
            block = FeatureBlock(keys, [f"caption {split} {start + i}" for i in range(shard_size)],
                                 [json.dumps({"i": start + i}) for i in range(shard_size)], mods)
            name = f"shard-{s:06d}"
            path = out / f"{name}.h5"
            write_hdf5_shard(path, block, {"format_version": FORMAT_VERSION, "fingerprint": fp})
            records.append({"name": name, "raw_shard": f"{name}.tar", "num_samples": shard_size,
                            "files": {"hdf5": {"file": path.name, "sha256": "", "bytes": path.stat().st_size}}})
        fields, stats = {}, {}
        for m, (length, width, pooled) in shapes.items():
            fields[f"{m}.tokens"] = {"dim": width, "dtype": "float16",
                                     "max_length": length if isinstance(length, int) else length[1] - 1}
            fields[f"{m}.pooled"] = {"dim": pooled, "dtype": "float16"}
        for field, mom in moments.items():
            mean, std = mom.mean_std()
            stats[field] = {"count": mom.count, "mean": mean.tolist(), "std": std.tolist()}
        manifest = {
            "format_version": FORMAT_VERSION, "split": split, "fingerprint": fp, "encoder_fingerprint": efp,
            "token_dtype": "float16", "pooled_dtype": "float16", "encoders": encoders, "formats": ["hdf5"],
            "fields": fields, "num_samples": num_shards * shard_size, "shards": records, "source": {"random": True},
            "stats": stats,
        }
        (out / "manifest.json").write_text(json.dumps(manifest))
    return Path(root)
