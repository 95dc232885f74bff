"""Striping over NFS servers: sequential swap-out throughput with 1, 2 and 3 servers, each behind a slow link.

    python3 -m uswap.bench.striping [--servers 1,2,3] [--rate 64mbit] [--size 256M] [--resident 16M]
                                    [--repeat 3] [--on-disk] [--workdir DIR] [--json FILE]

What it measures: MiB/s of writeback through the daemon, while a client writes ``--size`` of a fresh region once,
in order, through a ``--resident`` budget: the daemon must write out all but the budget, so the client runs at the
speed of writeback.  Timed from the client's first write until the daemon has no writeback in flight; the bytes are
the daemon's ``pswpout`` over that time (pages are non-zero: none is skipped as a zero page).

Where: NFS servers on one private network (uswap.nfs.network.NfsNetwork), ``--rate`` on each server's link (tc
tbf on both ends), so that each server is the bottleneck, as a real server behind its network link is; the daemon
stripes over the first N of them (``--store`` each, one priority: 64-slot clusters in turn) and runs in the
network's client namespace.  One server without a limit is measured too: what the machine itself allows.  The
configurations are interleaved round by round; medians of ``--repeat`` rounds.  Server, daemon and client share
the machine's CPUs.  The servers' exports are on a tmpfs the bench mounts (and unmounts) in ``--workdir``: real
servers have a disk each, and three servers syncing every WRITE to one shared disk would measure that disk, not
the striping (``--on-disk`` keeps them on the workdir's filesystem).  Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import socket
import time
import uuid

from uswap.core import PAGE_SIZE
from uswap.daemon.process import DaemonProcess
from uswap.daemon.status import fetch_status
from uswap.nfs.network import NfsNetwork
from uswap.store.header import StoreHeader
from uswap.units import parse_size

MiB = 1 << 20

# The client: maps SIZE bytes, says "ready", and on "go" writes one non-zero byte pattern over them in 1 MiB steps.
_CLIENT = """
import sys, uswap
size = int(sys.argv[1])
region = uswap.Region(size)
view = memoryview(region.buffer)
chunk = bytes([0xa5]) * (1 << 20)
print("ready", flush=True)
sys.stdin.readline()
for offset in range(0, size, len(chunk)):
    view[offset:offset + len(chunk)] = chunk
print("done", flush=True)
sys.stdin.readline()
del view
region.close()
"""


def make_store(path: str, size: int) -> None:
    """A store file written in full (what mkswap makes), with plain writes: a tmpfs has no O_DIRECT.  Made before
    its server starts (ganesha must not see files change behind its back)."""
    header = StoreHeader(page_size=PAGE_SIZE, slot_count=size // PAGE_SIZE - 1, uuid=uuid.uuid4(),
                         created=int(time.time()), host=socket.gethostname(), created_by="uswap.bench.striping")
    zeros = bytes(MiB)
    with open(path, "wb") as f:
        f.write(header.pack())
        for _ in range(header.slot_count * PAGE_SIZE // MiB):
            f.write(zeros)
        f.write(bytes(header.slot_count * PAGE_SIZE % MiB))
    os.chmod(path, 0o600)


def swap_out(daemon: DaemonProcess, size: int, timeout: float = 600) -> dict:
    """One client's sequential write of ``size`` bytes through ``daemon``: seconds, MiB written out, MiB/s."""
    client = subprocess.Popen([sys.executable, "-c", _CLIENT, str(size)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=daemon.env())
    try:
        if client.stdout.readline() != "ready\n":
            raise RuntimeError(f"the client could not map its region:\n{daemon.log()[-2000:]}")
        before = fetch_status(daemon.socket)["daemon"]["pswpout"]
        start = time.monotonic()
        client.stdin.write("go\n")
        client.stdin.flush()
        if client.stdout.readline() != "done\n":
            raise RuntimeError(f"the client did not finish:\n{daemon.log()[-2000:]}")
        while (d := fetch_status(daemon.socket)["daemon"])["writeback_pages"]:
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"writeback still in flight after {timeout} s")
            time.sleep(0.005)
        seconds = time.monotonic() - start
        if d["write_errors"]:
            raise RuntimeError(f"{d['write_errors']} write errors:\n{daemon.log()[-2000:]}")
        mib = (d["pswpout"] - before) * PAGE_SIZE / MiB
        return {"seconds": round(seconds, 3), "written_mib": round(mib, 1), "mib_s": round(mib / seconds, 1)}
    finally:
        client.stdin.close()
        client.wait(60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m uswap.bench.striping", description=__doc__.split("\n\n")[1])
    p.add_argument("--servers", default="1,2,3", help="how many servers to stripe over, each a configuration")
    p.add_argument("--rate", default="64mbit", help="each server's link, both ways (a tc rate)")
    p.add_argument("--size", default="256M", help="what the client writes")
    p.add_argument("--resident", default="16M", help="the daemon's budget")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--on-disk", action="store_true", help="exports on the workdir's filesystem, not a tmpfs")
    p.add_argument("--workdir", default=None, help="servers' directories (default: a temporary one, removed)")
    p.add_argument("--json", default=None, help="write every run's numbers here")
    args = p.parse_args(argv)
    counts = sorted({int(n) for n in args.servers.split(",")})
    size = parse_size(args.size)
    store_size = size + 64 * MiB           # each store alone could take everything: the layout decides, not space
    workdir = args.workdir or tempfile.mkdtemp(prefix="uswap-bench-striping.")
    os.makedirs(workdir, exist_ok=True)
    configs = [(n, args.rate) for n in counts] + [(1, None)]
    runs: dict[str, list[dict]] = {}
    load_before = os.getloadavg()
    exports = os.path.join(workdir, "exports")
    os.makedirs(exports, exist_ok=True)
    mounted = False
    try:
        if not args.on_disk:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={(max(counts) + 1) * store_size + 64 * MiB}",
                            "uswap-bench-striping", exports], check=True)
            mounted = True
        with NfsNetwork() as network:
            limited, unlimited = [], None
            for i in range(max(counts) + 1):
                server = network.server(os.path.join(exports, f"server{i}"), rate=args.rate if i else None)
                os.makedirs(server.export_dir, exist_ok=True)
                make_store(os.path.join(server.export_dir, "bench.store"), store_size)
                server.start()
                if i:
                    limited.append(server)
                else:
                    unlimited = server
            for round_ in range(args.repeat):
                for n, rate in configs:
                    servers = limited[:n] if rate else [unlimited]
                    name = f"{n} server{'s' if n > 1 else ''} at {rate}" if rate else "1 server, no limit"
                    stores = [s.url("bench.store") for s in servers]
                    extra = tuple(a for url in stores[1:] for a in ("--store", url))
                    daemon = DaemonProcess(stores[0], os.path.join(workdir, "uswap.sock"),
                                           os.path.join(workdir, "daemon.log"), budget=args.resident, extra=extra,
                                           prefix=network.netns_cmd([]))
                    with daemon:
                        result = swap_out(daemon, size)
                    runs.setdefault(name, []).append(result)
                    print(f"round {round_ + 1}: {name}: {result['mib_s']} MiB/s ({result['written_mib']} MiB in "
                          f"{result['seconds']} s)", flush=True)
    finally:
        if mounted:
            subprocess.run(["umount", exports], check=True)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    base = statistics.median(r["mib_s"] for r in runs[f"1 server at {args.rate}"])
    print(f"\n| servers | link | MiB/s (median of {args.repeat}) | per round | over 1 server |")
    print("|---|---|---|---|---|")
    summary = {}
    for name, results in runs.items():
        median = statistics.median(r["mib_s"] for r in results)
        summary[name] = {"median_mib_s": median, "over_one": round(median / base, 2), "runs": results}
        n, _, link = name.partition(" server")
        print(f"| {n} | {link.split('at ')[-1] if 'at ' in link else 'no limit'} | {median} | "
              f"{', '.join(str(r['mib_s']) for r in results)} | "
              f"{round(median / base, 2) if 'at ' in link else '-'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rate": args.rate, "size": args.size, "resident": args.resident,
                       "exports": "disk" if args.on_disk else "tmpfs",
                       "load_before": load_before,
                       "load_after": os.getloadavg(), "configs": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
