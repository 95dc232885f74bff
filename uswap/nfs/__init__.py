"""Stores on an NFS server, through libnfs (a userspace NFS client): no kernel NFS client needed."""

STABLE_MODES = ("file_sync", "commit")   # FILE_SYNC writes (default), or UNSTABLE writes + COMMIT
DEFAULT_TIMEOUT = 60.0   # s: how long a request waits for a server that is down (--nfs-timeout)
