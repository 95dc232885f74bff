"""The bench's C workloads: shipped as sources in the package, built on first use.

``uswap/bench/workloads/*.c`` (also in examples/) are package data.  They are
compiled against this installation's libuswap.so (uswap.config.c_client_flags)
into the per-user cache, in a directory named after a hash of everything that
goes into the binary: the sources, uswap.h, libuswap.so, the compiler command.
A new uswap, another install or another compiler gets a new directory; the
same one is built once.  A binary is written under a temporary name and
renamed into place, so two benches building at once both end with a whole one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile

from uswap.config import INCLUDE_DIR, LIB_DIR, c_client_flags, cache_dir

SOURCES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workloads")
PROGRAMS = ("workload", "hog")
CFLAGS = ("-O2", "-pthread")
LIBS = ("-lm",)


class NoCompiler(OSError):
    pass


def compiler() -> str:
    """$CC or cc, as a path; NoCompiler (one line, what to install) if there is none."""
    cc = os.environ.get("CC") or "cc"
    path = shutil.which(cc)
    if path is None:
        raise NoCompiler(f"uswap bench builds its C workloads on first use and found no C compiler ({cc!r} is not "
                         f"on PATH): install one (Debian: apt install gcc) or set CC")
    return path


def _fingerprint(cc: str) -> str:
    digest = hashlib.sha256()
    for path in [*(os.path.join(SOURCES, f"{p}.c") for p in PROGRAMS), os.path.join(INCLUDE_DIR, "uswap.h"),
                 os.path.join(LIB_DIR, "libuswap.so")]:
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update("\0".join([cc, *CFLAGS, *c_client_flags(), *LIBS]).encode())
    return digest.hexdigest()[:16]


def workload_binaries(cache: str | None = None) -> dict[str, str]:
    """{program: path} of the built workloads, building what the cache does not hold yet."""
    cc = compiler()
    directory = os.path.join(cache or cache_dir(), "bench", _fingerprint(cc))
    os.makedirs(directory, exist_ok=True)
    binaries = {}
    for program in PROGRAMS:
        out = os.path.join(directory, program)
        if not os.path.exists(out):
            _compile(cc, os.path.join(SOURCES, f"{program}.c"), out)
        binaries[program] = out
    return binaries


def _compile(cc: str, source: str, out: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), prefix=f".{os.path.basename(out)}-")
    os.close(fd)
    try:
        r = subprocess.run([cc, *CFLAGS, source, *c_client_flags(), *LIBS, "-o", tmp], capture_output=True,
                           text=True)
        if r.returncode:
            lines = [line for line in r.stderr.splitlines() if line.strip()]
            first = next((line for line in lines if "error" in line), lines[-1] if lines else f"exit {r.returncode}")
            raise OSError(f"building {os.path.basename(source)} with {cc} failed: {first}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
