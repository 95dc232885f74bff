"""Layer 10, hostile: the run protocol of `uswap run` (csrc/uswap_run.h, uswap/daemon/runs.py) against other
local users.  Whatever a run's client sends, the daemon stays up, every other client keeps its data, and it
holds no fd nor slot of the client afterwards; and only the uids the operator lists get the daemon's
/dev/userfaultfd fd at all (uswap/daemon/runpolicy.py).

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
import subprocess
import sys
import time

import pytest

from conftest import HERE, need, need_root, this_uswap_env
from test_t4_daemon import finish_holder, start_holder
from test_t8_hostile import GROUP, settled_fds, socket_dir, tail  # noqa: F401 (socket_dir: a fixture)
from test_t10_run_probes import LIBRUN, PYTHON
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
    f = field("--run-users", f"root,{NOBODY}")
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
               "other_pid": EPERM}
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
    assert "DROPPED answers 100 runs" in log or "DROPPED answers 17 runs" in log, tail(log)
    f.finish()


def test_a_peer_that_died_is_told_from_one_that_lives(tmp_path):
    """accept_run opens /proc/PID/{mem,pagemap} by pid, then asks whether the peer is still alive (its pidfd,
    SO_PEERPIDFD): alive now means the pid was its own when opened; dead (reaped) means the pid may be another
    process's by now (pid reuse), and the run is refused."""
    import socket
    from uswap.daemon.runs import peer_alive
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
