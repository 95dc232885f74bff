"""Ctrl-C at any moment: child processes are ended and setups undone.

A Ctrl-C that lands while ``subprocess.Popen`` is still waiting for the exec
raises out of ``Popen()`` with the child already running and no ``Popen``
object to end it by: a workload keeps its memcg busy and its pages in a swap
area the bench must take down.  Likewise between creating something (a swap
area, a memcg) and registering its undo.

``interrupts_held`` defers SIGINT and SIGTERM over such a step: their Python
handlers are swapped for one that only records the signal, and the original
handler runs when the step ends, where the caller's cleanup is in place.
(Blocking the signals with a mask would not do: the mask is per thread, and a
signal delivered to another thread, such as rich's refresh thread, still
raises KeyboardInterrupt in the main thread.)  ``running`` does so around
starting a child.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

HELD = (signal.SIGINT, signal.SIGTERM)


def uswap_argv(*args: str) -> list[str]:
    """A `uswap` command as a child process: this interpreter, with -P, so that the
    current directory is not put on sys.path (``python -m`` would otherwise put it
    first, and a source checkout's uswap/, without its built C core, would shadow
    the installed package).  Children that outlive a command also start in "/"."""
    return [sys.executable, "-P", "-m", "uswap", *args]


class _Held:
    """While held, SIGINT and SIGTERM are only recorded; release() restores the
    handlers and re-raises the first one that came, under its own handler."""

    def __init__(self):
        self.caught: list[int] = []
        self.previous: dict = {}

    def hold(self) -> None:
        if threading.current_thread() is threading.main_thread():   # (elsewhere nothing can interrupt us)
            self.previous = {sig: signal.signal(sig, lambda signum, frame: self.caught.append(signum))
                             for sig in HELD}

    def release(self) -> None:
        previous, self.previous = self.previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if self.caught:
            signal.raise_signal(self.caught[0])


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends, and are handled there."""
    held = _Held()
    held.hold()
    try:
        yield
    finally:
        held.release()


@contextlib.contextmanager
def running(cmd: list[str], *, stop: Callable[[subprocess.Popen], None] = subprocess.Popen.kill,
            **popen_kw) -> Iterator[subprocess.Popen]:
    """``Popen(cmd)``; on leaving, a child still running is ended with ``stop`` and reaped."""
    held = _Held()
    held.hold()
    try:
        proc = subprocess.Popen(cmd, **popen_kw)
    except BaseException:
        held.release()
        raise
    try:
        held.release()   # a Ctrl-C that came while the child started is raised here
        yield proc
    finally:
        if proc.poll() is None:
            stop(proc)
        proc.wait()
