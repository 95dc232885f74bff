/*
 * Reaching the daemon, for every C client: libuswap.so (and uswap._core) for regions, libuswaprun.so for
 * `uswap run`.  Whoever listens on the socket receives the client's memory and userfaultfd, so a client talks
 * only to a daemon run by root (the system daemon) or by its own effective uid.  One rule, one place.
 */
#ifndef USWAP_DAEMON_PEER_H
#define USWAP_DAEMON_PEER_H

#include <stddef.h>

/*
 * Connect a SOCK_SEQPACKET|SOCK_CLOEXEC socket to path and check the server's SO_PEERCRED (its credentials
 * at listen()): uid 0 or geteuid().  Nothing is sent: callers send their first byte only on the socket this
 * returns.  The socket, or -errno with a one-line reason naming the path in why (never NULL): -ENAMETOOLONG,
 * connect's errno (-ENOENT, -ECONNREFUSED, -EACCES: not in the daemon's group, ...), -EPERM: the server runs
 * as another uid (the reason names it).
 *
 * Hidden: a program may load both libuswap.so and libuswaprun.so; each keeps its own copy.
 */
__attribute__((visibility("hidden"))) int uswap_daemon_connect(const char *path, char *why, size_t size);

#endif
