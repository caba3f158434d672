"""The offline synthetic tri-modal source: an image, a sound and a caption that say the same thing.

Every sample is one point of the attribute space in `synthetic_attributes.py` shown three ways:
a coloured shape on a grey canvas, a beep pattern whose pitch/timbre/loudness/count/onset encode
the same attributes, and the caption. Because the modalities truly correspond, alignment and QA
can be checked for real on a CPU with no download (adapters on tiny random encoders learn this
space: tests/test_alignment_learning.py).

Determinism: a sample is a pure function of (seed, split, index) through its own RNG, so any shard
can be generated alone, in any process, in any order, and comes out byte-identical.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from edge_glass.data.hf_rows import check_fractions
from edge_glass.data.raw_shards import RawSample
from edge_glass.data.synthetic_attributes import (
    AMPLITUDE,
    BEEPS,
    COLOURS,
    COLUMNS,
    ONSET_S,
    PITCH_HZ,
    ROWS,
    SIZES,
    WAVEFORMS,
    Attributes,
    all_combos,
    caption,
    qa_pairs,
)
from edge_glass.utils.errors import UserError

SPLITS: tuple[str, ...] = ("train", "val", "test")

BACKGROUND = (64, 64, 64)
SUPERSAMPLE = 4  # drawn at 4x and BOX-downsampled: cheap anti-aliasing that keeps small shapes' area
COLOUR_JITTER = 15  # +- per channel
CENTRE_JITTER = 0.08  # +- fraction of a cell
RADIUS_JITTER = 0.08  # +- relative

CLIP_S = 1.0
BEEP_S = 0.120
GAP_S = 0.060
FADE_S = 0.005  # raised-cosine ramps; long enough to avoid clicks, short next to a 120 ms beep
PITCH_JITTER = 0.01
AMPLITUDE_JITTER = 0.10
NOISE_STD = 0.005
VIBRATO_HZ = 6.0
VIBRATO_DEPTH = 0.02  # peak frequency deviation relative to the pitch; keeps the FFT peak within ~2 %

# SeedSequence pads entropy with zeros, so [seed] and [seed, 0, 0] are the same stream; the plan's
# RNG gets a tag no split index can take, so it never coincides with a sample's RNG.
_PLAN_STREAM = 0x504C414E  # "PLAN"


# ---------------------------------------------------------------------------------------------
# Image


def _regular_polygon(points: int, radii: Sequence[float]) -> np.ndarray:
    """Unit-radius vertices pointing up (image y grows downwards), radii cycled over the points."""
    angles = -math.pi / 2 + np.arange(points) * 2 * math.pi / points
    r = np.resize(np.asarray(radii, dtype=np.float64), points)
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


_W = 1 / 3  # half-width of a cross arm, relative to the radius
# Unit outlines centred on the origin; every shape fits the square [-1, 1]^2, so "radius" means the
# same extent for every shape, and each outline's centroid is the origin (the image test relies on it).
_OUTLINES: dict[str, np.ndarray] = {
    "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64),
    "triangle": _regular_polygon(3, [1.0]),
    "cross": np.array(
        [(-_W, -1), (_W, -1), (_W, -_W), (1, -_W), (1, _W), (_W, _W)]
        + [(_W, 1), (-_W, 1), (-_W, _W), (-1, _W), (-1, -_W), (-_W, -_W)],
        dtype=np.float64,
    ),
    "star": _regular_polygon(10, [1.0, 0.45]),
}


def render_image(attrs: Attributes, rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """The shape in its (jittered) colour at its 3x3 grid cell on a grey background, RGB."""
    s = SUPERSAMPLE
    cell = image_size * s / 3
    colour = np.clip(np.asarray(COLOURS[attrs.colour]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)
    cx, cy = (np.array([attrs.col, attrs.row]) + 0.5 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, 2)) * cell
    radius = SIZES[attrs.size] * cell * (1 + rng.uniform(-RADIUS_JITTER, RADIUS_JITTER))

    # BOX averages each s x s block on its own, so drawing only the output pixels the shape covers
    # (at s x) and pasting them gives the same image as a full-canvas draw, at a tenth of the work.
    x0, y0 = (max(0, math.floor((v - radius) / s)) for v in (cx, cy))
    x1, y1 = (min(image_size, math.ceil((v + radius) / s) + 1) for v in (cx, cy))  # +1: PIL fills edges inclusively
    patch = Image.new("RGB", ((x1 - x0) * s, (y1 - y0) * s), BACKGROUND)
    draw = ImageDraw.Draw(patch)
    fill = tuple(int(v) for v in colour)
    cx, cy = cx - x0 * s, cy - y0 * s
    if attrs.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        outline = _OUTLINES[attrs.shape] * radius + (cx, cy)
        draw.polygon([tuple(p) for p in outline.tolist()], fill=fill)
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    image.paste(patch.resize((x1 - x0, y1 - y0), Image.Resampling.BOX), (x0, y0))
    return image


# ---------------------------------------------------------------------------------------------
# Audio


@functools.lru_cache(maxsize=8)
def _time_axis(sample_rate: int, seconds: float) -> np.ndarray:
    t = np.arange(round(sample_rate * seconds), dtype=np.float64) / sample_rate
    t.flags.writeable = False
    return t


@functools.lru_cache(maxsize=64)
def _beep_envelope(beeps: int, onset_s: float, sample_rate: int, seconds: float) -> tuple[int, int, np.ndarray]:
    """The gate of `beeps` 120 ms beeps from `onset_s` with raised-cosine edges, as (lo, hi, gate[lo:hi]).

    Only 9 (row, column) patterns exist, so they are built once, not per sample; the span lets the
    waveform be computed only where it sounds. Three beeps from 550 ms would end at 1.03 s: the
    last one is cut at the clip end (to 90 ms), its fade-out moved inside the clip.
    """
    n = round(sample_rate * seconds)
    env = np.zeros(n, dtype=np.float64)
    fade = max(1, round(FADE_S * sample_rate))
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
    starts = (round((onset_s + b * (BEEP_S + GAP_S)) * sample_rate) for b in range(beeps))
    spans = [(a, min(n, a + round(BEEP_S * sample_rate))) for a in starts]
    spans = [(a, b) for a, b in spans if b - a >= 2 * fade]  # a beep cut to nothing by a short clip
    for start, stop in spans:
        env[start:stop] = 1.0
        env[start : start + fade] = ramp
        env[stop - fade : stop] = ramp[::-1]
    lo, hi = (spans[0][0], spans[-1][1]) if spans else (0, 0)
    gate = env[lo:hi].copy()
    gate.flags.writeable = False
    return lo, hi, gate


def _waveform(kind: str, freq: float, t: np.ndarray) -> np.ndarray:
    """One of the five timbres, peak amplitude 1, at `freq` Hz."""
    cycles = freq * t
    if kind == "sine":
        return np.sin(2 * np.pi * cycles)
    if kind == "vibrato":
        index = freq * VIBRATO_DEPTH / VIBRATO_HZ  # FM index: deviation / modulation rate
        return np.sin(2 * np.pi * cycles + index * np.sin(2 * np.pi * VIBRATO_HZ * t))
    frac = cycles % 1.0
    if kind == "square":
        return np.where(frac < 0.5, 1.0, -1.0)
    if kind == "triangle":
        return 4.0 * np.abs(frac - 0.5) - 1.0
    if kind == "saw":
        return 2.0 * frac - 1.0
    raise ValueError(f"unknown waveform {kind!r}")


def synthesize_audio(
    attrs: Attributes, rng: np.random.Generator, sample_rate: int = 16000, seconds: float = 1.0
) -> np.ndarray:
    """Mono float32 in [-1, 1]: colour -> pitch, shape -> waveform, size -> amplitude,
    row -> number of beeps, column -> onset; plus faint Gaussian noise so no clip is silent-exact."""
    freq = PITCH_HZ[attrs.colour] * (1 + rng.uniform(-PITCH_JITTER, PITCH_JITTER))
    amplitude = AMPLITUDE[attrs.size] * (1 + rng.uniform(-AMPLITUDE_JITTER, AMPLITUDE_JITTER))
    t = _time_axis(sample_rate, seconds)
    lo, hi, gate = _beep_envelope(BEEPS[ROWS[attrs.row]], ONSET_S[COLUMNS[attrs.col]], sample_rate, seconds)
    audio = rng.standard_normal(t.shape[0], dtype=np.float32)
    audio *= NOISE_STD
    audio[lo:hi] += amplitude * gate * _waveform(WAVEFORMS[attrs.shape], freq, t[lo:hi])
    return np.clip(audio, -1.0, 1.0, out=audio)


# ---------------------------------------------------------------------------------------------
# Splits


def split_sizes(num_samples: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, int]:
    """Samples per split (train, val, test), summing exactly to `num_samples`.

    Rounding rule (largest remainder): each split gets floor(num_samples * fraction), then the
    samples still missing go one each to the splits with the largest fractional parts; ties go
    to the earlier split (train before val before test). So 10 x (0.8, 0.1, 0.1) is 8/1/1 and
    5 x (0.5, 0.25, 0.25) is 3/1/1.
    """
    _check_split_args(num_samples, fractions)
    return dict(zip(SPLITS, _largest_remainder(num_samples, fractions)))


def _largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _check_split_args(num_samples: int, fractions: Sequence[float]) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise UserError(f"--num_samples must be a positive integer, got {num_samples!r}")
    check_fractions(fractions)  # the real sources' check: one --split_fractions rule for every dataset


def plan_splits(
    num_samples: int,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    holdout: bool = True,
) -> dict[str, list[Attributes]]:
    """The attributes of every sample, per split.

    Val and test each get distinct combos (so every eval caption is unique and retrieval chance
    is 1/N), disjoint from each other. With `holdout`, train draws i.i.d. only from the combos
    val/test do not use, so eval measures generalisation to unseen combinations; without it,
    train draws from all 1080.

    If the distinct eval combos do not fit (val + test > 1080, or = 1080 leaving nothing for a
    held-out train), the combos are instead cut into disjoint pools in proportion to the split
    sizes (each non-empty split at least one combo; train gets a pool only with `holdout`) and
    every split draws with replacement from its own pool; a warning says so.
    """
    sizes = split_sizes(num_samples, fractions)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng([seed, _PLAN_STREAM])
    combos = all_combos()
    order = rng.permutation(len(combos))
    n_val, n_test, n_train = sizes["val"], sizes["test"], sizes["train"]
    train_needs_pool = holdout and n_train > 0

    available = len(combos) - int(train_needs_pool)
    if n_val + n_test <= available:
        plan_idx = {"val": order[:n_val], "test": order[n_val : n_val + n_test]}
        train_pool = order[n_val + n_test :] if holdout else np.arange(len(combos))
    else:
        pooled = [s for s in SPLITS if sizes[s] > 0 and (s != "train" or holdout)]
        counts = _largest_remainder(len(combos), [sizes[s] for s in pooled])
        for i, s in enumerate(pooled):  # every drawing split needs a combo; take it from the largest pool
            if counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] = 1
        bounds = np.cumsum([0, *counts])
        pools = {s: order[bounds[i] : bounds[i + 1]] for i, s in enumerate(pooled)}
        plan_idx = {s: rng.choice(pools[s], sizes[s]) for s in ("val", "test") if s in pools}
        train_pool = pools["train"] if train_needs_pool else np.arange(len(combos))
        kept = " (one is kept for the held-out train set)" if train_needs_pool else ""
        warnings.warn(
            f"val + test need {n_val + n_test} distinct attribute combos but only {available} are free{kept}: "
            f"val and test draw with replacement from disjoint pools of {len(pools.get('val', []))} and "
            f"{len(pools.get('test', []))} combos, so their captions repeat and retrieval chance is no longer 1/N",
            UserWarning,
            stacklevel=2,
        )
    plan_idx.setdefault("val", np.empty(0, dtype=np.int64))
    plan_idx.setdefault("test", np.empty(0, dtype=np.int64))
    plan_idx["train"] = rng.choice(train_pool, n_train) if n_train else np.empty(0, dtype=np.int64)
    return {s: [combos[i] for i in plan_idx[s].tolist()] for s in SPLITS}


# ---------------------------------------------------------------------------------------------
# Samples


def sample_key(split: str, index: int) -> str:
    """`train-00000042`: unique across splits, and dot-free because webdataset splits keys at the first dot."""
    return f"{split}-{index:08d}"


def make_sample(
    attrs: Attributes, split: str, index: int, seed: int, image_size: int = 64, sample_rate: int = 16000
) -> RawSample:
    """Sample `index` of `split`, from its own RNG so it can be made alone and always the same."""
    entropy = [seed, SPLITS.index(split), index]
    rng = np.random.default_rng(entropy)
    key = sample_key(split, index)
    return {
        "key": key,
        "image": render_image(attrs, rng, image_size),
        "audio": synthesize_audio(attrs, rng, sample_rate, CLIP_S),
        "sample_rate": sample_rate,
        "caption": caption(attrs),
        "json": {
            "source": "synthetic",
            "id": key,
            "split": split,
            "attributes": attrs.to_json(),
            "qa": qa_pairs(attrs),
            "seed": entropy,  # the sample's own RNG entropy: enough to re-render it alone
        },
    }


class SyntheticSource:
    """The synthetic set as a raw-shard source (see `raw_shards.RawSource`).

    The split plan is made once here, in the parent process, so its warning (if any) is shown
    once and workers writing shards in parallel only index into it.
    """

    name = "synthetic"

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        fractions: Sequence[float] = (0.8, 0.1, 0.1),
        image_size: int = 64,
        holdout: bool = True,
        sample_rate: int = 16000,
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise UserError(f"--image_size must be an integer >= 8, got {image_size!r}")
        self.num_samples = num_samples
        self.seed = seed
        self.fractions = tuple(float(f) for f in fractions)
        self.image_size = image_size
        self.holdout = holdout
        self.sample_rate = sample_rate
        self._plan = plan_splits(num_samples, self.fractions, seed, holdout)

    def params(self) -> dict:
        """Everything that changes the samples; a directory made with other values is a different dataset."""
        return {
            "num_samples": self.num_samples,
            "seed": self.seed,
            "split_fractions": list(self.fractions),
            "holdout": self.holdout,
            "image_size": self.image_size,
            "sample_rate": self.sample_rate,
            "audio_seconds": CLIP_S,
        }

    def split_sizes(self) -> dict[str, int]:
        return {s: len(v) for s, v in self._plan.items()}

    def samples(self, split: str, start: int, stop: int) -> Iterator[RawSample]:
        plan = self._plan[split]
        for i in range(start, stop):
            yield make_sample(plan[i], split, i, self.seed, self.image_size, self.sample_rate)
