"""Layer 9: uswap as a user installs and runs it: the wheel, the service, the metrics.

The sdist and the wheel are built once per session the way pip does it
(``python -m build``: the wheel from the sdist, in an isolated environment).
The wheel is then installed into a venv of its own that sees the dependencies
the suite runs on (cffi, trio, pyfuse3, rich, ...) but not this checkout, and
is run from directories that are not the checkout.  .ci/smoke-install does the
same from a bare venv with the extras from the index.
"""

from __future__ import annotations

import contextlib
import email.parser
import glob
import json
import os
import re
import signal
import site
import socket
import struct
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest

from conftest import DaemonProcess, need, need_root, run, this_uswap_env, uswap
from test_region_hostile import GROUP, socket_dir  # noqa: F401 (socket_dir: a fixture)
from uswap.child import uswap_argv
from uswap.config import DEFAULTS
from uswap.daemon.status import fetch_status
from uswap.run import LIBRUN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UCRED = struct.Struct("3i")

# A directory whose uswap/ would shadow the package if a child put the current directory on sys.path.
DECOY = 'import pathlib, sys\npathlib.Path(__file__).with_name("imported").touch()\nsys.exit("decoy uswap imported")\n'


# -- the build -------------------------------------------------------------------------

@pytest.fixture(scope="session")
def dist(tmp_path_factory):
    """(sdist, wheel) built from this tree with python -m build (sdist, then the wheel from it)."""
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), REPO], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (sdist,), (wheel,) = glob.glob(str(out / "*.tar.gz")), glob.glob(str(out / "*.whl"))
    return sdist, wheel


class Installed:
    """The wheel in a venv that sees the suite's site-packages but not this checkout."""

    def __init__(self, venv):
        self.venv = venv
        self.python = str(venv / "bin" / "python")
        self.uswap = str(venv / "bin" / "uswap")

    def run(self, *args: str, cwd, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([self.uswap, *args], capture_output=True, text=True, cwd=cwd, timeout=300, **kw)


@pytest.fixture(scope="session")
def installed(dist, tmp_path_factory):
    venv = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", str(venv))
    run(str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--disable-pip-version-check", dist[1])
    # Then the dependencies the suite runs on, as plain directories after the venv's own: a venv's if it runs
    # in one (--system-site-packages would name the base interpreter's), without their .pth files (an editable
    # uswap's).  After the install: pip would take the uswap there for this one.
    purelib = run(str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    with open(os.path.join(purelib.stdout.strip(), "suite-dependencies.pth"), "w") as f:
        f.write("".join(f"{path}\n" for path in site.getsitepackages()))
    return Installed(venv)


@pytest.fixture
def decoy_dir(tmp_path):
    """An otherwise empty directory with a uswap/ that must never be imported."""
    here = tmp_path / "cwd"
    (here / "uswap").mkdir(parents=True)
    (here / "uswap" / "__init__.py").write_text(DECOY)
    (here / "uswap" / "__main__.py").write_text(DECOY)
    return here


def source_modules() -> set[str]:
    out = set()
    for root, dirs, files in os.walk(os.path.join(REPO, "uswap")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        out |= {os.path.relpath(os.path.join(root, f), REPO) for f in files if f.endswith(".py")}
    return out


def test_wheel_holds_every_module_and_data_file(dist):
    names = set(zipfile.ZipFile(dist[1]).namelist())
    modules = source_modules()
    assert "uswap/nfs/url.py" in modules and len(modules) > 40   # the comparison below is not vacuous
    assert modules - names == set()
    for data in ("uswap/include/uswap.h", "uswap/lib/libuswap.so", "uswap/lib/libuswaprun.so",
                 "uswap/data/60-uswap.rules", "uswap/py.typed",
                 "uswap/bench/workloads/workload.c", "uswap/bench/workloads/hog.c",
                 "uswap/data/systemd/uswap.service.in", "uswap/data/systemd/uswap-fuse.service.in",
                 "uswap/data/systemd/uswap-swap.service.in"):
        assert data in names, data
    assert {n.split("/")[-1].split(".")[0] for n in names if n.endswith(".so")} == {"_core", "_nfs", "libuswap", "libuswaprun"}


def test_sdist_holds_what_the_build_needs(dist):
    with tarfile.open(dist[0]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "csrc", "**"), recursive=True)
              if p.endswith((".c", ".h", ".py"))}
    assert {"csrc/build.py", "csrc/nfs_build.py", "csrc/common/uswap_core.c", "csrc/preload/uswap_run.h"} <= needed
    assert needed - names == set()
    assert {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "uswap/include/uswap.h",
            "uswap/bench/workloads/hog.c", "tests/conftest.py"} <= names
    assert source_modules() - names == set()


def test_dependencies_are_what_the_daemon_imports_and_extras_the_rest(dist):
    with zipfile.ZipFile(dist[1]) as whl:
        meta = email.parser.Parser().parsestr(whl.read("uswap-0.1.0.dist-info/METADATA").decode())
    requires = meta.get_all("Requires-Dist")
    plain = {re.split(r"[<>=;\[ ]", r)[0].lower() for r in requires if "extra ==" not in r}
    assert plain == {"cffi", "trio"}
    extras = set(meta.get_all("Provides-Extra"))
    assert {"fuse", "bench", "demo", "test", "all"} <= extras
    by_extra = {e: {re.split(r"[<>=;\[ ]", r)[0].lower() for r in requires if f'extra == "{e}"' in r}
                for e in extras}
    assert "pyfuse3" in by_extra["fuse"] and {"rich", "matplotlib"} <= by_extra["bench"]
    assert "prometheus-client" in {n.replace("_", "-") for n in by_extra["test"]}


def test_the_lowest_environment_pins_every_dependency_to_its_lower_bound(dist):
    """.ci/run's "lowest" venv: scripts/lower-bounds pins each Requires-Dist of the wheel at its ">=" bound."""
    with zipfile.ZipFile(dist[1]) as whl:
        meta = email.parser.Parser().parsestr(whl.read("uswap-0.1.0.dist-info/METADATA").decode())
    bounds = {}
    for r in meta.get_all("Requires-Dist"):
        if not r.startswith("uswap["):              # uswap[bench,demo,fuse]: the extras, listed themselves
            name, bound = re.match(r"([A-Za-z0-9._-]+)\s*>=\s*([^,; ]+)", r).groups()
            bounds[re.sub(r"[-_.]+", "-", name).lower()] = bound
    assert {"trio", "cffi", "pyfuse3", "pytest", "build"} <= set(bounds)
    pins = run(os.path.join(REPO, "scripts", "lower-bounds")).stdout.splitlines()
    assert sorted(pins) == sorted(f"{name}=={bound}" for name, bound in bounds.items())


@pytest.mark.parametrize("module, argv, extra", [
    ("pyfuse3", ["mount", "/nonexistent"], "fuse"),
    ("rich", ["bench", "--workloads", "seq"], "bench"),
    ("numpy", ["demo"], "demo"),
])
def test_a_missing_extra_is_named(module, argv, extra, tmp_path):
    """The module is made unimportable (None in sys.modules) before the command runs."""
    code = f"import sys; sys.modules[{module!r}] = None; from uswap.cli import main; sys.exit(main({argv!r}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 1
    assert r.stderr == (f"uswap {argv[0]}: error: uswap {argv[0]} needs {module}, which is not installed: "
                        f"pip install 'uswap[{extra}]'\n")


def test_a_broken_module_is_not_called_a_missing_extra(tmp_path):
    """Negative control: an ImportError from inside an installed module keeps its own message."""
    (tmp_path / "halfbroken.py").write_text("import no_such_module_xyz\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from uswap.extras import require\n"
            "try:\n    require('halfbroken', 'uswap x', 'x')\nexcept ImportError as e:\n"
            "    print(type(e).__name__, e.name)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["ModuleNotFoundError", "no_such_module_xyz"], r.stderr


def test_the_command_line_defaults_are_the_shared_ones():
    from uswap.cli import build_parser
    daemon = build_parser().parse_args(["daemon"])
    assert (daemon.store[0], daemon.resident, daemon.io, daemon.readahead, daemon.fault_threads, daemon.pool,
            daemon.pool_compressor) == (DEFAULTS.store, DEFAULTS.budget, DEFAULTS.io, DEFAULTS.readahead,
                                        DEFAULTS.fault_threads, DEFAULTS.pool, DEFAULTS.pool_compressor)
    assert DEFAULTS.pool == 0          # off unless asked for (uswap.config says why)
    bench = build_parser().parse_args(["bench"])
    assert (bench.readahead, bench.workdir) == (DEFAULTS.readahead, DEFAULTS.bench_workdir)
    mount = build_parser().parse_args(["mount", "/mnt"])
    assert (mount.store, mount.size) == (DEFAULTS.fuse_store, DEFAULTS.fuse_file_size)


# -- the installed package, from directories that are not the checkout -----------------------

def test_installed_wheel_runs_from_an_empty_directory(installed, tmp_path):
    r = installed.run("--version", cwd=tmp_path)
    assert r.stdout == "uswap 0.1.0\n", r.stderr
    where = subprocess.run([installed.python, "-c", "import uswap; print(uswap.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path).stdout
    assert where.startswith(str(installed.venv)), where
    flags = installed.run("config", "--cflags", "--libs", cwd=tmp_path).stdout.split()
    assert all(str(installed.venv) in f for f in flags if f.startswith(("-I", "-L"))), flags


def test_children_are_not_shadowed_by_the_current_directory(installed, decoy_dir, tmp_path):
    """Negative control first: `python -m uswap` from the decoy directory imports the decoy."""
    r = subprocess.run([installed.python, "-m", "uswap", "--version"], capture_output=True, text=True, cwd=decoy_dir)
    assert r.returncode == 1 and "decoy uswap imported" in r.stderr
    (decoy_dir / "uswap" / "imported").unlink()
    # The daemon launcher, run from the decoy directory (the parent itself with -P)
    need(os.path.exists("/dev/userfaultfd") or os.geteuid() == 0, "no userfaultfd access")
    launch = ("import os, sys; from uswap.daemon.process import DaemonProcess\n"
              "with DaemonProcess(sys.argv[1], sys.argv[2], sys.argv[3], budget='4M') as d:\n"
              "    print(d.status()['daemon']['pswpout'], os.readlink(f'/proc/{d.proc.pid}/cwd'))\n")
    run(installed.uswap, "mkswap", str(tmp_path / "d.store"), "--size", "16M")
    r = subprocess.run([installed.python, "-P", "-c", launch, "d.store", "d.sock", "d.log"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr + (tmp_path / "d.log").read_text()
    assert r.stdout.split() == ["0", "/"]    # relative paths made absolute; the daemon runs in /
    assert not (decoy_dir / "uswap" / "imported").exists()


def test_uswap_mount_from_a_checkout_like_directory(installed, decoy_dir, tmp_path):
    """`uswap mount` starts its server in the background: not shadowed, in /, and in the metrics."""
    need_root()
    need(os.path.exists("/dev/fuse"), "no /dev/fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = installed.run("mount", "../mnt", "--store", "../fuse.store", "--size", "16M", cwd=decoy_dir)
    pid = int(m.group(1)) if (m := re.search(r"served by process (\d+)", r.stdout)) else None
    try:
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(mnt)
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        with open(f"/proc/{pid}/cmdline") as f:
            assert f.read().split("\0")[1:4] == ["-P", "-m", "uswap"]
        metrics = installed.run("status", "--format", "prometheus", "--socket", str(tmp_path / "none.sock"),
                                cwd=decoy_dir)
        assert metrics.returncode == 0
        families = parse_exposition(metrics.stdout)
        assert sample(families, "uswap_mount_up", mountpoint=str(mnt)) == 1
        assert sample(families, "uswap_mount_file_size_bytes", mountpoint=str(mnt)) == 16 << 20
        assert families["uswap_mount_written_pages"].type == "counter"
    finally:
        if os.path.ismount(mnt):
            u = installed.run("umount", str(mnt), cwd=tmp_path)
            if u.returncode:
                run("umount", "-l", str(mnt), check=False)
        if pid:
            _wait_gone(pid)
    assert not (decoy_dir / "uswap" / "imported").exists()


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"process {pid} outlived its mount")


def test_bench_builds_its_workloads_once_from_the_package(installed, decoy_dir, tmp_path):
    need(os.path.exists("/dev/userfaultfd") or os.geteuid() == 0, "no userfaultfd access")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    args = ("bench", "--workloads", "seq", "--size", "8M", "--resident", "4M", "--repeat", "1", "--io", "sync",
            "--against", "", "--workdir", str(tmp_path / "work"), "--json")
    r = installed.run(*args, str(tmp_path / "1.json"), cwd=decoy_dir, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    (run1,) = json.loads((tmp_path / "1.json").read_text())["runs"]
    assert run1["exit_code"] == 0 and run1["mismatches"] == 0 and run1["pswpout"] > 0
    binaries = glob.glob(str(tmp_path / "cache" / "uswap" / "bench" / "*" / "*"))
    assert sorted(os.path.basename(b) for b in binaries) == ["hog", "workload"]
    built = {b: os.stat(b).st_mtime_ns for b in binaries}
    r = installed.run(*args, str(tmp_path / "2.json"), cwd=decoy_dir, env=env)
    assert r.returncode == 0, r.stderr
    assert {b: os.stat(b).st_mtime_ns for b in binaries} == built        # used again, not rebuilt
    assert not (decoy_dir / "uswap" / "imported").exists()
    # no C compiler: one line that says what to install
    r = installed.run(*args, str(tmp_path / "3.json"), cwd=decoy_dir,
                      env=dict(env, XDG_CACHE_HOME=str(tmp_path / "cache2"), CC="no-such-cc"))
    assert r.returncode == 1
    assert r.stderr == ("uswap bench: error: uswap bench builds its C workloads on first use and found no C compiler "
                        "('no-such-cc' is not on PATH): install one (Debian: apt install gcc) or set CC\n")


# -- readiness (sd_notify) --------------------------------------------------------------

def notify_listener(address) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(30)
    return sock


def receive(sock: socket.socket) -> tuple[int, dict]:
    data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
    (pid,) = [UCRED.unpack(d[:UCRED.size])[0] for level, kind, d in ancdata if kind == socket.SCM_CREDENTIALS]
    return pid, dict(line.split("=", 1) for line in data.decode().splitlines())


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_daemon_says_ready_once_its_socket_listens(kind, tmp_path):
    need(os.path.exists("/dev/userfaultfd") or os.geteuid() == 0, "no userfaultfd access")
    store, sock_path = str(tmp_path / "s.store"), str(tmp_path / "d.sock")
    assert uswap("mkswap", store, "--size", "16M").returncode == 0
    if kind == "path":
        address = env_value = str(tmp_path / "notify")
    else:
        name = f"uswap-test-notify-{os.getpid()}"
        address, env_value = "\0" + name, "@" + name
    with notify_listener(address) as listener, open(tmp_path / "d.log", "w") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "uswap", "daemon", "--store", store, "--socket", sock_path,
                                   "--resident", "4M"], stdout=log, stderr=log,
                                  env=dict(os.environ, NOTIFY_SOCKET=env_value))
        try:
            pid, fields = receive(listener)
            assert pid == daemon.pid and fields["READY"] == "1"
            assert fields["STATUS"] == f"serving {store} on {sock_path}"
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
                client.connect(sock_path)       # at once, no retry: READY=1 means listening
            assert fetch_status(sock_path)["daemon"]["pid"] == daemon.pid
            daemon.send_signal(signal.SIGTERM)
            pid, fields = receive(listener)
            assert pid == daemon.pid and fields["STOPPING"] == "1"
            assert daemon.wait(60) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
    assert "WARNING" not in (tmp_path / "d.log").read_text()


def test_fuse_mount_says_ready_once_mounted(tmp_path):
    """uswap-fuse.service is Type=notify too: READY=1 only once the mount exists."""
    need_root()
    need(os.path.exists("/dev/fuse"), "no /dev/fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with notify_listener(str(tmp_path / "notify")) as listener, open(tmp_path / "m.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "uswap", "mount", str(mnt), "--foreground", "--store",
                                   str(tmp_path / "fuse.store"), "--size", "16M"], stdout=log, stderr=log,
                                  env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify")))
        try:
            pid, fields = receive(listener)
            assert pid == server.pid and fields["READY"] == "1"
            assert os.path.ismount(mnt) and "swap0" in os.listdir(mnt)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            finally:
                if server.poll() is None:
                    server.kill()
                    server.wait()
                if os.path.ismount(mnt):
                    run("umount", "-l", str(mnt), check=False)
    assert server.returncode == 0 and not os.path.ismount(mnt), (tmp_path / "m.log").read_text()


def test_an_unreachable_notify_socket_is_a_warning_not_a_failure(tmp_path):
    """Negative control: nobody listens on $NOTIFY_SOCKET; the daemon says so and serves anyway."""
    store, sock_path = str(tmp_path / "s.store"), str(tmp_path / "d.sock")
    assert uswap("mkswap", store, "--size", "16M").returncode == 0
    r_env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "nobody"))
    with open(tmp_path / "d.log", "w") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "uswap", "daemon", "--store", store, "--socket", sock_path,
                                   "--resident", "4M"], stdout=log, stderr=log, env=r_env)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock_path):
            assert daemon.poll() is None and time.monotonic() < deadline, (tmp_path / "d.log").read_text()
            time.sleep(0.05)
        assert fetch_status(sock_path)["daemon"]["pid"] == daemon.pid
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    log_text = (tmp_path / "d.log").read_text()
    assert f"sd_notify: No such file or directory: '{tmp_path / 'nobody'}': the supervisor may not know we are " \
           "serving" in log_text


# -- the systemd units ------------------------------------------------------------------

@pytest.fixture
def units(tmp_path):
    directory = tmp_path / "units"
    directory.mkdir()
    r = uswap("install-units", "--dir", str(directory))
    assert r.returncode == 0, r.stderr
    return directory


def unit_settings(path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    with open(path) as f:
        lines = f.readlines()
    for line in lines:
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.rstrip("\n").split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_units_pass_systemd_analyze_verify(units):
    need(subprocess.run(["which", "systemd-analyze"], capture_output=True).returncode == 0,
         "systemd-analyze is not installed")
    paths = sorted(str(p) for p in units.iterdir())
    assert [os.path.basename(p) for p in paths] == ["uswap-fuse.service", "uswap-swap.service", "uswap.service"]
    r = run("systemd-analyze", "verify", *paths, check=False)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    # negative control: verify does see a bad key or value in these files (it reports, exit 0)
    bad = units / "bad.service"
    bad.write_text((units / "uswap.service").read_text().replace("Type=notify", "Type=notfy")
                   .replace("ProtectSystem=", "ProtectSystm="))
    r = run("systemd-analyze", "verify", str(bad), check=False)
    assert "Failed to parse service type, ignoring: notfy" in r.stderr and "Unknown key 'ProtectSystm'" in r.stderr


def test_units_say_what_the_service_needs(units):
    daemon = unit_settings(units / "uswap.service")
    assert daemon["Type"] == ["notify"] and daemon["LimitMEMLOCK"] == ["infinity"]
    assert daemon["TimeoutStopSec"] == [str(DEFAULTS.service_stop_timeout_s)]
    assert daemon["ExecStart"][0].startswith(f"{sys.executable} -P -m uswap daemon ")
    fuse = unit_settings(units / "uswap-fuse.service")
    assert fuse["Type"] == ["notify"] and "ProtectSystem" not in fuse and "PrivateTmp" not in fuse
    swap = unit_settings(units / "uswap-swap.service")
    assert swap["Requires"] == ["uswap-fuse.service"]
    assert {"uswap-fuse.service", "swap.target"} <= set(swap["After"])     # swapoff first at shutdown
    assert swap["ExecStop"][0].endswith("-m uswap swapoff /run/uswap-fuse/swap0")
    assert fuse["ExecStart"][0].split()[5:7] == ["/run/uswap-fuse", "--foreground"]


SECCOMP_LOADER = """
import errno, os, subprocess, sys
import seccomp
def expand(group, seen):
    names = set()
    out = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True, text=True, check=True)
    for word in (line.strip() for line in out.stdout.splitlines()[1:]):
        if word.startswith("@") and word not in seen:
            seen.add(word)
            names |= expand(word, seen)
        elif word and not word.startswith(("@", "#")):
            names.add(word)
    return names
f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
for name in sorted(expand(sys.argv[1], set())):
    try:
        f.add_rule(seccomp.ALLOW, name)
    except (RuntimeError, ValueError):
        pass            # unknown to this libseccomp
f.load()
os.execvp(sys.argv[2], sys.argv[2:])
"""
MDWE = ("import ctypes, os, sys\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "if libc.prctl(65, 1, 0, 0, 0):   # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN\n"
        "    sys.exit(f'PR_SET_MDWE: errno {ctypes.get_errno()}')\nos.execvp(sys.argv[1], sys.argv[1:])\n")


def sandbox(settings: dict, caps: list[str]) -> list[str]:
    """A prefix that applies the unit's bounding set, no_new_privs, MemoryDenyWriteExecute (as
    PR_SET_MDWE) and SystemCallFilter (libseccomp, systemd's own group list), then execs."""
    assert settings["NoNewPrivileges"] == ["yes"] and settings["MemoryDenyWriteExecute"] == ["yes"]
    (syscalls,) = settings["SystemCallFilter"]
    bounding = ",".join(["-all", *(f"+{c.lower().removeprefix('cap_')}" for c in caps)])
    return ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--no-new-privs", "--",
            sys.executable, "-c", MDWE, "/usr/bin/python3", "-c", SECCOMP_LOADER, syscalls]


RUN_LIST = "import sys\nxs = [x * 3 for x in range(200000)]\nprint(sum(xs), sys.argv[1])\n"


def test_the_daemon_serves_under_the_units_hardening(units, hog, socket_dir, tmp_path):
    """What can be run here of uswap.service's sandbox, run: the daemon serves a region's client and another
    uid's `uswap run` under it.  Negative controls: without CAP_SYS_PTRACE (which the unit grants) the MAP
    checks refuse; without CAP_DAC_READ_SEARCH the daemon cannot open another uid's /proc/PID/mem and refuses
    its run.  The unit's device policy lets it open /dev/userfaultfd (what runs' uffds are made from)."""
    need_root()
    need(subprocess.run(["/usr/bin/python3", "-c", "import seccomp"], capture_output=True).returncode == 0,
         "python3-seccomp is not installed (scripts/install-deps)")
    settings = unit_settings(units / "uswap.service")
    caps = settings["CapabilityBoundingSet"][0].split()
    assert "CAP_SYS_PTRACE" in caps and "CAP_DAC_READ_SEARCH" in caps
    assert settings["DevicePolicy"] == ["closed"] and settings["DeviceAllow"] == ["/dev/userfaultfd rw"]
    assert "PrivateDevices" not in settings      # its private /dev has no userfaultfd
    script = os.path.join(socket_dir, "run_list.py")
    with open(script, "w") as f:
        f.write(RUN_LIST)
    os.chmod(script, 0o644)
    want = f"{sum(x * 3 for x in range(200000))} nobody\n"
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", f"--groups={GROUP}",
                 "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]   # to start from /root
    results = {}
    for name, granted in (("unit", caps), ("no ptrace", [c for c in caps if c != "CAP_SYS_PTRACE"]),
                          ("no dac", [c for c in caps if c != "CAP_DAC_READ_SEARCH"])):
        daemon = DaemonProcess(tmp_path, name.replace(" ", "-"), store_size="64M", resident="4M",
                               prefix=tuple(sandbox(settings, granted)), socket_dir=socket_dir,
                               extra=("--group", str(GROUP), "--run-users", "0,65534"))
        daemon.start()
        try:
            with open(f"/proc/{daemon.proc.pid}/status") as f:
                status = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
            assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
            r = subprocess.run([hog, "-s", "8", "-p", "1", "-r", "2"], capture_output=True, text=True,
                               env=daemon.env(), timeout=120)
            pswpout = daemon.status()["daemon"]["pswpout"]
            ran = subprocess.run([*as_nobody, *uswap_argv("run", "--resident", "4M", "--socket", daemon.socket, "--",
                                                          sys.executable, script, "nobody")],
                                 capture_output=True, text=True, timeout=120, env=this_uswap_env())
            results[name] = (r.returncode, r.stdout + r.stderr, pswpout, ran,
                             daemon.status()["daemon"]["pswpout"] - pswpout, daemon.log())
        finally:
            assert daemon.stop() == 0
    code, out, pswpout, ran, run_pswpout, log = results["unit"]
    assert code == 0 and "0 mismatches" in out and pswpout > 0, out
    assert (ran.returncode, ran.stdout) == (0, want) and run_pswpout > 0, (ran, log[-2000:])
    code, out, pswpout, ran, _, _ = results["no ptrace"]
    assert code != 0 and "cannot read the mappings of pid" in out and pswpout == 0, out
    code, out, pswpout, ran, run_pswpout, log = results["no dac"]
    assert code == 0 and pswpout > 0, out                       # regions need no DAC override
    assert ran.returncode == 1 and ran.stdout == "" and run_pswpout == 0, ran
    assert "/proc/PID: Permission denied" in log, log[-2000:]


# -- metrics ----------------------------------------------------------------------------

def parse_exposition(text: str) -> dict:
    """The families by name, parsed by prometheus_client; a family name or a sample (name and labels) seen
    twice fails."""
    from prometheus_client.parser import text_string_to_metric_families
    families, samples = {}, set()
    for family in text_string_to_metric_families(text):
        assert family.name not in families, f"{family.name} twice"
        families[family.name] = family
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"sample {key} twice"
            samples.add(key)
    helps = re.findall(r"^# HELP (\S+)", text, re.M)
    assert len(helps) == len(set(helps)) == len(families)
    return families


def sample(families: dict, name: str, **labels) -> float:
    family = families[name.removesuffix("_total")]
    values = [s.value for s in family.samples if all(s.labels.get(k) == str(v) for k, v in labels.items())]
    assert len(values) == 1, (name, labels, family.samples)
    return values[0]


HOLDER = """
import sys, uswap
region = uswap.Region(16 << 20)
pages = memoryview(region.buffer)
for i in range(0, 16 << 20, 4096):
    pages[i:i + 8] = i.to_bytes(8, "little")
bad = sum(pages[i:i + 8] != i.to_bytes(8, "little") for i in range(0, 16 << 20, 4096))
print("filled" if bad == 0 else f"{bad} bad pages", flush=True)
sys.stdin.read()
"""


def test_status_as_prometheus_text(uswapd):
    daemon = uswapd(resident="4M")
    with subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          env=daemon.env()) as holder:
        try:
            assert holder.stdout.readline() == "filled\n"
            full = daemon.status()
            out = uswap("status", "--format", "prometheus", "--socket", daemon.socket)
            after = daemon.status()   # counters may still move (readahead): the scrape lies between
        finally:
            holder.stdin.close()
            holder.wait(60)
    assert out.returncode == 0, out.stderr
    families = parse_exposition(out.stdout)
    status, (region,) = full["daemon"], full["regions"]
    assert all(name.startswith("uswap_") for name in families)
    counters = {n for n, f in families.items() if f.type == "counter"}
    assert {"uswap_pswpin_pages", "uswap_pswpout_pages", "uswap_read_errors", "uswap_write_errors",
            "uswap_region_faults"} <= counters
    for family in families.values():
        suffix = "_total" if family.type == "counter" else ""
        assert all(s.name == family.name + suffix for s in family.samples), family
        assert family.type in ("counter", "gauge")
    for key in ("pswpout", "pswpin"):
        assert 0 < status[key] <= sample(families, f"uswap_{key}_pages_total") <= after["daemon"][key]
    assert sample(families, "uswap_budget_bytes") == 4 << 20
    assert sample(families, "uswap_store_size_bytes") == status["slots_total"] * status["page_size"]
    assert sample(families, "uswap_daemon_up") == 1
    assert sample(families, "uswap_daemon_info", store=daemon.store, io=status["io"]) == 1
    assert -1 < time.time() - sample(families, "uswap_start_time_seconds") < 600   # uptime_s is rounded
    assert families["uswap_resident_bytes"].type == "gauge"
    assert families["uswap_readahead_window_pages"].type == "gauge"      # the window; the pages read ahead:
    assert families["uswap_readahead_pages"].type == "counter"           # one name each (was one name for both)
    labels = {"region": region["id"], "pid": holder.pid, "uid": os.getuid()}
    assert sample(families, "uswap_region_size_bytes", **labels) == 16 << 20
    for key in ("faults", "engine_faults"):    # Python's and the engine's: the engine serves most
        assert region[key] <= sample(families, f"uswap_region_{key}_total", **labels) <= after["regions"][0][key]
    assert region["engine_faults"] > 0
    assert 0 < status["engine_faults"] <= sample(families, "uswap_engine_faults_total") <= \
        after["daemon"]["engine_faults"]
    assert sample(families, "uswap_region_swapped_bytes", **labels) > 0


# A process of `uswap run`: 16 MiB filled through a 4 MiB budget, then read back (swap-ins), then held.
RUN_HOLDER = """
import sys
pages = bytearray(16 << 20)
for i in range(0, len(pages), 4096):
    pages[i:i + 8] = i.to_bytes(8, "little")
bad = sum(pages[i:i + 8] != i.to_bytes(8, "little") for i in range(0, len(pages), 4096))
print("filled" if bad == 0 else f"{bad} bad pages", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def a_region_and_a_run(daemon):
    """A region (HOLDER) and a process of `uswap run` (RUN_HOLDER), each 16 MiB written and read back through a
    4 MiB budget, held while the block runs; ended (stdin closed) and reaped after it, also on failure."""
    need_root()
    need(os.path.exists(LIBRUN), "libuswaprun.so not built (python3 setup.py build_ext --inplace)")
    run_argv = uswap_argv("run", "--resident", "4M", "--socket", daemon.socket, "--",
                          os.path.realpath(sys.executable), "-c", RUN_HOLDER)
    procs = []
    try:
        for argv in ([sys.executable, "-c", HOLDER], run_argv):
            procs.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                          env=daemon.env()))
            assert procs[-1].stdout.readline() == "filled\n"
        yield
    finally:
        for proc in procs:
            try:
                proc.communicate(timeout=60)     # closes stdin: the holder ends
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    assert [proc.returncode for proc in procs] == [0, 0]


def test_prometheus_one_family_per_name_with_a_region_and_a_run(uswapd):
    """Every table's metrics appear (a region and a run process are served), each name is one family and no
    sample repeats; the fault counts add up within the scrape."""
    from uswap import metrics
    daemon = uswapd(resident="8M")
    with a_region_and_a_run(daemon):
        status = daemon.status()
        out = uswap("status", "--format", "prometheus", "--socket", daemon.socket)
    assert out.returncode == 0, out.stderr
    families = parse_exposition(out.stdout)
    for table, values in ((metrics.DAEMON, status["daemon"]), (metrics.REGION, status["regions"][0]),
                          (metrics.RUN, status["runs"][0])):
        for key, name, kind, _, _ in table:
            assert key in values, key                       # the table's keys are the status's
            assert families[f"uswap_{name}"].type == kind   # and each is its own family
    for kind in ("regions", "runs"):          # one budget for both: each kind's part of it
        share = status["daemon"]["shares"][kind]
        assert share["clients"] == 1 and sample(families, "uswap_share_clients", kind=kind) == 1
        for key, name, kind_of_metric, _, _ in metrics.SHARE:
            assert key in share and families[f"uswap_{name}"].type == kind_of_metric
            assert sample(families, f"uswap_{name}", kind=kind) >= 0
    assert sample(families, "uswap_share_fair_bytes", kind="regions") + \
        sample(families, "uswap_share_fair_bytes", kind="runs") == sample(families, "uswap_budget_bytes")
    assert families["uswap_readahead_window_pages"].type == "gauge"
    assert families["uswap_readahead_pages"].type == "counter"
    assert sample(families, "uswap_faults_total") == \
        sample(families, "uswap_engine_faults_total") + sample(families, "uswap_slow_path_faults_total") > 0
    run_labels = {"run": status["runs"][0]["run"], "process": status["runs"][0]["id"]}
    assert sample(families, "uswap_run_faults_total", **run_labels) == \
        sample(families, "uswap_run_engine_faults_total", **run_labels) + \
        sample(families, "uswap_run_slow_path_faults_total", **run_labels) > 0


def test_faults_count_every_fault_of_regions_and_runs(uswapd):
    """FAULTS is every fault the daemon read: served in C (engine_faults) or by Python (slow_path_faults),
    regions and run processes, gone ones included in the daemon's total."""
    daemon = uswapd(resident="8M", readahead=1)   # a region's swap-in fault then installs one page
    with a_region_and_a_run(daemon):     # faults may still come (an eviction's /proc/PID/mem read): bracketed
        status = daemon.status()
        text = uswap("status", "--socket", daemon.socket).stdout
        later = daemon.status()
    d, (region,), (proc,) = status["daemon"], status["regions"], status["runs"]
    for counts in (d, region, proc, later["daemon"], *later["regions"], *later["runs"]):
        assert counts["faults"] == counts["engine_faults"] + counts["slow_path_faults"], counts
    assert region["engine_faults"] > 0 and proc["engine_faults"] > 0      # the C engines served most
    assert d["faults"] <= region["faults"] + proc["faults"] <= later["daemon"]["faults"]   # theirs, and only theirs
    assert region["readahead_pages"] == 0 and 0 < region["pswpin"] <= region["faults"]
    assert 0 < proc["pswpin"] - proc["readahead_pages"] <= proc["faults"]  # one fault per window read
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.split()}
    shown = int(rows[str(region["id"])][7]), int(rows[str(proc["run"])][8])   # the REGION and RUN tables' FAULTS
    assert region["faults"] <= shown[0] <= later["regions"][0]["faults"], text
    assert proc["faults"] <= shown[1] <= later["runs"][0]["faults"], text
    deadline = time.monotonic() + 10
    while (after := daemon.status())["regions"] or after["runs"]:
        assert time.monotonic() < deadline, after
        time.sleep(0.05)
    gone = after["daemon"]
    assert gone["faults"] == gone["engine_faults"] + gone["slow_path_faults"] >= later["daemon"]["faults"]


def test_prometheus_without_a_daemon_says_it_is_down(tmp_path):
    out = uswap("status", "--format", "prometheus", "--socket", str(tmp_path / "none.sock"))
    assert out.returncode == 0
    assert sample(parse_exposition(out.stdout), "uswap_daemon_up") == 0
    assert out.stderr == f"uswap status: {tmp_path / 'none.sock'}: no uswap daemon answers: No such file or directory\n"
