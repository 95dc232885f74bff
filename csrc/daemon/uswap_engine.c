/*
 * The fault engine (see uswap_engine.h): the swap map, a thread per region
 * serving faults, and writeback's per-page work.
 *
 * A fault thread reads like the kernel's fault path:
 *   handle_fault (do_swap_page / do_wp_page) decides,
 *   swap_in (swap_readpage with a readahead window) reads and checks,
 *   install (UFFDIO_COPY / UFFDIO_ZEROPAGE) maps, publish updates the map.
 *
 * Invariants (each relied on below; docs/DESIGN.md M1, M4, M2):
 *   - (M1) Only the holder of a page's BUSY bit changes its PTE, its memfd page or
 *     its slot.  The engine claims a page with a CAS and never waits for a
 *     busy one: it forwards that fault to Python.  Python (the trio thread)
 *     claims through the same CAS, so the two never both hold a page.
 *   - (M4) A slot is read only by the holder of the page that owns it, and freed
 *     only by that holder (or by Python after the engine reported it free
 *     through the ring), so a slot is never reused while a read of it is in
 *     flight.
 *   - (M2) The resident counts (region and budget) change only in publish, from
 *     the old state to the new, so they are exact whoever publishes.
 *   - The ring is the only channel from the engine to Python; it keeps each
 *     fault thread's order (what Python needs of it: post).
 *   - Several fault threads serve a region (uswap_engine_start: threads); they
 *     share the map, the ring, the counters (atomic) and the window sizes
 *     (per client thread, relaxed atomics: a heuristic); each has its own
 *     buffers, io_uring rings and readahead stream.  A thread never waits for a page Python holds; it
 *     waits a bounded time for one another thread holds (claim_for_fault).
 *   - The engine never calls into Python and never takes the GIL; its threads
 *     have every signal blocked.
 */
#define _GNU_SOURCE
#include "uswap_engine.h"
#include "uswap_core.h"
#include "uswap_pool.h"
#include "uswap_slots.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include <liburing.h>

#define NEG_ERRNO() (-(errno ? errno : EIO))
#define RING_SIZE 4096                 /* messages; a power of two */
#define RING_NOTIFY_AT (RING_SIZE / 4) /* wake Python at this fill even when it is not waiting for us */
#define MAX_WINDOW USWAP_MAX_READAHEAD
#define AHEAD_DEPTH 2                  /* windows read ahead of a stream, in flight at once */
#define AHEAD_LOOK_MS 5                /* a thread with windows in flight looks at its ring this often at least */
#define AHEAD_REACH (4 * MAX_WINDOW)   /* how far past the stream's last fault they may go */
#define RA_STREAMS 64                  /* window states per region, one per faulting thread (by its tid) */

/* ------------------------------------------------------------------ */
/* the swap map                                                        */
/* ------------------------------------------------------------------ */

static inline uint32_t state_of(uint64_t e) { return (uint32_t)(e & USWAP_STATE_MASK); }
static inline int64_t slot_of(uint64_t e) { return (int64_t)(e >> USWAP_SLOT_SHIFT) - 1; }
static inline int is_resident(uint32_t s) { return s == USWAP_DIRTY || s == USWAP_CLEAN || s == USWAP_WRITEBACK; }

static inline uint64_t load(struct uswap_swapmap *m, uint64_t page)
{
	return __atomic_load_n(&m->entry[page], __ATOMIC_ACQUIRE);
}

int uswap_swapmap_new(uint64_t pages, struct uswap_budget *budget, struct uswap_swapmap **out)
{
	struct uswap_swapmap *m = calloc(1, sizeof(*m));
	if (!m)
		return -ENOMEM;
	m->entry = calloc(pages ? pages : 1, sizeof(uint64_t));
	if (!m->entry) {
		free(m);
		return -ENOMEM;
	}
	m->pages = pages;
	m->budget = budget;
	*out = m;
	return 0;
}

/* Free a map whose engine is stopped; its resident pages leave the budget (atomically:
 * other regions' engines change the budget meanwhile). */
void uswap_swapmap_free(struct uswap_swapmap *m)
{
	if (!m)
		return;
	__atomic_sub_fetch(&m->budget->resident, __atomic_load_n(&m->resident, __ATOMIC_ACQUIRE), __ATOMIC_RELAXED);
	free(m->entry);
	free(m);
}

uint64_t uswap_map_entry(struct uswap_swapmap *m, uint64_t page)
{
	return load(m, page);
}

/* Take the page's BUSY bit; -EBUSY if someone holds it.  *entry: the entry before. */
int uswap_map_claim(struct uswap_swapmap *m, uint64_t page, uint64_t *entry)
{
	uint64_t e = load(m, page);
	do {
		if (e & USWAP_BUSY)
			return -EBUSY;
	} while (!__atomic_compare_exchange_n(&m->entry[page], &e, e | USWAP_BUSY, 0, __ATOMIC_ACQ_REL,
					      __ATOMIC_ACQUIRE));
	if (entry)
		*entry = e;
	return 0;
}

/* Set the page's state and slot (-1: none); BUSY dropped unless hold.
 * referenced: 1 set, 0 clear, -1 keep. */
static void transition(struct uswap_swapmap *m, uint64_t page, uint32_t state, int64_t slot, int referenced,
		       int hold)
{
	uint64_t e = load(m, page), n;
	do {
		n = (uint64_t)state | ((uint64_t)(slot + 1) << USWAP_SLOT_SHIFT) | (hold ? USWAP_BUSY : 0);
		if (referenced > 0 || (referenced < 0 && (e & USWAP_REFERENCED)))
			n |= USWAP_REFERENCED;
	} while (!__atomic_compare_exchange_n(&m->entry[page], &e, n, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
	int delta = is_resident(state) - is_resident(state_of(e));
	if (delta) {
		__atomic_add_fetch(&m->resident, delta, __ATOMIC_RELAXED);
		__atomic_add_fetch(&m->budget->resident, delta, __ATOMIC_RELAXED);
	}
}

/* Publish a claimed page's new state and slot (-1: none), and drop BUSY. */
void uswap_map_publish(struct uswap_swapmap *m, uint64_t page, uint32_t state, int64_t slot, int referenced)
{
	transition(m, page, state, slot, referenced, 0);
}

/* 1 if any page of the run was referenced since the last call; clears the bits (the CLOCK hand). */
int uswap_map_test_clear_referenced(struct uswap_swapmap *m, uint64_t first, uint64_t count)
{
	int any = 0;
	for (uint64_t p = first; p < first + count && p < m->pages; p++)
		any |= (__atomic_fetch_and(&m->entry[p], ~(uint64_t)USWAP_REFERENCED, __ATOMIC_ACQ_REL)
			& USWAP_REFERENCED) != 0;
	return any;
}

void uswap_map_set_referenced(struct uswap_swapmap *m, uint64_t page)
{
	__atomic_fetch_or(&m->entry[page], (uint64_t)USWAP_REFERENCED, __ATOMIC_ACQ_REL);
}

/* Claim the resident, unclaimed pages (DIRTY or CLEAN) of a span, up to max: the reclaimer's victims. */
/* Add page p (in state s) to a list of spans, extending the last span when p continues it
 * in the same state.  0 when a new span is needed and the list is full. */
static int add_to_spans(struct uswap_span *spans, int *n, int max, uint64_t p, uint32_t s)
{
	if (*n > 0 && spans[*n - 1].first + spans[*n - 1].count == p && spans[*n - 1].state == s) {
		spans[*n - 1].count++;
		return 1;
	}
	if (*n == max)
		return 0;
	spans[*n] = (struct uswap_span){ .first = p, .count = 1, .state = s };
	(*n)++;
	return 1;
}

int uswap_map_claim_spans(struct uswap_swapmap *m, uint64_t first, uint64_t count, uint64_t most,
			  struct uswap_span *taken, struct uswap_span *held, int max_spans, struct uswap_claimed *out)
{
	out->taken = out->held = 0;
	out->pages = 0;
	uint64_t p = first, stop = first + count < m->pages ? first + count : m->pages;
	for (; p < stop && out->pages < most; p++) {
		uint64_t e = load(m, p);
		uint32_t s = state_of(e);
		if (s != USWAP_DIRTY && s != USWAP_CLEAN)
			continue;
		if (uswap_map_claim(m, p, &e) < 0) {   /* someone holds it: it stays on the CLOCK */
			if (!add_to_spans(held, &out->held, max_spans, p, 0))
				break;
			continue;
		}
		s = state_of(e);   /* it may have changed between the look and the claim */
		if ((s != USWAP_DIRTY && s != USWAP_CLEAN) || !add_to_spans(taken, &out->taken, max_spans, p, s)) {
			uswap_map_publish(m, p, s, slot_of(e), -1);   /* give it back */
			if (s == USWAP_DIRTY || s == USWAP_CLEAN)
				break;   /* no room for another span: stop here */
			continue;
		}
		out->pages++;
	}
	out->end = p;
	return 0;
}

uint64_t uswap_map_count(struct uswap_swapmap *m, uint32_t state)
{
	uint64_t n = 0;
	for (uint64_t p = 0; p < m->pages; p++)
		n += state_of(load(m, p)) == state;
	return n;
}

/* ------------------------------------------------------------------ */
/* the codec                                                           */
/* ------------------------------------------------------------------ */

int uswap_codec_encode(const struct uswap_codec *c, void *buf, uint64_t first_slot, uint64_t count)
{
	if (c->sealer)
		return uswap_seal_pages(c->sealer, buf, count, c->page_size, first_slot, c->gens + first_slot,
					c->tags + first_slot * USWAP_SEAL_TAG_BYTES);
	for (uint64_t i = 0; i < count; i++)
		c->crc[first_slot + i] = uswap_crc32c(0, (char *)buf + i * c->page_size, c->page_size);
	return 0;
}

int uswap_codec_decode(const struct uswap_codec *c, void *buf, uint64_t first_slot, uint64_t count, int *bad)
{
	for (uint64_t i = 0; i < count; i++) {
		if (!c->valid[first_slot + i]) {
			*bad = (int)i;
			return -ENODATA;   /* nothing written there since the store was opened */
		}
	}
	if (c->sealer)
		return uswap_open_pages(c->sealer, buf, count, c->page_size, first_slot, c->gens + first_slot,
					c->tags + first_slot * USWAP_SEAL_TAG_BYTES, bad);
	for (uint64_t i = 0; i < count; i++) {
		if (uswap_crc32c(0, (char *)buf + i * c->page_size, c->page_size) != c->crc[first_slot + i]) {
			*bad = (int)i;
			return -EBADMSG;
		}
	}
	return 0;
}

int64_t uswap_store_pread(const struct uswap_codec *c, int fd, void *buf, uint64_t len, int64_t off)
{
	return c->remote_pread ? c->remote_pread(c->remote, buf, len, (uint64_t)off) : uswap_pread_full(fd, buf, len, off);
}

int64_t uswap_store_pwrite(const struct uswap_codec *c, int fd, const void *buf, uint64_t len, int64_t off)
{
	return c->remote_pwrite ? c->remote_pwrite(c->remote, buf, len, (uint64_t)off)
				: uswap_pwrite_full(fd, buf, len, off);
}

/* ------------------------------------------------------------------ */
/* the fault threads                                                   */
/* ------------------------------------------------------------------ */

/* A window read ahead of a stream: its pages are claimed (BUSY) by its fault thread from
 * its read's start to its install (finish_window).  first and n are written before active
 * is set and read by the other fault threads (engine_holds) only after active. */
struct ahead_window {
	int active;                   /* atomic */
	uint64_t first, n;            /* atomic */
	uint32_t in_flight;           /* its reads not yet completed */
	int err;                      /* the first error among them */
	void *buf;                    /* MAX_WINDOW pages, aligned for O_DIRECT */
	int64_t slots[MAX_WINDOW];
	uint8_t pooled[MAX_WINDOW];   /* pages taken from the compressed pool at the start, not read */
};

/* One fault thread: what only it touches (its buffers, its io_uring rings, liburing's
 * rings being single-issuer; its readahead stream), and the run of pages it holds for a
 * swap-in or zero-fill, published for the other fault threads (engine_holds). */
struct fault_thread {
	struct uswap_engine *e;
	pthread_t thread;
	int started;
	int epfd;                      /* the uffd (EPOLLEXCLUSIVE), the stop eventfd, its readahead ring */
	void *buf;                     /* ra_max pages, aligned for O_DIRECT */
	struct io_uring uring;         /* a window's slot runs in flight at once */
	int uring_init, uring_ok;      /* made; still usable */
	/* Async readahead of a forward stream (start_window and after): its windows, each
	 * with its own buffer, read on their own ring. */
	struct ahead_window ahead[AHEAD_DEPTH];
	struct io_uring ahead_ring;
	int ahead_ring_init, ahead_ring_ok;
	int ahead_polled;              /* the ring's fd is in epfd */
	int streaming;                 /* faults stream forward: keep windows in flight */
	uint64_t stream_next;          /* the stream's next page to read ahead */
	uint64_t stream_fault;         /* atomic: its last fault (another thread's fault may move it) */
	uint32_t stream_tid;           /* the client thread whose faults the stream follows */
	uint64_t hold_first, hold_n;   /* atomic: the run it claimed for a fault (hold_n 0: none) */
};

/* The adaptive window of one faulting thread of the client (file readahead keeps it per
 * open file; a region's threads each walk their own way, so here it is per thread).
 * Fields are relaxed atomics: two fault threads serving one client thread's faults at once
 * may both move it (a window one step off, never out of 1..ra_max). */
struct ra_state {
	uint32_t tid;                  /* the faulting thread (UFFD_FEATURE_THREAD_ID; 0 without it) */
	uint32_t size;
	int64_t last_fault;
};

struct uswap_engine {
	struct uswap_swapmap *map;
	int uffd, memfd, store_fd;
	int notify_fd;       /* eventfd: Python waits on it */
	int stop_fd;         /* eventfd: tells every thread to stop (never read: stays readable) */
	uint64_t addr;
	uint32_t page_size;
	struct uswap_codec codec;      /* read-only; decode is thread-safe (a cipher context per call) */
	struct uswap_slots *slots;     /* the daemon's allocator (atomic frees): slots made stale here are freed here */
	uint32_t ra_max;
	struct ra_state ra[RA_STREAMS];   /* the adaptive window, per faulting thread of the client */
	int install_dirty;             /* atomic: swap-ins go in writable (set by Python) */

	int nthreads;
	struct fault_thread *threads;

	pthread_mutex_t lock;          /* guards the ring and stopping */
	pthread_cond_t space;          /* the ring has room again */
	pthread_cond_t released;       /* a fault thread gave up pages it held (under lock; see engine_holds) */
	int hold_waiters;              /* atomic: threads waiting on released */
	struct uswap_engine_msg ring[RING_SIZE];
	uint64_t head, tail;           /* tail - head messages; head advanced by drain */
	int stopping;                  /* under lock */
	int quit;                      /* atomic: stop (a thread between faults looks here, one in epoll at stop_fd) */

	struct uswap_engine_stats stats;   /* atomic fields */
};

static void count(uint64_t *counter, uint64_t n)
{
	__atomic_add_fetch(counter, n, __ATOMIC_RELAXED);
}

/* Queue a message for Python; wakes it when it is waiting for us (a forwarded
 * fault, or resident memory above the budget line) or the ring fills.
 *
 * Several fault threads post: the ring is taken under the lock, so messages of
 * one thread stay in its order and those of different threads interleave.
 * Python relies on no more than that (DESIGN.md "The fault engine"):
 *   - every message is true when posted (pages are published before it);
 *   - a page's INSTALLED/ZEROED precede its next ones: the page leaves
 *     residency only through the CLOCK, which only that message puts it on;
 *   - a FORWARD is served from the map as it is when Python serves it, and every
 *     way a fault ends (install, wake, un-protect, poison) wakes the page's whole
 *     range, so faults of one page may be forwarded, and served, in any order. */
static void post(struct uswap_engine *e, const struct uswap_engine_msg *msg)
{
	pthread_mutex_lock(&e->lock);
	while (e->tail - e->head == RING_SIZE && !e->stopping)
		pthread_cond_wait(&e->space, &e->lock);
	if (e->stopping) {
		pthread_mutex_unlock(&e->lock);
		return;
	}
	uint64_t queued = e->tail - e->head;
	e->ring[e->tail % RING_SIZE] = *msg;
	e->tail++;
	pthread_mutex_unlock(&e->lock);
	/* Python must hear at once of a forwarded fault; of the rest only when reclaim
	 * needs it (resident above the budget line: one wake-up per drain, not per
	 * message) or the ring fills. */
	struct uswap_budget *b = e->map->budget;
	int urgent = msg->kind == USWAP_MSG_FORWARD
		     || (queued == 0 && __atomic_load_n(&b->resident, __ATOMIC_RELAXED) > b->soft)
		     || queued + 1 == RING_NOTIFY_AT;
	if (urgent) {
		uint64_t one = 1;
		if (write(e->notify_fd, &one, sizeof(one)) < 0) {
			/* the counter is saturated: Python has a wake-up pending anyway */
		}
	}
}

static void forward(struct uswap_engine *e, const struct uffd_msg *m, int why)
{
	struct uswap_engine_msg msg = { .kind = USWAP_MSG_FORWARD, .address = m->arg.pagefault.address,
					.flags = m->arg.pagefault.flags, .slot = why };
	count(&e->stats.forwarded, 1);
	post(e, &msg);
}

/* Install pages page..page+n-1: UFFDIO_COPY from the buffer's page buf_page on, or
 * UFFDIO_ZEROPAGE when buf_page < 0; finishes what the kernel stops short of (EAGAIN)
 * and steps over pages already there (EEXIST).  0, or -errno (the client's memory is gone). */
static int fill(struct uswap_engine *e, const void *buf, uint64_t page, uint64_t n, int64_t buf_page, int wp)
{
	uint64_t start = e->addr + page * e->page_size, end = start + n * e->page_size, at = start;
	uint64_t src = (uint64_t)(uintptr_t)buf + (uint64_t)(buf_page < 0 ? 0 : buf_page) * e->page_size;
	while (at < end) {
		int64_t done = 0;
		int ret = buf_page < 0 ? uswap_uffd_zeropage(e->uffd, at, end - at, 0, &done)
			  : uswap_uffd_copy(e->uffd, at, src + (at - start), end - at, wp ? UFFDIO_COPY_MODE_WP : 0, &done);
		if (ret == 0) {
			at += done > 0 ? (uint64_t)done : end - at;
		} else if (ret == -EAGAIN) {
			at += done > 0 ? (uint64_t)done : 0;
		} else if (ret == -EEXIST) {
			uswap_uffd_wake(e->uffd, at, e->page_size);
			at += e->page_size;
		} else {
			return ret;
		}
	}
	return 0;
}

static struct ra_state *ra_of(struct uswap_engine *e, uint32_t tid)
{
	return &e->ra[(tid * 2654435761u) >> 26];   /* RA_STREAMS = 2^6 slots */
}

/* The readahead window's size for a fault of thread tid at page (adaptive, like file
 * readahead): a fault near the thread's previous one doubles it, one elsewhere halves it.
 * A slot another thread used last starts over. */
static uint32_t window(struct uswap_engine *e, uint64_t page, uint32_t tid)
{
	struct ra_state *r = ra_of(e, tid);
	uint32_t size = __atomic_load_n(&r->size, __ATOMIC_RELAXED);
	int64_t last = __atomic_load_n(&r->last_fault, __ATOMIC_RELAXED);
	if (__atomic_load_n(&r->tid, __ATOMIC_RELAXED) != tid || size == 0) {
		__atomic_store_n(&r->tid, tid, __ATOMIC_RELAXED);
		size = 1;
		last = -(1LL << 40);
	}
	int64_t dist = (int64_t)page - last;
	if (dist < 0)
		dist = -dist;
	int64_t near = size > 2 ? size : 2;
	if (dist <= near)
		size = size * 2 < e->ra_max ? size * 2 : e->ra_max;
	else
		size = size / 2 > 1 ? size / 2 : 1;
	__atomic_store_n(&r->size, size, __ATOMIC_RELAXED);
	__atomic_store_n(&r->last_fault, (int64_t)page, __ATOMIC_RELAXED);
	return size;
}

/* A fault thread waiting in engine_holds learns here that pages it may wait for were given back. */
static void wake_hold_waiters(struct uswap_engine *e)
{
	if (__atomic_load_n(&e->hold_waiters, __ATOMIC_ACQUIRE) == 0)
		return;
	pthread_mutex_lock(&e->lock);
	pthread_cond_broadcast(&e->released);
	pthread_mutex_unlock(&e->lock);
}

/* The run a fault thread holds for one fault: set once claimed, cleared once published. */
static void hold_run(struct fault_thread *t, uint64_t first, uint64_t n)
{
	__atomic_store_n(&t->hold_n, 0, __ATOMIC_RELEASE);
	__atomic_store_n(&t->hold_first, first, __ATOMIC_RELEASE);
	__atomic_store_n(&t->hold_n, n, __ATOMIC_RELEASE);
}

static void hold_none(struct fault_thread *t)
{
	__atomic_store_n(&t->hold_n, 0, __ATOMIC_RELEASE);
	wake_hold_waiters(t->e);
}

/* Give back claims taken for a run that will not be installed (state unchanged). */
static void unclaim(struct uswap_swapmap *m, uint64_t first, uint64_t n)
{
	for (uint64_t p = first; p < first + n; p++) {
		uint64_t e = load(m, p);
		uswap_map_publish(m, p, state_of(e), slot_of(e), -1);
	}
}

/* Direct reclaim's line: how many of the n claimed pages first..first+n-1 (the faulting
 * page at index at) may go in.  At the hard line none: the claims are given back and
 * the fault goes to Python, which throttles (the same test as Reclaimer.throttle, so a
 * fault it lets through is served here).  Below it, the window is cut to what fits
 * around the faulting page, the rest unclaimed.  Several fault threads each cut their
 * own window to the room they read, so together they may pass the hard line by up to
 * (threads - 1) windows for as long as reclaim takes to catch up; the resident counts
 * stay exact (publish), and the next fault sees them. */
static int fit_budget(struct uswap_engine *e, uint64_t *first, uint64_t *n, uint64_t at)
{
	struct uswap_budget *b = e->map->budget;
	int64_t room = b->hard - __atomic_load_n(&b->resident, __ATOMIC_RELAXED);
	if (room <= 0) {
		unclaim(e->map, *first, *n);
		return -ENOMEM;
	}
	if ((int64_t)*n > room) {
		uint64_t keep = (uint64_t)room, lead = at < keep - 1 ? at : keep - 1;   /* pages kept before at */
		unclaim(e->map, *first, at - lead);
		unclaim(e->map, *first + at - lead + keep, *n - (at - lead) - keep);
		*first += at - lead;
		*n = keep;
	}
	return 0;
}

/* Claim a page for the readahead window if it is SWAPPED and unclaimed; its slot, or -1. */
static int64_t claim_swapped(struct uswap_swapmap *m, uint64_t page)
{
	uint64_t x = load(m, page);
	if (state_of(x) != USWAP_SWAPPED || uswap_map_claim(m, page, &x) < 0)
		return -1;
	if (state_of(x) != USWAP_SWAPPED) {   /* changed between the look and the claim */
		uswap_map_publish(m, page, state_of(x), slot_of(x), -1);
		return -1;
	}
	return slot_of(x);
}

/* swap_vma_readahead: claim the run of SWAPPED pages around page (claimed already),
 * a quarter of the window behind it and the rest ahead, wherever their slots are;
 * slots[i] gets page first+i's slot.  Returns the run's length. */
static uint64_t claim_window(struct uswap_engine *e, uint64_t page, int64_t slot, uint32_t limit, uint64_t *first,
			     int64_t *slots)
{
	struct uswap_swapmap *m = e->map;
	int64_t behind[MAX_WINDOW];
	uint64_t nb = 0, n = 1;
	while (n < limit && page > nb && nb < limit / 4) {
		int64_t s = claim_swapped(m, page - nb - 1);
		if (s < 0)
			break;
		behind[nb++] = s;
		n++;
	}
	for (uint64_t i = 0; i < nb; i++)
		slots[i] = behind[nb - 1 - i];
	slots[nb] = slot;
	while (n < limit && page + (n - nb) < m->pages) {
		int64_t s = claim_swapped(m, page + (n - nb));
		if (s < 0)
			break;
		slots[n++] = s;
	}
	*first = page - nb;
	return n;
}

/* The window's pooled pages into buf (zswap_load before swap_read_folio): pooled[i] = 1 for
 * each page i taken from the codec's compressed pool, which is then not read.  0, or -errno:
 * a pooled page failed its check (P2), an error of that page's read like a failed crc. */
static int load_pooled(struct uswap_engine *e, void *buf, const int64_t *slots, uint64_t n, uint8_t *pooled)
{
	memset(pooled, 0, n);
	if (!e->codec.pool)
		return 0;
	for (uint64_t i = 0; i < n; i++) {
		int r = uswap_pool_load(e->codec.pool, (uint64_t)slots[i], (char *)buf + i * e->page_size);
		if (r < 0)
			return r;
		pooled[i] = (uint8_t)r;
	}
	return 0;
}

/* How many slots from slots[i] on (not pooled) continue it, none pooled (at least 1): what
 * one read covers. */
static uint64_t slot_run(const int64_t *slots, const uint8_t *pooled, uint64_t i, uint64_t n)
{
	uint64_t k = 1;
	while (i + k < n && !pooled[i + k] && slots[i + k] == slots[i] + (int64_t)k)
		k++;
	return k;
}

/* Queue one read per run of contiguous slots not pooled into buf (page i of the window at
 * page i of buf); user_data is tag << 32 | the run's bytes.  How many were queued, or -EBUSY
 * (the rings have an entry for every page they can be asked for: it cannot happen). */
static int queue_reads(struct io_uring *ring, const struct uswap_engine *e, void *buf, size_t ps,
		       const int64_t *slots, const uint8_t *pooled, uint64_t n, uint64_t tag)
{
	int queued = 0;
	for (uint64_t i = 0, k; i < n; i += k) {
		if (pooled[i]) {
			k = 1;
			continue;
		}
		k = slot_run(slots, pooled, i, n);
		/* A run is one read from the store's fd; on a store set of local files, one per piece of it
		 * in one file (at least a page each: the rings still have an entry per page). */
		uint64_t off = (uint64_t)(slots[i] + 1) * ps, len = k * ps;
		for (uint64_t done = 0, piece; done < len; done += piece) {
			int fd = e->store_fd;
			uint64_t at = off + done;
			int64_t got = e->codec.remote_local ? e->codec.remote_local(e->codec.remote, off + done, len - done,
										     &fd, &at)
							    : (int64_t)(len - done);
			if (got <= 0)
				return got < 0 ? (int)got : -EIO;
			piece = (uint64_t)got;
			struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
			if (!sqe)
				return -EBUSY;
			io_uring_prep_read(sqe, fd, (char *)buf + i * ps + done, (unsigned)piece, at);
			sqe->user_data = (tag << 32) | piece;
			queued++;
		}
	}
	return queued;
}

/* The next completion, waited for.  A stop (SIGSTOP, a debugger or profiler attaching, a cgroup freezer)
 * interrupts the wait with EINTR, which blocked signals do not prevent, while the ring's reads are still in
 * flight into the thread's buffers: the only correct answer is to wait again.  (A thread that gave up left
 * completions in the ring that its next window took for its own, and reads landing in the buffer under it:
 * thousands of EBADMSG while py-spy sampled the daemon.) */
static int wait_cqe(struct io_uring *ring, struct io_uring_cqe **cqe)
{
	int ret;
	do
		ret = io_uring_wait_cqe(ring, cqe);
	while (ret == -EINTR);
	return ret;
}

/* Read the window's slots not pooled into the thread's buffer: one read per run of
 * contiguous slots, all in flight at once through io_uring when there are several (the
 * kernel's swap readahead plugs its reads the same way).  0, or -errno. */
static int read_slots(struct fault_thread *t, const int64_t *slots, const uint8_t *pooled, uint64_t n)
{
	struct uswap_engine *e = t->e;
	size_t ps = e->page_size;
	uint64_t runs = 0;
	for (uint64_t i = 0; i < n; i++)
		runs += !pooled[i] && (i == 0 || pooled[i - 1] || slots[i] != slots[i - 1] + 1);
	if (runs == 0)
		return 0;
	if (runs == 1 || !t->uring_ok) {
		for (uint64_t i = 0, k; i < n; i += k) {
			if (pooled[i]) {
				k = 1;
				continue;
			}
			k = slot_run(slots, pooled, i, n);
			int64_t got = uswap_store_pread(&e->codec, e->store_fd, (char *)t->buf + i * ps, k * ps,
							(slots[i] + 1) * (int64_t)ps);
			count(&e->stats.read_ios, 1);
			if (got != (int64_t)(k * ps))
				return got < 0 ? (int)got : -EIO;
		}
		return 0;
	}
	int queued = queue_reads(&t->uring, e, t->buf, ps, slots, pooled, n, 0);
	if (queued < 0) {
		t->uring_ok = 0;   /* what was queued is never submitted: the ring is not used again */
		return queued;
	}
	count(&e->stats.read_ios, (uint64_t)queued);
	int ret;
	do   /* -EINTR (a stop, as in wait_cqe): nothing was submitted */
		ret = io_uring_submit_and_wait(&t->uring, (unsigned)queued);
	while (ret == -EINTR);
	if (ret < 0) {
		t->uring_ok = 0;
		return ret;
	}
	int err = 0;
	for (int done = 0; done < queued; done++) {
		struct io_uring_cqe *cqe;
		ret = wait_cqe(&t->uring, &cqe);
		if (ret < 0) {
			t->uring_ok = 0;   /* never again: its completions are not accounted for */
			return ret;
		}
		if (cqe->res < 0 && !err)
			err = cqe->res;
		else if ((uint64_t)cqe->res != cqe->user_data && !err)
			err = -EIO;   /* a short read of a slot the checks said is allocated */
		io_uring_cqe_seen(&t->uring, cqe);
	}
	return err;
}

/* Check (and decrypt) the window's pages read from the store (the pooled ones were checked
 * by the pool: P2), one codec call per run of contiguous slots. */
static int decode_slots(struct uswap_engine *e, void *buf, const int64_t *slots, const uint8_t *pooled, uint64_t n)
{
	for (uint64_t i = 0, k; i < n; i += k) {
		if (pooled[i]) {
			k = 1;
			continue;
		}
		k = slot_run(slots, pooled, i, n);
		int bad = 0;
		int ret = uswap_codec_decode(&e->codec, (char *)buf + i * e->page_size, (uint64_t)slots[i], k, &bad);
		if (ret < 0)
			return ret;
	}
	return 0;
}

/* Publish an installed run (the faulting page, or -1 for readahead, referenced), free the
 * slots of the pages that went in writable, tell Python. */
static void publish_installed(struct uswap_engine *e, uint64_t first, uint64_t n, const int64_t *slots,
			      int64_t page, int write, int all_dirty)
{
	for (uint64_t p = first; p < first + n; p++) {
		int dirty = all_dirty || (write && (int64_t)p == page);
		uswap_map_publish(e->map, p, dirty ? USWAP_DIRTY : USWAP_CLEAN, dirty ? -1 : slots[p - first],
				  (int64_t)p == page);
	}
	/* A page that went in writable has a stale slot: free it now that nothing reads it
	 * (the read above was its last; published DIRTY, no entry names it). */
	for (uint64_t p = first; p < first + n; p++)
		if (all_dirty || (write && (int64_t)p == page))
			uswap_slots_release(e->slots, (uint64_t)slots[p - first], 1);
	struct uswap_engine_msg msg = { .kind = USWAP_MSG_INSTALLED, .first = first, .count = (uint32_t)n,
					.faulting = (uint64_t)page, .slot = -1 };
	count(&e->stats.pswpin, n);
	post(e, &msg);
}

/* The kernel's async readahead (PG_readahead): once faults stream forward through full
 * windows, the windows after the one just installed are read on the thread's own ring
 * while it goes on, AHEAD_DEPTH of them in flight at once (the disk serves them in
 * parallel) but never more than AHEAD_REACH pages past the stream's last fault.
 * A window is installed (clean, unreferenced) when its reads complete (the ring is
 * polled with the uffd) or when a fault reaches it first; either way the stream is
 * topped up.  Its pages are claimed (BUSY) by the thread from the start of the read to
 * the install; a fault on one waits for its window: here when this thread reads it,
 * in engine_holds when another does.  Best effort: on any failure a window's pages stay
 * SWAPPED and fault as usual (reporting what fails). */

/* Note completed reads: every one there is (wait_for < 0), or until window wait_for has
 * all of its own. */
static void take_completions(struct fault_thread *t, int wait_for)
{
	for (;;) {
		if (wait_for >= 0 && t->ahead[wait_for].in_flight == 0)
			return;
		struct io_uring_cqe *cqe;
		int ret = wait_for >= 0 ? wait_cqe(&t->ahead_ring, &cqe) : io_uring_peek_cqe(&t->ahead_ring, &cqe);
		if (ret < 0) {
			if (wait_for >= 0) {   /* cannot happen: no readahead from here on */
				t->ahead_ring_ok = 0;
				t->ahead[wait_for].err = ret;
				t->ahead[wait_for].in_flight = 0;
			}
			return;
		}
		struct ahead_window *w = &t->ahead[cqe->user_data >> 32];
		uint64_t want = cqe->user_data & 0xffffffffu;
		if (cqe->res < 0 && !w->err)
			w->err = cqe->res;
		else if ((uint64_t)cqe->res != want && !w->err)
			w->err = -EIO;   /* a short read of a slot the checks said is allocated */
		w->in_flight--;
		io_uring_cqe_seen(&t->ahead_ring, cqe);
	}
}

/* Install window i once its reads are done (waiting for them), or give its pages back. */
static void finish_window(struct fault_thread *t, int i, int install)
{
	struct uswap_engine *e = t->e;
	struct ahead_window *w = &t->ahead[i];
	take_completions(t, i);
	int all_dirty = __atomic_load_n(&e->install_dirty, __ATOMIC_RELAXED);
	if (!install || w->err || decode_slots(e, w->buf, w->slots, w->pooled, w->n) < 0
	    || fill(e, w->buf, w->first, w->n, 0, !all_dirty) < 0) {
		unclaim(e->map, w->first, w->n);
	} else {
		publish_installed(e, w->first, w->n, w->slots, -1, 0, all_dirty);
		count(&e->stats.readahead, w->n);
		/* the stream goes on from this window */
		__atomic_store_n(&ra_of(e, t->stream_tid)->last_fault, (int64_t)w->first, __ATOMIC_RELAXED);
	}
	__atomic_store_n(&w->active, 0, __ATOMIC_RELEASE);
	wake_hold_waiters(e);
}

/* Start reading the stream's next window into free window i; 0 if nothing was started
 * (the stream ended: its next page is not SWAPPED, or held, or over the budget line). */
static int start_window(struct fault_thread *t, int i)
{
	struct uswap_engine *e = t->e;
	struct ahead_window *w = &t->ahead[i];
	uint64_t n = 0, first = t->stream_next;
	while (n < e->ra_max && first + n < e->map->pages) {
		int64_t s = claim_swapped(e->map, first + n);
		if (s < 0)
			break;
		w->slots[n++] = s;
	}
	if (n == 0 || fit_budget(e, &first, &n, 0) < 0)
		return 0;
	if (load_pooled(e, w->buf, w->slots, n, w->pooled) < 0) {   /* its fault reads it and reports */
		unclaim(e->map, first, n);
		return 0;
	}
	int queued = queue_reads(&t->ahead_ring, e, w->buf, e->page_size, w->slots, w->pooled, n,
				 (uint64_t)i);
	int submitted = queued <= 0 ? queued : io_uring_submit(&t->ahead_ring);
	__atomic_store_n(&w->first, first, __ATOMIC_RELAXED);
	__atomic_store_n(&w->n, n, __ATOMIC_RELAXED);
	__atomic_store_n(&w->active, 1, __ATOMIC_RELEASE);
	w->err = 0;
	w->in_flight = submitted < 0 ? 0 : (uint32_t)submitted;
	count(&e->stats.read_ios, w->in_flight);
	if (queued < 0 || w->in_flight != (uint32_t)queued) {   /* not all in flight: no readahead from here on */
		t->ahead_ring_ok = 0;
		finish_window(t, i, 0);
		return 0;
	}
	t->stream_next = first + n;
	if (queued == 0)   /* all of it from the pool: nothing to wait for */
		finish_window(t, i, 1);
	return 1;
}

/* Keep the stream's windows in flight, within its reach. */
static void top_up(struct fault_thread *t)
{
	for (int i = 0; i < AHEAD_DEPTH && t->streaming && t->ahead_ring_ok; i++) {
		if (t->ahead[i].active)
			continue;
		if (t->stream_next >= __atomic_load_n(&t->stream_fault, __ATOMIC_RELAXED) + AHEAD_REACH
		    || !start_window(t, i))
			t->streaming = 0;
		else if (!t->ahead[i].active)
			i--;   /* installed at once (all from the pool): the window is free again, within the reach */
	}
}

/* A fault at page: if a window of this thread in flight holds it, install that window
 * (waiting for its reads) and keep the stream going from there.  Other windows go on as
 * they are: a fault elsewhere neither waits for them nor moves the stream. */
static void stream_reached(struct fault_thread *t, uint64_t page)
{
	int reached = 0;
	for (int i = 0; i < AHEAD_DEPTH; i++) {
		if (t->ahead[i].active && t->ahead[i].first <= page && page < t->ahead[i].first + t->ahead[i].n) {
			finish_window(t, i, 1);
			reached = 1;
		}
	}
	if (reached) {
		__atomic_store_n(&t->stream_fault, page, __ATOMIC_RELAXED);
		t->streaming = t->ahead_ring_ok;
		top_up(t);
	}
}

/* The ring said reads completed: install the windows that are whole, keep streaming. */
static void stream_completed(struct fault_thread *t)
{
	take_completions(t, -1);
	for (int i = 0; i < AHEAD_DEPTH; i++)
		if (t->ahead[i].active && t->ahead[i].in_flight == 0)
			finish_window(t, i, 1);
	top_up(t);
}

/* Does another fault thread hold page for a swap-in, a zero-fill or a readahead window?
 * Then the page is free again within one install.  A readahead window's stream is moved
 * to this fault (its thread keeps reading ahead of it).  The look is racy (a run may end
 * or start meanwhile): it only decides whether waiting is worth it. */
static int engine_holds(struct fault_thread *self, uint64_t page)
{
	struct uswap_engine *e = self->e;
	for (int k = 0; k < e->nthreads; k++) {
		struct fault_thread *t = &e->threads[k];
		if (t == self)
			continue;
		uint64_t n = __atomic_load_n(&t->hold_n, __ATOMIC_ACQUIRE), first = __atomic_load_n(&t->hold_first,
													__ATOMIC_ACQUIRE);
		if (n && first <= page && page < first + n)
			return 1;
		for (int i = 0; i < AHEAD_DEPTH; i++) {
			struct ahead_window *w = &t->ahead[i];
			if (!__atomic_load_n(&w->active, __ATOMIC_ACQUIRE))
				continue;
			first = __atomic_load_n(&w->first, __ATOMIC_RELAXED);
			n = __atomic_load_n(&w->n, __ATOMIC_RELAXED);
			if (first <= page && page < first + n) {
				__atomic_store_n(&t->stream_fault, page, __ATOMIC_RELAXED);
				return 1;
			}
		}
	}
	return 0;
}

#define HOLD_WAIT_NS 2000000   /* waiting for another fault thread's pages, at most (then Python waits) */
#define HOLD_SLICE_NS 100000   /* between looks at this thread's own readahead ring meanwhile */

/* Claim page, waiting up to HOLD_WAIT_NS while another fault thread holds it (its install
 * is one read away).  Meanwhile this thread's own finished readahead windows are installed,
 * so two threads waiting for each other's windows both go on.  -EBUSY: still held (by
 * Python, or past the wait): the fault goes to Python, which waits for the holder. */
static int claim_for_fault(struct fault_thread *t, uint64_t page, uint64_t *entry)
{
	struct uswap_engine *e = t->e;
	if (uswap_map_claim(e->map, page, entry) == 0)
		return 0;
	if (e->nthreads == 1 || !engine_holds(t, page))
		return -EBUSY;
	struct timespec start, now;
	clock_gettime(CLOCK_MONOTONIC, &start);
	__atomic_add_fetch(&e->hold_waiters, 1, __ATOMIC_ACQ_REL);
	int ret = -EBUSY;
	for (;;) {
		if (uswap_map_claim(e->map, page, entry) == 0) {
			ret = 0;
			break;
		}
		clock_gettime(CLOCK_MONOTONIC, &now);
		int64_t waited = (now.tv_sec - start.tv_sec) * 1000000000LL + (now.tv_nsec - start.tv_nsec);
		if (waited >= HOLD_WAIT_NS || !engine_holds(t, page))
			break;
		int reading = 0;
		for (int i = 0; i < AHEAD_DEPTH; i++)
			reading |= t->ahead[i].active;
		if (reading) {
			take_completions(t, -1);
			for (int i = 0; i < AHEAD_DEPTH; i++)
				if (t->ahead[i].active && t->ahead[i].in_flight == 0)
					finish_window(t, i, 1);
		}
		struct timespec until = now;
		until.tv_nsec += HOLD_SLICE_NS;
		if (until.tv_nsec >= 1000000000L) {
			until.tv_sec++;
			until.tv_nsec -= 1000000000L;
		}
		pthread_mutex_lock(&e->lock);
		if (!e->stopping && (load(e->map, page) & USWAP_BUSY))
			pthread_cond_timedwait(&e->released, &e->lock, &until);
		int stopping = e->stopping;
		pthread_mutex_unlock(&e->lock);
		if (stopping)
			break;
	}
	__atomic_sub_fetch(&e->hold_waiters, 1, __ATOMIC_ACQ_REL);
	return ret;
}

/* do_swap_page: the page is SWAPPED and claimed by us.  0 if served; else the
 * claim is given back and the caller forwards the fault.  After a write fault
 * the faulting page goes in writable (its slot is stale: freed) and the rest
 * of the window clean, as the kernel does; in install-dirty mode (Python's
 * choice, for a region whose swapped-in pages are nearly all written next)
 * the whole window goes in writable and every slot is freed, so no write
 * fault comes back for them. */
static int swap_in(struct fault_thread *t, uint64_t page, uint64_t entry, int write, uint32_t tid)
{
	struct uswap_engine *e = t->e;
	struct uswap_swapmap *m = e->map;
	int64_t slots[MAX_WINDOW];
	uint64_t first;
	uint64_t n = claim_window(e, page, slot_of(entry), window(e, page, tid), &first, slots), was = first;
	if (fit_budget(e, &first, &n, page - first) < 0)
		return -ENOMEM;
	if (first != was)
		memmove(slots, slots + (first - was), n * sizeof(slots[0]));
	hold_run(t, first, n);
	int all_dirty = __atomic_load_n(&e->install_dirty, __ATOMIC_RELAXED);
	uint8_t pooled[MAX_WINDOW];
	int ret = load_pooled(e, t->buf, slots, n, pooled);
	if (ret == 0)
		ret = read_slots(t, slots, pooled, n);
	if (ret == 0)
		ret = decode_slots(e, t->buf, slots, pooled, n);
	if (ret == 0 && write && !all_dirty) {
		uint64_t k = page - first;
		ret = fill(e, t->buf, first, k, 0, 1);
		if (ret == 0)
			ret = fill(e, t->buf, page, 1, (int64_t)k, 0);
		if (ret == 0)
			ret = fill(e, t->buf, page + 1, n - k - 1, (int64_t)k + 1, 1);
	} else if (ret == 0) {
		ret = fill(e, t->buf, first, n, 0, !all_dirty);
	}
	if (ret < 0) {   /* Python retries, reports, poisons, or learns the client is gone */
		unclaim(m, first, n);
		hold_none(t);
		return ret;
	}
	publish_installed(e, first, n, slots, (int64_t)page, write, all_dirty);
	hold_none(t);
	if (e->ra_max > 1 && n == e->ra_max && page - first <= n / 4) {   /* a full window entered at its front */
		t->streaming = t->ahead_ring_ok;
		t->stream_next = first + n;
		t->stream_tid = tid;
		__atomic_store_n(&t->stream_fault, page, __ATOMIC_RELAXED);
		top_up(t);
	}
	return 0;
}

void uswap_engine_set_install_dirty(struct uswap_engine *e, int on)
{
	__atomic_store_n(&e->install_dirty, on, __ATOMIC_RELAXED);
}

/* First touch: zero pages for the faulting page and the never-touched pages after it. */
static int zero_fill(struct fault_thread *t, uint64_t page, uint32_t tid)
{
	struct uswap_engine *e = t->e;
	struct uswap_swapmap *m = e->map;
	uint32_t limit = window(e, page, tid);
	uint64_t n = 1;
	while (n < limit && page + n < m->pages) {
		uint64_t x = load(m, page + n);
		if (state_of(x) != USWAP_ABSENT || uswap_map_claim(m, page + n, &x) < 0)
			break;
		if (state_of(x) != USWAP_ABSENT) {
			uswap_map_publish(m, page + n, state_of(x), slot_of(x), -1);
			break;
		}
		n++;
	}
	uint64_t first = page;
	if (fit_budget(e, &first, &n, 0) < 0)
		return -ENOMEM;
	hold_run(t, page, n);
	int ret = fill(e, NULL, page, n, -1, 0);
	if (ret < 0) {
		unclaim(m, page, n);
		hold_none(t);
		return ret;
	}
	for (uint64_t p = page; p < page + n; p++)
		uswap_map_publish(m, p, USWAP_DIRTY, -1, p == page);
	hold_none(t);
	struct uswap_engine_msg msg = { .kind = USWAP_MSG_ZEROED, .first = page, .count = (uint32_t)n,
					.faulting = page, .slot = -1 };
	count(&e->stats.zero_fills, n);
	post(e, &msg);
	return 0;
}

/* do_wp_page on a clean page: its slot is stale from now on. */
static int make_dirty(struct uswap_engine *e, uint64_t page, uint64_t entry)
{
	int ret = uswap_uffd_writeprotect(e->uffd, e->addr + page * e->page_size, e->page_size, 0);
	if (ret < 0) {
		uswap_map_publish(e->map, page, state_of(entry), slot_of(entry), -1);
		return ret;
	}
	uswap_map_publish(e->map, page, USWAP_DIRTY, -1, 1);
	uswap_slots_release(e->slots, (uint64_t)slot_of(entry), 1);   /* stale from the first write on */
	struct uswap_engine_msg msg = { .kind = USWAP_MSG_DIRTIED, .first = page, .count = 1, .faulting = page,
					.slot = -1 };
	post(e, &msg);
	return 0;
}

/* Serve one fault, or forward it.  Anything unusual goes to Python unchanged.
 * Several fault threads run this at once, for faults of the same page too: each
 * decides from the page's entry under its claim, and every way it ends wakes the
 * page's whole range (see post: the order of a page's faults does not matter). */
static void handle_fault(struct fault_thread *t, const struct uffd_msg *m)
{
	struct uswap_engine *e = t->e;
	uint64_t address = m->arg.pagefault.address, flags = m->arg.pagefault.flags;
	if ((e->store_fd < 0 && !e->codec.remote_pread) || address < e->addr || address >= e->addr + e->map->pages * e->page_size)
		return forward(e, m, -ENODEV);
	uint64_t page = (address - e->addr) / e->page_size, entry;
	stream_reached(t, page);
	if (claim_for_fault(t, page, &entry) < 0)
		return forward(e, m, -EBUSY);   /* Python waits for the holder */
	uint32_t s = state_of(entry);
	int ret;
	if (flags & UFFD_PAGEFAULT_FLAG_WP) {
		if (s == USWAP_CLEAN) {
			ret = make_dirty(e, page, entry);
			if (ret == 0)
				count(&e->stats.wp_faults, 1);
		} else if (s == USWAP_DIRTY) {
			/* DIRTY means writable: a WP bit left on it (a marker a punch kept under a
			 * zero page) is lifted; we hold the page, so no writeback has it. */
			ret = uswap_uffd_writeprotect(e->uffd, address & ~(uint64_t)(e->page_size - 1), e->page_size, 0);
			uswap_map_publish(e->map, page, s, -1, 1);
		} else if (s == USWAP_ABSENT || s == USWAP_SWAPPED) {
			/* stale: evicted since the fault was queued (the retry is a MISSING fault) */
			uswap_map_publish(e->map, page, s, slot_of(entry), -1);
			ret = uswap_uffd_wake(e->uffd, address & ~(uint64_t)(e->page_size - 1), e->page_size);
		} else {
			uswap_map_publish(e->map, page, s, slot_of(entry), -1);
			ret = -EAGAIN;   /* WRITEBACK (a writer waits), POISONED: Python's */
		}
	} else if (s == USWAP_SWAPPED) {
		ret = swap_in(t, page, entry, (flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0, m->arg.pagefault.feat.ptid);
	} else if (s == USWAP_ABSENT) {
		ret = zero_fill(t, page, m->arg.pagefault.feat.ptid);
	} else {
		uswap_map_publish(e->map, page, s, slot_of(entry), -1);
		ret = is_resident(s) ? uswap_uffd_wake(e->uffd, address & ~(uint64_t)(e->page_size - 1), e->page_size)
				     : -EAGAIN;   /* POISONED: Python installs the marker */
	}
	if (ret < 0)
		return forward(e, m, ret);
	count(&e->stats.engine_faults, 1);
}

/* Keep the thread's readahead ring in its epoll set exactly while the ring is usable. */
static void poll_ahead_ring(struct fault_thread *t)
{
	if (t->ahead_polled && !t->ahead_ring_ok) {
		for (int i = 0; i < AHEAD_DEPTH; i++)   /* their reads could no longer wake us: pages back now */
			if (t->ahead[i].active)
				finish_window(t, i, 0);
		epoll_ctl(t->epfd, EPOLL_CTL_DEL, t->ahead_ring.ring_fd, NULL);
		t->ahead_polled = 0;
	}
}

/* A fault thread.  Every fault thread of a region waits on the region's uffd with
 * EPOLLEXCLUSIVE (the kernel wakes one of them per fault queued, not all) and reads
 * one message at a time, so a fault goes to whichever thread is free: the uffd is
 * O_NONBLOCK and the kernel hands each queued message to one reader only.  A thread
 * reads again before it waits, so a fault queued while every thread was busy is
 * taken by the first one done. */
static void *fault_thread_main(void *arg)
{
	struct fault_thread *t = arg;
	struct uswap_engine *e = t->e;
	struct uffd_msg msg;
	for (;;) {
		ssize_t got = read(e->uffd, &msg, sizeof(msg));
		if (got == (ssize_t)sizeof(msg)) {
			if (msg.event == UFFD_EVENT_PAGEFAULT)
				handle_fault(t, &msg);
			else if (msg.event == UFFD_EVENT_FORK)
				close((int)msg.arg.fork.ufd);   /* refused at MAP; never keep an fd not asked for */
			poll_ahead_ring(t);
			if (__atomic_load_n(&e->quit, __ATOMIC_ACQUIRE))
				break;
			continue;
		}
		if (got < 0 && errno != EAGAIN && errno != EINTR)
			break;
		/* A window in flight holds its pages BUSY, and faults on them (ours or another thread's)
		 * wait for it: never sleep on its completion alone, look again every AHEAD_LOOK_MS. */
		int reading = 0;
		for (int i = 0; i < AHEAD_DEPTH; i++)
			reading |= t->ahead[i].active;
		struct epoll_event ev[3];
		int n = epoll_wait(t->epfd, ev, 3, reading ? AHEAD_LOOK_MS : -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		int stop = 0, gone = 0, completed = 0;
		for (int i = 0; i < n; i++) {
			if (ev[i].data.u32 == 1)
				stop = 1;
			else if (ev[i].data.u32 == 2)
				completed = 1;
			else if (ev[i].events & (EPOLLERR | EPOLLHUP))
				gone = 1;
		}
		if (stop || gone)
			break;
		if (completed || (n == 0 && reading))
			stream_completed(t);
		poll_ahead_ring(t);
	}
	for (int i = 0; i < AHEAD_DEPTH; i++)   /* quiesced: nothing is installed after stop */
		if (t->ahead[i].active)
			finish_window(t, i, 0);
	return NULL;
}

/* A fault thread's buffers, rings and epoll set (not yet running). */
static int fault_thread_init(struct uswap_engine *e, struct fault_thread *t)
{
	t->e = e;
	t->epfd = -1;
	t->buf = uswap_map_buffer(e->page_size, (size_t)e->ra_max * e->page_size);
	if (!t->buf)
		return -ENOMEM;
	/* The rings read the store's fd, or a store set's local files; any other remote store has none: one
	 * read per run, no async readahead. */
	int local = e->store_fd >= 0 || e->codec.remote_local;
	t->uring_init = t->uring_ok = local && io_uring_queue_init(MAX_WINDOW, &t->uring, 0) == 0;   /* else: one pread per run */
	t->ahead_ring_init = t->ahead_ring_ok = local && io_uring_queue_init(AHEAD_DEPTH * MAX_WINDOW, &t->ahead_ring, 0) == 0;
	for (int i = 0; i < AHEAD_DEPTH; i++) {
		t->ahead[i].buf = uswap_map_buffer(e->page_size, (size_t)MAX_WINDOW * e->page_size);
		if (!t->ahead[i].buf)
			return -ENOMEM;
	}
	t->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (t->epfd < 0)
		return NEG_ERRNO();
	struct epoll_event uffd_ev = { .events = EPOLLIN | EPOLLEXCLUSIVE, .data.u32 = 0 };
	struct epoll_event stop_ev = { .events = EPOLLIN, .data.u32 = 1 };
	if (epoll_ctl(t->epfd, EPOLL_CTL_ADD, e->uffd, &uffd_ev) < 0 || epoll_ctl(t->epfd, EPOLL_CTL_ADD, e->stop_fd,
										   &stop_ev) < 0)
		return NEG_ERRNO();
	if (t->ahead_ring_ok) {
		struct epoll_event ring_ev = { .events = EPOLLIN, .data.u32 = 2 };
		if (epoll_ctl(t->epfd, EPOLL_CTL_ADD, t->ahead_ring.ring_fd, &ring_ev) < 0)
			return NEG_ERRNO();
		t->ahead_polled = 1;
	}
	return 0;
}

static void fault_thread_free(struct uswap_engine *e, struct fault_thread *t)
{
	if (!t->e)
		return;
	if (t->epfd >= 0)
		close(t->epfd);
	if (t->uring_init)
		io_uring_queue_exit(&t->uring);
	if (t->ahead_ring_init)
		io_uring_queue_exit(&t->ahead_ring);
	for (int i = 0; i < AHEAD_DEPTH; i++)
		uswap_unmap_buffer(t->ahead[i].buf, (size_t)MAX_WINDOW * e->page_size);
	uswap_unmap_buffer(t->buf, (size_t)e->ra_max * e->page_size);
}

int uswap_engine_start(struct uswap_swapmap *m, int uffd, int memfd, uint64_t addr, uint32_t page_size,
		       int store_fd, const struct uswap_codec *codec, struct uswap_slots *slots, uint32_t readahead,
		       uint32_t threads, struct uswap_engine **out)
{
	if (threads < 1 || threads > USWAP_MAX_FAULT_THREADS)
		return -EINVAL;
	struct uswap_engine *e = calloc(1, sizeof(*e));
	if (!e)
		return -ENOMEM;
	e->map = m;
	e->uffd = uffd;
	e->memfd = memfd;
	e->store_fd = store_fd;
	e->slots = slots;
	e->addr = addr;
	e->page_size = page_size;
	if (codec)
		e->codec = *codec;
	e->ra_max = readahead < 1 ? 1 : readahead > MAX_WINDOW ? MAX_WINDOW : readahead;
	e->notify_fd = e->stop_fd = -1;
	pthread_mutex_init(&e->lock, NULL);
	pthread_cond_init(&e->space, NULL);
	pthread_condattr_t attr;
	pthread_condattr_init(&attr);
	pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
	pthread_cond_init(&e->released, &attr);
	pthread_condattr_destroy(&attr);
	int ret = -ENOMEM;
	e->threads = calloc(threads, sizeof(*e->threads));
	if (!e->threads)
		goto fail;
	e->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	e->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (e->notify_fd < 0 || e->stop_fd < 0) {
		ret = NEG_ERRNO();
		goto fail;
	}
	e->nthreads = (int)threads;
	for (uint32_t i = 0; i < threads; i++) {
		ret = fault_thread_init(e, &e->threads[i]);
		if (ret < 0)
			goto fail;
	}
	for (uint32_t i = 0; i < threads; i++) {
		ret = uswap_start_thread(&e->threads[i].thread, fault_thread_main, &e->threads[i], "uswap-engine");
		if (ret < 0)
			goto fail;   /* free stops (joins) those already started */
		e->threads[i].started = 1;
	}
	*out = e;
	return 0;
fail:
	uswap_engine_free(e);
	return ret;
}

int uswap_engine_notify_fd(struct uswap_engine *e)
{
	return e->notify_fd;
}

/* Take up to max queued messages, oldest first. */
int uswap_engine_drain(struct uswap_engine *e, struct uswap_engine_msg *out, int max)
{
	int n = 0;
	pthread_mutex_lock(&e->lock);
	while (n < max && e->head != e->tail) {
		out[n++] = e->ring[e->head % RING_SIZE];
		e->head++;
	}
	pthread_cond_broadcast(&e->space);   /* several fault threads may wait for room */
	pthread_mutex_unlock(&e->lock);
	return n;
}

void uswap_engine_stats(struct uswap_engine *e, struct uswap_engine_stats *out)
{
	uswap_copy_counters((const uint64_t *)&e->stats, (uint64_t *)out, sizeof(*out) / sizeof(uint64_t));
}

/* Quiesce: every fault thread has returned when this returns (a fault it was serving
 * is finished or given back).  Messages still queued stay for drain.  Idempotent. */
void uswap_engine_stop(struct uswap_engine *e)
{
	/* All threads are told before any is joined: stop_fd stays readable once written and
	 * every thread waits on it, quit is read between faults, and the broadcasts end waits
	 * for ring space (space) and for pages another thread holds (released). */
	__atomic_store_n(&e->quit, 1, __ATOMIC_RELEASE);
	pthread_mutex_lock(&e->lock);
	e->stopping = 1;
	pthread_cond_broadcast(&e->space);
	pthread_cond_broadcast(&e->released);
	pthread_mutex_unlock(&e->lock);
	for (int i = 0; i < e->nthreads; i++) {
		struct fault_thread *t = &e->threads[i];
		if (t->started)
			uswap_stop_thread(t->thread, e->stop_fd, &e->lock, &e->space, &e->stopping);
		t->started = 0;
	}
}

void uswap_engine_free(struct uswap_engine *e)
{
	if (!e)
		return;
	uswap_engine_stop(e);
	if (e->threads) {
		for (int i = 0; i < e->nthreads; i++)
			fault_thread_free(e, &e->threads[i]);
		free(e->threads);
	}
	if (e->notify_fd >= 0)
		close(e->notify_fd);
	if (e->stop_fd >= 0)
		close(e->stop_fd);
	pthread_cond_destroy(&e->released);
	pthread_cond_destroy(&e->space);
	pthread_mutex_destroy(&e->lock);
	free(e);
}

/* ------------------------------------------------------------------ */
/* writeback (swap_writepage), for pages the reclaimer claimed         */
/* ------------------------------------------------------------------ */

/* Write-protect the run, mark it WRITEBACK, copy it from the memfd into buf
 * and note which pages are all zeros.  On failure the pages are as before. */
int uswap_wb_prepare(struct uswap_swapmap *m, int uffd, int memfd, uint64_t addr, uint32_t page_size,
		     uint64_t first, uint64_t count, void *buf, uint8_t *zero)
{
	int ret = uswap_uffd_writeprotect(uffd, addr + first * page_size, count * page_size, UFFDIO_WRITEPROTECT_MODE_WP);
	if (ret < 0)
		return ret;
	size_t len = count * page_size;
	int64_t got = uswap_pread_full(memfd, buf, len, (int64_t)(first * page_size));
	if (got != (int64_t)len) {
		uswap_uffd_writeprotect(uffd, addr + first * page_size, len, 0);
		return got < 0 ? (int)got : -EIO;
	}
	for (uint64_t i = 0; i < count; i++) {
		uint64_t e = load(m, first + i);
		transition(m, first + i, USWAP_WRITEBACK, slot_of(e), -1, 1);   /* still ours: BUSY kept */
		zero[i] = (uint8_t)uswap_is_zero((char *)buf + i * page_size, page_size);
	}
	return 0;
}

/* Write the buffer's pages to their slots (-1: an all-zero page, not written), each
 * run of contiguous slots through uswap_pool_write_slots: each page offered to the
 * codec's pool first (zswap_store), the rejected ones encoded (crc or seal, in place)
 * and written, one pwrite per run of contiguous rejected slots.  Slots are trusted
 * (valid) only once their write completed. */
int uswap_wb_write(int store_fd, const struct uswap_codec *c, void *buf, const int64_t *slots, uint64_t count,
		   uint64_t *write_ios)
{
	uint64_t i = 0;
	while (i < count) {
		if (slots[i] < 0) {
			i++;
			continue;
		}
		uint64_t n = 1;
		while (i + n < count && slots[i + n] == slots[i] + (int64_t)n)
			n++;
		int ret = uswap_pool_write_slots(c, store_fd, (char *)buf + i * c->page_size, (uint64_t)slots[i], n,
						 write_ios);
		if (ret < 0)
			return ret;
		i += n;
	}
	return 0;
}

/* end_page_writeback, then drop the pages nobody wanted meanwhile.
 * ok: the write succeeded.  keep[i]: a writer waits for page first+i, so it
 * stays resident (CLEAN with its slot, or DIRTY and writable if it was all
 * zeros).  Others: punched out of the memfd, then published SWAPPED (or
 * ABSENT for zeros) — punch before publish, so no fault can see SWAPPED
 * while the page is still there.  Failed writes: DIRTY, writable again. */
int uswap_wb_finish(struct uswap_swapmap *m, int uffd, int memfd, uint64_t addr, uint32_t page_size,
		    uint64_t first, uint64_t count, const int64_t *slots, const uint8_t *keep, int ok,
		    uint64_t *punches, uint64_t *swapped)
{
	int ret = 0;
	if (!ok) {
		ret = uswap_uffd_writeprotect(uffd, addr + first * page_size, count * page_size, 0);
		for (uint64_t i = 0; i < count; i++)
			uswap_map_publish(m, first + i, USWAP_DIRTY, -1, 1);
		return ret;
	}
	uint64_t i = 0;
	while (i < count) {
		uint64_t n = 1;
		while (i + n < count && !keep[i] == !keep[i + n])
			n++;
		if (keep[i]) {
			for (uint64_t k = i; k < i + n; k++) {
				if (slots[k] < 0) {
					int r = uswap_uffd_writeprotect(uffd, addr + (first + k) * page_size, page_size, 0);
					if (r < 0 && !ret)
						ret = r;
				}
				uswap_map_publish(m, first + k, slots[k] < 0 ? USWAP_DIRTY : USWAP_CLEAN, slots[k], 1);
			}
		} else {
			int r = uswap_punch_hole(memfd, (int64_t)((first + i) * page_size), (int64_t)(n * page_size));
			if (punches)
				(*punches)++;
			if (r < 0 && !ret)
				ret = r;
			for (uint64_t k = i; k < i + n; k++) {
				uswap_map_publish(m, first + k, slots[k] < 0 ? USWAP_ABSENT : USWAP_SWAPPED, slots[k], 0);
				if (swapped && slots[k] >= 0)
					(*swapped)++;
			}
		}
		i += n;
	}
	return ret;
}

/* Drop claimed CLEAN pages (their slots hold their data): punch, then publish SWAPPED. */
int uswap_drop_clean(struct uswap_swapmap *m, int memfd, uint32_t page_size, uint64_t first, uint64_t count)
{
	int ret = uswap_punch_hole(memfd, (int64_t)(first * page_size), (int64_t)(count * page_size));
	for (uint64_t p = first; p < first + count; p++) {
		uint64_t e = load(m, p);
		if (ret < 0)
			uswap_map_publish(m, p, state_of(e), slot_of(e), -1);
		else
			uswap_map_publish(m, p, USWAP_SWAPPED, slot_of(e), 0);
	}
	return ret;
}
