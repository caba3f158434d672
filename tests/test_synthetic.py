"""The synthetic source: splits are planned as promised, and image, audio and caption say the same thing."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from edge_glass.data.synthetic import (
    BACKGROUND,
    SPLITS,
    SyntheticSource,
    make_sample,
    plan_splits,
    render_image,
    split_sizes,
    synthesize_audio,
)
from edge_glass.data.synthetic_attributes import (
    AMPLITUDE,
    BEEPS,
    COLOURS,
    COLUMNS,
    ONSET_S,
    PITCH_HZ,
    ROWS,
    SHAPES,
    SIZES,
    Attributes,
    all_combos,
    caption,
    qa_pairs,
)
from edge_glass.utils.errors import UserError

SR = 16000


# --- split planning ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, fractions, expected",
    [
        (10, (0.8, 0.1, 0.1), (8, 1, 1)),
        (5, (0.5, 0.25, 0.25), (3, 1, 1)),  # 2.5/1.25/1.25: the .5 remainder wins
        (7, (1 / 3, 1 / 3, 1 / 3), (3, 2, 2)),  # tie on remainders: earlier split first
        (1, (0.8, 0.1, 0.1), (1, 0, 0)),
        (3, (0.5, 0.5, 0.0), (2, 1, 0)),
        (100, (0.29, 0.71, 0.0), (29, 71, 0)),  # 100 * 0.29 is 28.999... in floats
        (1001, (0.7, 0.2, 0.1), (701, 200, 100)),
        (2, (0.0, 0.0, 1.0), (0, 0, 2)),
    ],
)
def test_split_sizes_follow_largest_remainder_and_sum_exactly(n, fractions, expected):
    sizes = split_sizes(n, fractions)
    assert tuple(sizes[s] for s in SPLITS) == expected
    plan = plan_splits(n, fractions, seed=3)
    assert {s: len(v) for s, v in plan.items()} == sizes


@pytest.mark.parametrize("n", [1, 2, 9, 37, 999, 4321])
@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.1), (0.6, 0.25, 0.15), (0.34, 0.33, 0.33)])
def test_split_sizes_always_sum_to_num_samples(n, fractions):
    sizes = split_sizes(n, fractions)
    assert sum(sizes.values()) == n
    for s, f in zip(SPLITS, fractions):
        assert abs(sizes[s] - n * f) < 1  # rounding moves a split by less than one sample


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(num_samples=0), "--num_samples"),
        (dict(num_samples=-5), "--num_samples"),
        (dict(num_samples=10, fractions=(0.8, 0.1, 0.05)), "sum to 1"),
        (dict(num_samples=10, fractions=(1.2, -0.1, -0.1)), "non-negative"),
        (dict(num_samples=10, fractions=(0.5, 0.5)), "3 numbers"),
        (dict(num_samples=10, seed=-1), "--seed"),
    ],
)
def test_bad_plan_inputs_raise_one_line_user_errors(kwargs, words):
    with pytest.raises(UserError, match=words) as e:
        plan_splits(**kwargs)
    assert "\n" not in str(e.value)


def test_bad_image_size_is_a_user_error():
    with pytest.raises(UserError, match="--image_size"):
        SyntheticSource(10, image_size=2)


def test_val_and_test_have_unique_disjoint_captions_and_train_is_held_out():
    plan = plan_splits(3000, (0.8, 0.1, 0.1), seed=0, holdout=True)
    val = [caption(a) for a in plan["val"]]
    test = [caption(a) for a in plan["test"]]
    assert len(set(val)) == len(val) == 300 and len(set(test)) == len(test) == 300
    assert not set(val) & set(test)
    train = {caption(a) for a in plan["train"]}
    assert not train & (set(val) | set(test))
    assert len(train) > 400  # i.i.d. over the 480 free combos, not one repeated


def test_without_holdout_train_draws_from_all_combos():
    plan = plan_splits(6000, (0.9, 0.05, 0.05), seed=0, holdout=False)
    val_test = {caption(a) for a in plan["val"] + plan["test"]}
    train = {caption(a) for a in plan["train"]}
    assert len(train & val_test) > 0.9 * len(val_test)


def test_too_many_eval_samples_fall_back_with_a_warning_and_stay_disjoint():
    with pytest.warns(UserWarning, match="with replacement"):
        plan = plan_splits(12000, (0.8, 0.1, 0.1), seed=1, holdout=True)
    val, test, train = ({caption(a) for a in plan[s]} for s in ("val", "test", "train"))
    assert len(plan["val"]) == len(plan["test"]) == 1200
    assert not val & test and not train & (val | test)
    assert len(val) < 1200  # captions repeat now


def test_eval_filling_every_combo_leaves_one_for_held_out_train():
    # 1080 distinct val+test combos would leave nothing for train, so this must fall back
    with pytest.warns(UserWarning):
        plan = plan_splits(1090, (10 / 1090, 540 / 1090, 540 / 1090), seed=0, holdout=True)
    assert len(plan["train"]) == 10


def test_fitting_plans_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan_splits(10000, (0.9, 0.05, 0.05), seed=0)


def test_plan_is_deterministic_in_the_seed():
    assert plan_splits(500, seed=7) == plan_splits(500, seed=7)
    assert plan_splits(500, seed=7) != plan_splits(500, seed=8)


# --- image ------------------------------------------------------------------------------------

_BG = np.asarray(BACKGROUND, dtype=np.float64)
_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _NAMES], dtype=np.float64)


def _coverage(image) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(image, dtype=np.float64)
    distance = np.abs(x - _BG).max(-1)
    return x, distance / distance.max()


@pytest.mark.parametrize("image_size", [32, 64])
def test_image_shows_the_named_colour_in_the_named_cell(image_size):
    for i, a in enumerate(all_combos()):
        image = render_image(a, np.random.default_rng(i), image_size)
        assert image.mode == "RGB" and image.size == (image_size, image_size)
        x, cover = _coverage(image)
        colour = x[cover >= 0.9].mean(0)  # fully covered pixels: no blend with the background
        assert _NAMES[np.argmin(((_PALETTE - colour) ** 2).sum(1))] == a.colour, a
        ys, xs = np.indices(cover.shape)
        cy, cx = ((cover * v).sum() / cover.sum() + 0.5 for v in (ys, xs))
        cell = image_size / 3
        assert (int(cy // cell), int(cx // cell)) == (a.row, a.col), a
        assert abs(cy / cell - a.row - 0.5) < 0.12 and abs(cx / cell - a.col - 0.5) < 0.12, a


def test_image_draws_the_named_shape_at_the_named_size():
    # fill of the bounding box and its aspect tell the five outlines apart; at 192 px edges barely matter
    templates = {"circle": (np.pi / 4, 1.0), "square": (1.0, 1.0), "triangle": (0.5, 2 / np.sqrt(3)),
                 "cross": (5 / 9, 1.0), "star": (0.384, 1.051)}
    areas: dict[str, list[float]] = {s: [] for s in SIZES}
    for i, (colour, shape, size) in enumerate((c, s, z) for c in COLOURS for s in SHAPES for z in SIZES):
        _, cover = _coverage(render_image(Attributes(colour, shape, size, 1, 1), np.random.default_rng(i), 192))
        areas[size].append(cover.sum() / 192**2)
        if size == "small":
            continue
        ys, xs = np.nonzero(cover > 0.5)
        h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
        fill, aspect = cover.sum() / (h * w), w / h
        guess = min(templates, key=lambda k: (templates[k][0] - fill) ** 2 + (templates[k][1] - aspect) ** 2)
        assert guess == shape, (colour, shape, size, fill, aspect)
    mean = {z: np.mean(v) for z, v in areas.items()}
    assert mean["small"] < mean["medium"] < mean["large"]


def test_image_is_deterministic_in_the_rng():
    a = Attributes("cyan", "star", "large", 2, 0)
    same = [np.asarray(render_image(a, np.random.default_rng(5))) for _ in range(2)]
    other = np.asarray(render_image(a, np.random.default_rng(6)))
    assert np.array_equal(*same) and not np.array_equal(same[0], other)


# --- audio ------------------------------------------------------------------------------------


def _bursts(audio: np.ndarray) -> tuple[int, float]:
    """(number of energy bursts, onset of the first in seconds), from 10 ms frame RMS."""
    frames = audio[: len(audio) // 160 * 160].reshape(-1, 160)
    loud = np.sqrt((frames**2).mean(1))
    on = loud > 0.5 * loud.max()
    return int(on[0]) + int((on[1:] & ~on[:-1]).sum()), float(np.argmax(on) * 0.01)


def test_audio_pitch_follows_the_colour_for_every_waveform():
    pitches = np.array(list(PITCH_HZ.values()))
    for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        audio = synthesize_audio(Attributes(colour, shape, "medium", 0, 0), np.random.default_rng(i))
        assert audio.dtype == np.float32 and audio.shape == (SR,) and np.abs(audio).max() <= 1.0
        spectrum = np.abs(np.fft.rfft(audio))
        peak = np.fft.rfftfreq(len(audio), 1 / SR)[np.argmax(spectrum)]
        assert abs(peak / PITCH_HZ[colour] - 1) < 0.035, (colour, shape, peak)
        assert pitches[np.argmin(np.abs(np.log(pitches / peak)))] == PITCH_HZ[colour]


def test_audio_beeps_follow_the_row_and_onset_the_column():
    for i, (row, col, size) in enumerate((r, k, z) for r in range(3) for k in range(3) for z in SIZES):
        audio = synthesize_audio(Attributes("green", "cross", size, row, col), np.random.default_rng(i))
        beeps, onset = _bursts(audio)
        assert beeps == BEEPS[ROWS[row]], (row, col, size)
        assert abs(onset - ONSET_S[COLUMNS[col]]) <= 0.015, (row, col, onset)


def test_audio_loudness_follows_the_size_and_noise_is_faint():
    peaks = {}
    for size in SIZES:
        audio = synthesize_audio(Attributes("red", "circle", size, 1, 0), np.random.default_rng(0))
        peaks[size] = np.abs(audio).max()
        assert abs(peaks[size] / AMPLITUDE[size] - 1) < 0.15
        silence = audio[: int(0.04 * SR)]  # before the 50 ms onset: only noise
        assert 0.003 < silence.std() < 0.007
    assert peaks["small"] < peaks["medium"] < peaks["large"]


def test_audio_has_no_clicks_at_beep_edges():
    audio = synthesize_audio(Attributes("pink", "square", "large", 2, 1), np.random.default_rng(0))
    # a hard-gated square wave would jump by 0.75 at its first sample; the fade keeps steps small
    onset = int(ONSET_S["middle"] * SR)
    assert np.abs(np.diff(audio[onset - 5 : onset + 5])).max() < 0.1


# --- samples ----------------------------------------------------------------------------------


def test_sample_caption_json_and_key_agree():
    a = Attributes("orange", "cross", "small", 2, 2)
    s = make_sample(a, "val", 42, seed=9)
    assert s["key"] == "val-00000042" and "." not in s["key"]
    assert s["caption"] == "a small orange cross in the bottom right" == caption(a)
    meta = s["json"]
    assert meta["source"] == "synthetic" and meta["id"] == s["key"] and meta["split"] == "val"
    assert Attributes(**{k: v for k, v in meta["attributes"].items() if k != "position"}) == a
    assert meta["qa"] == qa_pairs(a) and meta["seed"] == [9, 1, 42]


def test_sample_depends_only_on_seed_split_and_index():
    src = SyntheticSource(40, seed=2)
    whole = list(src.samples("train", 0, 32))
    part = list(SyntheticSource(40, seed=2).samples("train", 20, 24))  # made alone, in another order
    for a, b in zip(whole[20:24], part):
        assert a["key"] == b["key"] and np.array_equal(a["audio"], b["audio"])
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    other = next(SyntheticSource(40, seed=3).samples("train", 20, 21))
    assert not np.array_equal(other["audio"], whole[20]["audio"])
