"""A `uswap run` server anyone could start, for tests/test_run_hostile.py: ``run_rogue_server.py PATH UID``.

Started as root, it opens /dev/userfaultfd and binds PATH (mode 0666: any uid may connect), then becomes UID
(every id, no supplementary group, no capability) before listen(): SO_PEERCRED, what clients see, is UID.  It
speaks the first steps of the run protocol (csrc/preload/uswap_run.h): to a CONNECT it answers DEVFD with the
device's fd, and takes the HELLO (with the process's userfaultfd) without answering.  Run by uid 1002 in the
field, that was enough to register root's memory and inject a page root then read.  It prints ``listening as uid
UID``, serves until its stdin closes, then prints one JSON line of what it received: connections, bytes, ops, fds
and how many of them were userfaultfds.
"""

from __future__ import annotations

import array
import ctypes
import json
import os
import select
import socket
import sys

from uswap._core import lib
from uswap.daemon.runproto import MSG_SIZE, message

PR_SET_DUMPABLE = 4


def main() -> None:
    path, uid = sys.argv[1], int(sys.argv[2])
    dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    os.chmod(path, 0o666)
    if uid:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)     # from root to another uid: every capability goes
        ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)   # /proc/self/fd readable again
    srv.listen(8)
    print("listening as uid", os.getuid(), flush=True)
    got = {"connections": 0, "bytes": 0, "ops": [], "fds": 0, "uffds": 0}
    while True:
        ready, _, _ = select.select([srv, sys.stdin], [], [], 60)
        if srv not in ready:    # stdin closed (every queued connection taken first) or timed out
            break
        conn, _ = srv.accept()
        got["connections"] += 1
        with conn:
            conn.settimeout(10)
            while True:
                try:
                    data, anc, _, _ = conn.recvmsg(MSG_SIZE + 1, socket.CMSG_SPACE(16 * 4))
                except OSError:
                    break
                fds = [fd for level, kind, payload in anc if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                       for fd in array.array("i", payload[:len(payload) - len(payload) % 4])]
                for fd in fds:
                    got["uffds"] += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
                    os.close(fd)
                got["fds"] += len(fds)
                got["bytes"] += len(data)
                if len(data) < 8:
                    break
                op = int.from_bytes(data[6:8], "little")
                got["ops"].append(op)
                if op != lib.USWAP_RUN_CONNECT:
                    break       # the HELLO: its uffd was the prize; no READY
                conn.sendmsg([message(lib.USWAP_RUN_DEVFD)],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [dev]))])
    print(json.dumps(got), flush=True)


if __name__ == "__main__":
    main()
