"""One pool of worker processes for the data stages (`minigpt prepare`, fine-tuning data): items in, results out
in the order they went in, whatever the number of workers, so the output is the same with one worker or many.

    with OrderedPool(encode, workers, init, (spec,)) as pool:
        for result, tag in pool.map_tagged((chunk, tag) for ...):   # tags ride along untouched
            ...

At most IN_FLIGHT items per worker are queued, so a source larger than memory streams through: the main process
never reads ahead of the writer. With one worker everything runs in this process (no pickling, no start-up).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

IN_FLIGHT = 2  # items queued per worker


def cpu_count() -> int:
    """The CPU cores this process may run on (its affinity, where the OS says): the default number of workers."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class OrderedPool:
    """`function` over items on `workers` processes, each set up by `initializer(*initargs)`; in this process,
    set up by `local_init` (or the initializer) when there is one worker. `reset` runs on exit (clearing what the
    set-up left in this process)."""

    def __init__(self, function: Callable[[Any], Any], workers: int, initializer: Callable[..., None],
                 initargs: tuple = (), local_init: Callable[[], None] | None = None,
                 reset: Callable[[], None] | None = None) -> None:
        self.function, self.workers = function, workers
        self.initializer, self.initargs = initializer, initargs
        self.local_init, self.reset = local_init, reset
        self.pool = None

    def __enter__(self) -> OrderedPool:
        if self.workers > 1:
            # fork starts workers in milliseconds with the code already imported; spawn where there is no fork
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self.pool = multiprocessing.get_context(method).Pool(self.workers, self.initializer, self.initargs)
        elif self.local_init is not None:
            self.local_init()
        else:
            self.initializer(*self.initargs)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        if self.reset is not None:
            self.reset()

    def map_tagged(self, tagged: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        """(item, tag) -> (function(item), tag), in order."""
        if self.pool is None:
            for item, tag in tagged:
                yield self.function(item), tag
            return
        pending: deque = deque()
        for item, tag in tagged:
            pending.append((self.pool.apply_async(self.function, (item,)), tag))
            if len(pending) >= IN_FLIGHT * self.workers:  # bounded: the source is never read ahead of the writer
                result, tag = pending.popleft()
                yield result.get(), tag
        while pending:
            result, tag = pending.popleft()
            yield result.get(), tag

    def map(self, items: Iterable[Any]) -> Iterator[Any]:
        """item -> function(item), in order."""
        for result, _ in self.map_tagged((item, None) for item in items):
            yield result
