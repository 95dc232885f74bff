/*
 * run_probe: the kernel mechanisms `uswap run` (issue 12) relies on, checked on this kernel.
 *
 * Three parties, as in docs/RUN-DESIGN.md:
 *   D  the "daemon" (this process's main thread and its server thread),
 *   C  the "client" (a forked child; its main thread is the program),
 *   A  C's agent thread.
 * D opens /dev/userfaultfd and hands it to C over a Unix socket; C makes its uffd from it
 * (USERFAULTFD_IOC_NEW), maps its memory and a staging area (MADV_DONTFORK) and sends the uffd back.
 * D negotiates the features (UFFDIO_API) on C's uffd, registers C's ranges, write-protects them,
 * reads them through /proc/C/mem, and asks A to UFFDIO_MOVE runs into staging and MADV_DONTNEED
 * the staging range.  C then reads everything back (D serves the MISSING faults from its copies),
 * writes, and forks: D reads the FORK event and serves the child's faults from the same copies.
 *
 * Staging comes in two variants: (a) registered through the shared uffd (the DONTNEED raises
 * UFFD_EVENT_REMOVE at D, which must read it before madvise returns); (b) registered through a
 * private uffd A makes for itself, without events (nothing reaches D).
 *
 * Output: key=value lines, then "RESULT ok" or "RESULT FAIL: why"; exit status 0 only if ok.
 * Build: cc -O2 -Wall -pthread -Icsrc/common tests/c/run_probe.c -o run_probe   (run as root)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "uswap_core.h"    /* the guarded UFFD constants the 6.1 headers lack */

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

enum { NPAGES = 1024, RUN = 32, STAGING = 64 };
static long PS;

static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + t.tv_nsec;
}

#define DIE(...) do { fprintf(stderr, __VA_ARGS__); fprintf(stderr, " (%s)\n", strerror(errno)); \
		      printf("RESULT FAIL: setup\n"); exit(2); } while (0)

/* ---- fd passing ---- */

static void send_msg(int sock, const void *buf, size_t len, const int *fds, int nfds)
{
	struct iovec iov = { (void *)buf, len };
	char cbuf[CMSG_SPACE(sizeof(int) * 4)];
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (nfds) {
		memset(cbuf, 0, sizeof(cbuf));
		m.msg_control = cbuf;
		m.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
		struct cmsghdr *c = CMSG_FIRSTHDR(&m);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
	}
	if (sendmsg(sock, &m, 0) != (ssize_t)len)
		DIE("sendmsg");
}

static void recv_msg(int sock, void *buf, size_t len, int *fds, int nfds)
{
	struct iovec iov = { buf, len };
	char cbuf[CMSG_SPACE(sizeof(int) * 4)];
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	ssize_t n = recvmsg(sock, &m, MSG_CMSG_CLOEXEC);
	if (n != (ssize_t)len)
		DIE("recvmsg got %zd of %zu", n, len);
	if (nfds) {
		struct cmsghdr *c = CMSG_FIRSTHDR(&m);
		if (!c || c->cmsg_type != SCM_RIGHTS)
			DIE("no fds");
		memcpy(fds, CMSG_DATA(c), sizeof(int) * nfds);
	}
}

/* ---- the page pattern: page i of generation g ---- */

static uint64_t word(uint64_t i, uint64_t g, uint64_t w) { return (i * 0x9E3779B97F4A7C15ull) ^ (g << 56) ^ (w * 7919); }

static void fill(char *base, uint64_t g)
{
	for (uint64_t i = 0; i < NPAGES; i++)
		for (uint64_t w = 0; w < (uint64_t)PS / 8; w += 64)
			((uint64_t *)(base + i * PS))[w] = word(i, g, w);
}

static long check_page(const char *page, uint64_t i, uint64_t g)
{
	for (uint64_t w = 0; w < (uint64_t)PS / 8; w += 64)
		if (((const uint64_t *)page)[w] != word(i, g, w))
			return 1;
	return 0;
}

static long verify(const char *base, uint64_t g)
{
	long bad = 0;
	for (uint64_t i = 0; i < NPAGES; i++)
		bad += check_page(base + i * PS, i, g);
	return bad;
}

/* ---- the client ---- */

struct hello { uint64_t region, staging, staging_b; int pid; int staging_b_ok; };
struct cmd { int op; uint64_t src; uint64_t len; int variant; };     /* to the agent / the main thread */
struct reply { long a, b, c; uint64_t ns1, ns2; int err; };

enum { OP_MOVE = 1, OP_VERIFY_WRITE = 2, OP_FORK = 3, OP_EXIT = 4, OP_FORK_HOLD = 5, OP_RELEASE = 6, OP_REWRITE = 7 };

static int c_uffd, c_uffd_b = -1, c_agent_sock;
static char *c_staging, *c_staging_b;

static void *agent(void *arg)
{
	for (;;) {
		struct cmd k;
		struct reply r = { 0 };
		if (recv(c_agent_sock, &k, sizeof(k), 0) != sizeof(k) || k.op != OP_MOVE)
			return NULL;
		int fd = k.variant == 'b' ? c_uffd_b : c_uffd;
		char *st = k.variant == 'b' ? c_staging_b : c_staging;
		struct uffdio_move mv = { .dst = (uint64_t)st, .src = k.src, .len = k.len, .mode = 0 };
		uint64_t t0 = now_ns();
		if (ioctl(fd, UFFDIO_MOVE, &mv) < 0)
			r.err = errno;
		uint64_t t1 = now_ns();
		r.a = mv.move;
		if (!r.err && madvise(st, k.len, MADV_DONTNEED) < 0)
			r.err = errno;
		r.ns1 = t1 - t0;
		r.ns2 = now_ns() - t1;
		send(c_agent_sock, &r, sizeof(r), 0);
	}
}

static int client(int sock, int agent_sock)
{
	int devfd;
	char dummy;
	recv_msg(sock, &dummy, 1, &devfd, 1);
	c_uffd = ioctl(devfd, USERFAULTFD_IOC_NEW, O_CLOEXEC);
	if (c_uffd < 0)
		DIE("USERFAULTFD_IOC_NEW");
	char *region = mmap(NULL, NPAGES * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	c_staging = mmap(NULL, STAGING * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	c_staging_b = mmap(NULL, STAGING * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED || c_staging == MAP_FAILED || c_staging_b == MAP_FAILED)
		DIE("mmap");
	madvise(c_staging, STAGING * PS, MADV_DONTFORK);
	madvise(c_staging_b, STAGING * PS, MADV_DONTFORK);
	fill(region, 0);

	/* variant (b): a private uffd for staging b, without events, registered by the agent's process */
	int staging_b_ok = 0;
	c_uffd_b = ioctl(devfd, USERFAULTFD_IOC_NEW, O_CLOEXEC);
	struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_MOVE };
	if (c_uffd_b >= 0 && ioctl(c_uffd_b, UFFDIO_API, &api) == 0) {
		struct uffdio_register reg = { .range = { (uint64_t)c_staging_b, STAGING * PS },
					       .mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP };
		staging_b_ok = ioctl(c_uffd_b, UFFDIO_REGISTER, &reg) == 0;
	}
	close(devfd);

	struct hello h = { (uint64_t)region, (uint64_t)c_staging, (uint64_t)c_staging_b, getpid(), staging_b_ok };
	send_msg(sock, &h, sizeof(h), &c_uffd, 1);
	recv(sock, &dummy, 1, 0);          /* D negotiated and registered */

	c_agent_sock = agent_sock;
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	pthread_t t;
	pthread_create(&t, NULL, agent, NULL);
	pthread_sigmask(SIG_SETMASK, &old, NULL);

	for (;;) {
		struct cmd k;
		struct reply r = { 0 };
		if (recv(sock, &k, sizeof(k), 0) != sizeof(k))
			return 1;
		if (k.op == OP_EXIT)
			return 0;
		if (k.op == OP_VERIFY_WRITE) {    /* read gen src, then write gen src+1 */
			uint64_t t0 = now_ns();
			r.a = verify(region, k.src);
			r.ns1 = now_ns() - t0;
			t0 = now_ns();
			fill(region, k.src + 1);
			r.ns2 = now_ns() - t0;
			r.b = verify(region, k.src + 1);
		} else if (k.op == OP_FORK_HOLD) {  /* a child that shares every page until released */
			int pipefd[2];
			if (pipe(pipefd))
				return 1;
			pid_t held = fork();
			if (held == 0) {
				char c;
				close(pipefd[1]);
				_exit(read(pipefd[0], &c, 1) == 1 ? 0 : 1);
			}
			close(pipefd[0]);
			r.a = held;
			struct cmd rel;
			send(sock, &r, sizeof(r), 0);
			if (recv(sock, &rel, sizeof(rel), 0) != sizeof(rel) || rel.op != OP_RELEASE)
				return 1;
			int st;
			if (write(pipefd[1], "x", 1) != 1)
				return 1;
			close(pipefd[1]);
			waitpid(held, &st, 0);
			r.a = st;
		} else if (k.op == OP_REWRITE) {   /* rewrite one word of pages src..src+len-1 with itself */
			for (uint64_t i = k.src; i < k.src + k.len; i++) {
				volatile uint64_t *w = (volatile uint64_t *)(region + i * PS);
				*w = *w;
			}
		} else if (k.op == OP_FORK) {     /* memory holds gen src; the child checks it and writes its own */
			uint64_t t0 = now_ns();
			pid_t p = k.variant == 'r' ? (pid_t)syscall(SYS_fork) : fork();
			if (p == 0) {
				long bad = verify(region, k.src);
				fill(region, 100);
				bad += verify(region, 100);
				_exit(bad > 100 ? 100 : (int)bad);
			}
			r.ns1 = now_ns() - t0;
			r.c = p;
			int st;
			waitpid(p, &st, 0);
			r.a = WIFEXITED(st) ? WEXITSTATUS(st) : 1000 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
			r.b = verify(region, k.src);     /* the parent's pages, unchanged by the child's writes */
		}
		send(sock, &r, sizeof(r), 0);
	}
}

/* ---- the daemon ---- */

struct proc {                    /* one process's view: which pages D holds in its "slots" */
	int uffd, pid;
	_Atomic int first_ptid;          /* THREAD_ID of the first fault: how a fork uffd finds its pid */
	_Atomic uint8_t swapped[NPAGES];
};

static struct {
	uint64_t region, staging, staging_b;
	char *slots;                     /* one "slot" per page: the page's contents when it was swapped */
	struct proc procs[4];
	_Atomic int nprocs;
	_Atomic int stop;
	_Atomic int last_bad_revents;
	_Atomic long bad_polls;       /* POLLERR/POLLHUP on a uffd (a forked child that exited) */
	_Atomic long missing, wp, zero_fills, copies, forks, remove_staging, remove_other, other_events,
		staging_faults, errors;
} d;

static void serve_fault(struct proc *p, const struct uffd_msg *m)
{
	uint64_t addr = m->arg.pagefault.address & ~(uint64_t)(PS - 1);
	if (addr < d.region || addr >= d.region + NPAGES * PS) {
		d.staging_faults++;
		struct uffdio_zeropage z = { .range = { addr, PS } };
		ioctl(p->uffd, UFFDIO_ZEROPAGE, &z);
		return;
	}
	uint64_t i = (addr - d.region) / PS;
	if (!p->first_ptid)
		p->first_ptid = (int)m->arg.pagefault.feat.ptid;
	if (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) {
		d.wp++;
		struct uffdio_writeprotect w = { .range = { addr, PS }, .mode = 0 };
		if (ioctl(p->uffd, UFFDIO_WRITEPROTECT, &w) < 0)
			d.errors++;
		return;
	}
	d.missing++;
	if (atomic_exchange(&p->swapped[i], 0)) {
		/* counted before the copy, which wakes the faulting thread: the client's reply to the main thread
		 * can otherwise come before this thread counts its last page (1,023 of 1,024 once, under load) */
		d.copies++;
		struct uffdio_copy c = { .dst = addr, .src = (uint64_t)(d.slots + i * PS), .len = PS, .mode = 0 };
		if (ioctl(p->uffd, UFFDIO_COPY, &c) < 0 && errno != EEXIST)
			d.errors++;
	} else {
		d.zero_fills++;          /* a page D never took: in this probe, always a bug */
		struct uffdio_zeropage z = { .range = { addr, PS } };
		if (ioctl(p->uffd, UFFDIO_ZEROPAGE, &z) < 0 && errno != EEXIST)
			d.errors++;
	}
}

static void *server(void *arg)
{
	while (!d.stop) {
		int n = d.nprocs;
		struct pollfd pf[4];
		for (int k = 0; k < n; k++)
			pf[k] = (struct pollfd){ .fd = d.procs[k].uffd, .events = POLLIN };
		if (poll(pf, n, 50) <= 0)
			continue;
		for (int k = 0; k < n; k++)
			if (pf[k].revents & ~POLLIN) {
				d.last_bad_revents = pf[k].revents;
				d.bad_polls++;
				usleep(1000);      /* never spin */
			}
		for (int k = 0; k < n; k++) {
			if (!(pf[k].revents & POLLIN))
				continue;
			struct uffd_msg m;
			if (read(pf[k].fd, &m, sizeof(m)) != sizeof(m))
				continue;
			struct proc *p = &d.procs[k];
			switch (m.event) {
			case UFFD_EVENT_PAGEFAULT:
				serve_fault(p, &m);
				break;
			case UFFD_EVENT_FORK: {    /* the child references every slot the parent does */
				struct proc *c = &d.procs[n];
				c->uffd = (int)m.arg.fork.ufd;
				c->first_ptid = 0;
				/* the child's uffd inherits the creation flags (here O_CLOEXEC only), not the
				 * O_NONBLOCK set later by fcntl; poll() on a blocking uffd is always POLLERR */
				fcntl(c->uffd, F_SETFL, fcntl(c->uffd, F_GETFL) | O_NONBLOCK);
				for (int i = 0; i < NPAGES; i++)
					c->swapped[i] = p->swapped[i];
				d.forks++;
				d.nprocs = n + 1;
				break;
			}
			case UFFD_EVENT_REMOVE:
				if (m.arg.remove.start >= d.staging && m.arg.remove.start < d.staging + STAGING * PS)
					d.remove_staging++;
				else
					d.remove_other++;
				break;
			default:
				d.other_events++;
			}
		}
	}
	return NULL;
}

static void ask(int sock, const struct cmd *k, struct reply *r)
{
	send(sock, k, sizeof(*k), 0);
	if (recv(sock, r, sizeof(*r), 0) != sizeof(*r))
		DIE("client gone");
}

/* Take one run the way reclaim would (WP, read through /proc/PID/mem, move + drop); 0 or errno. */
static int take_run(int memfd, int agent_sock, int run, int variant)
{
	struct proc *p = &d.procs[0];
	uint64_t a = d.region + (uint64_t)run * RUN * PS;
	struct uffdio_writeprotect w = { .range = { a, RUN * PS }, .mode = UFFDIO_WRITEPROTECT_MODE_WP };
	if (ioctl(p->uffd, UFFDIO_WRITEPROTECT, &w) < 0)
		return errno;
	if (pread(memfd, d.slots + (uint64_t)run * RUN * PS, RUN * PS, a) != RUN * PS)
		return EIO;
	for (int i = run * RUN; i < (run + 1) * RUN; i++)
		p->swapped[i] = 1;
	struct cmd k = { OP_MOVE, a, RUN * PS, variant };
	struct reply rp;
	ask(agent_sock, &k, &rp);
	if (rp.err || rp.a != RUN * PS) {
		for (int i = run * RUN; i < (run + 1) * RUN; i++)
			p->swapped[i] = 0;
		return rp.err ? rp.err : EAGAIN;
	}
	return 0;
}

/* 1 if pages addr.. of both processes map the same page frames (pagemap, PFNs are root-only). */
static int same_frames(int pid1, int pid2, uint64_t addr, int count)
{
	char p1[64], p2[64];
	snprintf(p1, sizeof(p1), "/proc/%d/pagemap", pid1);
	snprintf(p2, sizeof(p2), "/proc/%d/pagemap", pid2);
	int f1 = open(p1, O_RDONLY), f2 = open(p2, O_RDONLY), same = 1;
	uint64_t e1[RUN], e2[RUN];
	if (f1 < 0 || f2 < 0 || count > RUN ||
	    pread(f1, e1, 8 * count, addr / PS * 8) != 8 * count || pread(f2, e2, 8 * count, addr / PS * 8) != 8 * count)
		same = -1;
	for (int i = 0; same == 1 && i < count; i++) {
		uint64_t pfn1 = e1[i] & ((1ull << 55) - 1), pfn2 = e2[i] & ((1ull << 55) - 1);
		if (!(e1[i] >> 63) || !pfn1 || pfn1 != pfn2)
			same = 0;
	}
	close(f1);
	close(f2);
	return same;
}

/* A child is gone: forget its uffd (and show what a dead process's uffd looks like: no event, no
 * HUP; ioctls through it fail with ESRCH). */
static void forget_child(void)
{
	int n = d.nprocs;
	if (n < 2)
		return;
	d.nprocs = n - 1;
	usleep(60000);     /* the server's poll has moved on */
	int cfd = d.procs[n - 1].uffd;
	struct pollfd pf = { .fd = cfd, .events = POLLIN };
	int pr = poll(&pf, 1, 0);
	struct uffdio_writeprotect w = { .range = { d.region, PS }, .mode = 0 };
	int rc = ioctl(cfd, UFFDIO_WRITEPROTECT, &w);
	printf("dead_child_uffd: poll=%d revents=0x%x ioctl=%d errno=%s\n", pr, pf.revents, rc,
	       rc ? strerror(errno) : "-");
	close(cfd);
}

/* Evict every other run of RUN pages: WP everything, read it through /proc/PID/mem, move + drop. */
static int evict(int memfd, int agent_sock, int variant_b_ok, const char *tag, long *moved_pages)
{
	struct proc *p = &d.procs[0];
	uint64_t t0 = now_ns();
	struct uffdio_writeprotect w = { .range = { d.region, NPAGES * PS }, .mode = UFFDIO_WRITEPROTECT_MODE_WP };
	if (ioctl(p->uffd, UFFDIO_WRITEPROTECT, &w) < 0)
		DIE("UFFDIO_WRITEPROTECT");
	uint64_t t1 = now_ns();
	if (pread(memfd, d.slots, NPAGES * PS, d.region) != NPAGES * PS)
		DIE("pread /proc/PID/mem");
	uint64_t t2 = now_ns();
	printf("%s_wp_all_us=%.1f\n", tag, (t1 - t0) / 1e3);
	printf("%s_procmem_read_us_per_page=%.2f\n", tag, (t2 - t1) / 1e3 / NPAGES);

	long before_removes = d.remove_staging, before_other = d.remove_other + d.other_events + d.missing + d.wp;
	uint64_t move_ns[2] = { 0 }, drop_ns[2] = { 0 };
	int runs[2] = { 0 }, fails = 0;
	for (int r = 0; r < NPAGES / RUN; r += 2) {
		int variant = (variant_b_ok && (r / 2) % 2) ? 'b' : 'a';
		for (int i = r * RUN; i < (r + 1) * RUN; i++)
			p->swapped[i] = 1;           /* the slot holds the data before the page leaves */
		struct cmd k = { OP_MOVE, d.region + (uint64_t)r * RUN * PS, RUN * PS, variant };
		struct reply rp;
		ask(agent_sock, &k, &rp);
		if (rp.err || rp.a != RUN * PS) {
			printf("%s_move_error=%s moved=%ld variant=%c\n", tag, strerror(rp.err), rp.a, variant);
			for (int i = r * RUN; i < (r + 1) * RUN; i++)
				p->swapped[i] = 0;
			fails++;
			continue;
		}
		*moved_pages += RUN;
		int v = variant == 'b';
		move_ns[v] += rp.ns1;
		drop_ns[v] += rp.ns2;
		runs[v]++;
	}
	usleep(100000);      /* let any late event arrive */
	for (int v = 0; v < 2; v++)
		if (runs[v])
			printf("%s_variant_%c_runs=%d move_us_per_run=%.1f dontneed_us_per_run=%.1f\n", tag, 'a' + v,
			       runs[v], move_ns[v] / 1e3 / runs[v], drop_ns[v] / 1e3 / runs[v]);
	printf("%s_remove_events_for_staging=%ld other_events_during_moves=%ld\n", tag,
	       d.remove_staging - before_removes, d.remove_other + d.other_events + d.missing + d.wp - before_other);
	return fails;
}

/* Is a MOVE refused when its source run crosses a VMA split (madvise: no uffd event)?  In-process. */
static void vma_split_probe(void)
{
	int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_MOVE };
	if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api) < 0)
		DIE("userfaultfd for the VMA split probe");
	char *src = mmap(NULL, 64 * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char *dst = mmap(NULL, 64 * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	memset(src, 7, 64 * PS);
	madvise(src + 32 * PS, 32 * PS, MADV_NOHUGEPAGE);     /* splits src into two VMAs */
	struct uffdio_register r = { .range = { (uint64_t)dst, 64 * PS }, .mode = UFFDIO_REGISTER_MODE_MISSING };
	if (ioctl(uffd, UFFDIO_REGISTER, &r) < 0)
		DIE("register dst");
	struct uffdio_move across = { .dst = (uint64_t)dst, .src = (uint64_t)(src + 16 * PS), .len = 32 * PS };
	int e1 = ioctl(uffd, UFFDIO_MOVE, &across) < 0 ? errno : 0;
	struct uffdio_move within = { .dst = (uint64_t)dst + 32 * PS, .src = (uint64_t)(src + 32 * PS), .len = 16 * PS };
	int e2 = ioctl(uffd, UFFDIO_MOVE, &within) < 0 ? errno : 0;
	printf("move_across_vma_split=%s moved=%lld move_within_one_vma=%s\n", e1 ? strerror(e1) : "ok",
	       (long long)across.move, e2 ? strerror(e2) : "ok");
	munmap(src, 64 * PS);
	munmap(dst, 64 * PS);
	close(uffd);
}

int main(void)
{
	PS = sysconf(_SC_PAGESIZE);
	setvbuf(stdout, NULL, _IOLBF, 0);
	vma_split_probe();
	int sv[2], av[2];
	if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv) || socketpair(AF_UNIX, SOCK_SEQPACKET, 0, av))
		DIE("socketpair");
	pid_t cpid = fork();
	if (cpid == 0) {
		close(sv[0]);
		close(av[0]);
		_exit(client(sv[1], av[1]));
	}
	close(sv[1]);
	close(av[1]);
	int sock = sv[0], agent_sock = av[0];

	int devfd = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (devfd < 0)
		DIE("/dev/userfaultfd");
	send_msg(sock, "x", 1, &devfd, 1);
	close(devfd);
	struct hello h;
	int uffd;
	recv_msg(sock, &h, sizeof(h), &uffd, 1);
	d.region = h.region;
	d.staging = h.staging;
	d.staging_b = h.staging_b;
	printf("staging_b_private_uffd_registered=%d\n", h.staging_b_ok);

	/* D negotiates on C's uffd: EVENT_FORK needs CAP_SYS_PTRACE in the caller, i.e. here */
	uint64_t want = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP |
			UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_THREAD_ID |
			UFFD_FEATURE_POISON | UFFD_FEATURE_MOVE;
	struct uffdio_api api = { .api = UFFD_API, .features = want };
	if (ioctl(uffd, UFFDIO_API, &api) < 0)
		DIE("UFFDIO_API on the client's uffd");
	printf("features_offered=0x%llx fork_negotiated=1\n", (unsigned long long)api.features);
	uint64_t mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP;
	struct uffdio_register rs = { .range = { h.staging, STAGING * PS }, .mode = mode };
	struct uffdio_register rr = { .range = { h.region, NPAGES * PS }, .mode = mode };
	if (ioctl(uffd, UFFDIO_REGISTER, &rs) < 0 || ioctl(uffd, UFFDIO_REGISTER, &rr) < 0)
		DIE("UFFDIO_REGISTER of the client's ranges from the daemon");
	printf("cross_process_register=1\n");
	int fl = fcntl(uffd, F_GETFL);
	fcntl(uffd, F_SETFL, fl | O_NONBLOCK);

	d.slots = aligned_alloc(PS, NPAGES * PS);
	d.procs[0].uffd = uffd;
	d.procs[0].pid = cpid;
	d.nprocs = 1;
	pthread_t srv;
	pthread_create(&srv, NULL, server, NULL);

	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/mem", cpid);
	int memfd = open(path, O_RDONLY | O_CLOEXEC);
	if (memfd < 0)
		DIE("open %s", path);
	send(sock, "g", 1, 0);

	const char *fail = NULL;
	long moved = 0;
	/* 1. evict, check the copies read through /proc/PID/mem, read back through MISSING faults, write */
	int fails = evict(memfd, agent_sock, h.staging_b_ok, "evict1", &moved);
	if (verify(d.slots, 0))
		fail = "/proc/PID/mem read wrong data";
	struct cmd k = { OP_VERIFY_WRITE, 0, 0, 0 };
	struct reply r;
	long copies0 = d.copies;
	ask(sock, &k, &r);
	printf("readback_bad_pages=%ld readback_us_per_page=%.2f missing_served=%ld write_all_us_per_page=%.2f "
	       "wp_faults=%ld bad_after_write=%ld\n", r.a, r.ns1 / 1e3 / NPAGES, d.copies - copies0,
	       r.ns2 / 1e3 / NPAGES, (long)d.wp, r.b);
	if (r.a || r.b)
		fail = "client read wrong data after swap-in";
	if (d.copies - copies0 != moved)
		fail = "not every moved page came back through a MISSING fault";

	/* 2. evict again (memory holds gen 1), then fork: libc fork, then raw SYS_fork */
	const int kinds[2] = { 'l', 'r' };
	for (int f = 0; f < 2; f++) {
		char tag[16];
		snprintf(tag, sizeof(tag), "evict%d", f + 2);
		long m2 = 0;
		fails += evict(memfd, agent_sock, h.staging_b_ok, tag, &m2);
		if (verify(d.slots, f + 1))
			fail = "/proc/PID/mem read wrong data (second eviction)";
		long forks0 = d.forks, c0 = d.copies;
		struct cmd fk = { OP_FORK, f + 1, 0, kinds[f] };
		ask(sock, &fk, &r);
		printf("fork_%s: fork_us=%.0f fork_events=%ld child_bad_pages=%ld parent_bad_pages=%ld "
		       "copies_served=%ld (swapped in parent at fork: %ld)\n", f ? "raw" : "libc", r.ns1 / 1e3,
		       d.forks - forks0, r.a, r.b, d.copies - c0, m2);
		int ptid = d.nprocs > 1 ? d.procs[d.nprocs - 1].first_ptid : 0;
		printf("fork_%s: child_first_fault_thread_id_is_child_pid=%d\n", f ? "raw" : "libc", ptid == r.c);
		if (ptid != r.c)
			fail = "the fork uffd's first fault did not name the child";
		if (d.forks - forks0 != 1)
			fail = "no FORK event";
		if (r.a || r.b)
			fail = "fork: wrong data in the child or the parent";
		if (d.copies - c0 != 2 * m2)
			fail = "fork: the child's and the parent's swapped pages were not all served from slots";
		/* parent: back to gen f+2 for the next round */
		struct cmd vw = { OP_VERIFY_WRITE, f + 1, 0, 0 };
		ask(sock, &vw, &r);
		if (r.a || r.b)
			fail = "wrong data after fork";
		forget_child();
	}

	/* 3. pages shared copy-on-write with a child: can the agent move them? */
	{
		struct cmd fh = { OP_FORK_HOLD, 0, 0, 0 };
		ask(sock, &fh, &r);
		int child = (int)r.a;
		int e_alive = take_run(memfd, agent_sock, 1, 'a');
		/* the /proc/PID/mem reads in take_run left the pages shared: same PFNs in parent and child */
		int shared = same_frames(d.procs[0].pid, child, d.region + RUN * PS, RUN);
		printf("procmem_read_keeps_cow_sharing=%d\n", shared);
		if (shared != 1)
			fail = "reading through /proc/PID/mem broke copy-on-write sharing";
		struct cmd rel = { OP_RELEASE, 0, 0, 0 };
		ask(sock, &rel, &r);
		forget_child();
		int e_dead = take_run(memfd, agent_sock, 1, 'a');
		struct cmd rw = { OP_REWRITE, RUN, RUN, 0 };
		ask(sock, &rw, &r);
		int e_rewritten = take_run(memfd, agent_sock, 1, 'a');
		printf("cow_shared_move: child_alive=%s child_exited=%s after_parent_rewrite=%s\n",
		       e_alive ? strerror(e_alive) : "moved", e_dead ? strerror(e_dead) : "moved",
		       e_rewritten ? strerror(e_rewritten) : "moved");
		if (!e_alive)
			fail = "a page shared with a live child was moved";
		if (e_rewritten)
			fail = "an exclusive page could not be moved";
		struct cmd vw = { OP_VERIFY_WRITE, 3, 0, 0 };
		ask(sock, &vw, &r);
		if (r.a || r.b)
			fail = "wrong data after the copy-on-write moves";
	}
	printf("totals: missing=%ld copies=%ld zero_fills=%ld wp=%ld forks=%ld remove_staging=%ld remove_other=%ld "
	       "other_events=%ld staging_faults=%ld ioctl_errors=%ld move_failures=%d bad_polls=%ld revents=0x%x\n", (long)d.missing,
	       (long)d.copies, (long)d.zero_fills, (long)d.wp, (long)d.forks, (long)d.remove_staging,
	       (long)d.remove_other, (long)d.other_events, (long)d.staging_faults, (long)d.errors, fails,
	       (long)d.bad_polls, d.last_bad_revents);
	if (d.zero_fills)
		fail = "a page was zero-filled";
	if (d.staging_faults || d.remove_other || d.errors || fails)
		fail = fail ? fail : "unexpected events, errors or failed moves";

	struct cmd ex = { OP_EXIT, 0, 0, 0 };
	send(sock, &ex, sizeof(ex), 0);
	int st;
	waitpid(cpid, &st, 0);
	d.stop = 1;
	pthread_join(srv, NULL);
	if (!WIFEXITED(st) || WEXITSTATUS(st))
		fail = fail ? fail : "client exited badly";
	printf(fail ? "RESULT FAIL: %s\n" : "RESULT ok\n", fail);
	return fail ? 1 : 0;
}
