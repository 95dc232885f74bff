/*
 * libuswaprun.so: the preload library of `uswap run` (issue 12, docs/RUN-DESIGN.md).
 *
 * In a constructor: connect to USWAP_RUN_SOCKET, send CONNECT (with USWAP_RUN_RESIDENT), receive the server's /dev/userfaultfd fd, make
 * this process's uffd from it (the server negotiates its features: it has CAP_SYS_PTRACE for
 * EVENT_FORK), map a staging area (MADV_DONTFORK) registered on a private uffd without events,
 * send HELLO, wait for READY (the program's memory is registered when main() starts), then start
 * the agent thread.
 *
 * The agent moves runs the server names out of the process: UFFDIO_MOVE into staging (no event:
 * MOVE checks only the destination's uffd), then MADV_DONTNEED of staging (no event: the private
 * uffd negotiated none).  It never touches registered memory: it runs on a stack of its own that
 * the server never registers, reads no globals after start, and calls the kernel directly (no
 * libc: libc's .bss is anonymous memory the server may swap).
 *
 * fork() is refused (ENOSYS, with a message) until the server copies swap maps for children;
 * a raw SYS_fork child gets SIGBUS on a swapped page from the server, never zeros.  If the server
 * goes away, the agent answers the faults itself: MISSING with UFFDIO_POISON (SIGBUS for the
 * toucher: the data may have been the server's), WP by lifting protection.
 */
#define _GNU_SOURCE
#include "uswap_core.h"
#include "uswap_run.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

enum { STAGING_BYTES = 2 << 20, AGENT_STACK = 256 << 10 };

/* Everything the agent needs, copied onto its own stack before it starts. */
struct agent_ctx {
	int sock, uffd, staging_uffd;
	uint64_t staging, staging_len, page_size;
	volatile uint64_t *hint_off;
};

static long raw6(long n, long a, long b, long c, long d, long e, long f)
{
	long ret;
	register long r10 __asm__("r10") = d, r8 __asm__("r8") = e, r9 __asm__("r9") = f;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;   /* -errno on failure */
}

static void say(const char *what)
{
	char buf[256];
	int n = snprintf(buf, sizeof(buf), "uswap run[%d]: %s\n", getpid(), what);
	if (n > 0 && write(2, buf, (size_t)n) < 0)
		return;
}

/* Move [addr, addr+len) out through staging; the bytes moved, *err the first errno. */
static uint64_t drop_run(const struct agent_ctx *c, uint64_t addr, uint64_t len, int32_t *err)
{
	uint64_t done = 0, most = c->staging_len;
	*err = 0;
	while (done < len) {
		uint64_t n = len - done < most ? len - done : most;
		struct uffdio_move mv = { .dst = c->staging, .src = addr + done, .len = n, .mode = 0 };
		long r = raw6(SYS_ioctl, c->staging_uffd, (long)UFFDIO_MOVE, (long)&mv, 0, 0, 0);
		uint64_t moved = mv.move > 0 ? (uint64_t)mv.move : 0;
		if (moved)
			raw6(SYS_madvise, (long)c->staging, (long)moved, MADV_DONTNEED, 0, 0, 0);
		done += moved;
		if (r == -EINVAL && most > c->page_size) {
			/* the run crosses VMAs (madvise/mprotect split them, which raises no uffd event):
			 * MOVE takes one VMA at a time; go on page by page */
			most = c->page_size;
			continue;
		}
		if (r < 0) {
			*err = (int32_t)-r;
			break;
		}
	}
	return done;
}

/* The server is gone: answer this process's faults so that none waits forever and none reads zeros. */
static void orphaned(const struct agent_ctx *c)
{
	struct uffd_msg m[16];
	for (;;) {
		struct pollfd p = { .fd = c->uffd, .events = POLLIN };
		if (raw6(SYS_poll, (long)&p, 1, -1, 0, 0, 0) < 0)
			continue;
		long got = raw6(SYS_read, c->uffd, (long)m, sizeof(m), 0, 0, 0);
		if (got == -EAGAIN || got == -EINTR)
			continue;
		if (got <= 0)
			return;
		for (long i = 0; i < got / (long)sizeof(m[0]); i++) {
			if (m[i].event == UFFD_EVENT_FORK) {
				raw6(SYS_close, (long)m[i].arg.fork.ufd, 0, 0, 0, 0, 0);
				continue;
			}
			if (m[i].event != UFFD_EVENT_PAGEFAULT)
				continue;
			uint64_t a = m[i].arg.pagefault.address & ~(c->page_size - 1);
			if (m[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) {
				struct uffdio_writeprotect w = { .range = { a, c->page_size }, .mode = 0 };
				raw6(SYS_ioctl, c->uffd, (long)UFFDIO_WRITEPROTECT, (long)&w, 0, 0, 0);
			} else {
				struct uffdio_poison p = { .range = { a, c->page_size }, .mode = 0 };
				raw6(SYS_ioctl, c->uffd, (long)UFFDIO_POISON, (long)&p, 0, 0, 0);
			}
		}
	}
}

/*
 * Registration hints: memory the program maps is registered on its uffd here, before the program can
 * touch it, instead of at the server's next rescan of /proc/PID/maps (memory filled meanwhile raises no
 * fault: budget slack).  Seen: anonymous private writable mmap() calls through the PLT (Python's arenas)
 * and madvise(MADV_HUGEPAGE), which numpy calls on every array of 4 MiB or more right after malloc made
 * it.  Not seen: glibc malloc's own mmap/mremap/brk (internal calls): the server's rescan finds those.
 * Registering is idempotent for the server (it registers what it finds again) and never blocks on it.
 * madvise cannot tell what it advises: a MADV_HUGEPAGE'd shmem range is registered too (the server zero-fills
 * its holes, which is what they read as, and never evicts it: reclaim walks only the rw-p anonymous VMAs it
 * scanned); a private file mapping is refused by the kernel (EINVAL, ignored).
 * hint_uffd is set once READY came; the agent turns hints off through the first word of its stack
 * mapping (never registered, mlocked) when the server is gone: registered new memory would then SIGBUS.
 */
static int hint_uffd = -1;
static volatile uint64_t *hint_off;      /* the agent's stack mapping's lowest word: nonzero = server gone */

static void hint(uint64_t addr, uint64_t len)
{
	uint64_t ps = 4096, a = (addr + ps - 1) & ~(ps - 1), b = (addr + len) & ~(ps - 1);
	if (hint_uffd < 0 || *hint_off || b <= a)
		return;
	struct uffdio_register reg = { .range = { a, b - a },
				       .mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP };
	raw6(SYS_ioctl, hint_uffd, (long)UFFDIO_REGISTER, (long)&reg, 0, 0, 0);   /* best effort */
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	long r = raw6(SYS_mmap, (long)addr, (long)len, prot, flags, fd, off);
	if (r < 0 && r > -4096) {
		errno = (int)-r;
		return MAP_FAILED;
	}
	if (prot == (PROT_READ | PROT_WRITE) && (flags & (MAP_PRIVATE | MAP_ANONYMOUS)) == (MAP_PRIVATE | MAP_ANONYMOUS) &&
	    !(flags & (MAP_SHARED | MAP_STACK | MAP_GROWSDOWN | MAP_HUGETLB)))
		hint((uint64_t)r, len);
	return (void *)r;
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off) __attribute__((alias("mmap")));

int madvise(void *addr, size_t len, int advice)
{
	long r = raw6(SYS_madvise, (long)addr, (long)len, advice, 0, 0, 0);
	if (r < 0) {
		errno = (int)-r;
		return -1;
	}
	if (advice == MADV_HUGEPAGE)
		hint((uint64_t)addr, len);
	return 0;
}

static void *agent(void *arg)
{
	struct agent_ctx c = *(struct agent_ctx *)arg;
	struct uswap_run_msg m;
	for (;;) {
		long n = raw6(SYS_recvfrom, c.sock, (long)&m, sizeof(m), 0, 0, 0);
		if (n == -EINTR)
			continue;
		if (n != (long)sizeof(m) || m.magic != USWAP_RUN_MAGIC || m.op != USWAP_RUN_DROP ||
		    m.count > USWAP_RUN_MAX_RUNS)
			break;
		for (uint32_t i = 0; i < m.count; i++)
			m.len[i] = drop_run(&c, m.addr[i], m.len[i], &m.err[i]);
		m.op = USWAP_RUN_DROPPED;
		if (raw6(SYS_sendto, c.sock, (long)&m, sizeof(m), MSG_NOSIGNAL, 0, 0) != (long)sizeof(m))
			break;
	}
	*c.hint_off = 1;          /* on our own stack mapping: no registered memory touched */
	orphaned(&c);
	return NULL;
}

/* fork() copies registered memory whose swapped pages this run cannot yet hand to a child. */
pid_t fork(void)
{
	if (getenv(USWAP_RUN_ENV_SOCKET)) {
		say("fork() refused (ENOSYS): `uswap run` does not support fork yet (issue 12)");
		errno = ENOSYS;
		return -1;
	}
	return (pid_t)syscall(SYS_fork);
}

static int send_fd(int sock, const struct uswap_run_msg *m, int fd)
{
	struct iovec iov = { (void *)m, sizeof(*m) };
	char cbuf[CMSG_SPACE(sizeof(int))] = { 0 };
	struct msghdr h = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *cm = CMSG_FIRSTHDR(&h);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cm), &fd, sizeof(int));
	return sendmsg(sock, &h, MSG_NOSIGNAL) == (ssize_t)sizeof(*m) ? 0 : -errno;
}

static int recv_msg(int sock, struct uswap_run_msg *m, int *fd)
{
	struct iovec iov = { m, sizeof(*m) };
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct msghdr h = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	ssize_t n = recvmsg(sock, &h, MSG_CMSG_CLOEXEC);
	if (n != (ssize_t)sizeof(*m) || m->magic != USWAP_RUN_MAGIC || m->version != USWAP_RUN_VERSION)
		return n < 0 ? -errno : -EPROTO;
	if (fd) {
		struct cmsghdr *cm = CMSG_FIRSTHDR(&h);
		if (!cm || cm->cmsg_type != SCM_RIGHTS)
			return -EPROTO;
		memcpy(fd, CMSG_DATA(cm), sizeof(int));
	}
	return 0;
}

static int start(const char *path)
{
	static struct agent_ctx c;
	long ps = sysconf(_SC_PAGESIZE);
	int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (sock < 0 || strlen(path) >= sizeof(sa.sun_path))
		return -EINVAL;
	strcpy(sa.sun_path, path);
	if (connect(sock, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		return -errno;
	struct uswap_run_msg m = { .magic = USWAP_RUN_MAGIC, .version = USWAP_RUN_VERSION, .op = USWAP_RUN_CONNECT,
				   .pid = (uint64_t)getpid() };
	const char *resident = getenv(USWAP_RUN_ENV_RESIDENT);
	m.resident = resident ? strtoull(resident, NULL, 10) : 0;
	if (send(sock, &m, sizeof(m), MSG_NOSIGNAL) != (ssize_t)sizeof(m))
		return -errno;
	int devfd = -1;
	int ret = recv_msg(sock, &m, &devfd);
	if (ret < 0 || m.op != USWAP_RUN_DEVFD)
		return ret < 0 ? ret : -EPROTO;
	int uffd = ioctl(devfd, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
	int suffd = ioctl(devfd, USERFAULTFD_IOC_NEW, O_CLOEXEC);
	close(devfd);
	if (uffd < 0 || suffd < 0)
		return -errno;
	struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_MOVE };
	if (ioctl(suffd, UFFDIO_API, &api) < 0)
		return -errno;
	void *staging = mmap(NULL, STAGING_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	void *stack = mmap(NULL, AGENT_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (staging == MAP_FAILED || stack == MAP_FAILED)
		return -ENOMEM;
	madvise(staging, STAGING_BYTES, MADV_DONTFORK);
	madvise(stack, AGENT_STACK, MADV_DONTFORK);
	madvise(staging, STAGING_BYTES, MADV_NOHUGEPAGE);
	struct uffdio_register reg = { .range = { (uint64_t)staging, STAGING_BYTES },
				       .mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP };
	if (ioctl(suffd, UFFDIO_REGISTER, &reg) < 0)
		return -errno;
	mlock(stack, AGENT_STACK);   /* best effort: the agent's stack is never swapped by anyone */

	memset(&m, 0, sizeof(m));
	m.magic = USWAP_RUN_MAGIC;
	m.version = USWAP_RUN_VERSION;
	m.op = USWAP_RUN_HELLO;
	m.pid = (uint64_t)getpid();
	m.staging = (uint64_t)staging;
	m.staging_len = STAGING_BYTES;
	m.agent_stack = (uint64_t)stack;
	m.agent_stack_len = AGENT_STACK;
	if ((ret = send_fd(sock, &m, uffd)) < 0)
		return ret;
	if ((ret = recv_msg(sock, &m, NULL)) < 0)
		return ret;
	if (m.op != USWAP_RUN_READY || m.status)
		return m.op != USWAP_RUN_READY ? -EPROTO : m.status;

	c = (struct agent_ctx){ sock, uffd, suffd, (uint64_t)staging, STAGING_BYTES, (uint64_t)ps, stack };
	hint_off = stack;
	hint_uffd = uffd;
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setstack(&attr, stack, AGENT_STACK);
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	pthread_t t;
	ret = -pthread_create(&t, &attr, agent, &c);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&attr);
	return ret;
}

__attribute__((constructor)) static void uswap_run_init(void)
{
	const char *path = getenv(USWAP_RUN_ENV_SOCKET);
	if (!path)
		return;
	int ret = start(path);
	if (ret < 0) {
		char what[160];
		snprintf(what, sizeof(what), "not budgeted: %s", strerror(-ret));
		say(what);
	}
}
