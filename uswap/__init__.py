"""uswap: userspace swap over userfaultfd."""

from uswap.client import Region

__all__ = ["Region"]
