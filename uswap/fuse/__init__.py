"""The FUSE swap store: kernel swap through uswap stores, via a loop device."""
