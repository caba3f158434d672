"""The attribute space of the synthetic tri-modal set, and the words used to talk about it.

Kept apart from the renderers (`synthetic.py`) because tokenizers and tests need the vocabulary
without drawing a single pixel. With these numbers the space was measured to be learnable by
adapters on tiny random encoders; tests/test_alignment_learning.py checks that it still is.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 220, 40),
    "green": (50, 180, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 80, 220),
    "purple": (140, 60, 200),
    "pink": (240, 120, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")
SIZES: dict[str, float] = {"small": 0.2, "medium": 0.3, "large": 0.45}
"""Size name -> radius as a fraction of one grid cell."""
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLUMNS: tuple[str, ...] = ("left", "middle", "right")

# Audio carries the same attributes: colour -> pitch, shape -> waveform, size -> loudness,
# row -> number of beeps, column -> onset time.
PITCH_HZ: dict[str, float] = dict(zip(COLOURS, (220.0, 277.0, 349.0, 440.0, 554.0, 698.0, 880.0, 1109.0)))
WAVEFORMS: dict[str, str] = dict(zip(SHAPES, ("sine", "square", "triangle", "saw", "vibrato")))
AMPLITUDE: dict[str, float] = dict(zip(SIZES, (0.12, 0.3, 0.75)))
BEEPS: dict[str, int] = dict(zip(ROWS, (1, 2, 3)))
ONSET_S: dict[str, float] = dict(zip(COLUMNS, (0.05, 0.30, 0.55)))


@dataclass(frozen=True)
class Attributes:
    """One point of the attribute space; everything a sample shows, sounds like and says."""

    colour: str
    shape: str
    size: str
    row: int
    col: int

    @property
    def position(self) -> str:
        """Grid position in words: 'top left', 'center', 'bottom middle', ..."""
        if self.row == 1 and self.col == 1:
            return "center"
        return f"{ROWS[self.row]} {COLUMNS[self.col]}"

    def to_json(self) -> dict:
        return {**asdict(self), "position": self.position}


def all_combos() -> list[Attributes]:
    """All 8 x 5 x 3 x 9 = 1080 attribute combinations, in a fixed order."""
    return [
        Attributes(c, s, z, r, k)
        for c, s, z, r, k in itertools.product(COLOURS, SHAPES, SIZES, range(3), range(3))
    ]


def caption(a: Attributes) -> str:
    """The caption: 'a large red circle in the top left'."""
    return f"a {a.size} {a.colour} {a.shape} in the {a.position}"


QUESTIONS: dict[str, str] = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "size": "How big is the shape?",
    "position": "Where is the shape?",
}


def qa_pairs(a: Attributes) -> list[dict[str, str]]:
    """One question per attribute, with a short exact answer (one or two words)."""
    answers = {"colour": a.colour, "shape": a.shape, "size": a.size, "position": a.position}
    return [{"attribute": k, "question": q, "answer": answers[k]} for k, q in QUESTIONS.items()]


def text_corpus() -> list[str]:
    """Every caption, question and answer the synthetic set can produce (for training tokenizers)."""
    texts: list[str] = list(QUESTIONS.values())
    for a in all_combos():
        texts.append(caption(a))
    texts += list(COLOURS) + list(SHAPES) + list(SIZES)
    texts += sorted({Attributes("red", "circle", "small", r, k).position for r in range(3) for k in range(3)})
    return texts
