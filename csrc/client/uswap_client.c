/*
 * uswap C client (libuswap.so, and part of uswap._core for the Python client).
 *
 * uswap_map: memfd + MAP_SHARED mapping + userfaultfd registered MISSING|WP,
 * both fds sent to the daemon over a SOCK_SEQPACKET connection that lives as
 * long as the region (protocol: uswap/protocol.py).  Whoever holds those fds
 * reads and writes the region, so they go only to a daemon run by root or by
 * our own uid (SO_PEERCRED, checked before anything is sent: uswap_daemon_peer.c).
 *
 * The client keeps its own reference to the uffd.  A watchdog thread polls
 * the connections; when the daemon goes away it wakes every thread blocked on
 * a fault of that region and from then on answers MISSING faults with
 * UFFDIO_POISON (SIGBUS for the toucher: the data was the daemon's) and WP
 * faults by lifting write protection (the page is resident and intact).
 * Without this, a fault would wait forever; if the client had closed its uffd
 * instead, the kernel would hand out zero pages where data was.
 */
#define _GNU_SOURCE
#include "uswap.h"
#include "uswap_core.h"
#include "uswap_daemon_peer.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define PROTO_VERSION 1
#define OP_MAP 1
#define OP_UNMAP 2
#define OP_DETACH 4

struct request {
	char magic[4];
	uint16_t version;
	uint16_t op;
	uint64_t a, b, c;
} __attribute__((packed));

struct reply {
	char magic[4];
	uint16_t version;
	uint16_t op;
	int32_t status;
	uint32_t pad;
	uint64_t value;
} __attribute__((packed));

#define UFFD_CLIENT_FEATURES (UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_WP_HUGETLBFS_SHMEM | \
			      UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_POISON)

struct region {
	struct region *next;
	uintptr_t addr;
	size_t length;
	int sock;
	int uffd;
	int orphaned; /* the daemon is gone: the watchdog serves faults */
	int detached; /* the daemon put every page back and let go: plain shared memory */
};

static pthread_mutex_t regions_lock = PTHREAD_MUTEX_INITIALIZER;
static struct region *regions;          /* guarded by regions_lock */
static int wake_pipe[2] = { -1, -1 };   /* tells the watchdog the list changed */
static int watchdog_running;
static __thread char last_error[512];

static void set_error(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(last_error, sizeof(last_error), fmt, ap);
	va_end(ap);
}

const char *uswap_last_error(void)
{
	return last_error;
}

/* The one rule for where a client finds the daemon (uswap.h); Python's
 * uswap.protocol.default_socket_path calls this.  secure_getenv: in a setuid
 * or otherwise secure-execution program the environment is the caller's, and
 * must not choose who receives this process's memory.  Never /tmp: anyone can
 * bind a socket there first. */
int uswap_default_socket(char *buf, size_t size)
{
	const char *env = secure_getenv("USWAP_SOCKET");
	const char *runtime = secure_getenv("XDG_RUNTIME_DIR");
	int n;
	struct stat st;

	if (env && *env)
		n = snprintf(buf, size, "%s", env);
	else if (geteuid() != 0 && runtime && *runtime) {
		n = snprintf(buf, size, "%s/uswap.sock", runtime);
		if (n >= 0 && (size_t)n < size && stat(buf, &st) < 0)
			n = snprintf(buf, size, "%s", USWAP_SYSTEM_SOCKET); /* no daemon of our own: the system's */
	} else
		n = snprintf(buf, size, "%s", USWAP_SYSTEM_SOCKET);
	return n < 0 || (size_t)n >= size ? -ENAMETOOLONG : 0;
}

static int send_request(int sock, uint16_t op, uint64_t a, uint64_t b, const int *fds, int nfds)
{
	struct request req = { { 'U', 'S', 'W', 'P' }, PROTO_VERSION, op, a, b, 0 };
	struct iovec iov = { &req, sizeof(req) };
	union {
		char buf[CMSG_SPACE(2 * sizeof(int))];
		struct cmsghdr align;
	} control;
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (nfds) {
		memset(&control, 0, sizeof(control));
		msg.msg_control = control.buf;
		msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
		struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
		cmsg->cmsg_level = SOL_SOCKET;
		cmsg->cmsg_type = SCM_RIGHTS;
		cmsg->cmsg_len = CMSG_LEN(nfds * sizeof(int));
		memcpy(CMSG_DATA(cmsg), fds, nfds * sizeof(int));
	}
	ssize_t n;
	do {
		n = sendmsg(sock, &msg, MSG_NOSIGNAL);
	} while (n < 0 && errno == EINTR);
	return n < 0 ? -errno : 0;
}

/* Waits for the reply; returns the daemon's status (0 or -errno), text in last_error. */
static int recv_reply(int sock, uint64_t *value)
{
	char buf[sizeof(struct reply) + 400];
	ssize_t n;
	do {
		n = recv(sock, buf, sizeof(buf) - 1, 0);
	} while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	if (n < (ssize_t)sizeof(struct reply)) {
		set_error("the daemon closed the connection without a reply");
		return -ECONNRESET;
	}
	struct reply rep;
	memcpy(&rep, buf, sizeof(rep));
	if (memcmp(rep.magic, "USWP", 4) != 0 || rep.version != PROTO_VERSION) {
		set_error("the daemon answered in another protocol version");
		return -EPROTO;
	}
	buf[n] = 0;
	if (rep.status) {
		set_error("%s", buf + sizeof(struct reply));
		return -rep.status;
	}
	if (value)
		*value = rep.value;
	return 0;
}

static void *watchdog(void *arg);

static void notify_watchdog(void)
{
	char c = 0;
	if (write(wake_pipe[1], &c, 1) < 0 && errno != EAGAIN) {
		/* the pipe is full: the watchdog will rebuild anyway */
	}
}

/* After fork the child has none of the parent's regions (MADV_DONTFORK) and
 * no watchdog; drop its copies of the fds, so that the parent's death still
 * closes the daemon's connections. */
static void after_fork_in_child(void)
{
	struct region *r = regions;
	while (r) {
		struct region *next = r->next;
		close(r->sock);
		close(r->uffd);
		free(r);
		r = next;
	}
	regions = NULL;
	if (wake_pipe[0] >= 0) {
		close(wake_pipe[0]);
		close(wake_pipe[1]);
		wake_pipe[0] = wake_pipe[1] = -1;
	}
	watchdog_running = 0;
	pthread_mutex_init(&regions_lock, NULL);
}

static int start_watchdog_locked(void)
{
	static int atfork_done;
	if (watchdog_running)
		return 0;
	if (!atfork_done) {
		pthread_atfork(NULL, NULL, after_fork_in_child);
		atfork_done = 1;
	}
	if (pipe2(wake_pipe, O_CLOEXEC | O_NONBLOCK) < 0)
		return -errno;
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	pthread_t thread;
	int err = pthread_create(&thread, &attr, watchdog, NULL);
	pthread_attr_destroy(&attr);
	if (err) {
		close(wake_pipe[0]);
		close(wake_pipe[1]);
		wake_pipe[0] = wake_pipe[1] = -1;
		return -err;
	}
	watchdog_running = 1;
	return 0;
}

int uswap_map_socket(const char *path, size_t length, void **out)
{
	long page = sysconf(_SC_PAGESIZE);
	char pathbuf[sizeof(((struct sockaddr_un *)0)->sun_path)];
	int sock = -1, memfd = -1, uffd = -1, ret;
	void *addr = MAP_FAILED;
	uint64_t features, ioctls;

	last_error[0] = 0;
	if (length == 0 || length % (size_t)page) {
		set_error("length %zu is not a positive multiple of the page size (%ld)", length, page);
		return -EINVAL;
	}
	if (!path) {
		ret = uswap_default_socket(pathbuf, sizeof(pathbuf));
		if (ret < 0) {
			set_error("default socket path too long (USWAP_SOCKET or XDG_RUNTIME_DIR)");
			return ret;
		}
		path = pathbuf;
	}
	sock = uswap_daemon_connect(path, last_error, sizeof(last_error));   /* authenticated: nothing sent yet */
	if (sock < 0) {
		ret = sock;
		sock = -1;
		goto fail;
	}
	/* sealable: the daemon seals it against size changes */
	memfd = memfd_create("uswap", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (memfd < 0 || ftruncate(memfd, (off_t)length) < 0) {
		ret = -errno;
		set_error("memfd: %s", strerror(errno));
		goto fail;
	}
	addr = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (addr == MAP_FAILED || madvise(addr, length, MADV_DONTFORK) < 0) {
		ret = -errno;
		set_error("mmap: %s", strerror(errno));
		goto fail;
	}
	uffd = uswap_uffd_open(O_CLOEXEC | O_NONBLOCK);
	if (uffd < 0) {
		ret = uffd;
		if (ret == -EPERM || ret == -EACCES)
			set_error("userfaultfd: %s: members of group uswap get /dev/userfaultfd through the shipped "
				  "udev rule (uswap config --udev-rule), or set vm.unprivileged_userfaultfd=1",
				  strerror(-ret));
		else
			set_error("userfaultfd: %s", strerror(-ret));
		goto fail;
	}
	ret = uswap_uffd_api(uffd, UFFD_CLIENT_FEATURES, &features, &ioctls);
	if (ret == 0)
		ret = uswap_uffd_register(uffd, (uintptr_t)addr, length,
					  UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP, &ioctls);
	if (ret < 0) {
		set_error("userfaultfd setup: %s", strerror(-ret));
		goto fail;
	}
	int fds[2] = { uffd, memfd };
	ret = send_request(sock, OP_MAP, (uintptr_t)addr, length, fds, 2);
	if (ret == 0)
		ret = recv_reply(sock, NULL);
	if (ret < 0) {
		if (!last_error[0])
			set_error("talking to the daemon: %s", strerror(-ret));
		goto fail;
	}
	close(memfd); /* the mapping and the daemon keep the file */

	struct region *r = calloc(1, sizeof(*r));
	if (!r) {
		memfd = -1;
		ret = -ENOMEM;
		goto fail;
	}
	r->addr = (uintptr_t)addr;
	r->length = length;
	r->sock = sock;
	r->uffd = uffd;
	pthread_mutex_lock(&regions_lock);
	ret = start_watchdog_locked();
	if (ret == 0) {
		r->next = regions;
		regions = r;
		notify_watchdog();
	}
	pthread_mutex_unlock(&regions_lock);
	if (ret < 0) {
		free(r);
		memfd = -1;
		set_error("cannot start the watchdog thread: %s", strerror(-ret));
		goto fail;
	}
	*out = addr;
	return 0;

fail:
	if (addr != MAP_FAILED)
		munmap(addr, length);
	if (uffd >= 0)
		close(uffd);
	if (memfd >= 0)
		close(memfd);
	if (sock >= 0)
		close(sock);
	return ret;
}

void *uswap_map(size_t length)
{
	void *addr;
	int ret = uswap_map_socket(NULL, length, &addr);
	if (ret < 0) {
		errno = -ret;
		return NULL;
	}
	return addr;
}

int uswap_unmap(void *addr, size_t length)
{
	pthread_mutex_lock(&regions_lock);
	struct region **link = &regions, *r;
	while ((r = *link) && !(r->addr == (uintptr_t)addr && r->length == length))
		link = &r->next;
	if (r) {
		*link = r->next;
		notify_watchdog();
	}
	pthread_mutex_unlock(&regions_lock);
	if (!r) {
		errno = EINVAL;
		return -1;
	}
	if (!r->orphaned && !r->detached && send_request(r->sock, OP_UNMAP, 0, 0, NULL, 0) == 0)
		recv_reply(r->sock, NULL); /* slots are free once the daemon answers */
	munmap(addr, length);
	close(r->sock);
	close(r->uffd);
	free(r);
	return 0;
}

/* The daemon is gone: answer this region's faults ourselves, loudly. */
static void serve_orphan_faults(struct region *r, long page)
{
	struct uswap_uffd_event events[16];
	int n;
	while ((n = uswap_uffd_read_events(r->uffd, events, 16)) > 0) {
		for (int i = 0; i < n; i++) {
			if (events[i].event != UFFD_EVENT_PAGEFAULT)
				continue;
			uint64_t at = events[i].address & ~(uint64_t)(page - 1);
			int64_t done;
			if (events[i].flags & UFFD_PAGEFAULT_FLAG_WP)
				uswap_uffd_writeprotect(r->uffd, at, page, 0); /* resident, intact: let it write */
			else
				uswap_uffd_poison_evicted(r->uffd, at, page, &done);
		}
	}
}

/* The daemon stopped gracefully: all data is in the memfd again. */
static int receive_detach(struct region *r)
{
	struct reply rep;
	ssize_t n = recv(r->sock, &rep, sizeof(rep), MSG_DONTWAIT);
	if (n != (ssize_t)sizeof(rep) || rep.op != OP_DETACH)
		return 0;
	uswap_uffd_unregister(r->uffd, r->addr, r->length); /* also wakes blocked faults */
	r->detached = 1;
	return 1;
}

static void *watchdog(void *arg)
{
	long page = sysconf(_SC_PAGESIZE);
	struct pollfd *fds = NULL;
	size_t cap = 0;
	int wake = wake_pipe[0];
	(void)arg;
	for (;;) {
		pthread_mutex_lock(&regions_lock);
		size_t n = 1;
		for (struct region *r = regions; r; r = r->next)
			n++;
		if (n > cap) {
			struct pollfd *bigger = realloc(fds, n * sizeof(*fds));
			if (bigger) {
				fds = bigger;
				cap = n;
			}
		}
		size_t used = 0;
		if (cap) {
			fds[used++] = (struct pollfd){ .fd = wake, .events = POLLIN };
			for (struct region *r = regions; r && used < cap; r = r->next) {
				if (r->detached)
					continue;
				fds[used++] = r->orphaned ? (struct pollfd){ .fd = r->uffd, .events = POLLIN }
							  : (struct pollfd){ .fd = r->sock, .events = POLLIN };
			}
		}
		pthread_mutex_unlock(&regions_lock);
		if (!used) {
			sleep(1);
			continue;
		}
		if (poll(fds, used, -1) < 0)
			continue;
		if (fds[0].revents) {
			char drain[64];
			while (read(wake, drain, sizeof(drain)) > 0)
				;
		}
		pthread_mutex_lock(&regions_lock);
		for (size_t i = 1; i < used; i++) {
			if (!fds[i].revents)
				continue;
			for (struct region *r = regions; r; r = r->next) {
				if (!r->orphaned && !r->detached && r->sock == fds[i].fd && (fds[i].revents & POLLIN)
				    && receive_detach(r)) {
					continue;
				}
				if (!r->orphaned && !r->detached && r->sock == fds[i].fd
				    && (fds[i].revents & (POLLHUP | POLLERR | POLLIN))) {
					r->orphaned = 1;
					fprintf(stderr, "uswap: lost the daemon; region %#lx (%zu bytes): touching "
							"pages it held now raises SIGBUS\n", (unsigned long)r->addr, r->length);
					/* threads blocked on faults the daemon read but never answered */
					uswap_uffd_wake(r->uffd, r->addr, r->length);
				} else if (r->orphaned && r->uffd == fds[i].fd) {
					serve_orphan_faults(r, page);
				}
			}
		}
		pthread_mutex_unlock(&regions_lock);
	}
	return NULL;
}
