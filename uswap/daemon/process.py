"""A `uswap daemon` as a child process: started, waited for until it answers, stopped.

Used by `uswap demo` and `uswap bench`, which each run a daemon of their own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from uswap.child import running
from uswap.daemon.status import fetch_status


class DaemonProcess:
    """Context manager: a daemon on ``store`` answering on ``workdir``/uswap.sock, logging to daemon.log."""

    def __init__(self, workdir: str, store: str, *, budget: int, io: str = "sync", readahead: int = 8,
                 cpu: int | None = None, extra: tuple[str, ...] = ()):
        self.socket = os.path.join(workdir, "uswap.sock")
        self.log_path = os.path.join(workdir, "daemon.log")
        self.prefix: list[str] = []   # e.g. nsenter into an NFS server's network namespace (it execs: same PID)
        self.args = [sys.executable, "-m", "uswap", "daemon", "--store", store, "--socket", self.socket,
                     "--resident", str(budget), "--io", io, "--readahead", str(readahead), *extra]
        self.cpu = cpu

    def __enter__(self):
        pin = None if self.cpu is None else (lambda: os.sched_setaffinity(0, {self.cpu}))
        with contextlib.ExitStack() as stack:
            with open(self.log_path, "w") as log:
                self.proc = stack.enter_context(running([*self.prefix, *self.args], stop=_terminate, stdout=log,
                                                        stderr=log, preexec_fn=pin))
            self._wait_until_answering()
            self._stack = stack.pop_all()  # from here on, __exit__ stops it
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                with open(self.log_path) as f:
                    raise OSError(f"uswap daemon exited with {self.proc.returncode}: {f.read().strip()}")
            try:
                fetch_status(self.socket, timeout=1)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM (the daemon gives every page back), then SIGKILL if it will not stop."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
