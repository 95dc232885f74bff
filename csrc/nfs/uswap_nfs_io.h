/*
 * Blocking, thread-safe I/O on one NFS store file, for the daemon's C threads (fault engines, writeback).
 *
 * One service thread owns the libnfs context (a libnfs 4.0 context must not be used by two threads):
 * callers queue requests and sleep until theirs completes, any number in flight on the one connection
 * (pipelined, as the kernel's NFS client does).  pread/pwrite are called from any thread, at any time
 * between open and close; each returns only once its request succeeded or failed for good.
 *
 * Failure policy (the same as uswap/nfs/connection.py, which the Python side keeps for locks and checks):
 *   - libnfs's own reconnect and request timeouts are not used.  A broken connection, or a request
 *     unanswered for USWAP_NFS_ATTEMPT_MS, ends the whole context: nfs_destroy_context fails every
 *     request in flight; the service thread builds a new context (parse URL options, MOUNT, open the
 *     file) with backoff 50 ms doubling to 1 s, and sends the retryable requests again.
 *   - A request that neither succeeds nor fails for good within timeout_ms of its start returns
 *     -ETIMEDOUT (a request in flight then is failed when its attempt ends: within timeout_ms +
 *     USWAP_NFS_ATTEMPT_MS).  An error the server gave (EROFS, EACCES, ENOSPC, EFBIG, ...) is returned
 *     at once: libnfs 4.0 reports a READ or WRITE the server refused as -EFAULT, and the NFS3ERR_* in
 *     its message gives the errno.  A short transfer is -EIO.
 *   - Retryable: EFAULT, EINTR (libnfs's transport errors and cancelled requests), EAGAIN,
 *     ECONNREFUSED, ECONNRESET, ECONNABORTED, EPIPE, ENOTCONN, ETIMEDOUT, EHOSTUNREACH, ENETUNREACH.
 *   - Stable writes: with commit == 0 the file is opened O_SYNC (libnfs sends FILE_SYNC WRITEs); with
 *     commit == 1 a pwrite is an UNSTABLE WRITE then a COMMIT, and both are sent again when the COMMIT
 *     was answered on another connection than the WRITE (the server may have lost the unstable data).
 *     The writes waiting for their COMMIT at one time share one.
 */
#ifndef USWAP_NFS_IO_H
#define USWAP_NFS_IO_H

#include <stdint.h>

#define USWAP_NFS_ATTEMPT_MS 5000

/* CDEF-BEGIN */
struct uswap_nfs_io;

enum { USWAP_NFS_DOWN = 0, USWAP_NFS_UP = 1, USWAP_NFS_CONNECTING = 2 };

struct uswap_nfs_io_stats {
    int state;                 /* USWAP_NFS_* */
    double since;              /* when state began (Unix time) */
    uint64_t connects;         /* successful connects, the first included */
    uint64_t retries;          /* requests sent again after a failure */
    uint64_t most_in_flight;   /* the most requests waiting for an answer at once */
    uint64_t reads, writes;    /* callers' requests completed (successfully) */
    uint64_t commits;          /* COMMITs answered (commit mode; one covers the WRITEs answered before it) */
    uint64_t read_bytes, write_bytes;
    char last_error[200];
};

/* Connect, mount, open: 0 and *out, or -errno and a one-line message in err (the caller's words are
 * the Python side's: it has already checked and locked the store through its own connection).
 *   libnfs_url:  what nfs_parse_url_full is given for its options (version, ports), with the address
 *   server:      the server's address (resolved once), export_path, file: what to MOUNT and open */
int uswap_nfs_io_open(const char *libnfs_url, const char *server, const char *export_path, const char *file,
                      int commit, uint32_t timeout_ms, struct uswap_nfs_io **out, char *err, uint32_t errlen);

/* len bytes at off: len, or -errno (a short transfer is -EIO).  ctx is a struct uswap_nfs_io *
 * (void * so that the daemon's core can call these through function pointers without linking libnfs). */
int64_t uswap_nfs_io_pread(void *ctx, void *buf, uint64_t len, uint64_t off);
int64_t uswap_nfs_io_pwrite(void *ctx, const void *buf, uint64_t len, uint64_t off);

void uswap_nfs_io_stats(struct uswap_nfs_io *io, struct uswap_nfs_io_stats *out);
/* 1 if the connection is up (a request goes out at once), else 0 (it would wait for a reconnect): for a
 * store set with copies, which reads another copy instead.  Lock-free. */
int uswap_nfs_io_up(void *ctx);

/* Fail what is queued or in flight (-ESHUTDOWN), wait for every caller inside pread/pwrite to return, stop
 * the service thread, free everything.  No call on io may start afterwards. */
void uswap_nfs_io_close(struct uswap_nfs_io *io);
/* CDEF-END */

#endif
