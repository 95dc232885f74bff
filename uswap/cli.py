"""The ``uswap`` command line.

Every command turns the errors users can cause (bad sizes, missing paths, a
store in use, a refused store) into one line on stderr and exit status 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

from uswap.config import DEFAULTS, IO_MODES, c_client_flags
from uswap.core import PAGE_SIZE
from uswap.daemon import options
from uswap.extras import MissingExtra, require
from uswap.nfs import DEFAULT_TIMEOUT, STABLE_MODES
from uswap.nfs.url import is_nfs_url
from uswap.paths import secure_directory
from uswap.store.checks import check_store
from uswap.store.mkswap import mkswap
from uswap.store.sealing import ENCRYPT_MODES
from uswap.store.lock import StoreUnusable
from uswap.units import format_size, parse_size

DEFAULT_STORE = DEFAULTS.store          # the defaults live in uswap.config.DEFAULTS
DEFAULT_STORE_SIZE = DEFAULTS.store_size
DEFAULT_BUDGET = DEFAULTS.budget
DEFAULT_GROUP = DEFAULTS.group
DEFAULT_FUSE_STORE = DEFAULTS.fuse_store
ENCRYPT_HELP = ("seal every slot with AES-256-GCM under a key only this process holds, so the store (local or "
                "nfs://) never holds readable data (default on; off: crc32c only; cost: docs/BENCHMARKS.md)")
DEFAULT_STORE_DIR = os.path.dirname(DEFAULT_STORE)  # created 0700, never trusted if someone else's
UDEV_RULE = "60-uswap.rules"  # in uswap/data: /dev/userfaultfd for group uswap (README "Who may use uswap")


class UsageError(Exception):
    pass


class _Stores(argparse.Action):
    """``--store`` given once or more: the list of them, which replaces the default's (argparse's append
    would add to it)."""

    def __call__(self, parser, namespace, value, option_string=None):
        stores = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [value] if stores is self.default else [*stores, value])


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _nfs_options(p: argparse.ArgumentParser, *, stable: bool = False) -> None:
    p.add_argument("--nfs-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="nfs:// stores: how long a request waits for a server that is down, retrying, before "
                        f"it fails (a fault then gets SIGBUS; eviction pauses) (default {DEFAULT_TIMEOUT:g})")
    if stable:
        p.add_argument("--nfs-stable", choices=STABLE_MODES, default=STABLE_MODES[0],
                       help="nfs:// stores: FILE_SYNC writes, or UNSTABLE writes + COMMIT (default file_sync: "
                            "measured, docs/BENCHMARKS.md)")


def _progress(label: str):
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        print(f"\r{label}: {format_size(done)} of {format_size(total)}", end=end, file=sys.stderr, flush=True)
    return show


def cmd_mkswap(args) -> int:
    if is_nfs_url(args.path):
        import trio

        from uswap.nfs.mkswap import mkswap_nfs
        header = trio.run(functools.partial(mkswap_nfs, args.path, args.size, page_size=args.page_size,
                                            force=args.force, progress=_progress("writing"),
                                            timeout=args.nfs_timeout))
    else:
        header = mkswap(args.path, args.size, page_size=args.page_size, force=args.force,
                        progress=_progress("writing"))
    print(f"Setting up uswap store version {header.version}, size = {format_size(header.slot_count * header.page_size)} "
          f"({header.slot_count} slots of {format_size(header.page_size)})")
    print(f"UUID={header.uuid}")
    return 0


def cmd_check(args) -> int:
    if is_nfs_url(args.path):
        import trio

        from uswap.nfs.store import check_nfs_store
        report = trio.run(functools.partial(check_nfs_store, args.path, timeout=args.nfs_timeout))
    else:
        report = check_store(args.path)
    print(report.render())
    return 0 if report.usable else 1


def ensure_store(path: str, size: int = DEFAULT_STORE_SIZE) -> None:
    """Create a local store with mkswap semantics if nothing is there yet (an
    nfs:// store must exist: `uswap mkswap URL --size SIZE`).

    The directory of a store created here, and the default directory always,
    must be ours alone: created 0700, refused if it is a symlink, someone
    else's, or open to others (uswap.paths.secure_directory)."""
    if is_nfs_url(path):
        return
    directory = os.path.dirname(os.path.abspath(path))
    if directory == DEFAULT_STORE_DIR or not os.path.exists(path):
        secure_directory(directory, 0o700)
    if not os.path.exists(path):
        print(f"creating store {path} ({format_size(size)})", file=sys.stderr)
        mkswap(path, size, progress=_progress("writing"))


def cmd_daemon(args) -> int:
    import logging

    import trio

    from uswap.daemon.main import harden_process, lock_memory, run_daemon
    from uswap.daemon.pool import PoolOptions
    from uswap.daemon.server import check_socket_path, writeback_batch
    from uswap.protocol import daemon_socket_path
    from uswap.daemon.runpolicy import parse_run_users
    from uswap.store.storeset import store_specs
    # Every option is checked before anything is made or started: a refused one leaves no directory,
    # store, socket, lock or log behind (tests/test_cli.py).
    batch = writeback_batch(args.writeback_batch)
    options.resident(args.resident)
    pool = PoolOptions(options.pool(args.pool, args.resident), options.pool_compressor(args.pool_compressor))
    options.readahead(args.readahead)
    fault_threads = options.fault_threads(args.fault_threads)
    options.timeout("--nfs-timeout", args.nfs_timeout)
    options.timeout("--map-timeout", args.map_timeout)
    if args.user_max_size is not None:
        options.user_max_size(args.user_max_size)
    options.count("--user-max-regions", args.user_max_regions, 0)        # 0: other uids map no region
    options.count("--user-max-connections", args.user_max_connections, 1)
    options.count("--user-max-runs", args.user_max_runs, 0)              # 0: runs for the daemon's uid only
    run_users = parse_run_users(args.run_users)
    stores = store_specs(args.store, args.copies)
    group = socket_group(args.group)
    socket_path = args.socket or daemon_socket_path()  # may ask for --socket
    check_socket_path(socket_path)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="uswap daemon[%(process)d]: %(levelname)s %(message)s")
    for spec in stores:
        ensure_store(spec.url)
    lock_memory()
    harden_process()
    trio.run(functools.partial(run_daemon, store_specs=stores, socket_path=socket_path,
                               budget=args.resident, io_mode=args.io, readahead=args.readahead,
                               fault_threads=fault_threads, nfs_timeout=args.nfs_timeout, nfs_stable=args.nfs_stable, group=group,
                               user_max_size=args.user_max_size, user_max_regions=args.user_max_regions,
                               user_max_connections=args.user_max_connections, map_timeout=args.map_timeout,
                               encrypt=args.encrypt == "on", writeback_batch=batch, run_users=run_users,
                               user_max_runs=args.user_max_runs, max_run_processes=args.max_run_processes,
                               pool=pool if pool.max_bytes else None, copies=args.copies))
    return 0


def socket_group(name: str | None) -> int | None:
    """The gid whose members may use the daemon: --group (a name or a number), else the
    group "uswap" if there is one, else None (the socket is then 0600: only our uid)."""
    import grp
    if name is None:
        try:
            return grp.getgrnam(DEFAULT_GROUP).gr_gid
        except KeyError:
            return None
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError(f"--group: no group named {name!r}") from None


def cmd_status(args) -> int:
    """The daemon's status and every uswap FUSE mount's counters (--format text, json or prometheus)."""
    from uswap.daemon.status import fetch_status, render_mounts, render_status
    fmt = "json" if args.json else args.format
    from uswap.fuse.mounts import uswap_mounts
    mounts = {}
    for mountpoint in uswap_mounts():
        try:
            with open(os.path.join(mountpoint, ".status")) as f:
                mounts[mountpoint] = json.load(f)
        except (OSError, ValueError) as e:
            mounts[mountpoint] = {"error": str(e)}
    try:
        status = fetch_status(args.socket)
    except OSError as e:
        if fmt == "prometheus":   # a scrape still gets uswap_daemon_up 0
            print(f"uswap status: {_describe(e)}", file=sys.stderr)
        elif not mounts or args.socket:
            raise
        status = None
    if fmt == "prometheus":
        from uswap.metrics import prometheus
        sys.stdout.write(prometheus(status, mounts, page_size=PAGE_SIZE))
        return 0
    if fmt == "json":
        print(json.dumps({**(status or {}), "mounts": mounts}, indent=2))
        return 0
    parts = [render_status(status)] if status else []
    if mounts:
        parts.append(render_mounts(mounts))
    print("\n\n".join(parts))
    return 0


def cmd_run(args) -> int:
    """Exec CMD with the preload library and the daemon's socket: its anonymous memory is then swapped
    by the daemon under --resident (docs/RUN-DESIGN.md).  Refuses what would run unbudgeted."""
    import errno
    import socket
    from uswap.daemon.status import WHO_MAY_CONNECT, default_socket_path
    from uswap.run import LIBRUN, NotPreloadable, check_preloadable
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise ValueError("no command: uswap run [--resident SIZE] [--socket PATH] -- CMD ARGS")
    if args.resident is not None:
        options.resident(args.resident)
    try:
        check_preloadable(cmd[0])
    except NotPreloadable as e:
        raise ValueError(f"refused: {e}") from None
    if not os.path.exists(LIBRUN):
        raise ValueError(f"{LIBRUN}: the preload library is not built (python3 setup.py build_ext --inplace)")
    path = os.path.abspath(args.socket or default_socket_path())
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(path)     # the daemon closes a connection that says nothing, quietly
        except PermissionError:     # not the daemon's uid nor in its socket's group: what the region client says
            raise OSError(errno.EACCES, f"no uswap daemon answers: permission denied: {WHO_MAY_CONNECT} (the "
                                        "program would run unbudgeted)", path) from None
        except OSError as e:
            raise OSError(e.errno, f"no uswap daemon answers: {e.strerror} (the program would run unbudgeted)",
                          path) from None
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(x for x in (LIBRUN, env.get("LD_PRELOAD")) if x)
    env["USWAP_RUN_SOCKET"] = path
    env["USWAP_RUN_RESIDENT"] = str(args.resident or 0)     # 0: the daemon's budget
    env["USWAP_RUN_REQUIRED"] = "1"     # refused by the daemon (or any failure): the preload exits 1, one line
    # No rseq registration: the kernel writes a thread's rseq area (in its TLS, registered memory) on every
    # return to user mode; if that page is swapped and the daemon has died, the write meets the agent's
    # poison in kernel mode and the kernel forces SIGSEGV instead of the SIGBUS a swapped page must give
    # (seen: 1 run in 2-6 of tests/test_run_probes.py's daemon-kill tests; 0 in 8 with this).
    env["GLIBC_TUNABLES"] = ":".join(x for x in (env.get("GLIBC_TUNABLES"), "glibc.pthread.rseq=0") if x)
    sys.stdout.flush()
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as e:
        raise OSError(e.errno, e.strerror, cmd[0]) from None


def cmd_config(args) -> int:
    package = os.path.dirname(os.path.abspath(__file__))
    if args.udev_rule:
        if args.cflags or args.libs:
            raise ValueError("--udev-rule goes alone")
        print(os.path.join(package, "data", UDEV_RULE))
        return 0
    flags = c_client_flags(cflags=args.cflags, libs=args.libs)
    if not flags:
        raise ValueError("say --cflags, --libs or both (or --udev-rule)")
    print(" ".join(flags))
    return 0


def cmd_bench(args) -> int:
    import signal

    require("rich", "uswap bench")
    if args.plot:
        require("matplotlib", "uswap bench --plot")
    from rich.console import Console
    from rich.progress import Progress

    from uswap.bench.report import breakdown_table, markdown, plot, table
    from uswap.bench.runner import WORKLOADS, Bench, BenchConfig, failed, parse_fill, split_workload

    workloads = args.workloads.split(",")
    unknown = {split_workload(w)[0] for w in workloads} - set(WORKLOADS)
    if unknown:
        raise ValueError(f"unknown workloads {sorted(unknown)} (choose from {', '.join(WORKLOADS)})")
    against = [a for a in args.against.split(",") if a]
    unknown = set(against) - {"native", "fuse", "zram", "zswap"}
    if unknown:
        raise ValueError(f"unknown --against rows {sorted(unknown)} (choose from native, fuse, zram, zswap)")
    if "fuse" in against:
        require("pyfuse3", "uswap bench --against fuse")
    run = [io for io in args.run.split(",") if io]
    unknown = set(run) - set(IO_MODES)
    if unknown:
        raise ValueError(f"unknown --run io modes {sorted(unknown)} (choose from {', '.join(IO_MODES)})")
    io_modes = args.io.split(",")
    if args.pool and not any(io_modes) and not run:
        raise ValueError("--pool adds rows next to the uswap rows: say --io or --run modes too")
    if args.pool * 2 > args.resident:    # the daemon's own rule: the pool is charged to the budget
        raise ValueError(f"--pool {format_size(args.pool)} is over half of --resident {format_size(args.resident)}")
    if args.pool_compressor and not args.pool:
        raise ValueError("--pool-compressor without --pool: say the pool's size")
    if not args.report:   # built once, into the cache; its errors come before any progress display
        from uswap.bench.build import workload_binaries
        workload_binaries()
    console = Console(stderr=True)
    if os.geteuid() != 0 and against:
        console.print("[yellow]not root: kernel swap rows need root (swapon, memcg); running the uswap rows only")
        against = []
    if os.geteuid() != 0 and run:
        console.print("[yellow]not root: `uswap run` rows need a root daemon (EVENT_FORK); leaving them out")
        run = []
    fill = None if args.fill is None else parse_fill(args.fill)
    pin = [int(c) for c in args.pin.split(",")] if args.pin else [None, None]
    config = BenchConfig(fill=fill, workloads=workloads, size=args.size, resident=args.resident, against=against,
                         io=io_modes, repeat=args.repeat, workdir=args.workdir,
                         readahead=args.readahead, accesses=args.accesses, daemon_cpu=pin[0], workload_cpu=pin[1],
                         run=run, pool=args.pool, pool_compressor=args.pool_compressor,
                         equal_memory=args.equal_memory)
    if args.report:
        with open(args.report) as f:
            bench = Bench.from_json(json.load(f))
    elif args.breakdown:
        bench = Bench(config)
        bench.run_breakdown()
    else:
        bench = Bench(config)

        def on_term(signum, frame):  # restore global settings on SIGTERM too
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, on_term)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("bench", total=None)

            def show(done, total, what):
                progress.update(task, completed=done, total=total, description=what)
            bench.run_all(show)
    if args.json:  # the raw runs first: nothing below may lose them
        with open(args.json, "w") as f:
            json.dump(bench.to_json(), f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(bench) + "\n")
    if args.plot and bench.runs:
        plot(bench, args.plot)
    out = Console(width=None if sys.stdout.isatty() else 160)
    if bench.breakdown:
        out.print(breakdown_table(bench))
    if bench.runs:
        for t in table(bench):
            out.print(t)
    for line in bench.not_run():
        out.print(f"not run under `uswap run`: {line}")
    bad = [r for r in bench.runs if failed(r) or r["mismatches"]]
    return 1 if bad else 0


def cmd_mount(args) -> int:
    require("pyfuse3", "uswap mount")
    if not args.foreground:
        from uswap.fuse.mount import mount_in_background
        store = args.store if is_nfs_url(args.store) else os.path.abspath(args.store)  # the server runs in /
        pid, log_path = mount_in_background(args.mountpoint, [
            "--store", store, "--size", str(args.size), "--files", str(args.files),
            "--nfs-timeout", str(args.nfs_timeout), "--nfs-stable", args.nfs_stable, "--encrypt", args.encrypt])
        print(f"mounted {args.mountpoint} (served by process {pid}, log {log_path})")
        return 0
    import logging

    import trio

    from uswap.fuse.mount import prepare_process, run_mount
    from uswap.store.mkswap import validate_geometry
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="uswap mount[%(process)d]: %(levelname)s %(message)s")
    file_pages = validate_geometry(args.size + PAGE_SIZE, PAGE_SIZE)
    if not os.path.isdir(args.mountpoint):
        raise OSError(2, "mount point is not a directory", args.mountpoint)
    ensure_store(args.store, args.files * args.size + PAGE_SIZE)
    prepare_process()
    trio.run(functools.partial(run_mount, args.store, os.path.abspath(args.mountpoint), files=args.files,
                               file_pages=file_pages, ready_fd=args.ready_fd, nfs_timeout=args.nfs_timeout,
                               nfs_stable=args.nfs_stable, encrypt=args.encrypt == "on"))
    return 0


def cmd_swapon(args) -> int:
    from uswap.fuse.swap import swapon
    print(swapon(args.file, args.priority))
    return 0


def cmd_swapoff(args) -> int:
    from uswap.fuse.swap import swapoff
    print(swapoff(args.file))
    return 0


def cmd_umount(args) -> int:
    from uswap.fuse.swap import umount
    umount(args.mountpoint)
    return 0


def cmd_demo(args) -> int:
    require("numpy", "uswap demo", "demo")
    from uswap.demo import run_demo
    ensure_store(args.store)
    return run_demo(store_path=args.store, budget=args.resident, size=args.size)


def cmd_install_units(args) -> int:
    from uswap.systemd import install_units
    for path in install_units(args.dir):
        print(f"installed {path}")
    print("the daemon: systemctl enable --now uswap.service; kernel swap through a uswap FUSE store: "
          "systemctl enable --now uswap-swap.service (options: /etc/default/uswap, README \"As a service\")")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("uswap")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uswap", description="Userspace swap over userfaultfd.")
    parser.add_argument("--version", action="version", version=f"uswap {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mkswap", help="create a store file")
    p.add_argument("path")
    p.add_argument("--size", type=_size, required=True, help="file size, header page included (e.g. 1G)")
    p.add_argument("--page-size", type=_size, default=PAGE_SIZE, help="slot size (default: the system page)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file that is not a uswap store")
    _nfs_options(p)
    p.set_defaults(func=cmd_mkswap)

    p = sub.add_parser("check", help="run the activation checks on a store; exit 0 only if usable")
    p.add_argument("path")
    _nfs_options(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("daemon", help="serve client regions (foreground; SIGTERM/SIGINT stop it)")
    p.add_argument("--store", action=_Stores, default=[DEFAULT_STORE], metavar="PATH|URL[,prio=N]",
                   help=f"store path or nfs:// URL (default {DEFAULT_STORE}; a missing local one is created, 1 GiB); "
                        "given several times, a store set: a higher prio (0 to 32767, default 0) fills first, "
                        "stores of equal prio are striped (docs/DESIGN.md \"Store sets\")")
    p.add_argument("--copies", type=int, default=1, choices=(1, 2),
                   help="stores of one priority holding each slot (default 1); with 2, a read falls back to the "
                        "other copy when a store fails, and a store that comes back is resynchronised")
    p.add_argument("--socket", default=None, help="socket path (default: /run/uswap/uswap.sock for root, "
                                                  "$XDG_RUNTIME_DIR/uswap.sock otherwise)")
    p.add_argument("--resident", type=_size, default=DEFAULT_BUDGET,
                   help=f"resident budget, {format_size(options.MIN_BUDGET)} to the physical memory (default "
                        f"{format_size(DEFAULT_BUDGET)})")
    p.add_argument("--io", choices=IO_MODES, default=DEFAULTS.io,
                   help=f"slot I/O mode (default {DEFAULTS.io}: measured, docs/BENCHMARKS.md)")
    p.add_argument("--readahead", type=int, default=DEFAULTS.readahead,
                   help=f"swap-in window in pages, 1 (off) to {options.MAX_READAHEAD} (default {DEFAULTS.readahead})")
    p.add_argument("--fault-threads", type=int, default=DEFAULTS.fault_threads, metavar="N",
                   help=f"threads serving each region's faults, 1 to {options.MAX_FAULT_THREADS} (default "
                        f"{DEFAULTS.fault_threads})")
    p.add_argument("--writeback-batch", type=int, default=None, metavar="N",
                   help="pages per writeback batch, 1 to 256 (default 64: measured; "
                        "docs/BENCHMARKS.md)")
    p.add_argument("--encrypt", choices=ENCRYPT_MODES, default=ENCRYPT_MODES[0], help=ENCRYPT_HELP)
    p.add_argument("--pool", type=_size, default=DEFAULTS.pool, metavar="SIZE",
                   help="a compressed pool in front of the store, like zswap: evicted pages that compress are kept "
                        "in memory, compressed, up to SIZE, paid for out of --resident (at most half of it); 0: "
                        "off (the default: docs/DESIGN.md \"Compressed pool\")")
    p.add_argument("--pool-compressor", default=DEFAULTS.pool_compressor, metavar="NAME",
                   help=f"the pool's compressor: {' or '.join(options.POOL_COMPRESSORS)} (default "
                        f"{DEFAULTS.pool_compressor}: the fastest)")
    _nfs_options(p, stable=True)
    access = p.add_argument_group("who may use the daemon (docs/SECURITY.md)")
    access.add_argument("--group", default=None, metavar="GROUP",
                        help=f"members of GROUP (a name or gid) may connect: the socket is 0660 (default: the group "
                             f"{DEFAULT_GROUP!r} if it exists, else the socket is 0600: only the daemon's own uid)")
    access.add_argument("--user-max-size", type=_size, default=None, metavar="SIZE",
                        help="bytes of regions one uid may map at once (default: half the store); "
                             "the daemon's own uid is not limited")
    access.add_argument("--user-max-regions", type=int, default=64, metavar="N",
                        help="regions one uid may hold at once (default 64)")
    access.add_argument("--user-max-connections", type=int, default=64, metavar="N",
                        help="connections one uid may hold open at once (default 64)")
    access.add_argument("--map-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="close a connection that has not mapped a region (or finished a run's handshake) "
                             "by then (default 10)")
    access.add_argument("--run-users", default=None, metavar="LIST",
                        help="uids or user names (comma-separated) whose programs `uswap run` may budget, besides "
                             "root and the daemon's own uid (always served): each run gets the daemon's "
                             "/dev/userfaultfd fd, i.e. kernel-mode userfaultfd (others are refused)")
    access.add_argument("--user-max-runs", type=int, default=16, metavar="N",
                        help="processes of `uswap run` one uid may have served at once, fork children included "
                             "(default 16; each costs the daemon a thread, up to 7 fds and ~600 KiB of locked "
                             "memory); a fork child over it runs unbudgeted, and a page swapped out before its "
                             "fork gives it SIGBUS (docs/SECURITY.md)")
    access.add_argument("--max-run-processes", type=int, default=1024, metavar="N",
                        help="processes of `uswap run` of every uid together, the daemon's own included "
                             "(default 1024, lowered so that they hold at most half of RLIMIT_NOFILE)")
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("run", help="run an unmodified program with its anonymous memory swapped by the daemon")
    p.add_argument("--resident", type=_size, default=None, metavar="SIZE",
                   help=f"the program's resident budget, {format_size(options.MIN_BUDGET)} to the physical memory "
                        "(default and most: the daemon's budget)")
    p.add_argument("--socket", default=None, help="the daemon's socket (default: as for uswap status)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="show a running daemon's store and regions")
    p.add_argument("--socket", default=None)
    p.add_argument("--format", choices=("text", "json", "prometheus"), default="text",
                   help="json: machine-readable (keys in docs/DESIGN.md); prometheus: text exposition for "
                        "node_exporter's textfile collector or a scrape (README \"Metrics\")")
    p.add_argument("--json", action="store_true", help="the same as --format json")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("config", help="compiler flags for C clients: cc prog.c $(uswap config --cflags --libs)")
    p.add_argument("--cflags", action="store_true")
    p.add_argument("--libs", action="store_true")
    p.add_argument("--udev-rule", action="store_true",
                   help="print the path of the udev rule that gives group uswap /dev/userfaultfd "
                        "(install: cp it to /etc/udev/rules.d/, then udevadm trigger --sysname-match=userfaultfd)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("bench", help="measure uswap against kernel swap on the same disk")
    p.add_argument("--workloads", default="seq,random,zipf,hog",
                   help="comma-separated: seq,random,zipf,hog,threads (8 threads random on one region); "
                        "WORKLOAD:FILL gives one its own page contents (as --fill), e.g. seq:zeros,seq:half,hog")
    p.add_argument("--size", type=_size, default=1 << 30, help="working set (default 1G)")
    p.add_argument("--resident", type=_size, default=256 << 20, help="budget and memcg limit (default 256M)")
    p.add_argument("--against", default="native", help="kernel rows: native,fuse,zram,zswap (default native)")
    p.add_argument("--io", default="sync,async",
                   help="uswap rows, comma-separated (default sync,async); nfs, nfs-commit: the store on nfs-ganesha "
                        "in a network namespace, FILE_SYNC or UNSTABLE+COMMIT writes; set: the store and a second "
                        "one like it, equal priority (a store set), sync I/O; copies: two such stores with --copies 2; "
                        "nfs-set, nfs-copies: the same over two nfs-ganesha servers on one private network")
    p.add_argument("--run", default="", metavar="IO",
                   help="`uswap run` rows: the native (plain anonymous memory) binaries unmodified under `uswap run "
                        "--resident` against a daemon with these --io modes, comma-separated (e.g. sync; default "
                        "none). Needs root")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--fill", default=None, metavar="CONTENT",
                   help="page contents: zeros (past a 16-byte header), half (half of each page random), random "
                        "(incompressible) or the random fraction, e.g. 0.25 (default: zeros for seq/random/zipf, "
                        "random for hog)")
    p.add_argument("--pool", type=_size, default=0, metavar="SIZE",
                   help="add uswap+pool/IO (and run+pool/IO) rows: the same daemon with a compressed pool of SIZE "
                        "inside its budget (daemon --pool; at most half of --resident), right after each plain row "
                        "(default 0: none)")
    p.add_argument("--pool-compressor", default=None, choices=("lz4", "zstd"),
                   help="the +pool rows' daemon --pool-compressor (default: the daemon's)")
    p.add_argument("--equal-memory", action="store_true",
                   help="give every backend the same total memory, --resident = its limit + what it uses outside: "
                        "calibration runs first lower uswap's budget by its daemon RSS outside the budget and "
                        "zram's/zswap's memcg limit by their pools; where that cannot be arranged the row runs at "
                        "--resident and says so (docs/BENCHMARKS.md)")
    p.add_argument("--accesses", type=int, default=None, help="random/zipf accesses (default 200k per GiB)")
    p.add_argument("--readahead", type=int, default=DEFAULTS.readahead)
    p.add_argument("--pin", default=None, help="DAEMON_CPU,WORKLOAD_CPU (default: unpinned)")
    p.add_argument("--workdir", default=DEFAULTS.bench_workdir,
                   help="the store and swapfile go here (the workloads are built once, into ~/.cache/uswap)")
    p.add_argument("--json", default=None, metavar="FILE")
    p.add_argument("--plot", default=None, metavar="FILE", help="PNG: latency CDFs and ratio bars")
    p.add_argument("--markdown", default=None, metavar="FILE", help="the tables as Markdown")
    p.add_argument("--report", default=None, metavar="JSON", help="run nothing: report a previous --json again")
    p.add_argument("--breakdown", action="store_true",
                   help="split one swap-in fault into parts, next to the C floors (instead of the workloads)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("mount", help="serve swap files backed by a store over FUSE (for kernel swap)")
    p.add_argument("mountpoint")
    p.add_argument("--store", default=DEFAULT_FUSE_STORE, help=f"store path (default {DEFAULT_FUSE_STORE}, "
                                                               "created to fit if missing)")
    p.add_argument("--size", type=_size, default=DEFAULTS.fuse_file_size,
                   help=f"size of each swap file (default {format_size(DEFAULTS.fuse_file_size)})")
    p.add_argument("--files", type=int, default=1, help="number of swap files swap0.. (default 1)")
    p.add_argument("--foreground", action="store_true", help="stay attached (default: serve in the background)")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--encrypt", choices=ENCRYPT_MODES, default=ENCRYPT_MODES[0], help=ENCRYPT_HELP)
    _nfs_options(p, stable=True)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("swapon", help="swap on a uswap FUSE file (loop device with direct I/O, mkswap, swapon)")
    p.add_argument("file")
    p.add_argument("--priority", type=int, default=None)
    p.set_defaults(func=cmd_swapon)

    p = sub.add_parser("swapoff", help="undo uswap swapon")
    p.add_argument("file")
    p.set_defaults(func=cmd_swapoff)

    p = sub.add_parser("umount", help="unmount a uswap FUSE store (refused while a file is swapped on)")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("install-units", help="install the systemd units (uswap.service, uswap-fuse.service, "
                                             "uswap-swap.service) for this installation")
    p.add_argument("--dir", default="/etc/systemd/system", help="where (default /etc/systemd/system; then "
                                                                "systemctl daemon-reload runs)")
    p.set_defaults(func=cmd_install_units)

    p = sub.add_parser("demo", help="start a daemon on the default store and run a workload 4x its budget")
    p.add_argument("--store", default=DEFAULT_STORE, help=f"store path (default {DEFAULT_STORE})")
    p.add_argument("--resident", type=_size, default=32 << 20, help="the daemon's budget (default 32M)")
    p.add_argument("--size", type=_size, default=None, help="workload size (default 4x the budget)")
    p.set_defaults(func=cmd_demo)
    return parser


def _describe(e: OSError) -> str:
    text = e.strerror or str(e)
    return f"{e.filename}: {text}" if e.filename else text


# What a user can cause (MissingExtra is an ImportError; StoreUnusable, SocketInUse... are OSErrors).
USER_ERRORS = (MissingExtra, OSError, ValueError, KeyboardInterrupt)


def user_errors(exc: BaseException) -> list[BaseException] | None:
    """The errors in ``exc`` if every one is a user's (USER_ERRORS), else None: a bug.

    A trio nursery raises what its tasks raise as an exception group (trio >= 0.25
    always does), so "another daemon is listening here" can arrive nested in groups:
    flattened, it is still one line; one other exception anywhere makes the whole a bug."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [user_errors(e) for e in exc.exceptions]
        return None if None in leaves else [e for errors in leaves for e in errors]
    return [exc] if isinstance(exc, USER_ERRORS) else None


def _report(command: str, e: BaseException) -> int:
    """One user error as one line on stderr (a refused store's report first); returns the exit status."""
    if isinstance(e, KeyboardInterrupt):
        print(f"uswap {command}: interrupted", file=sys.stderr)
        return 130
    if isinstance(e, StoreUnusable):
        print(e.report.render(), file=sys.stderr)
    text = _describe(e) if isinstance(e, OSError) else str(e)
    print(f"uswap {command}: error: {text}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (BaseExceptionGroup, *USER_ERRORS) as e:
        errors = user_errors(e)
        if errors is None:
            raise           # a group that holds a bug: its traceback, whole
    return max(_report(args.command, e) for e in errors)


if __name__ == "__main__":
    sys.exit(main())
