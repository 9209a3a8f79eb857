"""Threads: one call run in the background while the caller goes on; an attribute patched while any thread needs it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
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
