"""Layer 7: the daemon's C data path to an NFS store (csrc/nfs/uswap_nfs_io.c) against a real nfs-ganesha.

The client runs in the server's network namespace (tests/nfs_io_client.py under nfs.netns_cmd) and calls
uswap._nfs's uswap_nfs_io_* from Python threads (cffi drops the GIL around each call, so the threads'
requests meet in the C service thread); the test kills, freezes and restarts the server meanwhile.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nfs_io_client import PAGE, pages
from test_nfs import mkswap, nfs  # noqa: F401  (nfs: the server fixture)

pytestmark = pytest.mark.kernel

CLIENT = os.path.join(os.path.dirname(__file__), "nfs_io_client.py")
ATTEMPT_S = 5.0   # USWAP_NFS_ATTEMPT_MS


def run_client(server, *args: str, timeout: float = 120) -> dict:
    r = subprocess.run(server.netns_cmd([sys.executable, CLIENT, *args]), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.splitlines()[-1])


class Client:
    """nfs_io_client.py started for a conversation: JSON lines out, command lines in.  A context
    manager: on leaving, a client still running is killed, and its pipes are closed."""

    def __init__(self, server, *args: str):
        self.proc = subprocess.Popen(server.netns_cmd([sys.executable, CLIENT, *args]), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with self.proc:   # closes the pipes, reaps it
            pass

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise AssertionError(f"client exited {self.proc.returncode}: {self.proc.stderr.read()}")
        return json.loads(line)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        """It ends by itself: exit status 0."""
        self.proc.stdin.close()
        self.proc.wait(30)
        assert self.proc.returncode == 0, self.proc.stderr.read()


@pytest.fixture
def store(nfs):  # noqa: F811
    return mkswap(nfs, size="16M")


@pytest.mark.parametrize("commit", ["0", "1"])
def test_round_trip(nfs, store, commit):  # noqa: F811
    """1 to 512 pages (512: more than ganesha's 1 MiB READ/WRITE, split by libnfs) at several offsets."""
    out = run_client(nfs, "round_trip", store, commit)
    assert out["done"] == [1, 1, 8, 32, 256, 512, 33], out
    assert out["reads"] == out["writes"] == 8, out
    assert out["commits"] == (8 if commit == "1" else 0), out
    assert out["write_bytes"] == 4096 * (1 + 1 + 8 + 32 + 256 + 512 + 33) + 100, out
    assert out["connects"] == 1 and out["retries"] == 0 and out["state"] == 1 and not out["last_error"], out
    with open(os.path.join(nfs.export_dir, "store"), "rb") as f:   # on the server's disk, not in a cache
        for count, first in ((1, 0), (8, 17), (256, 1000), (512, 2000)):
            assert os.pread(f.fileno(), count * PAGE, first * PAGE) == pages(first, count, 1), (count, first)


def test_server_errors_return_at_once(nfs, store):  # noqa: F811
    """A short read is -EIO; a WRITE the server refuses (NFS3ERR_FBIG, which libnfs 4.0 reports as -EFAULT,
    like a broken connection) is its own errno at once: not retried, no reconnect."""
    out = run_client(nfs, "server_errors", store)
    assert out["read_past_eof"]["rc"] == -errno.EIO, out
    assert "short transfer" in out["read_past_eof"]["last_error"], out
    assert out["write_too_far"]["rc"] == -errno.EFBIG and out["write_too_far"]["s"] < 1.0, out
    assert "NFS3ERR_FBIG" in out["write_too_far"]["last_error"], out
    assert out["retries"] == 0 and out["connects"] == 1 and out["state"] == 1, out


@pytest.mark.parametrize("commit", ["0", "1"])
def test_threads_share_one_connection(nfs, store, commit):  # noqa: F811
    out = run_client(nfs, "concurrent", store, "8", "4", commit)
    assert out["errors"] == [], out
    assert out["reads"] == out["writes"] == 8 * 8 * 4, out
    assert out["most_in_flight"] > 1, out
    assert out["connects"] == 1, out
    if commit == "1":   # writes answered in the same pass share a COMMIT
        assert 0 < out["commits"] < out["writes"], out
    else:
        assert out["commits"] == 0, out


@pytest.mark.parametrize("commit", ["0", "1"])
def test_server_killed_and_restarted_mid_stream(nfs, store, commit):  # noqa: F811
    with Client(nfs, "stream", store, commit, "8") as client:
        done = 0
        for _ in range(2):
            deadline = time.monotonic() + 60
            while (progress := client.read()["progress"]) < done + 200:
                assert time.monotonic() < deadline, progress
            nfs.kill()
            time.sleep(0.5)              # requests pile up, and reconnects are refused
            nfs.restart()
            done = progress
        deadline = time.monotonic() + 60
        while (progress := client.read()["progress"]) < done + 200:   # it goes on after the last restart
            assert time.monotonic() < deadline, progress
        client.send("stop")
        while "progress" in (out := client.read()):
            pass
        client.finish()
    assert out["errors"] == [], out
    assert out["connects"] >= 3 and out["retries"] >= 1 and out["state"] == 1, out
    assert out["last_error"], out
    if commit == "1":   # one COMMIT covers the writes answered before it
        assert 0 < out["commits"] <= out["writes"], out


def _ganesha_pid(server) -> int:
    with open(os.path.join(server.base_dir, "ganesha.pid")) as f:
        return int(f.read())


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_server_down_longer_than_the_timeout(nfs, store, how):  # noqa: F811
    """Killed: every reconnect is refused until the request's 2 s are up.  Frozen (SIGSTOP): the READ is
    sent and never answered; the attempt ends after 5 s, when the 2 s are long gone."""
    with Client(nfs, "timeout", store, "2000") as client:
        assert client.read() == {"ready": True}
        if how == "killed":
            nfs.kill()
            client.send("go")
            out = client.read()
            nfs.restart()
        else:
            ganesha = _ganesha_pid(nfs)
            os.kill(ganesha, signal.SIGSTOP)
            try:
                client.send("go")
                out = client.read()
            finally:
                os.kill(ganesha, signal.SIGCONT)
        assert client.read() == {"ready": True}
        client.send("go")
        back = client.read()
        client.finish()
    assert out["rc"] == -errno.ETIMEDOUT and out["state"] != 1, out
    if how == "killed":
        assert 1.9 <= out["waited"] <= 2.0 + 1.0, out
        assert "cannot reach NFS server 127.0.0.1" in out["last_error"], out
    else:
        assert ATTEMPT_S - 0.1 <= out["waited"] <= ATTEMPT_S + 1.0, out
        assert "no answer for 5s" in out["last_error"], out
    assert back["recovered"] and back["state"] == 1 and back["connects"] >= 2, back


def test_close_ends_a_wait_on_a_dead_server(nfs, store):  # noqa: F811
    with Client(nfs, "close_while_waiting", store) as client:
        assert client.read() == {"ready": True}
        nfs.kill()
        client.send("go")
        out = client.read()
        client.finish()
    assert out["waiting_before_close"] is True, out
    assert out["rc"] == -errno.ESHUTDOWN, out
    assert out["returned_s"] is not None and out["returned_s"] < 0.5 and out["close_s"] < 0.5, out


def test_open_errors_get_one_line(nfs):  # noqa: F811
    cases = [
        (nfs.url("missing"), errno.ENOENT, "no file /missing in export /export"),
        ("nfs://127.0.0.1/nope/store?version=3", errno.EACCES, "refused to mount /nope (no such export"),
        ("nfs://127.0.0.1/export-squash/store?version=3", errno.EACCES, "cannot open /store for writing"),
    ]
    for url, code, message in cases:
        out = run_client(nfs, "open_error", url)
        assert out["rc"] == -code and message in out["message"] and "\n" not in out["message"], (url, out)
    nfs.kill()
    out = run_client(nfs, "open_error", nfs.url("store"))   # the first connect is not retried
    assert out["rc"] < 0 and "cannot reach NFS server 127.0.0.1 to mount" in out["message"], out
