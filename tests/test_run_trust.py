"""Layer 10, trust: the daemon reads a `uswap run` process only while it is the image its connection's uid may
ptrace, and installs pages only through that image's own uffd (uswap/daemon/procimage.py, docs/SECURITY.md
"Runs").  Issue 18, finding 1 and its variants, as uid 65534 (tests/run_rogue.py) against a setuid-root program
built here that holds a root-only secret in its memory.
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import need_root, run, this_uswap_env
from test_region_hostile import GROUP, socket_dir, tail  # noqa: F401 (socket_dir: a fixture)
from test_run_hostile import AS_NOBODY, NOBODY, ROGUE, field  # noqa: F401 (field: a fixture)

pytestmark = pytest.mark.kernel

HOLDER = r"""
/* Holds a root-only secret: reads argv[1] into 4 MiB of heap, prints "ready", sleeps until killed. */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv)
{
	char secret[64] = { 0 };
	int fd = open(argv[1], O_RDONLY);
	ssize_t n = fd < 0 ? -1 : read(fd, secret, sizeof(secret));
	if (n <= 0)
		return 1;
	size_t len = 4 << 20;
	char *m = malloc(len);
	for (size_t i = 0; i + (size_t)n <= len; i += (size_t)n)
		memcpy(m + i, secret, (size_t)n);
	if (write(1, "ready\n", 6) != 6)
		return 1;
	for (;;)
		pause();
}
"""

AT_PID = r"""
/* at_pid PID PROG ARGS...: runs PROG as a child with pid PID (clone3 set_tid: root in the pid namespace),
 * waits for it, exits with its status. */
#define _GNU_SOURCE
#include <linux/sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv)
{
	pid_t want = (pid_t)atoi(argv[1]);
	struct clone_args args = { .exit_signal = SIGCHLD, .set_tid = (uint64_t)(uintptr_t)&want, .set_tid_size = 1 };
	long pid = syscall(SYS_clone3, &args, sizeof(args));
	if (pid < 0) {
		perror("clone3");
		return 2;
	}
	if (pid == 0) {
		execv(argv[2], argv + 2);
		_exit(127);
	}
	int status;
	waitpid((pid_t)pid, &status, 0);
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
"""


class Suid:
    """A setuid-root holder of a secret (0600 root), in a directory uid 65534 can reach."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="uswap-trust-", dir="/var/tmp")
        os.chmod(self.dir, 0o755)
        self.secret = ("uswap-secret-" + os.urandom(16).hex()).encode()
        self.secret_path = os.path.join(self.dir, "secret")
        fd = os.open(self.secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, self.secret)
        os.close(fd)
        self.holder = self._build("holder", HOLDER)
        os.chmod(self.holder, 0o4755)
        self.at_pid = self._build("at_pid", AT_PID)

    def _build(self, name: str, source: str) -> str:
        src, out = os.path.join(self.dir, f"{name}.c"), os.path.join(self.dir, name)
        with open(src, "w") as f:
            f.write(source)
        run("cc", "-O2", "-Wall", "-Werror", src, "-o", out)
        return out

    @property
    def argv(self) -> list[str]:
        return [self.holder, self.secret_path]


@pytest.fixture(scope="module")
def suid():
    need_root()
    s = Suid()
    try:
        yield s
    finally:
        shutil.rmtree(s.dir)


def rogue(daemon, attack: str, **args) -> subprocess.Popen:
    return subprocess.Popen([*AS_NOBODY, sys.executable, ROGUE, daemon.socket, attack, json.dumps(args)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=this_uswap_env())


def result_of(p: subprocess.Popen, daemon, timeout: float = 30) -> dict:
    """The next JSON line the attacking process prints (its other half may have become the holder)."""
    deadline = time.monotonic() + timeout
    line = ""
    while not line.startswith("{"):
        ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = p.stdout.readline() if ready else ""
        if not line:
            p.kill()
            out, err = p.communicate()
            pytest.fail(f"no result from the rogue: {out}\n{err}\n{tail(daemon.log())}")
    return json.loads(line)


def end(p: subprocess.Popen, pid: int | None = None) -> None:
    """End the holder (root's, started by this test) and reap the rogue."""
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if p.poll() is None:
        p.kill()
    p.communicate(timeout=30)


def wait_log(daemon, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while text not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = daemon.log()
    assert text in log, tail(log)
    return log


def test_a_setuid_program_behind_a_connection_is_never_read(field, suid):
    """Finding 1: P connects, execs the setuid-root holder; its fork C sends HELLO naming P with C's own
    uffd.  The daemon opens P's /proc files and finds a process uid 65534 may not ptrace: READY(-EPERM),
    nothing read, the other clients untouched."""
    f = field("--run-users", f"0,{NOBODY}")
    p = rogue(f.daemon, "setuid_peer", holder=suid.argv)
    try:
        r = result_of(p, f.daemon)
        assert r["holder_owner"] == 0, r               # the holder is root's and undumpable: the attack is set up
        assert r["ready"]["status"] == -errno.EPERM, r
        wait_log(f.daemon, f"pid {r['holder']} may not be read for uid {NOBODY}: its uids")
    finally:
        end(p, p.pid)
    f.check("after a HELLO naming a setuid program")
    f.finish()


def test_a_uffd_of_another_process_is_refused(field):
    """The uffd must be the process's: a nonce copied through a sibling's uffd is not in the peer's memory
    (READY -EPERM); the same HELLO with the process's own uffd is accepted (the control)."""
    f = field("--run-users", f"0,{NOBODY}")
    assert f.rogue("sibling_uffd", own=True)["ready"]["status"] == 0
    r = f.rogue("sibling_uffd")
    assert r["ready"]["status"] == -errno.EPERM, r
    assert "the userfaultfd HELLO carries is not this process's" in f.daemon.log(), tail(f.daemon.log())
    f.check("after a HELLO with a sibling's uffd")
    f.finish()


def test_nothing_of_an_image_exec_made_is_read(socket_dir, uswapd, suid):
    """A served process forks C (which keeps the connection and answers every DROP) and execs the setuid-root
    holder.  The daemon wrote the old image's window out (its mark is in the unsealed store: the control),
    notices the image is gone before its next read, and the secret never reaches the store."""
    daemon = uswapd(socket_dir=socket_dir, resident="16M", store_size="64M",
                    extra=("--group", str(GROUP), "--run-users", f"0,{NOBODY}", "--encrypt", "off"))
    p = rogue(daemon, "exec_after_hello", holder=suid.argv)
    try:
        r = result_of(p, daemon)
        assert r["ready"]["status"] == 0, r
        wait_log(daemon, f"pid {r['holder']} exec'd or exited")
        deadline = time.monotonic() + 10
        while daemon.status()["runs"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemon.status()["runs"] == [], daemon.status()["runs"]
    finally:
        end(p, p.pid)
    with open(daemon.store, "rb") as store:
        data = store.read()
    assert b"rogue-window-pg!" in data          # the old image went out: the grep can see what was written
    assert suid.secret not in data


def test_a_reused_pid_is_not_read(field, suid):
    """P connects and exits; a root process (the holder) gets P's pid; the connection's HELLO names it.
    The daemon refuses (P's pidfd is dead, and uid 65534 may not ptrace the holder)."""
    f = field("--run-users", f"0,{NOBODY}")
    p = rogue(f.daemon, "pid_reused")
    holder = None
    try:
        pid = result_of(p, f.daemon)["pid"]
        holder = subprocess.Popen([suid.at_pid, str(pid), *suid.argv], stdout=subprocess.PIPE)
        assert holder.stdout.readline() == b"ready\n", holder.communicate()
        p.stdin.write("go\n")
        p.stdin.flush()
        r = result_of(p, f.daemon)
        assert r["ready"]["status"] in (-errno.EPERM, -errno.ESRCH), r
        deadline = time.monotonic() + 10      # logged just after READY is sent
        while not re.search(f"pid {pid} (may not be read for uid {NOBODY}|exited during)", f.daemon.log()):
            assert time.monotonic() < deadline, tail(f.daemon.log())
            time.sleep(0.05)
    finally:
        end(p)
        if holder is not None:
            end(holder, pid)
    f.check("after a HELLO naming a reused pid")
    f.finish()
