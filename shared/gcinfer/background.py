"""Threads: one call run in the background while the caller goes on; a value computed ahead for a later call; an
attribute patched while any thread needs it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Background(Generic[T]):
    """Run ``work()`` on a daemon thread from construction on; :meth:`result` waits for it.

    A daemon thread: a case interrupted (SIGTERM, Ctrl-C) while the work runs does not hold the process past the
    interruption (Grand Challenge's shim gives 5 s between SIGTERM and SIGKILL); the work is simply abandoned.
    """

    def __init__(self, work: Callable[[], T], name: str) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=name, daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], T]) -> None:
        try:
            self._value = work()
        except BaseException as error:  # handed to the caller of result(), raised there
            self._error = error

    def result(self) -> T:
        """The work's return value once it has finished; its exception, re-raised here, when it failed."""
        self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._value


class SharedPatch:
    """An attribute of ``owner`` replaced while any :meth:`applied` block is open, in any thread: the first block to
    open replaces it with ``replacement(original)``, the last to close puts the original back (blocks of different
    threads may close in any order)."""

    def __init__(self, owner: object, name: str, replacement: Callable[[object], object]) -> None:
        self._owner, self._name, self._replacement = owner, name, replacement
        self._lock = threading.Lock()
        self._open = 0
        self._original: object = None

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        with self._lock:
            if self._open == 0:
                self._original = getattr(self._owner, self._name)
                setattr(self._owner, self._name, self._replacement(self._original))
            self._open += 1
        try:
            yield
        finally:
            with self._lock:
                self._open -= 1
                if self._open == 0:
                    setattr(self._owner, self._name, self._original)
                    self._original = None


class ReadAhead(Generic[T]):
    """At most one value computed ahead on a :class:`Background` thread for a key (an input file) that a later call
    :meth:`claim` s: the next case's image read while the current case predicts."""

    def __init__(self) -> None:
        self._pending: tuple[Hashable, Background[T]] | None = None

    def start(self, key: Hashable, work: Callable[[], T], name: str) -> None:
        """Start ``work()`` for ``key``; a value still pending for another key is dropped first (:meth:`claim`)."""
        self.claim(key)
        self._pending = (key, Background(work, name))

    def claim(self, key: Hashable) -> Background[T] | None:
        """The work started for ``key`` (its :meth:`Background.result` waits for it and raises its error), None when
        none was: a value pending for another key is then waited for and dropped, so that it neither competes with
        the caller's own work nor holds its memory. Either way nothing is pending afterwards."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending[0] == key:
            return pending[1]
        with contextlib.suppress(Exception):
            pending[1].result()
        return None
