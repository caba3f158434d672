"""Run an iterator ahead of its consumer in a background thread.

Decoding, preprocessing and disk reads mostly release the GIL (PIL, numpy, h5py's I/O, the
tokenizers' Rust code), so a thread keeps the next batches ready while the main thread runs the
model, without the pickling and start-up cost of worker processes. Order is preserved exactly,
and an exception in the producer is re-raised in the consumer.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield `items` in order while a thread produces up to `depth` of them ahead."""
    if depth <= 0:
        yield from items
        return
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        """Block until there is room, unless the consumer has gone away."""
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(_Raised(e))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        # The consumer stopped early (break, exception, generator closed): release the producer.
        stop.set()
        thread.join(timeout=5)
