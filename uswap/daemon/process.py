"""A `uswap daemon` as a child process: started, ready when it says so, stopped.

The one launcher for `uswap demo`, `uswap bench` and the test suite.  It
supervises the daemon the way systemd does (``Type=notify``): it listens on a
datagram socket of its own, passes it as ``$NOTIFY_SOCKET``, and the daemon is
ready when READY=1 arrives from the daemon's PID (uswap.daemon.notify; sent
once the socket is bound and listening), not when some probe happens to work.

The child cannot be shadowed (uswap.child.uswap_argv: ``python -P``, started
in "/", so it holds no directory busy); paths given to it are made absolute.
Flags left as None are the daemon's own defaults (uswap.config.DEFAULTS).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time

from uswap.child import running, uswap_argv
from uswap.config import DEFAULTS
from uswap.daemon.notify import ENV as NOTIFY_ENV
from uswap.daemon.status import fetch_status
from uswap.nfs.url import is_nfs_url

_UCRED = struct.Struct("3i")  # pid, uid, gid (SCM_CREDENTIALS)


class DaemonDidNotStop(OSError):
    """The daemon outlived SIGTERM's timeout and was killed (SIGKILL)."""


class DaemonProcess:
    """Context manager (or start()/stop()): a daemon on ``store`` listening on ``socket``, logging to ``log_path``.

    ``prefix`` runs before the interpreter and must exec it (same PID), e.g.
    nsenter into an NFS server's network namespace; ``cpu`` pins the daemon."""

    def __init__(self, store: str, socket_path: str, log_path: str, *, budget: int | str | None = None,
                 io: str | None = None, readahead: int | None = None, extra: tuple[str, ...] = (),
                 prefix: tuple[str, ...] | list[str] = (), cpu: int | None = None,
                 start_timeout: float = DEFAULTS.start_timeout_s, stop_timeout: float = DEFAULTS.stop_timeout_s):
        self.store = store if is_nfs_url(store) else os.path.abspath(store)
        self.socket = os.path.abspath(socket_path)
        self.log_path = os.path.abspath(log_path)
        args = ["--store", self.store, "--socket", self.socket]
        for flag, value in (("--resident", budget), ("--io", io), ("--readahead", readahead)):
            if value is not None:
                args += [flag, str(value)]
        self.args = [*args, *extra]
        self.prefix = list(prefix)
        self.cpu = cpu
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen | None = None
        self._running = None        # the uswap.child.running context
        self._notify_dir: str | None = None
        self._listener: socket.socket | None = None   # open while the daemon runs: it says STOPPING=1 too

    # -- starting ------------------------------------------------------------------------

    def start(self) -> "DaemonProcess":
        """Start the daemon and return once it said READY=1; OSError with its log if it exits or stays silent."""
        self._notify_dir = tempfile.mkdtemp(prefix="uswap-notify-")
        address = os.path.join(self._notify_dir, "notify")
        self._listener = listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(address)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            pin = None if self.cpu is None else (lambda: os.sched_setaffinity(0, {self.cpu}))
            with open(self.log_path, "w") as log:
                self._running = running([*self.prefix, *uswap_argv("daemon", *self.args)], stop=self._terminate,
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd="/",
                                        env={**os.environ, NOTIFY_ENV: address}, preexec_fn=pin)
                self.proc = self._running.__enter__()
            self._wait_ready(listener)
        except BaseException:
            self._close()
            raise
        return self

    def _wait_ready(self, listener: socket.socket) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise OSError(f"uswap daemon exited with {self.proc.returncode} before it was ready: "
                              f"{self._last_line()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise OSError(f"uswap daemon did not say READY=1 within {self.start_timeout:g} s: {self._last_line()}")
            listener.settimeout(min(left, 0.1))
            try:
                data, ancdata, _, _ = listener.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except TimeoutError:
                continue
            sender = next((_UCRED.unpack(d[:_UCRED.size])[0] for level, kind, d in ancdata
                           if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)
            if sender == self.proc.pid and b"READY=1" in data.split(b"\n"):
                return

    # -- stopping ------------------------------------------------------------------------

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int:
        """Send ``sig`` and wait for the exit (SIGTERM: every page is given back first); its exit status.
        DaemonDidNotStop (after SIGKILL) if it is still running after ``timeout``."""
        if self.proc is None:
            return 0
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(self.stop_timeout if timeout is None else timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    raise DaemonDidNotStop(f"uswap daemon ignored {signal.Signals(sig).name} for "
                                           f"{self.stop_timeout if timeout is None else timeout:g} s and was killed: "
                                           f"{self._last_line()}") from None
            return self.proc.returncode
        finally:
            self._close()

    def _terminate(self, proc: subprocess.Popen) -> None:
        """How uswap.child.running ends a daemon still running when the context is left by an exception."""
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()

    def _close(self) -> None:
        if self._running is not None:
            running_, self._running = self._running, None
            running_.__exit__(None, None, None)   # reaps the child (ends it first if it still runs)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._notify_dir is not None:
            shutil.rmtree(self._notify_dir, ignore_errors=True)
            self._notify_dir = None

    def __enter__(self) -> "DaemonProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- while it runs -------------------------------------------------------------------

    def status(self) -> dict:
        return fetch_status(self.socket)

    def env(self, **extra: str) -> dict:
        """The environment for a client of this daemon."""
        return {**os.environ, "USWAP_SOCKET": self.socket, **extra}

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def _last_line(self) -> str:
        lines = [line for line in self.log().splitlines() if line.strip()]
        return lines[-1] if lines else "(nothing in its log)"
