"""Asking a daemon for its status, and showing it the way swapon --show would."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import time

from uswap.protocol import MAX_PACKET, OP_STATUS, Reply, Request, default_socket_path
from uswap.units import format_size


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# Who may connect, as the C client says it on EACCES (csrc/client/uswap_client.c); `uswap status` and `uswap run` too.
WHO_MAY_CONNECT = ("the daemon serves its own uid and members of its group (uswap by default; see README \"Who may "
                   "use uswap\")")


def fetch_status(socket_path: str | None = None, timeout: float = 10.0) -> dict:
    """The daemon's status; like the C client, only from a daemon run by root or by us."""
    path = socket_path or default_socket_path()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except PermissionError:
            raise OSError(errno.EACCES, f"no uswap daemon answers: permission denied: {WHO_MAY_CONNECT}",
                          path) from None
        except OSError as e:
            raise OSError(e.errno, f"no uswap daemon answers: {e.strerror}", path) from None
        _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid not in (0, os.geteuid()):
            me = "root" if os.geteuid() == 0 else f"root or uid {os.geteuid()} (you)"
            raise OSError(errno.EPERM, f"refusing the uswap daemon: it runs as uid {uid}, not {me}", path)
        sock.send(Request(OP_STATUS).pack())
        reply = Reply.unpack(sock.recv(MAX_PACKET))
    if reply.status:
        raise OSError(reply.status, reply.text)
    return json.loads(reply.text)


def _pages(n: int, page: int) -> str:
    return format_size(n * page)


def render_status(status: dict) -> str:
    d = status["daemon"]
    ps = d["page_size"]
    lines = [
        f"{'STORE':<28} {'SIZE':>7} {'USED':>7} {'RESIDENT':>8} {'BUDGET':>7} {'PSWPIN':>8} {'PSWPOUT':>8} "
        f"{'WB':>4} {'RERR':>5} {'WERR':>5}  HEALTH",
        f"{d['store']:<28} {_pages(d['slots_total'], ps):>7} {_pages(d['slots_used'], ps):>7} "
        f"{_pages(d['resident_pages'], ps):>8} {_pages(d['budget_pages'], ps):>7} {d['pswpin']:>8} "
        f"{d['pswpout']:>8} {d['writeback_pages']:>4} {d['read_errors']:>5} {d['write_errors']:>5}  "
        f"{d['store_health']}",
    ]
    if status.get("copies", 1) > 1:
        lines.append(f"  every slot on {status['copies']} of these stores (--copies)")
    for store in status.get("stores", []):      # the members of a store set (uswap.store.storeset)
        used = "-" if store["used_slots"] is None else _pages(store["used_slots"], ps)
        lines.append(f"  {store['url']:<26} {_pages(store['slots'], ps):>7} {used:>7}  prio {store['prio']}, "
                     f"{store['reads']} reads, {store['writes']} writes, {store['errors']} errors"
                     + (f", {store['fallbacks']} read from the other copy" if "fallbacks" in store else "")
                     + f"  {store['health']}")
    shares = d.get("shares")
    if shares:      # one budget for regions and runs (uswap.daemon.budget)
        parts = " + ".join(f"{kind} {_pages(k['resident_pages'], ps)} (line {_pages(k['line_pages'], ps)}, fair "
                           f"{_pages(k['fair_pages'], ps)})" for kind, k in shares.items() if k["clients"])
        lines.append(f"BUDGET {_pages(d['budget_pages'], ps)} (hard {_pages(d['hard_pages'], ps)}): resident "
                     f"{_pages(d['total_resident_pages'], ps)}" + (f" = {parts}" if parts else "")
                     + (f"; pool {_pages(d['pool_pages'], ps)}" if d.get("pool_pages") else ""))
    if "pool" in status:        # the compressed pool (uswap.daemon.pool); null: off
        lines.append(render_pool(status["pool"], ps))
    nfs = status.get("nfs")
    if nfs:
        since = time.strftime("%H:%M:%S", time.localtime(nfs["since"]))
        lines.append(f"NFS server {nfs['server']}: {nfs['state']} since {since}, {nfs['connects']} connect(s), "
                     f"{nfs['retries']} retried request(s), {nfs['stable']} writes, timeout {nfs['timeout_s']:g}s"
                     + (f"; last error: {nfs['last_error']}" if nfs["last_error"] else ""))
    if status["regions"]:
        lines.append("")
        lines.append(f"{'REGION':>6} {'PID':>7} {'SIZE':>7} {'RESIDENT':>8} {'SWAPPED':>8} {'PSWPIN':>8} "
                     f"{'PSWPOUT':>8} {'FAULTS':>8} {'RERR':>5} {'WERR':>5} {'POISONED':>8}")
        for r in status["regions"]:
            lines.append(f"{r['id']:>6} {r['pid']:>7} {_pages(r['size_pages'], ps):>7} "
                         f"{_pages(r['resident_pages'], ps):>8} {_pages(r['swapped_pages'], ps):>8} "
                         f"{r['pswpin']:>8} {r['pswpout']:>8} {r['faults']:>8} {r['read_errors']:>5} "
                         f"{r['write_errors']:>5} {r['poisoned']:>8}")
    if status.get("runs"):      # processes of `uswap run` (uswap.daemon.runprocess)
        lines.append("")
        lines.append(f"{'RUN':>6} {'PID':>7} {'PARENT':>7} {'BUDGET':>7} {'RESIDENT':>8} {'SWAPPED':>8} "
                     f"{'PSWPIN':>8} {'PSWPOUT':>8} {'FAULTS':>8} {'RANGES':>6} {'POISONED':>8}")
        for r in sorted(status["runs"], key=lambda r: (r["run"], r["id"])):   # a run's processes together
            lines.append(f"{r['run']:>6} {r['pid'] or '?':>7} {r['parent'] or '-':>7} "
                         f"{_pages(r['budget_pages'], ps):>7} "
                         f"{_pages(r['resident_pages'], ps):>8} {_pages(r['swapped_pages'], ps):>8} "
                         f"{r['pswpin']:>8} {r['pswpout']:>8} {r['faults']:>8} {r['registered_ranges']:>6} "
                         f"{r['poisoned']:>8}")
    return "\n".join(lines)


def render_pool(pool: dict | None, page_size: int) -> str:
    """The POOL line: what the compressed pool holds, in what, and what it did."""
    if pool is None:
        return "POOL off"
    ratio = f"{pool['ratio']:.2f}" if pool["ratio"] is not None else "-"
    return (f"POOL {pool['compressor']} {format_size(pool['charged_bytes'])} of {format_size(pool['max_bytes'])}: "
            f"{pool['stored_pages']} pages ({pool['same_filled_pages']} same-filled) in "
            f"{format_size(pool['compressed_bytes'])}, ratio {ratio}; stores {pool['stores']}, loads {pool['loads']}, "
            f"rejected {pool['rejected']}, written back {pool['written_back']}, corrupted {pool['corrupted']}")


def render_mounts(mounts: dict) -> str:
    lines = [f"{'MOUNT':<28} {'STORE':<28} {'FILES':>5} {'READ':>8} {'WRITTEN':>8} {'RERR':>5} {'WERR':>5}"]
    for mountpoint, m in mounts.items():
        if "error" in m:
            lines.append(f"{mountpoint:<28} {m['error']}")
            continue
        lines.append(f"{mountpoint:<28} {m['store']:<28} {m['files']:>5} {m['pages_read']:>8} "
                     f"{m['pages_written']:>8} {m['read_errors']:>5} {m['write_errors']:>5}")
    return "\n".join(lines)
