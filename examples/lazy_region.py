#!/usr/bin/env python3
"""A memory region whose pages are made on first touch, with uswap's userfaultfd binding.

Purpose: show the binding's shape in thirty lines — open a uffd with the
features you need, register a range, serve MISSING faults from a thread with
UFFDIO_COPY, read the region back from C (so that the faulting thread does not
hold the GIL that the serving thread needs).

Caveats: needs root or access to /dev/userfaultfd; the region is private
anonymous memory of this process, not a uswap client region.
"""

import argparse
import ctypes
import mmap
import select
import threading

from uswap.core import PAGE_SIZE, AlignedBuffer, page_copy
from uswap.uffd import Feature, Pagefault, RegisterMode, Userfaultfd


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=64)
    return parser.parse_args()


def main():
    args = parse_args()
    length = args.pages * PAGE_SIZE
    region = mmap.mmap(-1, length)
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))

    uffd = Userfaultfd.open(Feature.THREAD_ID)
    uffd.register(address, length, RegisterMode.MISSING)
    served = []
    done = threading.Event()

    def serve():
        page = AlignedBuffer(PAGE_SIZE)
        poller = select.poll()
        poller.register(uffd.fd, select.POLLIN)
        while not done.is_set():
            if not poller.poll(50):
                continue
            for event in uffd.read_events():
                if isinstance(event, Pagefault):
                    index = (event.address - address) // PAGE_SIZE
                    page.view[:8] = index.to_bytes(8, "little")
                    uffd.copy(address + index * PAGE_SIZE, page.address, PAGE_SIZE)
                    served.append(index)

    server = threading.Thread(target=serve)
    server.start()
    out = AlignedBuffer(length)
    page_copy(out.address, address, length)  # faults every page, GIL released
    done.set()
    server.join()
    bad = [i for i in range(args.pages) if int.from_bytes(out.view[i * PAGE_SIZE:i * PAGE_SIZE + 8], "little") != i]
    print(f"{len(served)} faults served, {args.pages - len(bad)} of {args.pages} pages correct")
    uffd.close()
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
