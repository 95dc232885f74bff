"""Layer 10, hostile: the run protocol of `uswap run` (csrc/preload/uswap_run.h, uswap/daemon/runaccept.py)
against other local users.  Whatever a run's client sends, the daemon stays up, every other client keeps its
data, and it holds no fd nor slot of the client afterwards; and only the uids the operator lists get the daemon's
/dev/userfaultfd fd at all (uswap/daemon/runpolicy.py).  The other way round, the preload gives nothing to a
server of another uid on the socket it is told (tests/run_rogue_server.py; csrc/common/uswap_daemon_peer.c).

The attacks come from uid 65534 (tests/run_rogue.py through setpriv, every capability dropped), allowed to
run with ``--run-users 65534`` or not.  Next to them (``Field``): a root memfd region (8 MiB, numpy,
filled before) and a root `uswap run` program (a list partly swapped out, built before) that both verify
their data at the end; after each attack the daemon answers, serves no run but the good one, uses no slot
but theirs, and has the fds it had before.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import HERE, build_c, need, need_root, this_uswap_env
from test_region_daemon import finish_holder, start_holder
from test_region_hostile import GROUP, settled_fds, socket_dir, tail  # noqa: F401 (socket_dir: a fixture)
from test_run_probes import LIBRUN, PYTHON
from uswap._core import lib
from uswap.child import uswap_argv

pytestmark = pytest.mark.kernel

NOBODY = 65534
# CAP_DAC_READ_SEARCH gets the interpreter started where 65534 cannot search (/root); the rogue drops it
# (and every other capability) first; `uswap run` keeps it, which changes nothing the daemon checks.
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", f"--groups={GROUP}",
             "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
ROGUE = os.path.join(HERE, "run_rogue.py")
EPROTO, EINVAL, EBADF, EPERM, EDQUOT = (-e for e in (errno.EPROTO, errno.EINVAL, errno.EBADF, errno.EPERM,
                                                     errno.EDQUOT))
READY, DEVFD = lib.USWAP_RUN_READY, lib.USWAP_RUN_DEVFD

GOOD_RUN = """
import sys
xs = [x * 7 for x in range(int(sys.argv[1]))]
print("built", flush=True)
sys.stdin.readline()
print("sum", sum(xs) == 7 * sum(range(len(xs))), flush=True)
"""


class Field:
    """A daemon under attack, with a memfd region and a `uswap run` program whose data must come through."""

    def __init__(self, daemon, tmp_path):
        self.daemon = daemon
        self.holder = start_holder(daemon, 8 << 20)
        script = tmp_path / "good.py"
        script.write_text(GOOD_RUN)
        self.good = subprocess.Popen(uswap_argv("run", "--resident", "2M", "--socket", daemon.socket, "--", PYTHON,
                                                str(script), "60000"), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=this_uswap_env())
        if self.good.stdout.readline() != "built\n":
            self.good.kill()
            pytest.fail(f"the good run did not start: {self.good.communicate()[1]}\n{tail(daemon.log())}")
        self.fds = settled_fds(daemon)
        status = daemon.status()
        assert [r["pid"] for r in status["runs"]] == [self.good.pid], status["runs"]
        assert status["runs"][0]["swapped_pages"] > 0, status["runs"]     # its data is partly in the store

    def rogue(self, attack: str, timeout: float = 60, **args) -> dict:
        r = subprocess.run([*AS_NOBODY, sys.executable, ROGUE, self.daemon.socket, attack, json.dumps(args)],
                           capture_output=True, text=True, timeout=timeout, env=this_uswap_env())
        assert r.returncode == 0 and r.stdout, (attack, r.stdout, r.stderr, tail(self.daemon.log()))
        result = json.loads(r.stdout.splitlines()[-1])
        assert result["uid"] == NOBODY
        return result

    def check(self, when: str, timeout: float = 10) -> None:
        """Alive; no run but the good one; every slot in use is the good clients'; the daemon's fds as before."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.daemon.proc.poll() is None, f"the daemon died {when}:\n{tail(self.daemon.log())}"
            s = self.daemon.status()
            d = s["daemon"]
            theirs = sum(r["swapped_pages"] for r in s["regions"]) + d["run_slots"]
            runs = [r["pid"] for r in s["runs"]]
            fds = settled_fds(self.daemon, quiet=0.2, timeout=1)
            if (runs, d["slots_used"], fds) == ([self.good.pid], theirs, self.fds):
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert runs == [self.good.pid], (when, s["runs"])
        assert d["slots_used"] == theirs, (when, "slots used", d["slots_used"], "held by the good clients", theirs)
        assert fds == self.fds, (when, "fds", dict(fds - self.fds), "missing", dict(self.fds - fds))

    def finish(self) -> None:
        code, out, err = finish_holder(self.holder)
        assert (code, out) == (0, "intact\n"), (code, out, err, tail(self.daemon.log()))
        out, err = self.good.communicate("go\n", timeout=60)
        assert (self.good.returncode, out) == (0, "sum True\n"), (self.good.returncode, out, err)
        assert "not budgeted" not in err and "refused" not in err, err
        assert "Traceback" not in self.daemon.log(), self.daemon.log()

    def close(self) -> None:
        for p in (self.holder, self.good):
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.fixture
def field(socket_dir, uswapd, tmp_path):   # socket_dir first: removed after the daemon stops
    need_root()
    need(os.path.exists(LIBRUN), "libuswaprun.so not built (python3 setup.py build_ext --inplace)")
    made: list[Field] = []

    def start(*extra: str) -> Field:
        daemon = uswapd(socket_dir=socket_dir, resident="16M", store_size="64M",
                        extra=("--group", str(GROUP), *extra))
        made.append(Field(daemon, tmp_path))
        return made[-1]
    yield start
    for f in made:
        f.close()


def uswap_run_as_nobody(daemon, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([*AS_NOBODY, *uswap_argv("run", "--socket", daemon.socket, "--", *cmd)],
                          capture_output=True, text=True, timeout=60, env=this_uswap_env())


# -- who gets /dev/userfaultfd --------------------------------------------------------------------------

def test_runs_only_for_the_uids_the_operator_lists(field):
    """Default: only root and the daemon's uid.  65534 is refused before any fd is sent, the log says which uid
    and which option, and `uswap run` exits 1 with one line instead of running the program unbudgeted."""
    f = field()
    r = f.rogue("connect_only")
    assert (r["got"], r.get("op"), r.get("status"), r.get("fds")) == ("msg", READY, EPERM, 0), r
    f.check("after a refused CONNECT")
    ran = uswap_run_as_nobody(f.daemon, PYTHON, "-c", "print('ran')")
    assert ran.returncode == 1 and "ran" not in ran.stdout, ran
    assert ran.stderr.count("\n") == 1, ran.stderr
    assert ran.stderr.endswith("refused: the daemon does not serve runs for this user (uswap daemon --run-users); "
                               "not running it unbudgeted\n"), ran.stderr
    log = f.daemon.log()
    assert f"uid {NOBODY}: run refused: uid {NOBODY} may not start runs" in log and "--run-users" in log, tail(log)
    f.check("after a refused uswap run")
    f.finish()


def test_a_listed_uid_runs_and_a_bad_list_is_refused(field, tmp_path):
    """--run-users adds to root and the daemon's uid: the field's root run is served (Field checks it) next to
    65534's."""
    f = field("--run-users", str(NOBODY))
    r = f.rogue("connect_only")
    assert (r["got"], r.get("op"), r.get("fds")) == ("msg", DEVFD, 1), r       # negative control of the above
    ran = uswap_run_as_nobody(f.daemon, PYTHON, "-c", "print('ran')")
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, "ran\n", ""), ran
    f.check("after a run of 65534")
    f.finish()
    bad = subprocess.run(uswap_argv("daemon", "--store", str(tmp_path / "x.store"), "--socket",
                                    str(tmp_path / "x.sock"), "--run-users", "0,no-such-user-here"),
                         capture_output=True, text=True, timeout=30, env=this_uswap_env())
    assert bad.returncode != 0 and "--run-users: no user named 'no-such-user-here'" in bad.stderr, bad
    assert not os.path.exists(tmp_path / "x.store")          # refused before anything was made


# -- the handshake ------------------------------------------------------------------------------------------

def test_handshake_attacks_end_only_their_connection(field):
    f = field("--run-users", f"0,{NOBODY}", "--map-timeout", "1")
    r = f.rogue("bad_connect")
    for name, got in r.items():
        if name != "uid":
            assert (got["got"], got.get("op"), got.get("status"), got["closed"]) == ("msg", READY, EPROTO, True), \
                (name, got)
    f.check("after bad CONNECTs")
    r = f.rogue("bad_hello")
    refused = {"garbage": EPROTO, "short": EPROTO, "long": EPROTO, "magic": EPROTO, "op": EPROTO,
               "no_fd": EINVAL, "two_fds": EINVAL, "pipe": EBADF, "devfd_itself": EBADF, "api_done": EINVAL,
               "other_pid": EPERM, "no_proof": EINVAL, "proof_unaligned": EINVAL, "proof_unmapped": EINVAL}
    for name, status in refused.items():
        assert (r[name]["got"], r[name].get("op"), r[name].get("status"), r[name]["closed"]) == \
               ("msg", READY, status, True), (name, r[name])
    for name in ("exclude_all", "overflow"):          # accepted: they can only leave their own memory unbudgeted
        assert (r[name]["got"], r[name].get("status")) == ("msg", 0), (name, r[name])
    log = f.daemon.log()
    assert f"uid {NOBODY}, budget 4096 pages, 0 range(s) registered" in log, tail(log)   # exclude_all
    f.check("after bad HELLOs")
    r = f.rogue("hang_up")
    assert r["silent_after_devfd_closed"] and r["waited"] < 5, r        # --map-timeout 1
    assert "no run handshake within 1s" in f.daemon.log()
    f.check("after hang-ups")
    f.finish()


def test_hundreds_of_connects_get_at_most_the_per_uid_runs(field):
    f = field("--run-users", f"0,{NOBODY}")
    r = f.rogue("flood", n=300)
    print(r)
    assert r.pop("devfd") == 16, r                           # --user-max-runs (default 16)
    assert r.pop(f"ready {EDQUOT}", 0) > 0, r                # refused in the run protocol, saying why
    r.pop("uid")
    assert all("connections open" in key for key in r), r  # the rest: --user-max-connections (64)
    f.check("after the flood")
    ran = uswap_run_as_nobody(f.daemon, PYTHON, "-c", "print('ran')")
    assert (ran.returncode, ran.stdout) == (0, "ran\n"), ran      # the uid's runs are back once the flood is gone
    f.check("after a run following the flood")
    f.finish()


# -- the agent lies ---------------------------------------------------------------------------------------

LIES = ("more_bytes", "huge_bytes", "count", "addr", "negative_errno", "short")


def test_an_agent_that_lies_or_never_answers_hurts_only_its_own_run(field):
    """The rogue's run is served through a child's uffd while the rogue answers DROPs: a DROPPED outside what was
    asked ends its run (and only that); a plausible lie (every page "moved") or an honest refusal keeps it, and
    leaks no slot; silence keeps it waiting without holding up anyone else."""
    f = field("--run-users", f"0,{NOBODY}")
    for mode in (*LIES, "claims_all", "ebusy", "silent"):
        r = f.rogue("agent", mode=mode)
        assert r["ready"]["status"] == 0 and r["drops"] >= 1 and r["own_data_intact"], r
        if mode in LIES:
            assert r.get("eof") and r["answered"] == 1, r        # the daemon ended the run at the lie
        elif mode == "silent":
            assert r["drops"] == 1 and not r.get("eof"), r      # it waits; nobody else does (check below)
        else:
            assert r["drops"] >= 2 and not r.get("eof"), r
        f.check(f"after an agent answering {mode}")
    log = f.daemon.log()
    assert "DROPPED answers 100 spans" in log or "DROPPED answers 17 spans" in log, tail(log)
    f.finish()


def test_a_peer_that_died_is_told_from_one_that_lives(tmp_path):
    """accept_run opens /proc/PID/{mem,pagemap} by pid, then asks whether the peer is still alive (its pidfd,
    SO_PEERPIDFD): alive now means the pid was its own when opened; dead (reaped) means the pid may be another
    process's by now (pid reuse), and the run is refused."""
    import socket
    from uswap.daemon.runaccept import peer_alive
    path = str(tmp_path / "peer.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(path)
        listener.listen(1)
        child = subprocess.Popen([sys.executable, "-c", f"import socket, sys\ns = socket.socket(socket.AF_UNIX, "
                                  f"socket.SOCK_SEQPACKET)\ns.connect({path!r})\nsys.stdin.read()"],
                                 stdin=subprocess.PIPE)
        conn, _ = listener.accept()
        with conn:
            assert peer_alive(conn)
            child.stdin.close()
            child.wait(10)                       # exited and reaped: its pid is free for anyone
            assert not peer_alive(conn)


def test_a_daemon_without_dev_userfaultfd_refuses_runs_saying_why(uswapd, tmp_path):
    """As under uswap.service's PrivateDevices=yes (a /dev of pseudo-devices only, emulated here with a mount
    namespace): every run is refused with a reason in the log, and the program exits 1 saying so; without the
    device the daemon used to drop the connection with only "connection lost" in its log."""
    need_root()
    need(os.path.exists(LIBRUN), "libuswaprun.so not built (python3 setup.py build_ext --inplace)")
    old = tmp_path / "olddev"
    old.mkdir()
    private_dev = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   f'mount --bind /dev {old} && mount -t tmpfs -o mode=755 tmpfs /dev && for n in null zero full '
                   f'random urandom tty; do touch /dev/$n; mount --bind {old}/$n /dev/$n; done; umount -l {old}; '
                   'exec "$@"', "sh"]
    daemon = uswapd("nodev", resident="16M", store_size="16M", prefix=tuple(private_dev))
    assert not os.path.exists(f"/proc/{daemon.proc.pid}/root/dev/userfaultfd")
    r = subprocess.run(uswap_argv("run", "--socket", daemon.socket, "--", PYTHON, "-c", "print('ran')"),
                       capture_output=True, text=True, timeout=60, env=this_uswap_env())
    assert r.returncode == 1 and r.stdout == "", r
    assert r.stderr.endswith("refused: the daemon refused the run (No such file or directory): its log says why; "
                             "not running it unbudgeted\n"), r.stderr
    deadline = time.monotonic() + 5           # the reason is logged just after READY is sent
    while "cannot open /dev/userfaultfd" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "run refused: the daemon cannot open /dev/userfaultfd: No such file or directory" in daemon.log()


# -- whom the preload trusts: root or its own uid (csrc/common/uswap_daemon_peer.c, shared with libuswap.so) -----------

ROGUE_SERVER = os.path.join(HERE, "run_rogue_server.py")
ECHO = "/bin/echo"       # dynamically linked: preloadable (a shell's builtin echo would never load the preload)
AS_ANOTHER = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]   # no capability at all
CONNECT, HELLO = lib.USWAP_RUN_CONNECT, lib.USWAP_RUN_HELLO
REFUSED_EXIT = 1          # USWAP_RUN_REFUSED_EXIT (csrc/preload/uswap_run.h, outside the cdef)
NOTHING = {"bytes": 0, "ops": [], "fds": 0, "uffds": 0}


class RunServer:
    """tests/run_rogue_server.py at ``path``, listening as ``uid`` with /dev/userfaultfd in hand."""

    def __init__(self, path: str, uid: int):
        self.path = path
        self.proc = subprocess.Popen([sys.executable, ROGUE_SERVER, path, str(uid)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=this_uswap_env())
        line = self.proc.stdout.readline()
        if line != f"listening as uid {uid}\n":
            self.close()
            pytest.fail(f"the test server did not start: {line!r} {self.proc.stderr.read()}")

    def report(self) -> dict:
        """What it received, once every connection made so far is taken."""
        out, err = self.proc.communicate(input="", timeout=30)
        assert self.proc.returncode == 0 and "Traceback" not in err, err
        return json.loads(out)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def run_server(socket_dir):
    """run_server(uid, name) -> RunServer on ``socket_dir/name.sock`` (a directory every uid may traverse)."""
    need_root()
    need(os.path.exists(LIBRUN), "libuswaprun.so not built (python3 setup.py build_ext --inplace)")
    made: list[RunServer] = []

    def start(uid: int, name: str) -> RunServer:
        made.append(RunServer(os.path.join(socket_dir, f"{name}.sock"), uid))
        return made[-1]
    yield start
    for server in made:
        server.close()


def preloaded(path: str, *cmd: str, required: bool, prefix=()) -> subprocess.CompletedProcess:
    """cmd with the preload library and USWAP_RUN_SOCKET set by hand (as `uswap run` would, without its probe);
    through ``env`` after ``prefix``, so that setpriv itself is not preloaded."""
    variables = [f"LD_PRELOAD={LIBRUN}", f"USWAP_RUN_SOCKET={path}", *(["USWAP_RUN_REQUIRED=1"] if required else [])]
    return subprocess.run([*prefix, "env", *variables, *cmd], capture_output=True, text=True, timeout=60, env=this_uswap_env())


def test_uswap_run_gives_nothing_to_a_server_of_another_uid(run_server):
    """A server of uid 65534 on the socket given to root's `uswap run` used to get CONNECT, then root's
    userfaultfd in HELLO.  Now the preload checks SO_PEERCRED before it sends a byte: the run is refused naming the
    socket and the uid, the program does not run under USWAP_RUN_REQUIRED (what `uswap run` sets) and runs
    unbudgeted without it; the server received no byte and no fd.  A program of uid 65534 refuses uid 65533's."""
    rogue, third = run_server(NOBODY, "rogue"), run_server(NOBODY - 1, "third")
    refusal = f"refusing the uswap daemon at {rogue.path}: it runs as uid {NOBODY}, not root"
    r = subprocess.run(uswap_argv("run", "--socket", rogue.path, "--", ECHO, "ran"), capture_output=True, text=True,
                       timeout=60, env=this_uswap_env())
    assert (r.returncode, r.stdout) == (REFUSED_EXIT, ""), r
    assert r.stderr.count("\n") == 1 and r.stderr.endswith(f"refused: {refusal}; not running it unbudgeted\n"), r
    required = preloaded(rogue.path, ECHO, "ran", required=True)
    assert (required.returncode, required.stdout) == (REFUSED_EXIT, ""), required
    assert required.stderr.count("\n") == 1 and required.stderr.endswith(f"refused: {refusal}; not running it "
                                                                         "unbudgeted\n"), required
    free = preloaded(rogue.path, ECHO, "ran", required=False)
    assert (free.returncode, free.stdout) == (0, "ran\n"), free
    assert free.stderr.count("\n") == 1 and free.stderr.endswith(f"not budgeted: {refusal}\n"), free
    theirs = preloaded(third.path, ECHO, "ran", required=True, prefix=AS_ANOTHER)
    assert (theirs.returncode, theirs.stdout) == (REFUSED_EXIT, ""), theirs
    assert theirs.stderr.endswith(f"refused: refusing the uswap daemon at {third.path}: it runs as uid {NOBODY - 1}, "
                                  f"not root or uid {NOBODY} (you); not running it unbudgeted\n"), theirs
    # `uswap run`'s probe (it sends nothing) and three preloads connected; none sent anything
    assert rogue.report() == {"connections": 4, **NOTHING}
    assert third.report() == {"connections": 1, **NOTHING}


def test_uswap_run_talks_to_a_server_of_root_or_its_own_uid(run_server):
    """Negative control of the above, same server: run by root (for root's program) or by the program's own uid
    (65534), it gets CONNECT and then the process's userfaultfd in HELLO; it never answers READY, so the run
    fails after the check, saying so."""
    root, own = run_server(0, "root"), run_server(NOBODY, "own")
    r = subprocess.run(uswap_argv("run", "--socket", root.path, "--", ECHO, "ran"), capture_output=True, text=True,
                       timeout=60, env=this_uswap_env())
    assert (r.returncode, r.stdout) == (REFUSED_EXIT, ""), r
    assert r.stderr.endswith("refused: Protocol error; not running it unbudgeted\n"), r
    mine = preloaded(own.path, ECHO, "ran", required=False, prefix=AS_ANOTHER)
    assert (mine.returncode, mine.stdout) == (0, "ran\n"), mine
    assert mine.stderr.endswith("not budgeted: Protocol error\n"), mine
    from uswap.daemon.runproto import MSG_SIZE
    handed = {"bytes": 2 * MSG_SIZE, "ops": [CONNECT, HELLO], "fds": 1, "uffds": 1}
    assert root.report() == {"connections": 2, **handed}
    assert own.report() == {"connections": 1, **handed}


FORKS_TWICE = """
import os, sys
for _ in range(2):
    sys.stdin.readline()
    pid = os.fork()
    if pid == 0:
        print("child ran", flush=True)
        os._exit(0)
    print("child exit", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def test_a_fork_child_checks_the_server_again(run_server, uswapd, socket_dir, tmp_path):
    """Every connection is checked, a fork child's too (the atfork handler connects again, by path): the run's
    socket is a symlink to the daemon, turned to another uid's server between two forks.  The first child is
    served as usual; the second is refused before it sends anything, and under USWAP_RUN_REQUIRED exits
    USWAP_RUN_REFUSED_EXIT instead of running; the daemon ends the child's run and stays clean."""
    daemon = uswapd("forks", resident="16M", store_size="64M", socket_dir=socket_dir)
    rogue = run_server(NOBODY, "rogue")
    link = os.path.join(socket_dir, "run.sock")
    os.symlink(daemon.socket, link)
    script = tmp_path / "forks.py"
    script.write_text(FORKS_TWICE)
    p = subprocess.Popen(uswap_argv("run", "--socket", link, "--", PYTHON, str(script)), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=this_uswap_env())
    try:
        p.stdin.write("\n")
        p.stdin.flush()
        assert [p.stdout.readline(), p.stdout.readline()] == ["child ran\n", "child exit 0\n"]
        os.symlink(rogue.path, link + ".new")
        os.replace(link + ".new", link)
        out, err = p.communicate("\n", timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert (p.returncode, out) == (0, f"child exit {REFUSED_EXIT}\n"), (out, err)
    assert err.count("\n") == 1 and err.endswith(f"refused: refusing the uswap daemon at {link}: it runs as uid "
                                                  f"{NOBODY}, not root; not running it unbudgeted\n"), err
    assert rogue.report() == {"connections": 1, **NOTHING}
    deadline = time.monotonic() + 10
    while daemon.status()["runs"]:
        assert time.monotonic() < deadline, ("the daemon kept a run", daemon.status()["runs"], tail(daemon.log()))
        time.sleep(0.05)
    assert daemon.status()["daemon"]["slots_used"] == 0


LOADS_THE_PRELOAD = r"""
#include <dlfcn.h>
#include <stdio.h>

int main(int argc, char **argv)
{
	printf("%s\n", dlopen(argv[1], RTLD_NOW) ? "loaded" : dlerror());
	return 0;
}
"""


def test_a_setgid_program_takes_no_socket_from_the_environment(run_server, socket_dir, tmp_path_factory):
    """secure_getenv: in a secure-execution program USWAP_RUN_SOCKET is the caller's and does not count (the
    loader ignores LD_PRELOAD there, so the library comes in by dlopen).  Negative control: the same program,
    not setgid, takes it and talks to the (root's, trusted) server."""
    root = run_server(0, "root")
    source = tmp_path_factory.mktemp("src") / "loads.c"
    source.write_text(LOADS_THE_PRELOAD)
    program = os.path.join(socket_dir, "loads")
    shutil.copy(build_c(tmp_path_factory, str(source), "loads"), program)
    variables = ["env", f"USWAP_RUN_SOCKET={root.path}", "USWAP_RUN_REQUIRED=1"]
    os.chmod(program, 0o755)
    plain = subprocess.run([*AS_ANOTHER, *variables, program, LIBRUN], capture_output=True, text=True, timeout=60)
    assert (plain.returncode, plain.stdout) == (REFUSED_EXIT, ""), plain        # it connected, and was let down
    os.chown(program, 0, GROUP)
    os.chmod(program, 0o2755)
    setgid = subprocess.run([*AS_ANOTHER, *variables, program, LIBRUN], capture_output=True, text=True, timeout=60)
    assert (setgid.returncode, setgid.stdout, setgid.stderr) == (0, "loaded\n", ""), setgid
    assert root.report()["ops"] == [CONNECT, HELLO]                              # the plain program's only


# -- fork children ----------------------------------------------------------------------------------------

def usage(daemon) -> dict:
    """The daemon's threads, fds and locked memory (VmLck, KiB) now."""
    with open(f"/proc/{daemon.proc.pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {"threads": int(fields["Threads"]), "fds": len(daemon.open_fds()),
            "locked_kib": int(fields["VmLck"].split()[0])}


@pytest.fixture(scope="module")
def run_forks(tmp_path_factory):
    """tests/c/run_forks.c, where 65534 can run it."""
    out = tmp_path_factory.mktemp("forks") / "run_forks"
    subprocess.run(["cc", "-O2", "-Wall", "-Werror", os.path.join(HERE, "c", "run_forks.c"), "-o", str(out)],
                   check=True)
    os.chmod(out.parent, 0o755)
    return str(out)


def forks(daemon, run_forks, n: int, how: str, *, as_nobody: bool = True, peak=None) -> tuple[str, str]:
    """run_forks (8 MiB, 6 of them swapped out) under `uswap run`: ``n`` children, all alive when ``peak`` is
    called, then each verifies what it inherited; (stdout, stderr)."""
    p = subprocess.Popen([*(AS_NOBODY if as_nobody else ()), *uswap_argv(
        "run", "--resident", "2M", "--socket", daemon.socket, "--", run_forks, "8", str(n), how)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=this_uswap_env())
    try:
        assert p.stdout.readline() == f"forked {n}\n", p.communicate(timeout=30)
        if peak is not None:
            peak()
        out, err = p.communicate("go\n", timeout=240)   # a hang guard: 300 children take ~60 s on 2 busy vCPUs
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0 and out.endswith("parent ok\n"), (p.returncode, out, err)
    return out, err


MAX_RUNS = 8                 # --user-max-runs below; runpolicy's cost of one process:
PROCESS_FDS, PROCESS_KIB = 7, 600


@pytest.fixture
def fork_daemon(socket_dir, uswapd):
    """A daemon that serves 65534 at most MAX_RUNS run processes, and a check that it is back where it was (no run,
    the fds it had)."""
    need_root()
    need(os.path.exists(LIBRUN), "libuswaprun.so not built (python3 setup.py build_ext --inplace)")
    daemon = uswapd(socket_dir=socket_dir, resident="16M", store_size="64M",
                    extra=("--group", str(GROUP), "--run-users", f"0,{NOBODY}", "--user-max-runs", str(MAX_RUNS)))
    fds = settled_fds(daemon)

    def back(when: str) -> None:
        deadline = time.monotonic() + 10
        while daemon.status()["runs"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemon.status()["runs"] == [], when
        assert settled_fds(daemon) == fds, when
    daemon.back = back
    return daemon


def test_fork_children_count_against_the_uid(fork_daemon, run_forks):
    """Issue 18, finding 3: 300 raw forks (SYS_fork: no agent, no CONNECT) of a run of 65534.  The daemon serves
    --user-max-runs processes of the uid, fork children included (the parent and 7 children); its threads, fds
    and locked memory grow by what those cost, and are back where they were once the children are gone.  The
    children it refused run on: every one that reads a page swapped out before the fork gets SIGBUS, none reads
    a wrong word; the refusal is logged, not once per child."""
    d = fork_daemon
    before = usage(d)
    peak = {}
    started = time.monotonic()
    out, err = forks(d, run_forks, 300, "raw", peak=lambda: (time.sleep(0.5), peak.update(usage(d))))
    took = time.monotonic() - started
    assert out == f"ok {MAX_RUNS - 1} bad 0 sigbus {300 - MAX_RUNS + 1} other 0\nparent ok\n", (out, err)
    assert peak["threads"] <= before["threads"] + MAX_RUNS, (before, peak)
    assert peak["fds"] <= before["fds"] + MAX_RUNS * PROCESS_FDS, (before, peak)
    # one run's eviction buffer (4 MiB) and the children's page tables (16 bytes a page) besides
    assert peak["locked_kib"] <= before["locked_kib"] + MAX_RUNS * PROCESS_KIB + 6 * 1024, (before, peak)
    log = d.log()
    told = log.count("a fork child is not served (uid 65534 has")
    assert 1 <= told <= 1 + took, (told, took, tail(log))
    assert f"the limit (--user-max-runs {MAX_RUNS})): it runs unbudgeted, and its " in log, tail(log)
    d.back("after 300 forks")           # no run, no slot, the fds it had
    after = usage(d)
    assert after["threads"] == before["threads"], (before, after)
    assert after["locked_kib"] <= before["locked_kib"] + 2048, (before, peak, after)   # Python's heap


def test_a_refused_fork_child_is_told_and_the_daemons_uid_is_not_bounded(fork_daemon, run_forks):
    """libc fork(): the preload's atfork handler connects each child.  One whose fork the daemon did not serve is
    refused at its CONNECT and says so on stderr, once; it runs unbudgeted and gets SIGBUS on a page swapped out
    before its fork, never a wrong word.  Negative control: root's (the daemon's uid) forks are all served."""
    d = fork_daemon
    out, err = forks(d, run_forks, 12, "libc")
    assert out == f"ok {MAX_RUNS - 1} bad 0 sigbus {12 - MAX_RUNS + 1} other 0\nparent ok\n", (out, err)
    told = [line for line in err.splitlines() if line]
    assert len(told) == 12 - MAX_RUNS + 1, err
    assert all(line.endswith("this child is not served (its fork is over a bound: uswap daemon --user-max-runs, "
                             "--max-run-processes): it runs unbudgeted; a page swapped out before the fork gives "
                             "SIGBUS") for line in told), err
    assert "its fork was not served (uid 65534 has" in d.log(), tail(d.log())
    d.back("after refused libc forks")
    out, err = forks(d, run_forks, 12, "libc", as_nobody=False)
    assert (out, err) == ("ok 12 bad 0 sigbus 0 other 0\nparent ok\n", ""), (out, err)
    d.back("after root's forks")



def test_every_fork_child_served_gives_every_slot_back(socket_dir, uswapd, run_forks):
    """Raw forks of a parent being evicted, every child served (a bound far above them): each child reads every
    page it inherited (swapped-out ones from the parent's slots, one more reference each) and exits while the
    parent and its siblings go on.  Once the run has ended no slot is left, in any round (a child's last swap-ins,
    its table and the parent's at their releases; fork events the ring still held)."""
    need_root()
    need(os.path.exists(LIBRUN), "libuswaprun.so not built (python3 setup.py build_ext --inplace)")
    d = uswapd(socket_dir=socket_dir, resident="16M", store_size="64M",
               extra=("--group", str(GROUP), "--run-users", f"0,{NOBODY}", "--user-max-runs", "1000"))
    for round in range(2):
        out, err = forks(d, run_forks, 300, "raw")
        assert out == "ok 300 bad 0 sigbus 0 other 0\nparent ok\n", (round, out, err)
        deadline = time.monotonic() + 10
        while d.status()["runs"] and time.monotonic() < deadline:
            time.sleep(0.05)
        s = d.status()
        assert s["runs"] == [], (round, s["runs"])
        assert (s["daemon"]["slots_used"], s["daemon"]["run_slots"]) == (0, 0), (round, s["daemon"])
