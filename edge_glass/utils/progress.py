"""Rank-0 progress bars (rich) with a rate and an ETA; every other rank stays quiet.

When the output is not a terminal (a SLURM log, nohup, a CI log) rich would draw the bar once,
at the very end; there the progress is plain lines instead, one every `line_seconds` and one at
the end: description, count, rate and ETA.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second (rich's own speed column formats bytes)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else f"{speed:,.0f} {self.unit}/s", style="progress.data.speed")


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, **fields) -> None:
        """Change the description or extra fields shown (e.g. the loss)."""
        if self._progress is not None:
            self._progress.update(self._task, **fields)


class _Lines:
    """The bar's stand-in for a file: a plain line every `seconds` (checked as work advances)."""

    def __init__(self, description: str, total: float | None, unit: str, seconds: float) -> None:
        self.description, self.total, self.unit, self.seconds = description, total, unit, seconds
        self.done = self.last_done = 0.0
        self.start = self.last = time.monotonic()

    def advance(self, n: float = 1) -> None:
        self.done += n
        if n and time.monotonic() - self.last >= self.seconds:
            self.emit()

    def update(self, description: str | None = None, **fields) -> None:
        if description is not None:
            self.description = description

    def emit(self) -> None:
        now = time.monotonic()
        # The rate since the previous line: the current speed (a resumed run's first advance
        # jumps by the steps already done, which took no time here).
        rate = (self.done - self.last_done) / max(now - self.last, 1e-9) if self.done > self.last_done else 0.0
        self.last, self.last_done = now, self.done
        elapsed = now - self.start
        count = f"{self.done:,.0f}" + (f"/{self.total:,.0f}" if self.total else "")
        eta = ""
        if self.total and rate > 0:
            eta = f" · eta {_clock((self.total - self.done) / rate)}"
        print(f"{self.description} · {count} {self.unit} · {rate:,.1f} {self.unit}/s · elapsed {_clock(elapsed)}{eta}",
              file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@contextmanager
def progress_bar(description: str, total: float | None, unit: str = "samples", enabled: bool = True,
                 line_seconds: float = 30.0) -> Iterator[_Bar]:
    """A bar with count, rate and ETA when `enabled` (rank 0), a silent stand-in otherwise; plain
    lines every `line_seconds` when stderr is not a terminal."""
    if not enabled:
        yield _Bar(None, None)
        return
    if not Console(stderr=True).is_terminal:
        lines = _Lines(description, total, unit, line_seconds)
        yield lines  # type: ignore[misc]  # the same advance/update surface as _Bar
        lines.emit()
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        yield _Bar(progress, progress.add_task(description, total=total))


def tracked(items: Iterable, description: str, total: float | None, count: Callable[[object], float] = lambda _: 1,
            unit: str = "samples", enabled: bool = True) -> Iterator:
    """`items`, advancing a progress bar by `count(item)` per item (e.g. a batch's samples)."""
    with progress_bar(description, total, unit=unit, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.advance(count(item))
