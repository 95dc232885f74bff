"""Per-uid limits: no local user can take the store, the daemon's fds or its regions from the others.

Like RLIMIT_* and memcg limits, they bound what one uid can hold at once:
connections (each costs the daemon up to three fds), regions, and mapped
bytes (uswap does not overcommit its store, so mapped bytes are reserved
slots).  The daemon's own uid is not limited: it already owns the store.
"""

from __future__ import annotations

import collections
import errno
from dataclasses import dataclass

from uswap.protocol import ProtocolError


@dataclass(frozen=True)
class UserLimits:
    max_pages: int            # --user-max-size, in pages
    max_regions: int          # --user-max-regions
    max_connections: int      # --user-max-connections
    exempt_uid: int           # the daemon's own uid


@dataclass
class UserUsage:
    connections: int = 0
    regions: int = 0
    pages: int = 0


class UserLedger:
    """What each uid holds now; the only writer of those counts."""

    def __init__(self, limits: UserLimits):
        self.limits = limits
        self.usage: dict[int, UserUsage] = collections.defaultdict(UserUsage)

    def _limited(self, uid: int) -> bool:
        return uid != self.limits.exempt_uid

    def open_connection(self, uid: int) -> None:
        """Count a new connection; ProtocolError(EDQUOT) if the uid has its limit already."""
        use = self.usage[uid]
        if self._limited(uid) and use.connections >= self.limits.max_connections:
            raise ProtocolError(f"uid {uid} has {use.connections} connections open, the limit "
                                f"(--user-max-connections)", errno.EDQUOT)
        use.connections += 1

    def close_connection(self, uid: int) -> None:
        use = self.usage[uid]
        use.connections -= 1
        self._forget_idle(uid)

    def add_region(self, uid: int, pages: int) -> None:
        """Reserve a region of ``pages``; ProtocolError(EDQUOT) over a limit."""
        use = self.usage[uid]
        if self._limited(uid):
            if use.regions >= self.limits.max_regions:
                raise ProtocolError(f"uid {uid} has {use.regions} regions, the limit (--user-max-regions)",
                                    errno.EDQUOT)
            if use.pages + pages > self.limits.max_pages:
                raise ProtocolError(f"uid {uid} maps {use.pages} pages; {pages} more would pass its limit of "
                                    f"{self.limits.max_pages} (--user-max-size)", errno.EDQUOT)
        use.regions += 1
        use.pages += pages

    def remove_region(self, uid: int, pages: int) -> None:
        use = self.usage[uid]
        use.regions -= 1
        use.pages -= pages
        self._forget_idle(uid)

    def _forget_idle(self, uid: int) -> None:
        if self.usage[uid] == UserUsage():
            del self.usage[uid]
