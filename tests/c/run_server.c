/*
 * run_server: a minimal server for libuswaprun.so (csrc/uswap_run.c), standing in for the daemon
 * until the engine serves processes (docs/RUN-DESIGN.md, "Order of work").  Single-threaded, one
 * process per run, slots in a file (O_DIRECT when the filesystem allows), no readahead, no CLOCK:
 * its purpose is to show the mechanisms and the invariants working on an unmodified program.
 *
 *   run_server SOCKET STORE RESIDENT_PAGES LIBUSWAPRUN -- CMD ARGS...
 *
 * Spawns CMD with LD_PRELOAD and USWAP_RUN_SOCKET, negotiates the features on the uffd the
 * program made, registers its anonymous private writable VMAs (rescanned every tick), serves its
 * faults and events, and when its registered resident pages exceed RESIDENT_PAGES evicts runs:
 * write-protect, read through /proc/PID/mem, write slots, agent drop, publish SWAPPED.  Exits with
 * CMD's status; prints counters on stderr ("run_server: pswpout=... ").
 *
 * Page state is a hash from page address to slot; absent from it = not swapped (resident or never
 * touched).  INFLIGHT marks a page written but not yet dropped: events and WP faults on it cancel
 * its eviction (it is still resident then: no MOVE is ever in flight while events are handled).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "uswap_core.h"
#include "uswap_run.h"

enum { RUN = 32, TICK_MS = 10, MAX_RANGES = 8192, HASH_BITS = 21, MAX_CHILDREN = 8 };
#define INFLIGHT (1ull << 62)
#define EMPTY_KEY 0ull

static long PS;

static void die(const char *what)
{
	fprintf(stderr, "run_server: %s: %s\n", what, strerror(errno));
	exit(125);
}

/* ---- the swap map: page address -> slot | flags (open addressing, backward-shift delete) ---- */

struct map {
	uint64_t *key, *val;
	uint64_t mask, count;
};

static void map_init(struct map *m)
{
	m->mask = (1ull << HASH_BITS) - 1;
	m->key = calloc(m->mask + 1, 8);
	m->val = calloc(m->mask + 1, 8);
	m->count = 0;
	if (!m->key || !m->val)
		die("calloc");
}

static uint64_t hsh(uint64_t k) { return (k / PS * 0x9E3779B97F4A7C15ull) >> (64 - HASH_BITS); }

static int64_t map_find(const struct map *m, uint64_t k)
{
	for (uint64_t i = hsh(k);; i = (i + 1) & m->mask) {
		if (m->key[i] == k)
			return (int64_t)i;
		if (m->key[i] == EMPTY_KEY)
			return -1;
	}
}

/* Insert or replace; the replaced value, or -1. */
static int64_t map_put(struct map *m, uint64_t k, uint64_t v)
{
	if (m->count * 4 > m->mask * 3) {
		errno = ENOSPC;
		die("swap map full");
	}
	uint64_t i = hsh(k);
	while (m->key[i] != EMPTY_KEY && m->key[i] != k)
		i = (i + 1) & m->mask;
	int64_t old = -1;
	if (m->key[i] == EMPTY_KEY)
		m->count++;
	else
		old = (int64_t)(m->val[i] & ~(1ull << 63));
	m->key[i] = k;
	m->val[i] = v;
	return old;
}

static void map_del_at(struct map *m, uint64_t i)
{
	m->key[i] = EMPTY_KEY;
	m->count--;
	for (uint64_t j = (i + 1) & m->mask; m->key[j] != EMPTY_KEY; j = (j + 1) & m->mask) {
		uint64_t h = hsh(m->key[j]);
		/* move j back to i if its home is not in (i, j] */
		if ((j > i && (h <= i || h > j)) || (j < i && (h <= i && h > j))) {
			m->key[i] = m->key[j];
			m->val[i] = m->val[j];
			m->key[j] = EMPTY_KEY;
			i = j;
		}
	}
}

/* ---- state ---- */

static struct {
	int pid, uffd, memfd, sock, store;
	uint64_t staging, staging_len, stack, stack_len;
	struct map map;
	uint32_t *free_slots;
	uint64_t nfree, next_slot, slot_count;
	uint64_t ranges[MAX_RANGES][2], nranges;
	uint64_t budget, cursor;
	char *buf;                      /* RUN * USWAP_RUN_MAX_RUNS pages, aligned */
	struct { int uffd; struct map snap; } child[MAX_CHILDREN];
	int nchildren;
	uint64_t pswpout, pswpin, zero_fills, missing, wp, ev_remove, ev_unmap, ev_remap, ev_fork, ev_other,
		eagain, ebusy, enoent, cancelled, drops, execs, overwrites, other_refusals, max_resident, max_rss_kb, registered, poisoned, ticks;
} s;

static uint64_t slot_alloc(void)
{
	if (s.nfree)
		return s.free_slots[--s.nfree];
	if (s.next_slot == s.slot_count) {
		errno = ENOSPC;
		die("store full");
	}
	return s.next_slot++;
}

static void slot_free(uint64_t slot) { s.free_slots[s.nfree++] = (uint32_t)slot; }

static void forget(uint64_t i)      /* drop a page's entry and its slot */
{
	slot_free(s.map.val[i] & 0xffffffffull);
	map_del_at(&s.map, i);
}

/* ---- faults and events ---- */

/* One fill or protection ioctl: 0, -EAGAIN (events are pending: the caller defers the fault until the
 * queue is read; retrying here would wait for ourselves), or another -errno (the thread is woken). */
static int fill(int fd, unsigned long op, void *arg, uint64_t a)
{
	if (ioctl(fd, op, arg) == 0)
		return 0;
	int e = errno;
	if (e == EAGAIN) {
		s.eagain++;
		return -EAGAIN;
	}
	struct uffdio_range w = { a, PS };    /* EEXIST (served meanwhile), or the range went away */
	ioctl(fd, UFFDIO_WAKE, &w);
	return -e;
}

/* 0 when served, -EAGAIN when it must be retried after the queued events are read. */
static int serve_fault(int uffd, const struct uffd_msg *m, const struct map *snap)
{
	uint64_t a = m->arg.pagefault.address & ~(uint64_t)(PS - 1);
	if (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) {
		int64_t i = snap ? -1 : map_find(&s.map, a);
		if (i >= 0 && (s.map.val[i] & INFLIGHT)) {   /* a write to a page we were about to drop: keep it */
			forget((uint64_t)i);
			s.cancelled++;
		}
		struct uffdio_writeprotect w = { .range = { a, PS }, .mode = 0 };
		if (fill(uffd, UFFDIO_WRITEPROTECT, &w, a) == -EAGAIN)
			return -EAGAIN;
		s.wp++;
		return 0;
	}
	int64_t i = map_find(snap ? snap : &s.map, a);
	if (snap && i >= 0) {            /* a raw-fork child touching a page swapped in its parent: SIGBUS, not zeros */
		struct uffdio_poison p = { .range = { a, PS } };
		if (fill(uffd, UFFDIO_POISON, &p, a) == -EAGAIN)
			return -EAGAIN;
		s.poisoned++;
		return 0;
	}
	if (i >= 0 && !(s.map.val[i] & INFLIGHT)) {
		uint64_t slot = s.map.val[i] & 0xffffffffull;
		if (pread(s.store, s.buf, PS, (off_t)(slot * PS)) != PS)
			die("slot read");
		struct uffdio_copy c = { .dst = a, .src = (uint64_t)s.buf, .len = PS };
		int r = fill(uffd, UFFDIO_COPY, &c, a);
		if (r == -EAGAIN)
			return -EAGAIN;          /* the slot stays: the fault comes back */
		if (r < 0 && r != -EEXIST)
			fprintf(stderr, "run_server: UFFDIO_COPY %#lx: %s\n", (unsigned long)a, strerror(-r));
		forget((uint64_t)i);
		s.pswpin++;
		s.missing++;
		return 0;
	}
	struct uffdio_zeropage z = { .range = { a, PS } };
	if (fill(uffd, UFFDIO_ZEROPAGE, &z, a) == -EAGAIN)
		return -EAGAIN;
	s.zero_fills++;
	s.missing++;
	return 0;
}

/* REMOVE/UNMAP: the pages' contents are gone; so are their slots (also a pending eviction's). */
static void invalidate(uint64_t start, uint64_t end)
{
	if ((end - start) / PS > s.map.count * 2) {
		for (uint64_t i = 0; i <= s.map.mask; i++)
			while (s.map.key[i] != EMPTY_KEY && s.map.key[i] >= start && s.map.key[i] < end)
				forget(i);      /* a shifted-in key may match too */
		return;
	}
	for (uint64_t a = start; a < end; a += PS) {
		int64_t i = map_find(&s.map, a);
		if (i >= 0)
			forget((uint64_t)i);
	}
}

/* REMAP: swapped pages move with their range; a pending eviction of a moved page is cancelled. */
static void remap(uint64_t from, uint64_t to, uint64_t len)
{
	for (uint64_t off = 0; off < len; off += PS) {
		int64_t i = map_find(&s.map, from + off);
		if (i < 0)
			continue;
		uint64_t v = s.map.val[i];
		map_del_at(&s.map, (uint64_t)i);
		if (v & INFLIGHT) {
			slot_free(v & 0xffffffffull);
			s.cancelled++;
		} else {
			int64_t old = map_put(&s.map, to + off, v);
			if (old >= 0) {
				slot_free((uint64_t)old & 0xffffffffull);
				s.overwrites++;
			}
		}
	}
}

static int handle(int uffd, const struct uffd_msg *m, const struct map *snap)
{
	switch (m->event) {
	case UFFD_EVENT_PAGEFAULT:
		return serve_fault(uffd, m, snap);
	case UFFD_EVENT_REMOVE:
		s.ev_remove++;
		if (!snap)
			invalidate(m->arg.remove.start, m->arg.remove.end);
		break;
	case UFFD_EVENT_UNMAP:
		s.ev_unmap++;
		if (!snap)
			invalidate(m->arg.remove.start, m->arg.remove.end);
		break;
	case UFFD_EVENT_REMAP:
		s.ev_remap++;
		if (!snap)
			remap(m->arg.remap.from, m->arg.remap.to, m->arg.remap.len);
		break;
	case UFFD_EVENT_FORK: {   /* fork() is refused by the preload; this is a raw SYS_fork */
		s.ev_fork++;
		int fd = (int)m->arg.fork.ufd;
		if (snap || s.nchildren == MAX_CHILDREN) {
			close(fd);   /* its faults hang: never zeros */
			break;
		}
		fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
		struct map *c = &s.child[s.nchildren].snap;
		map_init(c);
		memcpy(c->key, s.map.key, (s.map.mask + 1) * 8);
		c->count = s.map.count;
		s.child[s.nchildren++].uffd = fd;
		break;
	}
	default:
		s.ev_other++;
	}
	return 0;
}

/* Read and handle every queued message of one uffd, in order; faults refused with EAGAIN (events
 * queued behind them) are retried once the queue is empty.  0 when nothing is left; -errno when the
 * uffd is unusable. */
static int drain(int uffd, const struct map *snap)
{
	static struct uffd_msg deferred[4096];
	int ndeferred = 0;
	struct uffd_msg m[64];
	for (int rounds = 0;; rounds++) {
		ssize_t n = read(uffd, m, sizeof(m));
		if (n < 0 && errno != EAGAIN)
			return -errno;
		for (ssize_t i = 0; i < n / (ssize_t)sizeof(m[0]); i++)
			if (handle(uffd, &m[i], snap) == -EAGAIN) {
				if (ndeferred == 4096)
					die("too many deferred faults");
				deferred[ndeferred++] = m[i];
			}
		if (n > 0)
			continue;
		int left = 0;
		for (int i = 0; i < ndeferred; i++)
			if (handle(uffd, &deferred[i], snap) == -EAGAIN)
				deferred[left++] = deferred[i];
		ndeferred = left;
		if (!ndeferred)
			return 0;
		usleep(rounds < 10 ? 1 : 50);   /* a program thread is finishing its event (mmap_changing) */
	}
}

static void drain_all(void)
{
	drain(s.uffd, NULL);
	for (int c = 0; c < s.nchildren; c++)
		if (drain(s.child[c].uffd, &s.child[c].snap) < 0) {
			close(s.child[c].uffd);
			free(s.child[c].snap.key);
			free(s.child[c].snap.val);
			s.child[c] = s.child[--s.nchildren];
			c--;
		}
}

/* ---- registration (rescanned every tick: brk and mmap make new VMAs) ---- */

static int overlaps(uint64_t a, uint64_t b, uint64_t c, uint64_t len) { return a < c + len && c < b; }

static void rescan(void)
{
	char path[64], line[512];
	snprintf(path, sizeof(path), "/proc/%d/maps", s.pid);
	FILE *f = fopen(path, "re");
	if (!f)
		return;
	uint64_t seen[MAX_RANGES][2], n = 0;
	while (fgets(line, sizeof(line), f) && n < MAX_RANGES) {
		unsigned long a, b, off;
		char perms[8], dev[16], name[256] = "";
		unsigned long ino;
		if (sscanf(line, "%lx-%lx %7s %lx %15s %lu %255s", &a, &b, perms, &off, dev, &ino, name) < 6)
			continue;
		if (strcmp(perms, "rw-p") || ino || (name[0] && strcmp(name, "[heap]")))
			continue;      /* anonymous private writable only; not [stack] (yet) */
		if (overlaps(a, b, s.staging, s.staging_len) || overlaps(a, b, s.stack, s.stack_len))
			continue;
		seen[n][0] = a;
		seen[n][1] = b;
		n++;
		int known = 0;
		for (uint64_t k = 0; k < s.nranges && !known; k++)
			known = s.ranges[k][0] == a && s.ranges[k][1] == b;
		if (known)
			continue;
		struct uffdio_register r = { .range = { a, b - a },
					     .mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP };
		if (ioctl(s.uffd, UFFDIO_REGISTER, &r) == 0)
			s.registered++;
	}
	fclose(f);
	memcpy(s.ranges, seen, n * sizeof(seen[0]));
	s.nranges = n;
}

/* ---- eviction ---- */

struct run { uint64_t addr, pages; };

/* Evict the given runs: WP, read through /proc/PID/mem, write slots, agent drop, publish. */
static void evict(struct run *runs, int nruns)
{
	for (int r = 0; r < nruns; r++) {
		struct uffdio_writeprotect w = { .range = { runs[r].addr, runs[r].pages * PS },
						 .mode = UFFDIO_WRITEPROTECT_MODE_WP };
		while (ioctl(s.uffd, UFFDIO_WRITEPROTECT, &w) < 0) {
			if (errno != EAGAIN) {
				runs[r].pages = 0;    /* gone meanwhile */
				break;
			}
			s.eagain++;
			drain_all();     /* nothing of ours is in flight yet */
		}
	}
	char *p = s.buf;
	for (int r = 0; r < nruns; r++) {
		uint64_t len = runs[r].pages * PS;
		if (!len)
			continue;
		if (pread(s.memfd, p, len, (off_t)runs[r].addr) != (ssize_t)len) {
			runs[r].pages = 0;     /* unmapped meanwhile; a WP fault will lift protection */
			continue;
		}
		for (uint64_t i = 0; i < runs[r].pages; i++) {
			uint64_t slot = slot_alloc();
			if (pwrite(s.store, p + i * PS, PS, (off_t)(slot * PS)) != PS)
				die("slot write");
			int64_t old = map_put(&s.map, runs[r].addr + i * PS, slot | INFLIGHT);   /* slot complete, page here */
			if (old >= 0) {      /* a resident page with a slot entry: an invariant broke; never leak */
				slot_free((uint64_t)old & 0xffffffffull);
				s.overwrites++;
			}
		}
		p += len;
	}
	/* the agent drops; runs it could not move for pending events are retried after draining */
	for (int attempt = 0; attempt < 100; attempt++) {
		struct uswap_run_msg m = { .magic = USWAP_RUN_MAGIC, .version = USWAP_RUN_VERSION, .op = USWAP_RUN_DROP };
		for (int r = 0; r < nruns; r++) {
			/* the part of the run still pending (events may have cancelled pages: split at them) */
			uint64_t i = 0;
			while (i < runs[r].pages && m.count < USWAP_RUN_MAX_RUNS) {
				int64_t h = map_find(&s.map, runs[r].addr + i * PS);
				if (h < 0 || !(s.map.val[h] & INFLIGHT)) {
					i++;
					continue;
				}
				uint64_t n = 1;
				while (i + n < runs[r].pages) {
					int64_t h2 = map_find(&s.map, runs[r].addr + (i + n) * PS);
					if (h2 < 0 || !(s.map.val[h2] & INFLIGHT))
						break;
					n++;
				}
				m.addr[m.count] = runs[r].addr + i * PS;
				m.len[m.count++] = n * PS;
				i += n;
			}
		}
		if (!m.count)
			return;
		if (send(s.sock, &m, sizeof(m), MSG_NOSIGNAL) != sizeof(m) || recv(s.sock, &m, sizeof(m), 0) != sizeof(m)) {
			s.sock = -1;
			return;
		}
		s.drops++;
		int again = 0, refused = 0;
		for (uint32_t k = 0; k < m.count; k++) {
			uint64_t moved = m.len[k] / PS;
			for (uint64_t i = 0; i < moved; i++) {     /* gone from the process: SWAPPED */
				int64_t h = map_find(&s.map, m.addr[k] + i * PS);
				s.map.val[h] &= ~INFLIGHT;
				s.pswpout++;
			}
			if (!m.err[k])
				continue;
			if (m.err[k] == EAGAIN) {
				again = 1;
				continue;
			}
			s.ebusy += m.err[k] == EBUSY;
			s.enoent += m.err[k] == ENOENT;
			if (m.err[k] != EBUSY && m.err[k] != ENOENT && !s.other_refusals++)
				fprintf(stderr, "run_server: agent: %s (first of its kind; counted)\n", strerror(m.err[k]));
			int64_t h = map_find(&s.map, m.addr[k] + moved * PS);   /* the page MOVE refused stays */
			if (h >= 0)
				forget((uint64_t)h);
			refused = 1;     /* the rest of that run is still pending: the next attempt sends it */
		}
		if (!again && !refused)
			return;
		if (again) {
			s.eagain++;
			drain_all();
		}
	}
	for (int r = 0; r < nruns; r++)      /* still refused: the pages stay, their slots go */
		for (uint64_t i = 0; i < runs[r].pages; i++) {
			int64_t h = map_find(&s.map, runs[r].addr + i * PS);
			if (h >= 0 && (s.map.val[h] & INFLIGHT))
				forget((uint64_t)h);
		}
}

/* Present pages of the registered ranges (pagemap), and eviction down to 7/8 of the budget. */
static void reclaim(void)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/pagemap", s.pid);
	int pm = open(path, O_RDONLY | O_CLOEXEC);
	if (pm < 0)
		return;
	static uint64_t ent[1 << 16];
	uint64_t resident = 0;
	for (uint64_t k = 0; k < s.nranges; k++)
		for (uint64_t a = s.ranges[k][0]; a < s.ranges[k][1]; a += (1 << 16) * PS) {
			uint64_t n = (s.ranges[k][1] - a) / PS;
			n = n > (1 << 16) ? (1 << 16) : n;
			ssize_t got = pread(pm, ent, n * 8, (off_t)(a / PS * 8));
			for (ssize_t i = 0; i < got / 8; i++)
				resident += (ent[i] >> 63) & 1;
		}
	if (resident > s.max_resident)
		s.max_resident = resident;
	if (resident <= s.budget) {
		close(pm);
		return;
	}
	uint64_t want = resident - s.budget * 7 / 8, taken = 0;
	struct run runs[USWAP_RUN_MAX_RUNS];
	int nruns = 0;
	/* walk the ranges from where the last pass stopped (a FIFO of address order, not a CLOCK) */
	for (uint64_t pass = 0; pass < 2 * s.nranges && taken < want && s.sock >= 0; pass++) {
		uint64_t k = 0;
		while (k < s.nranges && s.ranges[k][1] <= s.cursor)
			k++;
		if (k == s.nranges) {
			s.cursor = 0;
			continue;
		}
		uint64_t a = s.cursor > s.ranges[k][0] ? s.cursor : s.ranges[k][0];
		uint64_t end = s.ranges[k][1];
		for (; a < end && taken < want; a += (1 << 16) * PS) {
			uint64_t n = (end - a) / PS;
			n = n > (1 << 16) ? (1 << 16) : n;
			ssize_t got = pread(pm, ent, n * 8, (off_t)(a / PS * 8));
			for (ssize_t i = 0; i < got / 8 && taken < want; i++) {
				int ok = (ent[i] >> 63) & 1 && (ent[i] >> 56) & 1;   /* present, exclusively mapped */
				uint64_t pa = a + (uint64_t)i * PS;
				if (ok && nruns && runs[nruns - 1].addr + runs[nruns - 1].pages * PS == pa &&
				    runs[nruns - 1].pages < RUN) {
					runs[nruns - 1].pages++;
					taken++;
				} else if (ok) {
					if (nruns == USWAP_RUN_MAX_RUNS) {
						evict(runs, nruns);
						nruns = 0;
					}
					runs[nruns++] = (struct run){ pa, 1 };
					taken++;
				}
			}
		}
		s.cursor = a < end ? a : end;
	}
	if (nruns)
		evict(runs, nruns);
	close(pm);
}

static void note_rss(void)
{
	char path[64], line[256];
	snprintf(path, sizeof(path), "/proc/%d/status", s.pid);
	FILE *f = fopen(path, "re");
	if (!f)
		return;
	while (fgets(line, sizeof(line), f)) {
		unsigned long kb;
		if (sscanf(line, "RssAnon: %lu", &kb) == 1 && kb > s.max_rss_kb)
			s.max_rss_kb = kb;
	}
	fclose(f);
}

/* ---- the connection ---- */

static int send_devfd(int sock)
{
	int devfd = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (devfd < 0)
		return -errno;
	struct uswap_run_msg m = { .magic = USWAP_RUN_MAGIC, .version = USWAP_RUN_VERSION, .op = USWAP_RUN_DEVFD };
	struct iovec iov = { &m, sizeof(m) };
	char cbuf[CMSG_SPACE(sizeof(int))] = { 0 };
	struct msghdr h = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *cm = CMSG_FIRSTHDR(&h);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cm), &devfd, sizeof(int));
	int ret = sendmsg(sock, &h, MSG_NOSIGNAL) == sizeof(m) ? 0 : -errno;
	close(devfd);
	return ret;
}

static void reply_ready(int sock, int status)
{
	struct uswap_run_msg m = { .magic = USWAP_RUN_MAGIC, .version = USWAP_RUN_VERSION, .op = USWAP_RUN_READY,
				   .status = status };
	send(sock, &m, sizeof(m), MSG_NOSIGNAL);
}

/* One process's HELLO: negotiate on its uffd, register, READY.  0, or -errno (connection refused). */
static int accept_process(int sock)
{
	struct uswap_run_msg m;
	if (recv(sock, &m, sizeof(m), 0) != sizeof(m) || m.magic != USWAP_RUN_MAGIC || m.op != USWAP_RUN_CONNECT)
		return -EPROTO;      /* the budget it asks for is ignored here: RESIDENT_PAGES */
	if (send_devfd(sock) < 0)
		return -EIO;
	struct iovec iov = { &m, sizeof(m) };
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct msghdr h = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	if (recvmsg(sock, &h, MSG_CMSG_CLOEXEC) != sizeof(m) || m.magic != USWAP_RUN_MAGIC || m.op != USWAP_RUN_HELLO)
		return -EPROTO;
	struct cmsghdr *cm = CMSG_FIRSTHDR(&h);
	if (!cm || cm->cmsg_type != SCM_RIGHTS)
		return -EPROTO;
	int uffd;
	memcpy(&uffd, CMSG_DATA(cm), sizeof(int));
	if (s.uffd >= 0 && m.pid == (uint64_t)s.pid) {
		/* the same pid again: it exec'd, its old mm (and every page of it) is gone */
		for (uint64_t i = 0; i <= s.map.mask; i++)
			while (s.map.key[i] != EMPTY_KEY)
				forget(i);
		close(s.uffd);
		close(s.memfd);
		close(s.sock);
		s.uffd = s.sock = -1;
		s.nranges = 0;
		s.execs++;
	}
	if (s.uffd >= 0) {                 /* one process per run, for now: said, not silent */
		close(uffd);
		reply_ready(sock, -EUSERS);
		return -EUSERS;
	}
	struct ucred cr;
	socklen_t cl = sizeof(cr);
	if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cr, &cl) < 0 || (uint64_t)cr.pid != m.pid) {
		close(uffd);
		return -EPERM;
	}
	struct uffdio_api api = { .api = UFFD_API,
				  .features = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_EVENT_FORK |
					      UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE |
					      UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_POISON |
					      UFFD_FEATURE_MOVE };
	if (ioctl(uffd, UFFDIO_API, &api) < 0) {
		int e = errno;
		close(uffd);
		reply_ready(sock, -e);
		return -e;
	}
	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/mem", cr.pid);
	s.memfd = open(path, O_RDONLY | O_CLOEXEC);
	s.pid = cr.pid;
	s.uffd = uffd;
	s.sock = sock;
	s.staging = m.staging;
	s.staging_len = m.staging_len;
	s.stack = m.agent_stack;
	s.stack_len = m.agent_stack_len;
	rescan();
	reply_ready(sock, 0);
	return 0;
}

int main(int argc, char **argv)
{
	PS = sysconf(_SC_PAGESIZE);
	if (argc < 7 || strcmp(argv[5], "--")) {
		fprintf(stderr, "usage: run_server SOCKET STORE RESIDENT_PAGES LIBUSWAPRUN -- CMD ARGS...\n");
		return 125;
	}
	signal(SIGPIPE, SIG_IGN);
	s.uffd = s.sock = -1;
	s.budget = strtoull(argv[3], NULL, 0);
	s.slot_count = 1 << 20;
	s.free_slots = malloc(s.slot_count * 4);
	map_init(&s.map);
	s.store = open(argv[2], O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_DIRECT, 0600);
	if (s.store < 0 && errno == EINVAL)
		s.store = open(argv[2], O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (s.store < 0)
		die("store");
	s.buf = aligned_alloc(PS, RUN * USWAP_RUN_MAX_RUNS * PS);

	int ls = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", argv[1]);
	unlink(argv[1]);
	if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(ls, 8) < 0)
		die("listen");

	pid_t child = fork();
	if (child == 0) {
		const char *old = getenv("LD_PRELOAD");
		char pre[4096];
		snprintf(pre, sizeof(pre), "%s%s%s", argv[4], old ? ":" : "", old ? old : "");
		setenv("LD_PRELOAD", pre, 1);
		setenv(USWAP_RUN_ENV_SOCKET, argv[1], 1);
		execvp(argv[6], argv + 6);
		_exit(127);
	}
	int status = -1;
	struct timespec last = { 0 };
	for (;;) {
		struct pollfd pf[2 + MAX_CHILDREN] = { { .fd = ls, .events = POLLIN }, { .fd = s.uffd, .events = POLLIN } };
		for (int c = 0; c < s.nchildren; c++)
			pf[2 + c] = (struct pollfd){ .fd = s.child[c].uffd, .events = POLLIN };
		poll(pf, 2 + s.nchildren, TICK_MS);
		if (pf[0].revents & POLLIN) {
			int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
			if (c >= 0 && accept_process(c) < 0)
				close(c);
		}
		if (s.uffd >= 0)
			drain_all();
		struct timespec now;
		clock_gettime(CLOCK_MONOTONIC, &now);
		if ((now.tv_sec - last.tv_sec) * 1000 + (now.tv_nsec - last.tv_nsec) / 1000000 >= TICK_MS) {
			last = now;
			if (waitpid(child, &status, WNOHANG) == child)
				break;
			if (s.uffd >= 0 && s.sock >= 0) {
				s.ticks++;
				rescan();
				reclaim();
				note_rss();
			}
		}
	}
	fprintf(stderr, "run_server: pswpout=%lu pswpin=%lu zero_fills=%lu missing=%lu wp=%lu registered=%lu "
		"remove=%lu unmap=%lu remap=%lu fork=%lu other=%lu eagain=%lu ebusy=%lu enoent=%lu cancelled=%lu "
		"drops=%lu poisoned=%lu max_resident_pages=%lu budget_pages=%lu max_rss_anon_kb=%lu slots_used=%lu "
		"ticks=%lu execs=%lu overwrites=%lu other_refusals=%lu\n",
		s.pswpout, s.pswpin, s.zero_fills, s.missing, s.wp, s.registered, s.ev_remove, s.ev_unmap, s.ev_remap,
		s.ev_fork, s.ev_other, s.eagain, s.ebusy, s.enoent, s.cancelled, s.drops, s.poisoned, s.max_resident,
		s.budget, s.max_rss_kb, s.map.count, s.ticks, s.execs, s.overwrites, s.other_refusals);
	unlink(argv[1]);
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
