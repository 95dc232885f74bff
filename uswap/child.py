"""Ctrl-C at any moment: child processes are ended and setups undone.

A Ctrl-C that lands while ``subprocess.Popen`` is still waiting for the exec
raises out of ``Popen()`` with the child already running and no ``Popen``
object to end it by: a workload keeps its memcg busy and its pages in a swap
area the bench must take down.  Likewise between creating something (a swap
area, a memcg) and registering its undo.  ``interrupts_held`` holds SIGINT and
SIGTERM over such a step and lets them in when it ends, where the caller's
cleanup is in place; ``running`` does so around starting a child.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Callable, Iterator

HELD = {signal.SIGINT, signal.SIGTERM}


def kill(proc: subprocess.Popen) -> None:
    proc.kill()


def unhold_interrupts() -> None:
    """For a long-lived child started while interrupts are held: it must get its SIGTERM."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends, and are raised there."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


@contextlib.contextmanager
def running(cmd: list[str], *, stop: Callable[[subprocess.Popen], None] = kill,
            preexec_fn: Callable[[], None] | None = None, **popen_kw) -> Iterator[subprocess.Popen]:
    """``Popen(cmd)``; on leaving, a child still running is ended with ``stop`` and reaped."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)

    def child_setup() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # the child must not inherit the hold
        if preexec_fn is not None:
            preexec_fn()

    try:
        proc = subprocess.Popen(cmd, preexec_fn=child_setup, **popen_kw)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # a Ctrl-C held meanwhile is raised here
        yield proc
    finally:
        if proc.poll() is None:
            stop(proc)
        proc.wait()
