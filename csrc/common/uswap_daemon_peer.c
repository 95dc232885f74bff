/*
 * Reaching the daemon: connect, then authenticate the server before anything is sent (uswap_daemon_peer.h).
 * Built into libuswap.so, uswap._core and libuswaprun.so.  Ordinary context only (libc, stdio): the
 * preload calls it from its constructor and its atfork child handler, never from the agent thread.
 */
#define _GNU_SOURCE
#include "uswap_daemon_peer.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* Who listens receives this process's memory: only root or ourselves.  SO_PEERCRED gives the credentials the
 * server had when it called listen(), so a socket passed on or a server that changed uid since is judged by
 * who listened. */
static int check_daemon_owner(int sock, const char *path, char *why, size_t size)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);
	uid_t me = geteuid();

	if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
		int err = errno;
		snprintf(why, size, "cannot tell who runs the uswap daemon at %s: %s", path, strerror(err));
		return -err;
	}
	if (cred.uid != 0 && cred.uid != me) {
		if (me == 0)
			snprintf(why, size, "refusing the uswap daemon at %s: it runs as uid %u, not root", path,
				 (unsigned)cred.uid);
		else
			snprintf(why, size, "refusing the uswap daemon at %s: it runs as uid %u, not root or uid %u (you)",
				 path, (unsigned)cred.uid, (unsigned)me);
		return -EPERM;
	}
	return 0;
}

int uswap_daemon_connect(const char *path, char *why, size_t size)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	int sock, ret;

	if (strlen(path) >= sizeof(sun.sun_path)) {
		snprintf(why, size, "socket path too long: %s", path);
		return -ENAMETOOLONG;
	}
	strcpy(sun.sun_path, path);
	sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (sock < 0) {
		ret = -errno;
		snprintf(why, size, "cannot reach the uswap daemon at %s: %s", path, strerror(-ret));
		return ret;
	}
	if (connect(sock, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
		ret = -errno;
		if (ret == -EACCES)
			snprintf(why, size, "cannot reach the uswap daemon at %s: permission denied: the daemon serves its "
				 "own uid and members of its group (uswap by default; see README \"Who may use uswap\")", path);
		else
			snprintf(why, size, "cannot reach the uswap daemon at %s: %s", path, strerror(-ret));
		close(sock);
		return ret;
	}
	ret = check_daemon_owner(sock, path, why, size);   /* before any byte or fd goes out */
	if (ret < 0) {
		close(sock);
		return ret;
	}
	return sock;
}
