"""Method decorators that run an object's methods under its own re-entrant lock (`self._lock`).

GistEngine and GistMemory are shared between threads (web servers, LlamaIndex / LangChain
callbacks). Their locks are re-entrant so a locked method may call another (a batch over
memory calls `generate` per question). Lock order is always engine, then memory: the memory
never takes the engine's lock, so the two cannot deadlock.
"""

from __future__ import annotations

import functools
import threading
from typing import Self


class GenerationLock:
    """Re-entrant for the thread that holds it, yet releasable from another thread.

    A `threading.RLock` must be released by its owner, but a stream holds its engine's lock
    across yields and may be resumed, finished or closed (by async frameworks' executors, or
    the garbage collector) in another thread than the one that started it.
    """

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._count = 0

    def acquire(self, timeout: float | None = None) -> bool:
        """Waits (at most `timeout` seconds; None: forever); True once held."""
        me = threading.get_ident()
        with self._cond:
            if not self._cond.wait_for(lambda: not self._count or self._owner == me, timeout):
                return False
            self._owner, self._count = me, self._count + 1
            return True

    def release(self) -> None:
        with self._cond:
            if not self._count:
                raise RuntimeError("release of an unheld GenerationLock")
            self._count -= 1
            if not self._count:
                self._owner = None
                self._cond.notify()

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def locked(method):
    """Runs `method` holding `self._lock`."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return run


def locked_generator(method):
    """For a generator method: the lock is taken at the first item and held until the
    generator is exhausted, closed, or raises (the `with` is a try/finally inside it)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            yield from method(self, *args, **kwargs)

    return run
