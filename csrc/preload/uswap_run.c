/*
 * libuswaprun.so: the preload library of `uswap run` (issue 12, docs/RUN-DESIGN.md).
 *
 * In a constructor: connect to USWAP_RUN_SOCKET and check that the server runs as root or as this process's
 * euid (uswap_daemon_peer.c, the rule of libuswap.so; the environment through secure_getenv, no fallback),
 * send CONNECT (with USWAP_RUN_RESIDENT), receive the server's /dev/userfaultfd fd, make
 * this process's uffd from it (the server negotiates its features: it has CAP_SYS_PTRACE for
 * EVENT_FORK), map a staging area (MADV_DONTFORK) registered on a private uffd without events,
 * send HELLO, wait for READY (the program's memory is registered when main() starts), then start
 * the agent thread.
 *
 * The agent moves spans the server names out of the process: UFFDIO_MOVE into staging (no event:
 * MOVE checks only the destination's uffd), then MADV_DONTNEED of staging (no event: the private
 * uffd negotiated none).  It never touches registered memory: it runs on a stack of its own that
 * the server never registers, reads no globals after start, and calls the kernel directly (no
 * libc: libc's .bss is anonymous memory the server may swap).
 *
 * fork: the server negotiated EVENT_FORK, so a child's registered memory is served through a uffd
 * fork made, which only the server holds; it fills the child's missing pages from the parent's slots
 * (counted per process, like the kernel's swap_map).  The atfork child handler closes what the
 * child inherited of the parent's connection, touches the doorbell page (its fault names the child
 * to the server: the FORK event does not), drops it again (so a grandchild's touch faults too), and
 * connects as a child: the server hands back the child's uffd for the fallback below, and the child
 * gets its own staging area and agent.  A raw SYS_fork child has no agent: it is served, not evicted.
 *
 * If the server goes away, the agent answers the faults itself: MISSING with UFFDIO_POISON (SIGBUS
 * for the toucher: the data may have been the server's) where the record says an agent moved the page
 * out, UFFDIO_ZEROPAGE elsewhere; WP by lifting protection; it keeps the
 * uffds raw forks make and answers them the same way while this process lives.  fork() is then
 * refused (EAGAIN, with a message): the child's swapped pages would be nobody's.
 */
#define _GNU_SOURCE
#include "uswap_core.h"
#include "uswap_daemon_peer.h"
#include "uswap_run.h"

#include <dlfcn.h>
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

enum { STAGING_BYTES = 2 << 20, AGENT_STACK = 256 << 10, MAX_ORPHAN_FORKS = 64 };

/* Everything the agent needs, at the base of its own mapping (never registered, mlocked),
 * written before it starts.  server_gone is the one field written later (by the agent) and read by
 * fork(): it must not live in the library's .bss, which is anonymous memory the server swaps. */
struct agent_ctx {
	int sock, uffd, staging_uffd;
	volatile int server_gone;
	uint64_t staging, staging_len, page_size, doorbell;
	int child, ready_pipe;                /* the handshake: see handshake() */
	int refused;                          /* READY said no (the server lives: a child's uffd is served) */
	struct record *record;                /* this process tree's (see record_mark) */
	struct uswap_run_msg hello;
};
enum { SERVED = 0, SERVER_GONE = 1, DETACHED = 2 };   /* server_gone */

/*
 * What this process tree's agents moved out (the record).  Once the server is gone, a missing page the record
 * has may have had a slot (the agent answers SIGBUS: its data was the server's), one it lacks never left this
 * process (a zero page: it was never touched, or freed).  A sparse bitmap, a directory of 4 KiB leaves of 2^15
 * pages each, in a MAP_SHARED anonymous mapping: fork children share it (their swapped pages were the parent's;
 * what they move is marked for all, the safe side), the server never registers it (it registers private
 * memory only), nothing mlocks it (a leaf is touched when a page in its 128 MiB is first moved).  A page is marked
 * *before* its move: a fork between a move and its mark would give the child a record without it.  Marks are
 * never cleared (a page swapped back in and freed since gives SIGBUS, again the safe side); out of leaves, the
 * record is full and has every page.
 */
enum { RECORD_LEAF_PAGES = 1 << 15, RECORD_DIR = 1 << 20 /* 2^35 pages: 47-bit user space */,
       RECORD_LEAVES = 8192 /* 1 TiB of address space */ };
struct record {
	uint32_t leaves_used;                 /* atomic */
	uint32_t full;                        /* atomic */
	uint32_t dir[RECORD_DIR];             /* atomic: leaf + 1, 0: none */
	uint64_t leaf[RECORD_LEAVES][RECORD_LEAF_PAGES / 64];   /* atomic */
};

static void record_mark(struct record *r, uint64_t addr, uint64_t len, uint64_t page_size)
{
	for (uint64_t page = addr / page_size; page < (addr + len) / page_size; page++) {
		uint64_t d = page / RECORD_LEAF_PAGES, bit = page % RECORD_LEAF_PAGES;
		uint32_t leaf = d < RECORD_DIR ? __atomic_load_n(&r->dir[d], __ATOMIC_ACQUIRE) : 0;
		if (!leaf) {
			uint32_t mine = __atomic_add_fetch(&r->leaves_used, 1, __ATOMIC_RELAXED), none = 0;
			if (d >= RECORD_DIR || mine > RECORD_LEAVES) {
				__atomic_store_n(&r->full, 1, __ATOMIC_RELEASE);
				return;
			}
			leaf = __atomic_compare_exchange_n(&r->dir[d], &none, mine, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)
			       ? mine : none;   /* another agent's leaf won: this one stays unused */
		}
		__atomic_or_fetch(&r->leaf[leaf - 1][bit / 64], 1ull << (bit % 64), __ATOMIC_RELEASE);
	}
}

static int record_has(const struct record *r, uint64_t addr, uint64_t page_size)
{
	uint64_t page = addr / page_size, d = page / RECORD_LEAF_PAGES, bit = page % RECORD_LEAF_PAGES;
	if (!r || __atomic_load_n(&r->full, __ATOMIC_ACQUIRE) || d >= RECORD_DIR)
		return 1;
	uint32_t leaf = __atomic_load_n(&r->dir[d], __ATOMIC_ACQUIRE);
	return leaf && (__atomic_load_n(&r->leaf[leaf - 1][bit / 64], __ATOMIC_ACQUIRE) >> (bit % 64) & 1);
}

/* Written by the constructor (and the atfork child handler) before any agent runs; read by the
 * program's threads only (fork() and the child handler), never by an agent. */
static struct agent_ctx *agent_of_process;
static const char *socket_path;
static char *doorbell;
static char *proof;                           /* the page HELLO names for the daemon's nonce (uswap_run.h) */
static struct record *record;                 /* inherited by fork children (shared), new after exec */
static int state_at_fork = -1;                /* server_gone when this process last forked; -1: no agent */
static int process_fds[3] = { -1, -1, -1 };   /* the connection, the uffd, the staging uffd: a child closes them */

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
	char buf[512];
	int n = snprintf(buf, sizeof(buf), "uswap run[%d]: %s\n", getpid(), what);
	if (n > 0 && write(2, buf, (size_t)n) < 0)
		return;
}

/* Move [addr, addr+len) out through staging; the bytes moved, *err the first errno. */
static uint64_t drop_span(const struct agent_ctx *c, uint64_t addr, uint64_t len, int32_t *err)
{
	uint64_t done = 0, most = c->staging_len;
	*err = 0;
	record_mark(c->record, addr, len, c->page_size);   /* before the move: see struct record */
	while (done < len) {
		uint64_t n = len - done < most ? len - done : most;
		struct uffdio_move mv = { .dst = c->staging, .src = addr + done, .len = n, .mode = 0 };
		long r = raw6(SYS_ioctl, c->staging_uffd, (long)UFFDIO_MOVE, (long)&mv, 0, 0, 0);
		uint64_t moved = mv.move > 0 ? (uint64_t)mv.move : 0;
		if (moved)
			raw6(SYS_madvise, (long)c->staging, (long)moved, MADV_DONTNEED, 0, 0, 0);
		done += moved;
		if (r == -EINVAL && most > c->page_size) {
			/* the span crosses VMAs (madvise/mprotect split them, which raises no uffd event):
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

/* The server is gone: a write to a protected page may go on; a missing page the record has gives SIGBUS (its
 * data may have been in a slot), any other is a zero page.  An ioctl refused while an event is pending
 * (EAGAIN) wakes the thread instead: it faults again, after the event, which this agent reads. */
static void answer_faults(int uffd, const struct uffd_msg *m, const struct record *r, uint64_t page_size)
{
	uint64_t a = m->arg.pagefault.address & ~(page_size - 1);
	long ret;
	if (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) {
		struct uffdio_writeprotect w = { .range = { a, page_size }, .mode = 0 };
		ret = raw6(SYS_ioctl, uffd, (long)UFFDIO_WRITEPROTECT, (long)&w, 0, 0, 0);
	} else if (record_has(r, a, page_size)) {
		struct uffdio_poison p = { .range = { a, page_size }, .mode = 0 };
		ret = raw6(SYS_ioctl, uffd, (long)UFFDIO_POISON, (long)&p, 0, 0, 0);
	} else {
		struct uffdio_zeropage z = { .range = { a, page_size }, .mode = 0 };
		ret = raw6(SYS_ioctl, uffd, (long)UFFDIO_ZEROPAGE, (long)&z, 0, 0, 0);
	}
	if (ret == -EAGAIN || ret == -EEXIST) {
		struct uffdio_range w = { a, page_size };
		raw6(SYS_ioctl, uffd, (long)UFFDIO_WAKE, (long)&w, 0, 0, 0);
	}
}

/* Whether the process behind a uffd is gone (its mm: exit or exec): ioctls then fail with ESRCH. */
static int uffd_mm_gone(int uffd, const struct agent_ctx *c)
{
	struct uffdio_writeprotect w = { .range = { c->doorbell, c->page_size }, .mode = 0 };
	return raw6(SYS_ioctl, uffd, (long)UFFDIO_WRITEPROTECT, (long)&w, 0, 0, 0) == -ESRCH;
}

/* The server is gone: answer this process's faults, and those of children raw forks made (their uffds
 * arrive here as FORK events), so that none waits forever and none reads zeros. */
static void orphaned(struct agent_ctx *c)
{
	struct pollfd p[1 + MAX_ORPHAN_FORKS];
	struct uffd_msg m[16];
	int n = 1;
	c->server_gone = SERVER_GONE;
	p[0] = (struct pollfd){ .fd = c->uffd, .events = POLLIN };
	for (;;) {
		if (raw6(SYS_poll, (long)p, n, -1, 0, 0, 0) < 0)
			continue;
		for (int k = 0; k < n; k++) {
			if (!(p[k].revents & POLLIN))
				continue;
			long got = raw6(SYS_read, p[k].fd, (long)m, sizeof(m), 0, 0, 0);
			if (got <= 0) {
				if (k == 0 && got != -EAGAIN && got != -EINTR)
					return;
				continue;
			}
			for (long i = 0; i < got / (long)sizeof(m[0]); i++) {
				if (m[i].event == UFFD_EVENT_PAGEFAULT) {
					answer_faults(p[k].fd, &m[i], c->record, c->page_size);
				} else if (m[i].event == UFFD_EVENT_FORK) {
					int fd = (int)m[i].arg.fork.ufd;
					for (int j = 1; j < n && n == 1 + MAX_ORPHAN_FORKS; j++)
						if (uffd_mm_gone(p[j].fd, c)) {     /* make room: a child that is gone */
							raw6(SYS_close, p[j].fd, 0, 0, 0, 0, 0);
							p[j] = p[--n];
						}
					if (n < 1 + MAX_ORPHAN_FORKS) {
						/* a fork's uffd is blocking (O_NONBLOCK is not inherited), and poll on
						 * a blocking uffd only ever says POLLERR */
						raw6(SYS_fcntl, fd, F_SETFL, O_NONBLOCK, 0, 0, 0);
						p[n++] = (struct pollfd){ .fd = fd, .events = POLLIN };
					}
					else
						raw6(SYS_close, fd, 0, 0, 0, 0, 0);   /* a 65th live child: its swapped pages read zeros */
				}
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
 * hint_uffd is set once READY came (a forked child: its own uffd, after its READY); hints stop when the
 * agent says the server is gone (agent_ctx.server_gone): registered new memory would then SIGBUS.
 */
static int hint_uffd = -1;

static void hint(uint64_t addr, uint64_t len)
{
	uint64_t ps = 4096, a = (addr + ps - 1) & ~(ps - 1), b = (addr + len) & ~(ps - 1);
	if (hint_uffd < 0 || !agent_of_process || agent_of_process->server_gone != SERVED || b <= a)
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

/* HELLO (with this process's uffd; a child's comes back with READY) and READY, in the agent: once READY is
 * sent the server may evict and ask for a DROP, and it serves no fault of this process until the DROP is
 * answered, so the agent must exist before READY (a program thread creating it after READY could fault on
 * an evicted page of libc's and wait forever).  Raw syscalls: libc's state is memory the server may swap. */
static int32_t handshake(struct agent_ctx *c)
{
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { &c->hello, sizeof(c->hello) };
	struct msghdr h = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (!c->child) {
		h.msg_control = cbuf;
		h.msg_controllen = sizeof(cbuf);
		struct cmsghdr *cm = CMSG_FIRSTHDR(&h);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int));
		__builtin_memcpy(CMSG_DATA(cm), &c->uffd, sizeof(int));
	}
	long n = raw6(SYS_sendmsg, c->sock, (long)&h, MSG_NOSIGNAL, 0, 0, 0);
	if (n != (long)sizeof(c->hello))
		return n < 0 ? (int32_t)n : -EPROTO;
	struct uswap_run_msg m;
	iov = (struct iovec){ &m, sizeof(m) };
	h = (struct msghdr){ .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	n = raw6(SYS_recvmsg, c->sock, (long)&h, MSG_CMSG_CLOEXEC, 0, 0, 0);
	if (n != (long)sizeof(m) || m.magic != USWAP_RUN_MAGIC || m.version != USWAP_RUN_VERSION ||
	    m.op != USWAP_RUN_READY)
		return n < 0 ? (int32_t)n : -EPROTO;
	if (m.status) {
		c->refused = 1;
		return m.status;
	}
	if (c->child) {
		struct cmsghdr *cm = CMSG_FIRSTHDR(&h);
		if (!cm || cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
			return -EPROTO;
		__builtin_memcpy(&c->uffd, CMSG_DATA(cm), sizeof(int));
	}
	return 0;
}

static void *agent(void *arg)
{
	struct agent_ctx *c = arg;
	struct uswap_run_msg m;
	int32_t status = handshake(c);
	raw6(SYS_write, c->ready_pipe, (long)&status, sizeof(status), 0, 0, 0);
	if (status)
		return NULL;
	for (;;) {
		long n = raw6(SYS_recvfrom, c->sock, (long)&m, sizeof(m), 0, 0, 0);
		if (n == -EINTR)
			continue;
		if (n == (long)sizeof(m) && m.magic == USWAP_RUN_MAGIC && m.op == USWAP_RUN_DETACH) {
			c->server_gone = DETACHED;    /* nothing is registered any more: no fault, no event */
			return NULL;
		}
		if (n != (long)sizeof(m) || m.magic != USWAP_RUN_MAGIC || m.op != USWAP_RUN_DROP ||
		    m.count > USWAP_RUN_MAX_SPANS)
			break;
		for (uint32_t i = 0; i < m.count; i++)
			m.len[i] = drop_span(c, m.addr[i], m.len[i], &m.err[i]);
		m.op = USWAP_RUN_DROPPED;
		if (raw6(SYS_sendto, c->sock, (long)&m, sizeof(m), MSG_NOSIGNAL, 0, 0) != (long)sizeof(m))
			break;
	}
	orphaned(c);
	return NULL;
}

/* With the server gone, a child's swapped pages (the parent's slots) could be served by nobody once this
 * process exits: refuse rather than risk zeros. */
pid_t fork(void)
{
	static pid_t (*libc_fork)(void);
	if (agent_of_process && agent_of_process->server_gone == SERVER_GONE) {
		say("fork() refused (EAGAIN): the uswap daemon is gone, a child could not get its swapped pages");
		errno = EAGAIN;
		return -1;
	}
	if (!libc_fork)
		libc_fork = (pid_t (*)(void))dlsym(RTLD_NEXT, "fork");
	return libc_fork ? libc_fork() : (pid_t)syscall(SYS_fork);
}

static int recv_msg(int sock, struct uswap_run_msg *m, int *fd)
{
	struct iovec iov = { m, sizeof(*m) };
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct msghdr h = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	ssize_t n = recvmsg(sock, &h, MSG_CMSG_CLOEXEC);
	if (n != (ssize_t)sizeof(*m) || m->magic != USWAP_RUN_MAGIC || m->version != USWAP_RUN_VERSION)
		return n < 0 ? -errno : -EPROTO;
	if (fd && m->op == USWAP_RUN_READY)   /* refused instead of DEVFD: no fd comes */
		return m->status < 0 ? m->status : -EPROTO;
	if (fd) {
		struct cmsghdr *cm = CMSG_FIRSTHDR(&h);
		if (!cm || cm->cmsg_type != SCM_RIGHTS)
			return -EPROTO;
		memcpy(fd, CMSG_DATA(cm), sizeof(int));
	}
	return 0;
}

static const char *daemon_refused(int status)
{
	static char text[128];
	snprintf(text, sizeof(text), "the daemon refused the run (%s): its log says why", strerror(-status));
	return text;
}


/* USWAP_RUN_REQUIRED (set by `uswap run`): a program that cannot be budgeted does not run at all. */
static int run_required(void)
{
	const char *required = secure_getenv(USWAP_RUN_ENV_REQUIRED);
	return required && strcmp(required, "0") != 0;
}

/* The server at the run's socket, authenticated (root or our euid) before anything is sent: whoever
 * listens gets this process's userfaultfd and asks its agent to drop pages.  The socket, or -errno with
 * the reason in *why (-EPERM: a server of another uid). */
static int connect_server(const char *path, const char **why)
{
	static char reason[384];   /* constructor and atfork child: one thread */
	int sock = uswap_daemon_connect(path, reason, sizeof(reason));
	if (sock < 0)
		*why = reason;
	return sock;
}

/* On an authenticated connection (connect_server): be registered (READY), start the agent.  child: a forked
 * child of a process of the run, whose uffd fork made and the server holds (it comes back with READY). */
static int start(int sock, int child, const char **why)
{
	long ps = sysconf(_SC_PAGESIZE);
	struct uswap_run_msg m = { .magic = USWAP_RUN_MAGIC, .version = USWAP_RUN_VERSION, .op = USWAP_RUN_CONNECT,
				   .pid = (uint64_t)getpid(), .flags = child ? USWAP_RUN_CHILD : 0 };
	const char *resident = secure_getenv(USWAP_RUN_ENV_RESIDENT);
	m.resident = resident ? strtoull(resident, NULL, 10) : 0;
	if (send(sock, &m, sizeof(m), MSG_NOSIGNAL) != (ssize_t)sizeof(m))
		return -errno;
	int ret;
	int devfd = -1;
	ret = recv_msg(sock, &m, &devfd);
	if (ret < 0 || m.op != USWAP_RUN_DEVFD) {
		if (m.op == USWAP_RUN_READY && ret == -EPERM)
			*why = "the daemon does not serve runs for this user (uswap daemon --run-users)";
		else if (m.op == USWAP_RUN_READY && ret == -EDQUOT)
			*why = "this user has as many run processes as the daemon allows (uswap daemon --user-max-runs)";
		else if (m.op == USWAP_RUN_READY && ret == -EAGAIN && child)
			*why = "this child is not served (its fork is over a bound: uswap daemon --user-max-runs, "
			       "--max-run-processes): it runs unbudgeted; a page swapped out before the fork gives SIGBUS";
		else if (m.op == USWAP_RUN_READY && ret == -EAGAIN)
			*why = "the daemon serves as many run processes as it allows (uswap daemon --max-run-processes)";
		else if (m.op == USWAP_RUN_READY)
			*why = daemon_refused(ret);
		return ret < 0 ? ret : -EPROTO;
	}
	int uffd = child ? -1 : ioctl(devfd, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
	int suffd = ioctl(devfd, USERFAULTFD_IOC_NEW, O_CLOEXEC);
	close(devfd);
	if ((!child && uffd < 0) || suffd < 0)
		return -errno;
	struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_MOVE };
	if (ioctl(suffd, UFFDIO_API, &api) < 0)
		return -errno;
	if (!record) {
		/* virtual: 36 MiB reserved, a page touched per 128 MiB of address space evicted */
		record = mmap(NULL, sizeof(struct record), PROT_READ | PROT_WRITE,
			      MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (record == MAP_FAILED) {
			record = NULL;
			return -ENOMEM;
		}
	}
	if (!doorbell) {
		/* registered with the rest of the program's memory and never touched but by a child's handler */
		doorbell = mmap(NULL, (size_t)ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (doorbell == MAP_FAILED)
			return -ENOMEM;
	}
	if (!proof) {
		/* untouched until the daemon copies its nonce in; MADV_DONTDUMP keeps it a VMA of its own (never
		 * merged with the program's memory, which the daemon would then leave unregistered with it);
		 * inherited by fork children, whose copy proves their image (exec maps none) */
		proof = mmap(NULL, (size_t)ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (proof == MAP_FAILED) {
			proof = NULL;
			return -ENOMEM;
		}
		madvise(proof, (size_t)ps, MADV_DONTDUMP);
	}
	void *staging = mmap(NULL, STAGING_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char *stack = mmap(NULL, AGENT_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (staging == MAP_FAILED || stack == MAP_FAILED)
		return -ENOMEM;
	madvise(staging, STAGING_BYTES, MADV_DONTFORK);
	/* not MADV_DONTFORK: glibc keeps the agent's thread descriptor at the top of this stack and walks it in
	 * a forked child (before the atfork handlers run, which then unmap the copy) */
	madvise(staging, STAGING_BYTES, MADV_NOHUGEPAGE);
	struct uffdio_register reg = { .range = { (uint64_t)staging, STAGING_BYTES },
				       .mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP };
	if (ioctl(suffd, UFFDIO_REGISTER, &reg) < 0)
		return -errno;
	mlock(stack, AGENT_STACK);   /* best effort: the agent's stack is never swapped by anyone */

	int ready[2];
	if (pipe2(ready, O_CLOEXEC) < 0)
		return -errno;
	struct agent_ctx *c = (struct agent_ctx *)stack;
	*c = (struct agent_ctx){ .sock = sock, .uffd = uffd, .staging_uffd = suffd, .staging = (uint64_t)staging,
				 .staging_len = STAGING_BYTES, .page_size = (uint64_t)ps, .doorbell = (uint64_t)doorbell,
				 .child = child, .ready_pipe = ready[1], .record = record };
	c->hello = (struct uswap_run_msg){ .magic = USWAP_RUN_MAGIC, .version = USWAP_RUN_VERSION,
					   .op = USWAP_RUN_HELLO, .pid = (uint64_t)getpid(), .staging = (uint64_t)staging,
					   .staging_len = STAGING_BYTES, .agent_stack = (uint64_t)stack,
					   .agent_stack_len = AGENT_STACK, .doorbell = (uint64_t)doorbell,
					   .proof = (uint64_t)proof };
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setstack(&attr, stack + ps, AGENT_STACK - ps);
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	pthread_t t;
	ret = -pthread_create(&t, &attr, agent, c);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&attr);
	int32_t status = ret;
	if (ret == 0 && read(ready[0], &status, sizeof(status)) != (ssize_t)sizeof(status))
		status = -EPROTO;
	close(ready[0]);
	close(ready[1]);
	if (status < 0 && c->refused)
		*why = daemon_refused(status);
	if (status < 0 && child && !c->refused)
		return -ECONNABORTED;
	if (status == 0) {
		hint_uffd = c->uffd;
		agent_of_process = c;
		process_fds[0] = sock, process_fds[1] = c->uffd, process_fds[2] = suffd;
	}
	return status;
}

/* In a forked child: what it inherited of the parent's run is the parent's (the connection, the uffd whose
 * context is the parent's, the staging uffd; staging and the agent's stack are MADV_DONTFORK); the doorbell's
 * fault names this process to the server, the DONTNEED re-arms it for a grandchild (its REMOVE event is
 * read by the server like any other); then connect as a child. */
static void before_fork(void)
{
	state_at_fork = agent_of_process ? agent_of_process->server_gone : -1;
}

static void after_fork_in_child(void)
{
	if (state_at_fork < 0)
		return;
	hint_uffd = -1;                          /* the parent's uffd: closed below */
	munmap(agent_of_process, AGENT_STACK);   /* the parent agent's stack: no thread here uses it */
	agent_of_process = NULL;
	for (int i = 0; i < 3; i++)
		close(process_fds[i]);
	if (state_at_fork != SERVED)
		return;                  /* detached: nothing registered; gone: fork() was refused (a raw fork) */
	(void)*(volatile char *)doorbell;
	madvise(doorbell, (size_t)sysconf(_SC_PAGESIZE), MADV_DONTNEED);
	const char *why = NULL;
	int sock = connect_server(socket_path, &why);
	if (sock == -EPERM) {
		/* another uid's server: it gets nothing.  Whoever holds this child's uffd serves it (the parent's
		 * server, unless it went away), but never swaps it out */
		char what[512];
		int fatal = run_required();
		snprintf(what, sizeof(what), "%s: %s%s", fatal ? "refused" : "this child is served but never swapped out",
			 why, fatal ? "; not running it unbudgeted" : "");
		say(what);
		if (fatal)
			_exit(USWAP_RUN_REFUSED_EXIT);
		return;
	}
	int ret = sock < 0 ? sock : start(sock, 1, &why);
	if (ret == -ECONNREFUSED || ret == -ENOENT || ret == -ECONNRESET || ret == -EPIPE || ret == -ECONNABORTED) {
		/* The server went away between the fork and READY: the uffd fork made for this child was only
		 * the server's, so it is closed and this child's swapped pages would read as zeros.  Never. */
		say("the uswap daemon went away while this child was forked: its swapped memory is lost (SIGBUS)");
		signal(SIGBUS, SIG_DFL);
		sigset_t bus;
		sigemptyset(&bus);
		sigaddset(&bus, SIGBUS);
		sigprocmask(SIG_UNBLOCK, &bus, NULL);
		raise(SIGBUS);
		_exit(128 + SIGBUS);
	}
	if (ret == -EAGAIN && why) {
		say(why);                /* refused at its CONNECT: its fork was not served (no uffd of its own) */
	} else if (ret < 0) {
		char what[512];
		snprintf(what, sizeof(what), "this child is served but never swapped out: %s", why ? why : strerror(-ret));
		say(what);
	}
}

__attribute__((constructor)) static void uswap_run_init(void)
{
	/* secure_getenv: in a secure-execution program (setuid, setgid, file capabilities) the environment is the
	 * caller's and must not choose who receives this process's memory; then there is no run at all */
	const char *path = secure_getenv(USWAP_RUN_ENV_SOCKET);
	if (!path)
		return;
	socket_path = path;
	const char *why = NULL;
	int sock = connect_server(path, &why);
	int ret = sock < 0 ? sock : start(sock, 0, &why);
	if (ret == 0)
		pthread_atfork(before_fork, NULL, after_fork_in_child);
	if (ret < 0) {
		int fatal = run_required();
		char what[512];
		snprintf(what, sizeof(what), "%s: %s%s", fatal ? "refused" : "not budgeted", why ? why : strerror(-ret),
			 fatal ? "; not running it unbudgeted" : "");
		say(what);
		if (fatal)
			_exit(USWAP_RUN_REFUSED_EXIT);
	}
}
