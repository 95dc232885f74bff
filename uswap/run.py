"""`uswap run` (issue 12, docs/RUN-DESIGN.md): what can be run under a budget.

The budget reaches a program through the preload library (``uswap/lib/libuswaprun.so``). The dynamic loader
ignores ``LD_PRELOAD`` for static binaries (no ``PT_INTERP``: static and static-pie) and for setuid/setgid ones,
so such a program would run unbudgeted: ``uswap run`` refuses it, never silently runs it. A ``#!`` script is
judged by its interpreter.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct

LIBRUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib", "libuswaprun.so")
PT_INTERP = 3


class NotPreloadable(Exception):
    """The program would not load the preload library; the message says why, in one line."""


def resolve(program: str) -> str:
    """The file ``program`` names, as execvp would find it."""
    path = program if "/" in program else shutil.which(program)
    if not path or not os.path.exists(path):
        raise NotPreloadable(f"{program}: not found")
    return os.path.realpath(path)


def has_interpreter(elf: bytes) -> bool:
    """Whether an ELF image (its first bytes, with the program headers) names a dynamic loader."""
    if elf[5] != 1:
        raise ValueError("big-endian ELF")
    if elf[4] == 2:      # ELFCLASS64
        phoff, = struct.unpack_from("<Q", elf, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    else:
        phoff, = struct.unpack_from("<I", elf, 0x1C)
        phentsize, phnum = struct.unpack_from("<HH", elf, 0x2A)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(elf):
            raise ValueError("program headers beyond the first 64 KiB")
        if struct.unpack_from("<I", elf, off)[0] == PT_INTERP:
            return True
    return False


def check_preloadable(program: str, *, depth: int = 0) -> str:
    """The program's path if the preload library will be loaded into it; else NotPreloadable saying why."""
    path = resolve(program)
    st = os.stat(path)
    if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        raise NotPreloadable(f"{path}: setuid/setgid: the loader ignores LD_PRELOAD, it would run unbudgeted")
    with open(path, "rb") as f:
        head = f.read(65536)
    if head.startswith(b"#!") and depth < 4:
        interpreter = head[2:].split(b"\n", 1)[0].strip().split()
        if not interpreter:
            raise NotPreloadable(f"{path}: empty #! line")
        check_preloadable(os.fsdecode(interpreter[0]), depth=depth + 1)
        return path
    if not head.startswith(b"\x7fELF"):
        raise NotPreloadable(f"{path}: not an ELF binary or #! script")
    try:
        dynamic = has_interpreter(head)
    except (ValueError, struct.error) as e:
        raise NotPreloadable(f"{path}: unreadable ELF ({e})") from None
    if not dynamic:
        raise NotPreloadable(f"{path}: statically linked: the preload library cannot be loaded, it would run "
                             "unbudgeted")
    return path
