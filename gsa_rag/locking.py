"""Method decorators that run an object's methods under its own re-entrant lock (`self._lock`).

GistEngine and GistMemory are shared between threads (web servers, LlamaIndex / LangChain
callbacks). Their locks are re-entrant so a locked method may call another (a batch over
memory calls `generate` per question). Lock order is always engine, then memory: the memory
never takes the engine's lock, so the two cannot deadlock.
"""

from __future__ import annotations

import functools


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
