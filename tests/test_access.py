"""Layer 3: who may use uswap, and whom uswap trusts, with real uids.

Other users are real: processes run as uid 65534 through ``setpriv`` (real
ids, no capabilities, chosen supplementary groups).  The test interpreter
lives under /root (0700, not traversable by others), so each such process
gets a mount namespace of its own in which /root is a 0711 tmpfs holding only
the interpreter's tree: nothing else of root's becomes visible to it.

- Clients hand their memory (memfd) and userfaultfd only to a daemon run by
  root or by themselves (SO_PEERCRED), and never look in /tmp for one.
- A store someone else could read (their file, mode open to others, their
  directory on the way, a symlinked default directory) is refused by check,
  mkswap and the daemon alike.
- Non-root users get in through a group: the daemon's --group for the socket,
  the shipped udev rule for /dev/userfaultfd; without either they are told so.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import pathlib
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import tomllib

import pytest

from conftest import DaemonProcess, build_c, need, need_root, uswap
from uswap.core import PAGE_SIZE

pytestmark = pytest.mark.kernel

NOBODY = 65534
TEST_GID = 64000          # a group no one else has; no /etc/group entry needed
SYSTEM_SOCKET = "/run/uswap/uswap.sock"
MiB = 1 << 20


def as_user(argv: list[str], *, groups: tuple[int, ...] = (), uid: int = NOBODY, gid: int = NOBODY) -> list[str]:
    """``argv`` as uid/gid with exactly ``groups`` as supplementary groups (setpriv)."""
    ids = ["setpriv", "--reuid", str(uid), "--regid", str(gid),
           *(["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"])]
    interpreter = os.path.realpath(sys.executable)
    if not interpreter.startswith("/root/"):
        return [*ids, *argv]
    tree = "/root/" + interpreter.split("/")[2]  # e.g. /root/.pyenv
    # cd into the tree first: after /root is covered, "." still names the real one (to the kernel:
    # mount must not canonicalize it into the path, which by then names the empty tmpfs)
    script = ('cd "$0" && mount -t tmpfs -o mode=0711,size=1m uswap-test /root && mkdir "$0" && '
              'mount --no-canonicalize --bind . "$0" && cd / && exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, tree, *ids, *argv]


def user_env(**extra: str) -> dict:
    """The test's environment without the variables that choose a socket."""
    env = {k: v for k, v in os.environ.items() if k not in ("USWAP_SOCKET", "XDG_RUNTIME_DIR")}
    env.update(extra)
    return env


def run_as(argv: list[str], *, groups: tuple[int, ...] = (), env: dict | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(as_user(argv, groups=groups), capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else user_env(), cwd="/")


def python_as(code: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return run_as([sys.executable, "-c", textwrap.dedent(code), *args], **kw)


@pytest.fixture
def shared_dir():
    """A directory other users may traverse (pytest's tmp_path is 0700): sockets and programs
    they must reach live here.  Owned by root, 0711."""
    need_root()
    need(shutil.which("setpriv") is not None and shutil.which("unshare") is not None,
         "setpriv and unshare (util-linux) are needed to run as another user")
    path = pathlib.Path(tempfile.mkdtemp(prefix="uswap-access-", dir="/tmp"))
    try:
        os.chmod(path, 0o711)
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def nobodys_dir(shared_dir):
    """A directory uid 65534 owns (and may bind sockets in)."""
    path = shared_dir / "nobody"
    path.mkdir(mode=0o755)
    os.chown(path, NOBODY, NOBODY)
    return path


CLIENT_C = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <uswap.h>

/* "default": print the default socket.  Otherwise map 1 MiB, write and read it back. */
int main(int argc, char **argv)
{
	char path[108];
	if (argc > 1 && strcmp(argv[1], "default") == 0) {
		int ret = uswap_default_socket(path, sizeof(path));
		printf("%d %s\n", ret, ret ? "" : path);
		return 0;
	}
	size_t len = 1 << 20;
	unsigned char *p = uswap_map(len);
	if (!p) {
		printf("%d %s\n", errno, uswap_last_error());
		return 1;
	}
	memset(p, 0x5a, len);
	for (size_t i = 0; i < len; i++)
		if (p[i] != 0x5a)
			return 2;
	uswap_unmap(p, len);
	printf("0 mapped\n");
	return 0;
}
"""


@pytest.fixture(scope="module")
def client_c(tmp_path_factory):
    source = tmp_path_factory.mktemp("src") / "access_client.c"
    source.write_text(CLIENT_C)
    return build_c(tmp_path_factory, str(source), "access_client")


# -- finding 5: a client gives its memory only to root's daemon or its own ------------------

LISTENER = r"""
import json, os, select, socket, sys
srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
srv.bind(sys.argv[1])
srv.listen(8)
print("listening as uid", os.getuid(), flush=True)
got = {"connections": 0, "bytes": 0, "fds": 0}
while True:
    ready, _, _ = select.select([srv, sys.stdin], [], [], 60)
    if srv not in ready:  # told to stop (stdin closed) once every queued connection is taken, or timed out
        break
    conn, _ = srv.accept()
    got["connections"] += 1
    with conn:
        conn.settimeout(10)
        data, ancillary, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
        got["bytes"] += len(data)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = [int.from_bytes(payload[i:i + 4], "little") for i in range(0, len(payload) // 4 * 4, 4)]
                got["fds"] += len(fds)
                for fd in fds:
                    os.close(fd)
        # no reply: a client that sent something now sees the connection close
print(json.dumps(got), flush=True)
"""


@contextlib.contextmanager
def fake_daemon(path, *, as_nobody: bool):
    """A SOCK_SEQPACKET listener at ``path`` that counts what clients send it (bytes, fds);
    yields a function that stops it and returns the counts."""
    argv = [sys.executable, "-c", LISTENER, str(path)]
    proc = subprocess.Popen(as_user(argv) if as_nobody else argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        line = proc.stdout.readline()
        assert line == f"listening as uid {NOBODY if as_nobody else 0}\n", line + proc.stderr.read()

        def report() -> dict:
            out, err = proc.communicate(input="", timeout=30)
            assert proc.returncode == 0, err
            return json.loads(out)
        yield report
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_root_client_refuses_a_daemon_run_by_another_user(nobodys_dir, client_c):
    path = nobodys_dir / "uswap.sock"
    refusal = f"refusing the uswap daemon at {path}: it runs as uid {NOBODY}, not root"
    env = user_env(USWAP_SOCKET=str(path))
    with fake_daemon(path, as_nobody=True) as report:
        c = subprocess.run([client_c], capture_output=True, text=True, env=env, timeout=60)
        py = subprocess.run([sys.executable, "-c", "import uswap\ntry:\n    uswap.Region(1 << 20)\n"
                             "except OSError as e:\n    print(e.errno, e.strerror)"],
                            capture_output=True, text=True, env=env, timeout=60)
        status = uswap("status", "--socket", str(path), env=user_env(), timeout=60)
        got = report()
    assert (c.returncode, c.stdout) == (1, f"{errno.EPERM} {refusal}\n"), c.stdout + c.stderr
    assert py.stdout == f"{errno.EPERM} {refusal}\n", py.stdout + py.stderr
    assert status.returncode == 1
    assert f"uswap status: error: {path}: refusing the uswap daemon: it runs as uid {NOBODY}, not root" \
        in status.stderr, status.stderr
    # every client did connect, and none sent a byte or a file descriptor
    assert got == {"connections": 3, "bytes": 0, "fds": 0}


def test_the_fake_daemon_sees_what_a_trusting_client_sends(nobodys_dir, client_c):
    """Negative control: the same listener run by root does get the request and both fds."""
    path = nobodys_dir / "root.sock"
    with fake_daemon(path, as_nobody=False) as report:
        c = subprocess.run([client_c], capture_output=True, text=True, env=user_env(USWAP_SOCKET=str(path)),
                           timeout=60)
        got = report()
    assert c.returncode == 1 and "the daemon closed the connection without a reply" in c.stdout, c.stdout
    assert got == {"connections": 1, "bytes": 32, "fds": 2}


DEFAULT_SOCKET = """
    from uswap._core import ffi, lib
    from uswap.protocol import default_socket_path
    buf = ffi.new("char[]", 108)
    print(lib.uswap_default_socket(buf, len(buf)), ffi.string(buf).decode(), default_socket_path())
"""


def test_default_socket_rule_for_other_users(shared_dir):
    runtime = shared_dir / "runtime"          # an XDG_RUNTIME_DIR with no daemon in it
    runtime.mkdir(mode=0o755)
    served = shared_dir / "served"            # and one with a socket in it
    served.mkdir(mode=0o755)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(str(served / "uswap.sock"))
        cases = [
            ({}, SYSTEM_SOCKET),                                       # never /tmp
            ({"XDG_RUNTIME_DIR": str(runtime)}, SYSTEM_SOCKET),        # no daemon of their own: the system's
            ({"XDG_RUNTIME_DIR": str(served)}, f"{served}/uswap.sock"),
            ({"USWAP_SOCKET": "/elsewhere.sock", "XDG_RUNTIME_DIR": str(served)}, "/elsewhere.sock"),
        ]
        for extra, expected in cases:
            r = python_as(DEFAULT_SOCKET, env=user_env(**extra))
            assert r.stdout == f"0 {expected} {expected}\n", (extra, r.stdout, r.stderr)
        # root's default is the system socket, whatever XDG_RUNTIME_DIR says
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(DEFAULT_SOCKET)], capture_output=True, text=True,
                           env=user_env(XDG_RUNTIME_DIR=str(served)), timeout=60)
        assert r.stdout == f"0 {SYSTEM_SOCKET} {SYSTEM_SOCKET}\n", r.stderr


def test_status_and_daemon_without_xdg_runtime_dir(shared_dir):
    # fetch_status is what `uswap status` asks (which then also lists FUSE mounts: other tests' may exist)
    r = python_as("""
        from uswap.daemon.status import fetch_status
        try:
            fetch_status()
        except OSError as e:
            print(e.filename, e.strerror)
    """)
    assert r.stdout.startswith(f"{SYSTEM_SOCKET} no uswap daemon answers: "), r.stdout + r.stderr
    r = run_as([sys.executable, "-m", "uswap", "daemon", "--store", str(shared_dir / "store")])
    assert r.returncode == 1
    assert r.stderr.strip().endswith("XDG_RUNTIME_DIR is not set, so there is no directory of yours for the "
                                     "socket: say --socket PATH (in a directory only you can write)"), r.stderr
    assert not (shared_dir / "store").exists()


def test_setgid_program_ignores_the_environment(shared_dir, client_c):
    """secure_getenv: in a setgid (secure-execution) program USWAP_SOCKET and XDG_RUNTIME_DIR are the
    caller's and do not count."""
    program = shared_dir / "client"
    shutil.copy(client_c, program)
    served = shared_dir / "served"
    served.mkdir(mode=0o755)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(str(served / "uswap.sock"))
        env = user_env(USWAP_SOCKET="/tmp/evil.sock", XDG_RUNTIME_DIR=str(served))
        os.chmod(program, 0o755)  # negative control: an ordinary program does take them
        assert run_as([str(program), "default"], env=env).stdout == "0 /tmp/evil.sock\n"
        os.chown(program, 0, TEST_GID)
        os.chmod(program, 0o2755)
        r = run_as([str(program), "default"], env=env)
        assert r.stdout == f"0 {SYSTEM_SOCKET}\n", r.stdout + r.stderr


# -- finding 6: a store someone else could read is not served ---------------------------------

def _theirs(path: pathlib.Path) -> str:
    os.chown(path, NOBODY, NOBODY)
    return f"owned by uid {NOBODY} (nobody), not uid 0 (root): its owner could read every swapped page"


def _open_mode(path: pathlib.Path) -> str:
    os.chmod(path, 0o644)
    return "readable or writable by group or others (mode 0644): swapped memory is secret"


def _their_directory(path: pathlib.Path) -> str:
    os.chown(path.parent, NOBODY, NOBODY)
    return f"directory {path.parent} is owned by uid {NOBODY} (nobody), not root: someone else could replace " \
           "the store"


@pytest.mark.parametrize("make_unsafe", [_theirs, _open_mode, _their_directory], ids=["owner", "mode", "directory"])
def test_unsafe_store_is_refused_by_check_and_daemon(tmp_path, make_unsafe):
    need_root()
    store = tmp_path / "d" / "store"
    store.parent.mkdir(mode=0o755)
    assert uswap("mkswap", str(store), "--size", "1M").returncode == 0
    assert uswap("check", str(store)).returncode == 0  # negative control: usable as made
    reason = make_unsafe(store)
    r = uswap("check", str(store))
    assert r.returncode == 1 and "REFUSED" in r.stdout and reason in r.stdout, r.stdout
    sock = tmp_path / "d.sock"
    r = uswap("daemon", "--store", str(store), "--socket", str(sock), timeout=60)
    assert r.returncode == 1
    assert reason in r.stderr and f"uswap daemon: error: {store}: store refused: " in r.stderr, r.stderr
    assert not os.path.lexists(sock)  # nothing served


def _with_own_var_tmp(setup: str, *argv: str, target: pathlib.Path) -> subprocess.CompletedProcess:
    """``argv`` in a mount namespace whose /var/tmp is an empty tmpfs of its own, after the shell
    ``setup`` ($0 is ``target``); the real /var/tmp is never touched."""
    script = f'mount -t tmpfs -o mode=1777,size=1m uswap-test /var/tmp && {setup} && "$@"; ' \
             'stat -c "%A %u" /var/tmp/uswap'
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(target),
                           *argv], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("setup, refusal", [
    ('ln -s "$0" /var/tmp/uswap', "/var/tmp/uswap: is a symlink (to {target}); uswap wants a directory of its own"),
    (f"mkdir -m 0700 /var/tmp/uswap && chown {NOBODY} /var/tmp/uswap",
     f"/var/tmp/uswap: directory is owned by uid {NOBODY} (nobody), not uid 0 (root)"),
    ("mkdir -m 0770 /var/tmp/uswap", "/var/tmp/uswap: directory is writable by group (mode 0770)"),
], ids=["symlink", "owner", "group-writable"])
def test_default_store_directory_must_be_ours(tmp_path, setup, refusal):
    need_root()
    target = tmp_path / "elsewhere"
    target.mkdir()
    r = _with_own_var_tmp(setup, sys.executable, "-m", "uswap", "daemon", "--socket", str(tmp_path / "d.sock"),
                          target=target)
    assert f"uswap daemon: error: {refusal.format(target=target)}" in r.stderr, r.stderr
    assert os.listdir(target) == [] and not os.path.lexists(tmp_path / "d.sock")


def test_default_store_directory_is_created_0700(tmp_path):
    need_root()
    old = os.umask(0)  # whatever the umask
    try:
        r = _with_own_var_tmp("true", sys.executable, "-m", "uswap", "daemon", "--socket", str(tmp_path / "d.sock"),
                              target=tmp_path)
    finally:
        os.umask(old)
    # the directory was accepted; the store is then refused for living on this tmpfs
    assert "tmpfs keeps files in memory" in r.stderr, r.stderr
    assert r.stdout == "drwx------ 0\n"


# -- finding 9: non-root users come in through a group --------------------------------------------

@pytest.fixture
def userfaultfd_for_test_group():
    """/dev/userfaultfd root:TEST_GID 0660, as the shipped udev rule makes it for group uswap;
    owner, group and mode restored at teardown, also on failure."""
    need_root()
    dev = "/dev/userfaultfd"
    need(os.path.exists(dev), "no /dev/userfaultfd (kernel < 6.1)")
    st = os.stat(dev)
    try:
        os.chown(dev, 0, TEST_GID)
        os.chmod(dev, 0o660)
        yield TEST_GID
    finally:
        os.chown(dev, st.st_uid, st.st_gid)
        os.chmod(dev, stat.S_IMODE(st.st_mode))


@pytest.fixture
def group_daemon(shared_dir):
    """A root daemon whose socket members of TEST_GID may use (--group), in a directory others traverse."""
    daemon = DaemonProcess(shared_dir, "group", resident="4M", extra=("--group", str(TEST_GID)))
    try:
        yield daemon.start()
    finally:
        daemon.stop()
        assert "Traceback" not in daemon.log(), daemon.log()


REGION_CLIENT = """
    import json, os, sys
    import numpy, uswap
    size = int(sys.argv[1])
    try:
        region = uswap.Region(size)
    except OSError as e:
        print(json.dumps({"errno": e.errno, "error": e.strerror}))
        sys.exit(0)
    with region:
        a = numpy.frombuffer(region.buffer, dtype=numpy.uint64)
        expected = numpy.arange(a.size, dtype=numpy.uint64) * numpy.uint64(0x9E3779B97F4A7C15)
        a[:] = expected
        mismatches = int(numpy.count_nonzero(a != expected))
        del a
    print(json.dumps({"uid": os.getuid(), "groups": os.getgroups(), "mismatches": mismatches}))
"""


def map_as_nobody(daemon, size: int, groups: tuple[int, ...] = ()) -> dict:
    r = python_as(REGION_CLIENT, str(size), groups=groups, env=user_env(USWAP_SOCKET=daemon.socket),
                  timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_udev_rule_is_shipped():
    r = uswap("config", "--udev-rule")
    assert r.returncode == 0
    rule = pathlib.Path(r.stdout.strip())
    assert rule.name == "60-uswap.rules"
    assert 'KERNEL=="userfaultfd", GROUP="uswap", MODE="0660"' in rule.read_text().splitlines()
    with open(pathlib.Path(__file__).parent.parent / "pyproject.toml", "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["uswap"]
    assert any(fnmatch.fnmatch("data/60-uswap.rules", pattern) for pattern in patterns), patterns


def test_outside_the_group_the_socket_says_who_is_served(group_daemon):
    got = map_as_nobody(group_daemon, MiB)
    assert got == {"errno": errno.EACCES, "error": f"cannot reach the uswap daemon at {group_daemon.socket}: "
                   "permission denied: the daemon serves its own uid and members of its group (uswap by default; "
                   'see README "Who may use uswap")'}
    assert group_daemon.status()["regions"] == []


def test_uswap_run_outside_the_group_says_who_is_served(group_daemon):
    """`uswap run` says what the region client says (not "no uswap daemon answers: Permission denied" alone);
    in the group, the same command reaches the daemon, which refuses runs for 65534 (not in --run-users)."""
    argv = [sys.executable, "-m", "uswap", "run", "--socket", group_daemon.socket, "--", "echo", "ran"]
    r = run_as(argv)
    assert (r.returncode, r.stdout) == (1, ""), r
    assert r.stderr.splitlines() == [
        f"uswap run: error: {group_daemon.socket}: no uswap daemon answers: permission denied: the daemon serves "
        'its own uid and members of its group (uswap by default; see README "Who may use uswap") (the program '
        "would run unbudgeted)"], r.stderr
    r = run_as(argv, groups=(TEST_GID,))       # negative control: connected, then refused by the daemon
    assert (r.returncode, r.stdout) == (1, ""), r
    assert r.stderr.endswith("refused: the daemon does not serve runs for this user (uswap daemon --run-users); "
                             "not running it unbudgeted\n"), r.stderr
    assert group_daemon.status()["runs"] == []


def test_in_the_group_without_userfaultfd_access_the_udev_rule_is_named(group_daemon):
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        need(f.read().strip() == "0", "vm.unprivileged_userfaultfd is not 0: other users may create userfaultfds")
    need(os.stat("/dev/userfaultfd").st_mode & 0o066 == 0, "/dev/userfaultfd is open to group or others here")
    got = map_as_nobody(group_daemon, MiB, groups=(TEST_GID,))
    assert got == {"errno": errno.EPERM, "error": "userfaultfd: Operation not permitted: members of group uswap get "
                   "/dev/userfaultfd through the shipped udev rule (uswap config --udev-rule), or set "
                   "vm.unprivileged_userfaultfd=1"}
    assert group_daemon.status()["regions"] == []


def test_a_group_member_pages_through_the_system_daemon(userfaultfd_for_test_group, group_daemon):
    before = group_daemon.status()["daemon"]
    got = map_as_nobody(group_daemon, 16 * MiB, groups=(TEST_GID,))   # 4x the 4 MiB budget
    assert got == {"uid": NOBODY, "groups": [TEST_GID], "mismatches": 0}
    d = group_daemon.status()["daemon"]
    assert d["pswpout"] - before["pswpout"] >= (16 - 4) * MiB // PAGE_SIZE // 2, d   # it really went to the store
    assert d["pswpin"] > before["pswpin"], d                                    # and came back
    assert group_daemon.status()["regions"] == []
