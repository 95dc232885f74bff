"""A real NFS server for tests and the bench: nfs-ganesha (FSAL VFS) serving NFSv3, in a network namespace of its own.

Why: the NFS store is tested against a real server, not a mock, and this machine
has no kernel NFS client, so everything speaks NFS from userspace (libnfs).
rpcbind cannot be told to listen on loopback only (``rpcbind -h 127.0.0.1``
crashed), so the server gets a fresh network namespace holding nothing but
``lo``: no NFS traffic can leave the machine, and ports 111/2049/20048 are free
for every instance.

How: ``unshare --net --mount`` starts rpcbind in new, anonymous network and
mount namespaces, after bringing ``lo`` up and bind-mounting ``base_dir/run``
over ``/run`` (``/var/run`` is a link to it).  rpcbind's socket, lock and
warm-start files and ganesha's ``/run/ganesha`` thus live under ``base_dir``:
two servers, or stale files of a dead one, cannot collide, and the host's
``/run`` is never touched.  ganesha is started in rpcbind's namespaces with
``nsenter``; its config, log, pid file and recovery directory are in
``base_dir`` too.  The namespaces vanish with the last process in them, so
there is nothing named to delete and no mount left on the host.

Clients are run with :meth:`NfsServer.netns_cmd`, which enters the network
namespace only: they keep the test's mount namespace and filesystem (and so
its pathname Unix sockets), and reach the server at 127.0.0.1.  A client still
running at :meth:`NfsServer.stop` keeps the namespace alive until it exits.
Several servers that one client reaches: :class:`uswap.nfs.network.NfsNetwork`,
which links each server's namespace to a client namespace and gives the server
an ``address`` of its own there.

Populate ``export_dir`` and ``export_ro_dir`` (or mount a filesystem on them)
only before :meth:`NfsServer.start`; afterwards change them through NFS.
ganesha caches what it has seen, and a file made behind its back gives EXIST
errors.
"""

from __future__ import annotations

import collections.abc
import os
import re
import shutil
import subprocess
import time
import urllib.parse

ADDRESS = "127.0.0.1"  # as seen from inside the namespace (a server's default address)
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

_CONFIG = """\
NFS_CORE_PARAM {{ NFS_Port = 2049; MNT_Port = 20048; Protocols = 3, 4;
  Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = false; mount_path_pseudo = true; }}
NFS_KRB5 {{ Active_krb5 = false; }}
NFSv4 {{ Graceless = true; RecoveryBackend = fs; RecoveryRoot = "{recovery_dir}"; Minor_Versions = 0, 1, 2; }}
EXPORT {{ Export_Id = 1; Path = "{export_dir}"; Pseudo = /export; Protocols = 3, 4; Transports = TCP;
  Access_Type = RW; Squash = No_Root_Squash; SecType = sys; FSAL {{ Name = VFS; }} }}
EXPORT {{ Export_Id = 2; Path = "{export_ro_dir}"; Pseudo = /export-ro; Protocols = 3, 4; Transports = TCP;
  Access_Type = RO; Squash = No_Root_Squash; SecType = sys; FSAL {{ Name = VFS; }} }}
"""

# Runs as the namespaces' first process; $0 is the directory to show as /run.
_ENTER_NAMESPACES_AND_RUN_RPCBIND = 'ip link set lo up && mount --bind "$0" /run && exec rpcbind -f -w'


class NfsServer:
    """ganesha exporting ``export_dir`` read-write as /export and ``export_ro_dir``
    read-only as /export-ro.  ``extra_config`` is appended to ganesha's config.

    ``address`` is where clients reach it (:meth:`url`); ganesha and rpcbind listen on every address of the
    namespace.  ``network_setup``, if given, is called with the path of the server's network namespace
    (``/proc/PID/ns/net``) once rpcbind serves there and before ganesha starts: it gives the namespace the link
    that carries ``address`` (:class:`uswap.nfs.network.NfsNetwork`).  What it makes must vanish with the
    namespace, and it must raise if it fails (the server is then stopped)."""

    def __init__(self, base_dir: str, *, extra_config: str = "", address: str = ADDRESS,
                 network_setup: collections.abc.Callable[[str], None] | None = None):
        self.base_dir = os.path.realpath(base_dir)
        if (self.base_dir + "/").startswith("/run/"):
            raise ValueError(f"{base_dir}: the server's own /run would hide it")
        self.export_dir = os.path.join(self.base_dir, "export")
        self.export_ro_dir = os.path.join(self.base_dir, "export-ro")
        self.log_path = os.path.join(self.base_dir, "ganesha.log")
        self.address = address
        self._network_setup = network_setup
        self._run_dir = os.path.join(self.base_dir, "run")
        self._config_path = os.path.join(self.base_dir, "ganesha.conf")
        self._config = _CONFIG.format(recovery_dir=os.path.join(self.base_dir, "recovery"),
                                      export_dir=self.export_dir, export_ro_dir=self.export_ro_dir) + extra_config
        self._rpcbind: subprocess.Popen | None = None
        self._ganesha: subprocess.Popen | None = None

    def __enter__(self) -> NfsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> NfsServer:
        if self._rpcbind is not None:
            raise RuntimeError("the NFS server is already started")   # a second ganesha would lose the first
        for d in (self.export_dir, self.export_ro_dir, os.path.join(self.base_dir, "recovery")):
            os.makedirs(d, exist_ok=True)
        shutil.rmtree(self._run_dir, ignore_errors=True)
        os.mkdir(self._run_dir)
        with open(self._config_path, "w") as f:
            f.write(self._config)
        try:
            with open(os.path.join(self.base_dir, "rpcbind.log"), "ab") as log:
                self._rpcbind = subprocess.Popen(
                    ["unshare", "--net", "--mount", "sh", "-c", _ENTER_NAMESPACES_AND_RUN_RPCBIND, self._run_dir],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            self._wait_for_rpcbind()
            if self._network_setup is not None:
                self._network_setup(self.netns_path())
            self._start_ganesha()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, ganesha and rpcbind, and reap them."""
        for proc in (self._ganesha, self._rpcbind):  # ganesha first: it unregisters from rpcbind
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._ganesha = self._rpcbind = None

    def kill(self) -> None:
        """Crash ganesha (SIGKILL); rpcbind and the namespace stay for :meth:`restart`."""
        self._running_ganesha().kill()
        self._ganesha.wait()

    def restart(self) -> None:
        """Start ganesha again after :meth:`kill`; returns once it serves."""
        if self._ganesha is None or self._ganesha.poll() is None:
            raise RuntimeError("restart() needs a started server whose ganesha was kill()ed")
        self._start_ganesha()

    def url(self, path: str = "", **params) -> str:
        """libnfs URL of ``path`` in the read-write export; ``params`` add to ``version=3``.
        ``path`` goes in verbatim: libnfs does not decode %XX escapes."""
        return self._url("export", path, params)

    def ro_url(self, path: str = "", **params) -> str:
        """libnfs URL of ``path`` in the read-only export."""
        return self._url("export-ro", path, params)

    def netns_cmd(self, cmd: list[str]) -> list[str]:
        """``cmd`` prefixed to run in the server's network namespace (and only that one)."""
        return ["nsenter", f"--net={self.netns_path()}", "--", *cmd]

    def netns_path(self) -> str:
        """The server's network namespace, as a path nsenter and ``ip ... netns`` take."""
        if self._rpcbind is None:
            raise RuntimeError("the NFS server is not started")
        return f"/proc/{self._rpcbind.pid}/ns/net"

    def log_excerpt(self, tail: int = 10) -> str:
        """ganesha's warnings and errors, then its last lines; TIRPC's per-connection chatter left out."""
        try:
            with open(self.log_path, errors="replace") as f:
                lines = [line for line in f if " :TIRPC :" not in line]
        except FileNotFoundError:
            return "(no log)\n"
        problems = [line for line in lines[:-tail] if re.search(r" :(WARN|CRIT|MAJ|FATAL) :", line)]
        return "".join(problems + ["...\n"] + lines[-tail:])

    def _url(self, export: str, path: str, params: dict) -> str:
        query = urllib.parse.urlencode({"version": 3, **params})
        return f"nfs://{self.address}/{export}/{path.lstrip('/')}?{query}"

    def _running_ganesha(self) -> subprocess.Popen:
        if self._ganesha is None or self._ganesha.poll() is not None:
            raise RuntimeError("ganesha is not running")
        return self._ganesha

    def _wait_for_rpcbind(self) -> None:
        # Its socket showing in our run dir proves the namespaces exist (until then /proc/PID/ns is the host's);
        # an answer proves it listens on every transport, since it sets them all up before serving.
        socket_path = os.path.join(self._run_dir, "rpcbind.sock")
        deadline = time.monotonic() + READY_TIMEOUT
        while not (os.path.exists(socket_path) and subprocess.run(
                self.netns_cmd(["rpcinfo", "-p", ADDRESS]), capture_output=True, timeout=5).returncode == 0):
            if self._rpcbind.poll() is not None or time.monotonic() > deadline:
                with open(os.path.join(self.base_dir, "rpcbind.log"), errors="replace") as f:
                    raise RuntimeError(f"rpcbind did not come up (exit status {self._rpcbind.poll()}):\n{f.read()}")
            time.sleep(0.005)

    def _start_ganesha(self) -> None:
        namespaces = f"/proc/{self._rpcbind.pid}/ns"
        with open(self.log_path, "ab") as log:
            self._ganesha = subprocess.Popen(
                ["nsenter", f"--net={namespaces}/net", f"--mount={namespaces}/mnt", "--",
                 "ganesha.nfsd", "-F", "-f", self._config_path, "-L", self.log_path,
                 "-p", os.path.join(self.base_dir, "ganesha.pid")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self._wait_until_serving()

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            if self._ganesha.poll() is not None:
                raise RuntimeError(f"ganesha exited with status {self._ganesha.returncode}; from its log:\n"
                                   f"{self.log_excerpt()}")
            try:
                if subprocess.run(self.netns_cmd(["nfs-ls", self.url()]), stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=min(left, 5)).returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"ganesha did not serve {self.url()} within {READY_TIMEOUT} s; from its log:\n"
                           f"{self.log_excerpt()}")
