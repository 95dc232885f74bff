"""The ``uswap`` command line.

Every command turns the errors users can cause (bad sizes, missing paths, a
store in use, a refused store) into one line on stderr and exit status 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from uswap.core import PAGE_SIZE, AlignedBuffer
from uswap.store.checks import check_store
from uswap.store.mkswap import mkswap
from uswap.store.lock import StoreUnusable
from uswap.store.swapfile import SwapStore
from uswap.units import format_size, parse_size

DEFAULT_STORE = "/var/tmp/uswap/store"
DEFAULT_STORE_SIZE = 256 << 20


class UsageError(Exception):
    pass


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _progress(label: str):
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        print(f"\r{label}: {format_size(done)} of {format_size(total)}", end=end, file=sys.stderr, flush=True)
    return show


def cmd_mkswap(args) -> int:
    header = mkswap(args.path, args.size, page_size=args.page_size, force=args.force,
                    progress=_progress("writing"))
    print(f"Setting up uswap store version {header.version}, size = {format_size(header.slot_count * header.page_size)} "
          f"({header.slot_count} slots of {format_size(header.page_size)})")
    print(f"UUID={header.uuid}")
    return 0


def cmd_check(args) -> int:
    report = check_store(args.path)
    print(report.render())
    return 0 if report.usable else 1


def cmd_demo(args) -> int:
    """Create (if needed) and check the default store, then round-trip pages through it."""
    path = args.store
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        print(f"creating default store {path} ({format_size(DEFAULT_STORE_SIZE)})")
        mkswap(path, DEFAULT_STORE_SIZE, progress=_progress("writing"))
    report = check_store(path)
    print(report.render())
    if not report.usable:
        return 1
    with SwapStore.open(path) as store:
        batch = 32
        pages = min(store.slot_count - store.slot_count % batch, 16384)
        buf = AlignedBuffer(batch * PAGE_SIZE)
        seed = os.urandom(8)
        t0 = time.perf_counter()
        for first in range(0, pages, batch):
            for i in range(batch):
                buf.page(i)[:16] = seed + (first + i).to_bytes(8, "little")
            store.write_slots(first, batch, buf)
        t1 = time.perf_counter()
        for first in range(0, pages, batch):
            store.read_slots(first, batch, buf)
            for i in range(batch):
                if bytes(buf.page(i)[:16]) != seed + (first + i).to_bytes(8, "little"):
                    print(f"slot {first + i}: wrong data read back", file=sys.stderr)
                    return 1
        t2 = time.perf_counter()
    mib = pages * PAGE_SIZE / (1 << 20)
    print(f"round trip: {pages} pages in batches of {batch} (O_DIRECT, crc32c checked): "
          f"write {mib / (t1 - t0):.0f} MiB/s, read {mib / (t2 - t1):.0f} MiB/s, 0 mismatches")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uswap", description="Userspace swap over userfaultfd.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mkswap", help="create a store file")
    p.add_argument("path")
    p.add_argument("--size", type=_size, required=True, help="file size, header page included (e.g. 1G)")
    p.add_argument("--page-size", type=_size, default=PAGE_SIZE, help="slot size (default: the system page)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file that is not a uswap store")
    p.set_defaults(func=cmd_mkswap)

    p = sub.add_parser("check", help="run the activation checks on a store; exit 0 only if usable")
    p.add_argument("path")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("demo", help="create, check and exercise the default store")
    p.add_argument("--store", default=DEFAULT_STORE, help=f"store path (default {DEFAULT_STORE})")
    p.set_defaults(func=cmd_demo)
    return parser


def _describe(e: OSError) -> str:
    text = e.strerror or str(e)
    return f"{e.filename}: {text}" if e.filename else text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StoreUnusable as e:
        print(e.report.render(), file=sys.stderr)
        print(f"uswap {args.command}: error: {_describe(e)}", file=sys.stderr)
    except (OSError, ValueError) as e:
        text = _describe(e) if isinstance(e, OSError) else str(e)
        print(f"uswap {args.command}: error: {text}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"uswap {args.command}: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
