/*
 * uswap client API: memory served by the uswap daemon through userfaultfd.
 *
 *   cc prog.c $(uswap config --cflags --libs)
 *
 * A region is a shared memfd mapping registered with a userfaultfd; the daemon
 * fills its pages on first touch (from its store, or with zeros) and writes
 * cold pages out when its resident budget is exceeded.
 *
 * Fork: regions are mapped MADV_DONTFORK, so a child does not inherit them; a
 * child touching one gets SIGSEGV (never a silent zero page).
 * Daemon death: the library notices the closed connection; from then on a
 * fault on a page the daemon held raises SIGBUS in the faulting thread (data
 * that was resident stays readable and writable).
 */
#ifndef USWAP_H
#define USWAP_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Map length bytes (a positive multiple of the page size) served by the daemon
 * at uswap_default_socket().  NULL with errno set on failure;
 * uswap_last_error() then has the daemon's words.  The daemon must run as
 * root or as this process's effective uid (EPERM otherwise: it would get the
 * region's memory); non-root users reach the system daemon as members of its
 * group (uswap by default). */
void *uswap_map(size_t length);

/* Release a region returned by uswap_map: 0, or -1 with errno set. */
int uswap_unmap(void *addr, size_t length);

/* Like uswap_map with an explicit socket path (NULL: as uswap_map).
 * Returns 0 and sets *addr, or a negative errno. */
int uswap_map_socket(const char *socket_path, size_t length, void **addr);

/* Why the last uswap_map in this thread failed, in words ("" if it did not). */
const char *uswap_last_error(void);

/* The system daemon's socket (root's `uswap daemon`, reached by members of its group). */
#define USWAP_SYSTEM_SOCKET "/run/uswap/uswap.sock"

/* The socket uswap_map connects to, into buf: $USWAP_SOCKET (ignored in
 * setuid programs: secure_getenv); else /run/uswap/uswap.sock for root; for
 * others $XDG_RUNTIME_DIR/uswap.sock if that socket exists, else
 * /run/uswap/uswap.sock (the system daemon).  Never /tmp.
 * 0, or -ENAMETOOLONG if it does not fit in size bytes. */
int uswap_default_socket(char *buf, size_t size);

#ifdef __cplusplus
}
#endif

#endif
