"""Store URLs: ``nfs://SERVER/EXPORT/FILE?version=3``.

As in libnfs, everything before the last ``/`` is the export to mount and the
last component is the store file in it.  Query parameters: ``version`` (3;
libnfs 4.0's NFSv4 fails writes over 3944 bytes, so 4 is refused),
``nfsport`` and ``mountport`` (skip the portmapper).
"""

from __future__ import annotations

import errno
import socket
import urllib.parse
from dataclasses import dataclass

PARAMS = {"version", "nfsport", "mountport"}


class NfsUrlError(OSError):
    def __init__(self, url: str, problem: str):
        super().__init__(errno.EINVAL, problem, url)


def is_nfs_url(spec: str) -> bool:
    return spec.startswith("nfs:")


@dataclass(frozen=True)
class NfsUrl:
    url: str
    server: str
    export: str
    file: str
    params: dict

    @classmethod
    def parse(cls, url: str) -> "NfsUrl":
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "nfs" or not url.startswith("nfs://"):
            raise NfsUrlError(url, "not an NFS URL (expected nfs://SERVER/EXPORT/FILE?version=3)")
        if not parts.hostname:
            raise NfsUrlError(url, "no server in the URL (expected nfs://SERVER/EXPORT/FILE)")
        if parts.username or parts.password or parts.fragment:
            raise NfsUrlError(url, "user, password or fragment in an NFS URL are not supported")
        export, _, name = parts.path.rpartition("/")
        if not export or not name:
            raise NfsUrlError(url, "the URL needs an export and a file name: nfs://SERVER/EXPORT/FILE")
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
        unknown = sorted(set(query) - PARAMS)
        if unknown:
            raise NfsUrlError(url, f"unknown URL parameter(s) {', '.join(unknown)} "
                                   f"(known: {', '.join(sorted(PARAMS))})")
        params = {}
        for key, values in query.items():
            if len(values) != 1 or not values[0].isdigit():
                raise NfsUrlError(url, f"URL parameter {key} must be one number")
            params[key] = int(values[0])
        if params.setdefault("version", 3) != 3:
            raise NfsUrlError(url, f"NFS version {params['version']} is not supported: use version=3 "
                                   "(libnfs 4.0 cannot write more than 3944 bytes over NFSv4)")
        return cls(url=url, server=parts.hostname, export=export, file="/" + name, params=params)

    def resolve(self) -> str:
        """The server's address; a one-line error for a host that does not resolve."""
        try:
            return socket.getaddrinfo(self.server, None, type=socket.SOCK_STREAM)[0][4][0]
        except socket.gaierror as e:
            raise OSError(errno.EHOSTUNREACH, f"unknown NFS server host {self.server!r} ({e.strerror})",
                          self.url) from None

    def libnfs_url(self, address: str) -> str:
        """The URL as libnfs parses it (for the options it applies), with the server's address."""
        host = f"[{address}]" if ":" in address else address
        return f"nfs://{host}{self.export}{self.file}?{urllib.parse.urlencode(self.params)}"
