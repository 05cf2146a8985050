"""Overlapping stages with bounded queues: each stage is an iterator run in its own thread.

Reading masks, inference, accumulation and encoding release the GIL in their native code, so threads give
real overlap. An exception in a stage is re-raised in the consumer; when the consumer stops early (error,
Ctrl-C) the producer thread is told to stop instead of blocking forever on a full queue.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(items: Iterable, depth: int = 2, name: str = "safron-stage") -> Iterator:
    """Yield `items`, produced ahead by a background thread into a queue of `depth` entries."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(_Failure(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


class StageClock:
    """Seconds spent in each named stage. Every stage is timed by the one thread that runs it, so no lock
    is needed; the figures are busy time, which `--profile` compares with the wall time."""

    def __init__(self, stages):
        self.seconds = dict.fromkeys(stages, 0.0)

    @contextmanager
    def __call__(self, stage: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - started
