"""Stores on an NFS server, through libnfs (a userspace NFS client): no kernel NFS client needed."""
