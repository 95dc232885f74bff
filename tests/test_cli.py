"""Layer 3: the command line, as a user meets it.

Bad input gets one line naming the problem, a non-zero exit, and leaves what
was on disk exactly as it was.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import trio

from conftest import need_root, store_held_elsewhere, uswap
from uswap import cli
from uswap.core import PAGE_SIZE


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert lines, result
    return lines[-1]


def test_mkswap_then_check(tmp_path):
    path = tmp_path / "store"
    made = uswap("mkswap", str(path), "--size", "1M")
    assert made.returncode == 0, made.stderr
    assert "255 slots of 4K" in made.stdout and "UUID=" in made.stdout
    checked = uswap("check", str(path))
    assert checked.returncode == 0, checked.stdout
    assert checked.stdout.rstrip().endswith("usable")


@pytest.mark.parametrize("size,message", [
    ("4097", "size 4097 is not a whole number of 4K pages"),
    ("4K", "leaves no room for one slot after the header page"),
    ("100T", "not enough free space: need 100T"),
])
def test_mkswap_bad_sizes(tmp_path, size, message):
    r = uswap("mkswap", str(tmp_path / "store"), "--size", size)
    assert r.returncode == 1
    assert message in error_line(r)
    assert error_line(r).startswith("uswap mkswap: error:")
    assert os.listdir(tmp_path) == []


def test_mkswap_unparsable_size(tmp_path):
    r = uswap("mkswap", str(tmp_path / "store"), "--size", "lots")
    assert r.returncode == 2
    assert "not a size: 'lots'" in r.stderr


def test_mkswap_missing_directory(tmp_path):
    r = uswap("mkswap", str(tmp_path / "no" / "store"), "--size", "1M")
    assert r.returncode == 1
    assert f"directory {tmp_path / 'no'} does not exist" in error_line(r)


def test_mkswap_keeps_an_existing_file_unless_forced(tmp_path):
    path = tmp_path / "precious"
    path.write_bytes(os.urandom(3 * PAGE_SIZE))
    before = digest(path)
    r = uswap("mkswap", str(path), "--size", "1M")
    assert r.returncode == 1
    assert "exists and is not a uswap store; use --force to overwrite it" in error_line(r)
    assert digest(path) == before
    forced = uswap("mkswap", str(path), "--size", "1M", "--force")
    assert forced.returncode == 0, forced.stderr
    assert uswap("check", str(path)).returncode == 0
    assert os.listdir(tmp_path) == ["precious"]


def test_mkswap_replaces_an_idle_store(tmp_path):
    path = tmp_path / "store"
    assert uswap("mkswap", str(path), "--size", "1M").returncode == 0
    r = uswap("mkswap", str(path), "--size", "2M")
    assert r.returncode == 0, r.stderr
    assert "511 slots" in r.stdout


def test_mkswap_refuses_a_directory(tmp_path):
    (tmp_path / "d").mkdir()
    r = uswap("mkswap", str(tmp_path / "d"), "--size", "1M", "--force")
    assert r.returncode == 1
    assert "exists and is not a regular file" in error_line(r)


def test_mkswap_on_tmpfs(loopfs):
    mnt = loopfs.mount_memory("tmpfs")
    r = uswap("mkswap", os.path.join(mnt, "store"), "--size", "1M")
    assert r.returncode == 1
    assert "tmpfs keeps files in memory" in error_line(r)
    assert os.listdir(mnt) == []


def test_store_in_use(tmp_path):
    path = tmp_path / "store"
    assert uswap("mkswap", str(path), "--size", "1M").returncode == 0
    before = digest(path)
    with store_held_elsewhere(path) as holder:
        r = uswap("mkswap", str(path), "--size", "1M")
        assert r.returncode == 1
        assert f"store is in use by PID {holder.pid}" in error_line(r)
        c = uswap("check", str(path))
        assert c.returncode == 1
        assert f"in use by PID {holder.pid}" in c.stdout
    assert digest(path) == before


def test_check_missing_file(tmp_path):
    r = uswap("check", str(tmp_path / "nothing"))
    assert r.returncode == 1
    assert "No such file or directory" in error_line(r)


def test_check_refusal_exit_code_and_reasons(tmp_path):
    path = tmp_path / "store"
    path.write_bytes(bytes(4 * PAGE_SIZE))
    path.chmod(0o600)  # only the bad magic is wrong
    os.sync()
    r = uswap("check", str(path))
    assert r.returncode == 1
    assert "REFUSED" in r.stdout and "bad magic" in r.stdout
    assert "not usable (1 problem(s))" in r.stdout


def run_cli_as_nobody(*args: str) -> tuple[int, str]:
    """cli.main in a forked child with uid/gid 65534 (the interpreter under
    /root is not executable for nobody); returns (exit status, stderr)."""
    from uswap import cli
    cli.build_parser()   # imports what parsing needs (argparse's gettext: locale) while the stdlib is readable
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(r)
            sys.stderr = open(w, "w")  # pytest has replaced sys.stderr
            os.setgid(65534)
            os.setuid(65534)
            status = cli.main(list(args))
            sys.stderr.flush()
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def test_check_unreadable_file_as_other_user():
    need_root()
    workdir = tempfile.mkdtemp(dir="/var/tmp", prefix="uswap-test-")
    try:
        os.chmod(workdir, 0o755)
        path = os.path.join(workdir, "store")
        assert uswap("mkswap", path, "--size", "1M").returncode == 0
        status, err = run_cli_as_nobody("check", path)
        assert status == 1
        assert f"uswap check: error: {path}: Permission denied" in err
        status, err = run_cli_as_nobody("mkswap", path, "--size", "1M", "--force")
        assert status == 1
        assert "Permission denied" in err
        assert uswap("check", path).returncode == 0  # untouched
    finally:
        shutil.rmtree(workdir)


def test_interrupted_mkswap_leaves_nothing(tmp_path):
    path = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "uswap", "mkswap", str(path), "--size", "4G"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until it is writing
            names = os.listdir(tmp_path)
            if names and os.path.getsize(tmp_path / names[0]) > 0:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("value", ["0", "257", "-1"])
def test_daemon_refuses_a_writeback_batch_out_of_range(tmp_path, value):
    """Refused before anything is made: no store, no socket, one line naming the range."""
    store, sock = tmp_path / "store", tmp_path / "d.sock"
    r = uswap("daemon", "--store", str(store), "--socket", str(sock), "--writeback-batch", value, timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"uswap daemon: error: --writeback-batch {value} is out of range: give 1 to 256 pages"]
    assert os.listdir(tmp_path) == []


def test_writeback_batch_default_and_range():
    from uswap.daemon.server import MAX_WRITEBACK_BATCH, WRITEBACK_BATCH, writeback_batch
    assert (writeback_batch(None), writeback_batch(1), writeback_batch(256)) == (WRITEBACK_BATCH, 1, 256)
    assert MAX_WRITEBACK_BATCH == 256
    with pytest.raises(ValueError, match="--writeback-batch 300 is out of range"):
        writeback_batch(300)
    # The help states the default without importing the daemon: it must say the constant's value.
    help_text = " ".join(uswap("daemon", "--help").stdout.split())
    assert f"1 to 256 (default {WRITEBACK_BATCH}:" in help_text


# -- uswap daemon and uswap run: every option checked before anything is made ---------------------------------

def _max_budget() -> str:
    from uswap.daemon.options import max_budget
    from uswap.units import format_size_exact
    return format_size_exact(max_budget())


def _nr_open() -> int:
    with open("/proc/sys/fs/nr_open") as f:
        return int(f.read())


RESIDENT_RANGE = "give 256K to {max} (one readahead window to the physical memory)"
COUNT_RANGE = "give {low} to {nr_open} (at most fs.nr_open, the fds a process may hold)"
REFUSED_OPTIONS = [
    (["--resident", "0"], "--resident 0B is out of range: " + RESIDENT_RANGE),
    (["--resident", "128K"], "--resident 128K is out of range: " + RESIDENT_RANGE),
    (["--resident", "99999999T"], "--resident 99999999T is out of range: " + RESIDENT_RANGE),
    (["--readahead", "100000"], "--readahead 100000 is out of range: give 1 to 64 pages (1 is off; at most the "
                                "engine's largest window)"),
    (["--readahead", "0"], "--readahead 0 is out of range: give 1 to 64 pages (1 is off; at most the engine's "
                           "largest window)"),
    (["--writeback-batch", "-1"], "--writeback-batch -1 is out of range: give 1 to 256 pages"),
    (["--fault-threads", "0"], "--fault-threads 0 is out of range: give 1 to 16 (fault threads per region, at most "
                               "the engine's most)"),
    (["--fault-threads", "17"], "--fault-threads 17 is out of range: give 1 to 16 (fault threads per region, at "
                                "most the engine's most)"),
    (["--map-timeout", "0"], "--map-timeout 0 is out of range: give 0.1 to 86400 seconds"),
    (["--map-timeout", "nan"], "--map-timeout nan is out of range: give 0.1 to 86400 seconds"),
    (["--nfs-timeout", "-5"], "--nfs-timeout -5 is out of range: give 0.1 to 86400 seconds"),
    (["--user-max-size", "1K"], "--user-max-size 1K is out of range: give 4K to 131072T (a page to the largest "
                                "user address space)"),
    (["--user-max-regions", "-1"], "--user-max-regions -1 is out of range: " + COUNT_RANGE.replace("{low}", "0")),
    (["--user-max-connections", "0"], "--user-max-connections 0 is out of range: "
                                      + COUNT_RANGE.replace("{low}", "1")),
    (["--user-max-runs", "-2"], "--user-max-runs -2 is out of range: " + COUNT_RANGE.replace("{low}", "0")),
    (["--run-users", "0,,1"], "--run-users '0,,1': an empty item (give uids or user names, comma-separated)"),
    (["--group", "no-such-group-here"], "--group: no group named 'no-such-group-here'"),
]


def refused_daemon(capsys, tmp_path, *args: str, socket: str | None = None) -> str:
    """`uswap daemon` in this process, on a store in a directory that does not exist yet: its one error line.
    Should it accept, it stops at the first thing it would make (the store), not serve inside pytest."""
    from uswap import cli

    def made_a_store(path, *a, **kw):
        raise AssertionError(f"uswap daemon {' '.join(args)} got as far as making its store {path}")
    socket = socket or str(tmp_path / "d.sock")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "ensure_store", made_a_store)
        code = cli.main(["daemon", "--store", str(tmp_path / "new" / "store"), "--socket", socket, *args])
    out, err = capsys.readouterr()
    assert (code, out) == (1, ""), err
    assert err.count("\n") == 1, err
    return err.rstrip("\n")


@pytest.mark.parametrize("args,message", REFUSED_OPTIONS, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_daemon_refuses_an_option_out_of_range_before_making_anything(capsys, tmp_path, args, message):
    """No directory, store, socket or lock for a refused option (a refused --resident made the directory and
    wrote a 1 GiB store first)."""
    expected = message.format(max=_max_budget(), nr_open=_nr_open())
    assert refused_daemon(capsys, tmp_path, *args) == f"uswap daemon: error: {expected}"
    assert os.listdir(tmp_path) == []


def test_daemon_refused_resident_as_a_user_meets_it(tmp_path):
    r = uswap("daemon", "--resident", "0", "--store", str(tmp_path / "new" / "dir" / "x"), "--socket",
              str(tmp_path / "d.sock"), timeout=60)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"uswap daemon: error: --resident 0B is out of range: "
                                     f"{RESIDENT_RANGE.format(max=_max_budget())}"]
    assert os.listdir(tmp_path) == []


def test_daemon_socket_directory_must_exist_and_be_safe(capsys, tmp_path):
    """Only /run/uswap (the default socket's) is ever made; any other socket directory must exist, be safe, and
    hold nothing but a stale socket at the path."""
    missing = tmp_path / "no" / "such" / "d.sock"
    assert refused_daemon(capsys, tmp_path, socket=str(missing)) == (
        f"uswap daemon: error: {missing}: directory {missing.parent} does not exist (the daemon makes only "
        "/run/uswap, for its default socket)")
    assert os.listdir(tmp_path) == []
    long = tmp_path / ("s" * 120)
    assert refused_daemon(capsys, tmp_path, socket=str(long)) == (
        f"uswap daemon: error: {long}: too long for a socket path ({len(str(long))} bytes, at most 107)")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    assert refused_daemon(capsys, tmp_path, socket=str(open_dir / "d.sock")) == (
        f"uswap daemon: error: {open_dir}: directory is writable by group and others (mode 0777): fix with "
        "chmod go-w")
    (tmp_path / "file").write_text("mine\n")
    assert refused_daemon(capsys, tmp_path, socket=str(tmp_path / "file")) == (
        f"uswap daemon: error: {tmp_path / 'file'}: exists and is not a socket")
    assert sorted(os.listdir(tmp_path)) == ["file", "open"]
    assert os.listdir(open_dir) == [] and (tmp_path / "file").read_text() == "mine\n"


def test_daemon_refuses_a_socket_a_daemon_answers_on_before_making_a_store(uswapd, capsys, tmp_path):
    daemon = uswapd()
    before = sorted(os.listdir(tmp_path))
    assert refused_daemon(capsys, tmp_path, socket=daemon.socket) == (
        f"uswap daemon: error: {daemon.socket}: another uswap daemon is listening here")
    assert sorted(os.listdir(tmp_path)) == before            # no new/store
    assert daemon.answers()


def test_daemon_accepts_every_range_at_its_bounds(uswapd):
    """The negative control of the refusals: the smallest budget and the largest window serve (the daemon says
    what it took), and the other bounds start it."""
    daemon = uswapd(resident="256K", readahead=64, extra=(
        "--writeback-batch", "256", "--fault-threads", "16", "--map-timeout", "86400", "--nfs-timeout", "0.1", "--user-max-size", "4K",
        "--user-max-regions", "0", "--user-max-connections", "1", "--user-max-runs", "0"))
    assert "budget 64 pages, sync I/O, readahead 64, 16 fault threads per region, writeback batch 256" in daemon.log()
    d = daemon.status()["daemon"]
    assert (d["budget_pages"], d["readahead"], d["fault_threads"]) == (64, 64, 16)


def test_option_ranges_come_from_the_engine_and_the_help_says_them():
    from uswap._core import lib
    from uswap.daemon import options
    assert options.MAX_READAHEAD == lib.USWAP_MAX_READAHEAD == 64      # csrc/daemon/uswap_engine.h sizes for it
    assert options.MAX_FAULT_THREADS == lib.USWAP_MAX_FAULT_THREADS == 16
    assert options.MIN_BUDGET == 64 * PAGE_SIZE
    help_text = " ".join(uswap("daemon", "--help").stdout.split())
    assert "resident budget, 256K to the physical memory" in help_text
    assert "swap-in window in pages, 1 (off) to 64 (default 32)" in help_text
    from uswap.config import DEFAULTS
    assert f"threads serving each region's faults, 1 to 16 (default {DEFAULTS.fault_threads})" in help_text
    assert "besides root and the daemon's own uid (always served)" in help_text


@pytest.mark.parametrize("resident", ["0", "4K", "99999999T"])
def test_run_refuses_a_budget_out_of_range(tmp_path, resident):
    """Before it looks for a daemon: --resident 0 used to mean "the daemon's budget" silently."""
    from uswap.units import format_size_exact, parse_size
    r = uswap("run", "--resident", resident, "--socket", str(tmp_path / "none.sock"), "--", "echo", "ran",
              timeout=60)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr.splitlines() == [f"uswap run: error: --resident {format_size_exact(parse_size(resident))} is "
                                     f"out of range: {RESIDENT_RANGE.format(max=_max_budget())}"]


def test_run_users_add_to_root_and_the_daemons_uid():
    from uswap.daemon.runpolicy import parse_run_users
    me = os.geteuid()
    assert parse_run_users(None) == {0, me}
    assert parse_run_users("65534") == {0, me, 65534}
    assert parse_run_users("nobody, 1002") == {0, me, 65534, 1002}
    with pytest.raises(ValueError, match="--run-users: no user named 'no-such-user-here'"):
        parse_run_users("0,no-such-user-here")


def raised_in_nested_nurseries(*errors: BaseException) -> BaseException:
    """What trio.run raises when tasks of a nursery inside another raise ``errors`` (strict groups, the
    default since trio 0.25: a group in a group)."""
    async def fail(e):
        raise e

    async def main():
        async with trio.open_nursery() as outer:
            async def inner():
                async with trio.open_nursery() as nursery:
                    for e in errors:
                        nursery.start_soon(fail, e)
            outer.start_soon(inner)
    with pytest.raises(BaseException) as raised:
        trio.run(main, strict_exception_groups=True)
    return raised.value


def test_errors_from_nurseries_are_a_users_and_bugs_stay_whole():
    """cli.main prints a user's errors (USER_ERRORS) one line each however deep in groups they come,
    and re-raises a group holding anything else (test_region_daemon.py::test_socket_and_store_in_use: the
    whole stderr of a second daemon on a socket in use)."""
    from uswap.daemon.server import SocketInUse
    in_use = SocketInUse(errno.EADDRINUSE, "another uswap daemon is listening here", "/run/x.sock")
    group = raised_in_nested_nurseries(in_use)
    assert isinstance(group, BaseExceptionGroup) and isinstance(group.exceptions[0], BaseExceptionGroup)
    assert cli.user_errors(group) == [in_use]
    bad_size = ValueError("--resident: not a size")
    assert set(cli.user_errors(raised_in_nested_nurseries(in_use, bad_size))) == {in_use, bad_size}
    assert cli.user_errors(raised_in_nested_nurseries(in_use, RuntimeError("a bug"))) is None   # negative control
    assert cli.user_errors(RuntimeError("a bug")) is None
    assert cli.user_errors(in_use) == [in_use]
