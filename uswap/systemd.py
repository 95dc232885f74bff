"""`uswap install-units`: the systemd units shipped in the package, written where systemd reads them.

The templates (uswap/data/systemd/*.service.in) leave out what only the
installation knows: the interpreter that has uswap (a venv's, or the
system's), run with -P (uswap.child.uswap_argv), whether that interpreter lives
under /home or /root (then ProtectHome= cannot hide those), and the stop
timeout (uswap.config.DEFAULTS.service_stop_timeout_s).

    uswap.service        the daemon (Type=notify, hardened)
    uswap-fuse.service   a FUSE store mounted at /run/uswap-fuse (Type=notify)
    uswap-swap.service   swapon on it after the mount, swapoff before the unmount
"""

from __future__ import annotations

import os
import subprocess
import sys

from uswap.config import DATA_DIR, DEFAULTS, PACKAGE_DIR

TEMPLATES = os.path.join(DATA_DIR, "systemd")
UNITS = ("uswap.service", "uswap-fuse.service", "uswap-swap.service")
SYSTEM_DIR = "/etc/systemd/system"
HOMES = ("/home/", "/root/", "/run/user/")


def render(name: str, *, python: str = sys.executable) -> str:
    """The unit ``name`` for this installation."""
    with open(os.path.join(TEMPLATES, name + ".in")) as f:
        text = f.read()
    in_home = any(p.startswith(HOMES) for p in (os.path.realpath(python), os.path.realpath(PACKAGE_DIR)))
    return (text.replace("@PYTHON@", python)
                .replace("@STOP_TIMEOUT@", str(DEFAULTS.service_stop_timeout_s))
                .replace("@PROTECT_HOME@", "read-only" if in_home else "yes"))


def install_units(directory: str = SYSTEM_DIR) -> list[str]:
    """Write every unit into ``directory`` (0644, replacing older ones); the paths written.
    Into the system directory of a running systemd, `systemctl daemon-reload` follows."""
    if not os.path.isdir(directory):
        raise OSError(2, "no such directory", directory)
    written = []
    for name in UNITS:
        path = os.path.join(directory, name)
        tmp = path + ".uswap-new"
        with open(tmp, "w") as f:
            f.write(render(name))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        written.append(path)
    if os.path.realpath(directory) == SYSTEM_DIR and os.path.isdir("/run/systemd/system"):
        subprocess.run(["systemctl", "daemon-reload"], check=True)
    return written
