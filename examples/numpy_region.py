#!/usr/bin/env python3
"""A NumPy array larger than the daemon's resident budget, in a uswap region.

Purpose: show the Python client — ``uswap.Region`` gives a buffer that
``numpy.frombuffer`` turns into an array; the daemon pages it to its store.
Fills the array, updates one word per page a few times, verifies everything.

Caveats: needs a running daemon (``uswap daemon``; $USWAP_SOCKET picks it).
Release every view of the buffer before the region closes.
"""

import argparse
import time

import numpy

import uswap
from uswap.units import parse_size


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("256M"))
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args()


def main():
    args = parse_args()
    words = args.size // 8
    t0 = time.perf_counter()
    with uswap.Region(words * 8) as region:
        a = numpy.frombuffer(region.buffer, dtype=numpy.uint64)
        a[:] = numpy.arange(words, dtype=numpy.uint64) * 7
        for _ in range(args.rounds):
            a[::512] += 1
        expect = numpy.arange(words, dtype=numpy.uint64) * 7
        expect[::512] += args.rounds
        mismatches = int((a != expect).sum())
        del a
    print(f"{words * 8 >> 20} MiB, {args.rounds} rounds: {mismatches} mismatches, "
          f"{time.perf_counter() - t0:.2f} s")
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
