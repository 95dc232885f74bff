"""Several NFS test servers (:class:`~uswap.nfs.ganesha.NfsServer`) on one private network a client reaches.

Why: one :class:`NfsServer` answers at 127.0.0.1 in a network namespace of its own, so a client in it reaches that
server only.  A daemon striping over several servers needs them all, each at an address of its own, and a link per
server that can be cut or slowed on its own.

How: :class:`NfsNetwork` starts a *client namespace*, held by ``unshare --net sleep infinity`` (its one process).
For server N it adds a veth pair whose ends are made directly in the two namespaces (``ip link add ... netns
/proc/PID/ns/net type veth peer ... netns /proc/PID2/ns/net``): ``srvN`` in the client namespace with 10.231.N.1/30,
``uplink`` in server N's with 10.231.N.2/30.  The server's :meth:`NfsServer.url` then names 10.231.N.2.  Nothing is
made in the host's namespace and nothing routes out of these: each /30 is the only route there is, so no packet
leaves the namespaces.  Clients run in the client namespace with :meth:`NfsNetwork.netns_cmd` (network only, like
:meth:`NfsServer.netns_cmd`).

A ``rate`` (e.g. ``"300mbit"``) puts a token bucket (tc tbf) on the egress of both ends of that server's link, so
reads and writes are both held to it: a server as slow as a real one behind its network link.

Losing a server, two ways, both quick for a client:
- :meth:`NfsServer.kill`: ganesha dies, rpcbind and the link stay; a client gets "connection refused" (and its
  open connection a reset).  :meth:`NfsServer.restart` brings it back.
- :meth:`NfsServer.stop`: the server's namespace ends, and with it both ends of its veth pair; a client gets
  "network unreachable" at once, and its open connection simply hears nothing more.

Cleanup: the links vanish with the namespaces, and the namespaces with their processes, which are ours and
ended by PID: :meth:`NfsNetwork.stop` stops every server it made, then the holder.
"""

from __future__ import annotations

import os
import subprocess
import time

from uswap.nfs.ganesha import NfsServer

SUBNET = "10.231"      # server N's link is 10.231.N.0/30
MAX_SERVERS = 250
READY_TIMEOUT = 10.0
# tc tbf: a bucket of 512 KiB holds a few of veth's 64 KiB GSO packets (a packet bigger than the bucket is
# dropped), small next to what a second carries at the rates we use; queued traffic waits at most 100 ms.
TBF_BURST = "512kb"
TBF_LATENCY = "100ms"


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit status {r.returncode}): {r.stderr.strip()}")


class NfsNetwork:
    """A client network namespace and the NfsServers linked to it; see the module's docstring."""

    def __init__(self):
        self.servers: list[NfsServer] = []
        self._holder: subprocess.Popen | None = None

    def __enter__(self) -> NfsNetwork:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> NfsNetwork:
        if self._holder is not None:
            raise RuntimeError("the NFS network is already started")
        own = os.stat("/proc/self/ns/net").st_ino
        self._holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"], stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while self._namespace_inode() == own:       # until unshare has made it
                if self._holder.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"unshare --net did not make a namespace (exit status {self._holder.poll()})")
                time.sleep(0.002)
            _run(self.netns_cmd(["ip", "link", "set", "lo", "up"]))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every server made here, then end the client namespace's holder (SIGKILL: it is sleep)."""
        servers, self.servers = self.servers, []
        try:
            for server in servers:
                server.stop()
        finally:
            if self._holder is not None:
                if self._holder.poll() is None:
                    self._holder.kill()
                self._holder.wait()
                self._holder = None

    def server(self, base_dir: str, *, rate: str | None = None, extra_config: str = "") -> NfsServer:
        """A server linked to this network, not started yet (populate its export directories first, then
        ``start()`` it, once the network is started); :meth:`stop` stops it.  ``rate``: a tc rate for both
        directions of its link."""
        n = len(self.servers) + 1
        if n > MAX_SERVERS:
            raise RuntimeError(f"an NFS network links at most {MAX_SERVERS} servers")
        server = NfsServer(base_dir, extra_config=extra_config, address=f"{SUBNET}.{n}.2",
                           network_setup=lambda server_ns: self._link(n, server_ns, rate))
        self.servers.append(server)
        return server

    def netns_cmd(self, cmd: list[str]) -> list[str]:
        """``cmd`` prefixed to run in the client namespace (and only that one), where every server is reachable."""
        return ["nsenter", f"--net={self.netns_path()}", "--", *cmd]

    def netns_path(self) -> str:
        if self._holder is None:
            raise RuntimeError("the NFS network is not started")
        return f"/proc/{self._holder.pid}/ns/net"

    def _namespace_inode(self) -> int:
        try:
            return os.stat(f"/proc/{self._holder.pid}/ns/net").st_ino
        except FileNotFoundError:            # exited: the caller sees poll()
            return os.stat("/proc/self/ns/net").st_ino

    def _link(self, n: int, server_ns: str, rate: str | None) -> None:
        """Server N's veth pair and addresses, the rate limit, and proof that its rpcbind answers from here."""
        client_end, server_end = f"srv{n}", "uplink"
        _run(["ip", "link", "add", client_end, "netns", self.netns_path(), "type", "veth",
              "peer", "name", server_end, "netns", server_ns])
        ends = ((self.netns_cmd, client_end, f"{SUBNET}.{n}.1/30"),
                (lambda cmd: ["nsenter", f"--net={server_ns}", "--", *cmd], server_end, f"{SUBNET}.{n}.2/30"))
        for in_ns, dev, address in ends:
            _run(in_ns(["ip", "addr", "add", address, "dev", dev]))
            if rate is not None:
                _run(in_ns(["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                            "burst", TBF_BURST, "latency", TBF_LATENCY]))
            _run(in_ns(["ip", "link", "set", dev, "up"]))
        # rpcbind listens on every address (it cannot be told otherwise): it must answer on the link's
        deadline = time.monotonic() + READY_TIMEOUT
        while subprocess.run(self.netns_cmd(["rpcinfo", "-p", f"{SUBNET}.{n}.2"]), stdin=subprocess.DEVNULL,
                             capture_output=True, timeout=5).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError(f"rpcbind of server {n} does not answer at {SUBNET}.{n}.2 from the client side")
            time.sleep(0.01)
