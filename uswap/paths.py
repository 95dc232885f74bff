"""Directories uswap may trust: nobody but root and us can change what they hold.

A store or socket is only as private as the directories that lead to it: whoever
can write to one of them can rename our file away and put theirs in its place
(or a symlink to it).  The rule is ssh's StrictModes: every directory on the way
is owned by root or by us (the effective uid), and is not writable by group or
others unless it is sticky (/tmp, /var/tmp: there others cannot rename what we
own; a file or directory we then open there must be ours, which the callers
check).  Symlinks on the way are followed as the kernel follows them, and each
must be owned by root or by us too (in a sticky directory anyone may have made it).
"""

from __future__ import annotations

import errno
import os
import pwd
import stat

_MAX_SYMLINKS = 40  # the kernel's limit (ELOOP)


def describe_uid(uid: int) -> str:
    """'uid 65534 (nobody)', or 'uid N' for a uid without a name."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _trusted_owners() -> str:
    return "root" if os.geteuid() == 0 else f"root or {describe_uid(os.geteuid())}"


def directory_problem(path: str, st: os.stat_result) -> str | None:
    """Why one directory may not be trusted, in words (None if it may)."""
    if not _trusted_owner(st.st_uid):
        return f"directory {path} is owned by {describe_uid(st.st_uid)}, not {_trusted_owners()}"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return (f"directory {path} is writable by {_writers(st.st_mode)} and not sticky "
                f"(mode {stat.S_IMODE(st.st_mode):04o})")
    return None


def _writers(mode: int) -> str:
    return {0o022: "group and others", 0o020: "group", 0o002: "others"}[mode & 0o022]


def check_directory_chain(path: str) -> list[str]:
    """Every reason the directories leading to ``path`` (and ``path`` itself, if it is a
    directory) are unsafe, in words; [] if all are safe.

    The path is resolved one component at a time as the kernel resolves it, so
    every directory and symlink actually traversed is judged, including those a
    symlink leads through.  A missing component ends the walk (nothing to judge
    yet: the caller creates it, or fails to open it, with its own error).
    """
    problems: list[str] = []
    pending = os.path.abspath(path).split("/")[1:]
    pending.reverse()  # a stack: the next component is at the end
    current = "/"
    links = 0

    def judge_directory(where: str, st: os.stat_result) -> None:
        problem = directory_problem(where, st)
        if problem and problem not in problems:
            problems.append(problem)

    judge_directory("/", os.lstat("/"))
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = os.path.dirname(current)  # ``current`` has no symlinks in it: this is its real parent
            continue
        candidate = os.path.join(current, name)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            break
        if stat.S_ISLNK(st.st_mode):
            if not _trusted_owner(st.st_uid):
                problems.append(f"symlink {candidate} is owned by {describe_uid(st.st_uid)}, not {_trusted_owners()}")
            links += 1
            if links > _MAX_SYMLINKS:
                problems.append(f"too many levels of symlinks at {candidate}")
                break
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = "/"
            pending.extend(reversed(target.split("/")))
            continue
        if not stat.S_ISDIR(st.st_mode):
            break  # the file at the end (or a path through a file, which opening will refuse)
        judge_directory(candidate, st)
        current = candidate
    return problems


def secure_directory(path: str, mode: int) -> None:
    """Make sure ``path`` is a directory only we control: create it with ``mode`` if it is
    missing (its parent must exist); raise a one-line OSError naming the path if it is a
    symlink, not a directory, owned by someone else, writable by group or others, or if a
    directory leading to it is unsafe (check_directory_chain)."""
    path = os.path.abspath(path)
    problems = check_directory_chain(os.path.dirname(path))  # first: creating in an unsafe place is no use
    if problems:
        raise OSError(errno.EPERM, f"unsafe directory on the way: {problems[0]}", path)
    try:
        os.mkdir(path, mode)
        os.chmod(path, mode)  # mkdir's mode went through the umask
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise OSError(errno.ENOENT, f"cannot create it: directory {os.path.dirname(path)} does not exist",
                      path) from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, f"is a symlink (to {os.readlink(path)}); uswap wants a directory of its own "
                                   "here", path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, "exists and is not a directory", path)
    if st.st_uid != os.geteuid():
        raise OSError(errno.EPERM, f"directory is owned by {describe_uid(st.st_uid)}, not "
                                   f"{describe_uid(os.geteuid())}: someone else could replace what uswap keeps "
                                   "there", path)
    if st.st_mode & 0o022:
        raise OSError(errno.EPERM, f"directory is writable by {_writers(st.st_mode)} (mode "
                                   f"{stat.S_IMODE(st.st_mode):04o}): fix with chmod go-w", path)
