/*
 * The fault engine (see uswap_engine.h): the swap map, a thread per region
 * serving faults, and writeback's per-page work.
 *
 * The engine thread reads like the kernel's fault path:
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
 *   - The ring is the only channel from the engine to Python; it keeps order.
 *   - The engine never calls into Python and never takes the GIL; its thread
 *     has every signal blocked.
 */
#define _GNU_SOURCE
#include "uswap_engine.h"
#include "uswap_core.h"
#include "uswap_slots.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <liburing.h>

#define NEG_ERRNO() (-(errno ? errno : EIO))
#define RING_SIZE 4096                 /* messages; a power of two */
#define RING_NOTIFY_AT (RING_SIZE / 4) /* wake Python at this fill even when it is not waiting for us */
#define MAX_WINDOW USWAP_MAX_READAHEAD
#define AHEAD_DEPTH 2                  /* windows read ahead of a stream, in flight at once */
#define AHEAD_REACH (4 * MAX_WINDOW)   /* how far past the stream's last fault they may go */

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

/* ------------------------------------------------------------------ */
/* the engine thread                                                   */
/* ------------------------------------------------------------------ */

/* A window read ahead of a stream: its pages are claimed (BUSY) by the engine from its
 * read's start to its install (finish_window). */
struct ahead_window {
	int active;
	uint64_t first, n;
	uint32_t in_flight;           /* its reads not yet completed */
	int err;                      /* the first error among them */
	void *buf;                    /* MAX_WINDOW pages, aligned for O_DIRECT */
	int64_t slots[MAX_WINDOW];
};

struct uswap_engine {
	struct uswap_swapmap *map;
	int uffd, memfd, store_fd;
	int notify_fd;       /* eventfd: Python waits on it */
	int stop_fd;         /* eventfd: tells the thread to stop */
	uint64_t addr;
	uint32_t page_size;
	struct uswap_codec codec;
	struct uswap_slots *slots;     /* the daemon's allocator: slots made stale here are freed here */
	uint32_t ra_max, ra_size;
	int64_t last_fault;
	void *buf;           /* ra_max pages, aligned for O_DIRECT */
	struct io_uring uring;         /* readahead: several slot runs in flight at once */
	int uring_ok;
	/* Async readahead of a forward stream (start_window and after): its windows, each
	 * with its own buffer, read on their own ring. */
	struct ahead_window ahead[AHEAD_DEPTH];
	struct io_uring ahead_ring;
	int ahead_ring_ok;
	int streaming;                 /* faults stream forward: keep windows in flight */
	uint64_t stream_next;          /* the stream's next page to read ahead */
	uint64_t stream_fault;         /* its last fault */
	int install_dirty;             /* atomic: swap-ins go in writable (set by Python) */

	pthread_mutex_t lock;          /* guards the ring */
	pthread_cond_t space;          /* the ring has room again */
	struct uswap_engine_msg ring[RING_SIZE];
	uint64_t head, tail;           /* tail - head messages; head advanced by drain */
	int stopping;                  /* under lock */

	struct uswap_engine_stats stats;   /* atomic fields */
	pthread_t thread;
	int started;
};

static void count(uint64_t *counter, uint64_t n)
{
	__atomic_add_fetch(counter, n, __ATOMIC_RELAXED);
}

/* Queue a message for Python; wakes it when it is waiting for us (a forwarded
 * fault, or resident memory above the budget line) or the ring fills. */
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

/* The readahead window's size for a fault at page (adaptive, like file readahead). */
static uint32_t window(struct uswap_engine *e, uint64_t page)
{
	int64_t dist = (int64_t)page - e->last_fault;
	if (dist < 0)
		dist = -dist;
	int64_t near = e->ra_size > 2 ? e->ra_size : 2;
	if (dist <= near)
		e->ra_size = e->ra_size * 2 < e->ra_max ? e->ra_size * 2 : e->ra_max;
	else
		e->ra_size = e->ra_size / 2 > 1 ? e->ra_size / 2 : 1;
	e->last_fault = (int64_t)page;
	return e->ra_size;
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
 * around the faulting page, the rest unclaimed. */
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

/* How many slots from slots[i] on continue it (at least 1): what one read covers. */
static uint64_t slot_run(const int64_t *slots, uint64_t i, uint64_t n)
{
	uint64_t k = 1;
	while (i + k < n && slots[i + k] == slots[i] + (int64_t)k)
		k++;
	return k;
}

/* Queue one read per run of contiguous slots into buf (page i of the window at page i of
 * buf); user_data is tag << 32 | the run's bytes.  How many were queued, or -EBUSY (the
 * rings have an entry for every page they can be asked for: it cannot happen). */
static int queue_reads(struct io_uring *ring, int fd, void *buf, size_t ps, const int64_t *slots, uint64_t n,
		       uint64_t tag)
{
	int queued = 0;
	for (uint64_t i = 0, k; i < n; i += k) {
		k = slot_run(slots, i, n);
		struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
		if (!sqe)
			return -EBUSY;
		io_uring_prep_read(sqe, fd, (char *)buf + i * ps, (unsigned)(k * ps), (uint64_t)(slots[i] + 1) * ps);
		sqe->user_data = (tag << 32) | (k * ps);
		queued++;
	}
	return queued;
}

/* Read the window's slots into buf: one read per run of contiguous slots, all
 * in flight at once through io_uring when there are several (the kernel's
 * swap readahead plugs its reads the same way).  0, or -errno. */
static int read_slots(struct uswap_engine *e, const int64_t *slots, uint64_t n)
{
	size_t ps = e->page_size;
	uint64_t runs = 0;
	for (uint64_t i = 0; i < n; i++)
		runs += i == 0 || slots[i] != slots[i - 1] + 1;
	if (runs == 1 || !e->uring_ok) {
		for (uint64_t i = 0, k; i < n; i += k) {
			k = slot_run(slots, i, n);
			int64_t got = uswap_pread_full(e->store_fd, (char *)e->buf + i * ps, k * ps, (slots[i] + 1) * (int64_t)ps);
			count(&e->stats.read_ios, 1);
			if (got != (int64_t)(k * ps))
				return got < 0 ? (int)got : -EIO;
		}
		return 0;
	}
	int queued = queue_reads(&e->uring, e->store_fd, e->buf, ps, slots, n, 0);
	if (queued < 0) {
		e->uring_ok = 0;   /* what was queued is never submitted: the ring is not used again */
		return queued;
	}
	count(&e->stats.read_ios, (uint64_t)queued);
	int ret = io_uring_submit_and_wait(&e->uring, (unsigned)queued);
	if (ret < 0)
		return ret;
	int err = 0;
	for (int done = 0; done < queued; done++) {
		struct io_uring_cqe *cqe;
		ret = io_uring_wait_cqe(&e->uring, &cqe);
		if (ret < 0)
			return ret;   /* the ring is unusable from here; the reads all completed or failed */
		if (cqe->res < 0 && !err)
			err = cqe->res;
		else if ((uint64_t)cqe->res != cqe->user_data && !err)
			err = -EIO;   /* a short read of a slot the checks said is allocated */
		io_uring_cqe_seen(&e->uring, cqe);
	}
	return err;
}

/* Check (and decrypt) the window, one codec call per run of contiguous slots. */
static int decode_slots(struct uswap_engine *e, void *buf, const int64_t *slots, uint64_t n)
{
	for (uint64_t i = 0, k; i < n; i += k) {
		k = slot_run(slots, i, n);
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
 * windows, the windows after the one just installed are read on their own ring while
 * the faulting thread goes on, AHEAD_DEPTH of them in flight at once (the disk serves
 * them in parallel) but never more than AHEAD_REACH pages past the stream's last fault.
 * A window is installed (clean, unreferenced) when its reads complete (the ring is
 * polled with the uffd) or when a fault reaches it first; either way the stream is
 * topped up.  Its pages are claimed (BUSY) by the engine from the start of the read to
 * the install; a fault on one waits for its window here.  Best effort: on any failure a
 * window's pages stay SWAPPED and fault as usual (reporting what fails). */

/* Note completed reads: every one there is (wait_for < 0), or until window wait_for has
 * all of its own. */
static void take_completions(struct uswap_engine *e, int wait_for)
{
	for (;;) {
		if (wait_for >= 0 && e->ahead[wait_for].in_flight == 0)
			return;
		struct io_uring_cqe *cqe;
		int ret = wait_for >= 0 ? io_uring_wait_cqe(&e->ahead_ring, &cqe) : io_uring_peek_cqe(&e->ahead_ring, &cqe);
		if (ret < 0) {
			if (wait_for >= 0) {   /* cannot happen (signals are blocked): no readahead from here on */
				e->ahead_ring_ok = 0;
				e->ahead[wait_for].err = ret;
				e->ahead[wait_for].in_flight = 0;
			}
			return;
		}
		struct ahead_window *w = &e->ahead[cqe->user_data >> 32];
		uint64_t want = cqe->user_data & 0xffffffffu;
		if (cqe->res < 0 && !w->err)
			w->err = cqe->res;
		else if ((uint64_t)cqe->res != want && !w->err)
			w->err = -EIO;   /* a short read of a slot the checks said is allocated */
		w->in_flight--;
		io_uring_cqe_seen(&e->ahead_ring, cqe);
	}
}

/* Install window i once its reads are done (waiting for them), or give its pages back. */
static void finish_window(struct uswap_engine *e, int i, int install)
{
	struct ahead_window *w = &e->ahead[i];
	take_completions(e, i);
	w->active = 0;
	int all_dirty = __atomic_load_n(&e->install_dirty, __ATOMIC_RELAXED);
	if (!install || w->err || decode_slots(e, w->buf, w->slots, w->n) < 0
	    || fill(e, w->buf, w->first, w->n, 0, !all_dirty) < 0) {
		unclaim(e->map, w->first, w->n);
		return;
	}
	publish_installed(e, w->first, w->n, w->slots, -1, 0, all_dirty);
	count(&e->stats.readahead, w->n);
	e->last_fault = (int64_t)w->first;   /* the stream goes on from this window */
}

/* Start reading the stream's next window into free window i; 0 if nothing was started
 * (the stream ended: its next page is not SWAPPED, or held, or over the budget line). */
static int start_window(struct uswap_engine *e, int i)
{
	struct ahead_window *w = &e->ahead[i];
	uint64_t n = 0, first = e->stream_next;
	while (n < e->ra_max && first + n < e->map->pages) {
		int64_t s = claim_swapped(e->map, first + n);
		if (s < 0)
			break;
		w->slots[n++] = s;
	}
	if (n == 0 || fit_budget(e, &first, &n, 0) < 0)
		return 0;
	int queued = queue_reads(&e->ahead_ring, e->store_fd, w->buf, e->page_size, w->slots, n, (uint64_t)i);
	int submitted = queued < 0 ? queued : io_uring_submit(&e->ahead_ring);
	w->active = 1;
	w->first = first;
	w->n = n;
	w->err = 0;
	w->in_flight = submitted < 0 ? 0 : (uint32_t)submitted;
	count(&e->stats.read_ios, w->in_flight);
	if (queued < 0 || w->in_flight != (uint32_t)queued) {   /* not all in flight: no readahead from here on */
		e->ahead_ring_ok = 0;
		finish_window(e, i, 0);
		return 0;
	}
	e->stream_next = first + n;
	return 1;
}

/* Keep the stream's windows in flight, within its reach. */
static void top_up(struct uswap_engine *e)
{
	for (int i = 0; i < AHEAD_DEPTH && e->streaming && e->ahead_ring_ok; i++) {
		if (e->ahead[i].active)
			continue;
		if (e->stream_next >= e->stream_fault + AHEAD_REACH || !start_window(e, i))
			e->streaming = 0;
	}
}

/* A fault at page: if a window in flight holds it, install that window (waiting for its
 * reads) and keep the stream going from there.  Other windows go on as they are: a fault
 * elsewhere (another thread's) neither waits for them nor moves the stream. */
static void stream_reached(struct uswap_engine *e, uint64_t page)
{
	int reached = 0;
	for (int i = 0; i < AHEAD_DEPTH; i++) {
		if (e->ahead[i].active && e->ahead[i].first <= page && page < e->ahead[i].first + e->ahead[i].n) {
			finish_window(e, i, 1);
			reached = 1;
		}
	}
	if (reached) {
		e->stream_fault = page;
		e->streaming = e->ahead_ring_ok;
		top_up(e);
	}
}

/* The ring said reads completed: install the windows that are whole, keep streaming. */
static void stream_completed(struct uswap_engine *e)
{
	take_completions(e, -1);
	for (int i = 0; i < AHEAD_DEPTH; i++)
		if (e->ahead[i].active && e->ahead[i].in_flight == 0)
			finish_window(e, i, 1);
	top_up(e);
}

/* do_swap_page: the page is SWAPPED and claimed by us.  0 if served; else the
 * claim is given back and the caller forwards the fault.  After a write fault
 * the faulting page goes in writable (its slot is stale: freed) and the rest
 * of the window clean, as the kernel does; in install-dirty mode (Python's
 * choice, for a region whose swapped-in pages are nearly all written next)
 * the whole window goes in writable and every slot is freed, so no write
 * fault comes back for them. */
static int swap_in(struct uswap_engine *e, uint64_t page, uint64_t entry, int write)
{
	struct uswap_swapmap *m = e->map;
	int64_t slots[MAX_WINDOW];
	uint64_t first;
	uint64_t n = claim_window(e, page, slot_of(entry), window(e, page), &first, slots), was = first;
	if (fit_budget(e, &first, &n, page - first) < 0)
		return -ENOMEM;
	if (first != was)
		memmove(slots, slots + (first - was), n * sizeof(slots[0]));
	int all_dirty = __atomic_load_n(&e->install_dirty, __ATOMIC_RELAXED);
	int ret = read_slots(e, slots, n);
	if (ret == 0)
		ret = decode_slots(e, e->buf, slots, n);
	if (ret == 0 && write && !all_dirty) {
		uint64_t k = page - first;
		ret = fill(e, e->buf, first, k, 0, 1);
		if (ret == 0)
			ret = fill(e, e->buf, page, 1, (int64_t)k, 0);
		if (ret == 0)
			ret = fill(e, e->buf, page + 1, n - k - 1, (int64_t)k + 1, 1);
	} else if (ret == 0) {
		ret = fill(e, e->buf, first, n, 0, !all_dirty);
	}
	if (ret < 0) {   /* Python retries, reports, poisons, or learns the client is gone */
		unclaim(m, first, n);
		return ret;
	}
	publish_installed(e, first, n, slots, (int64_t)page, write, all_dirty);
	if (e->ra_max > 1 && n == e->ra_max && page - first <= n / 4) {   /* a full window entered at its front */
		e->streaming = e->ahead_ring_ok;
		e->stream_next = first + n;
		e->stream_fault = page;
		top_up(e);
	}
	return 0;
}

void uswap_engine_set_install_dirty(struct uswap_engine *e, int on)
{
	__atomic_store_n(&e->install_dirty, on, __ATOMIC_RELAXED);
}

/* First touch: zero pages for the faulting page and the never-touched pages after it. */
static int zero_fill(struct uswap_engine *e, uint64_t page)
{
	struct uswap_swapmap *m = e->map;
	uint32_t limit = window(e, page);
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
	int ret = fill(e, NULL, page, n, -1, 0);
	if (ret < 0) {
		unclaim(m, page, n);
		return ret;
	}
	for (uint64_t p = page; p < page + n; p++)
		uswap_map_publish(m, p, USWAP_DIRTY, -1, p == page);
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

/* Serve one fault, or forward it.  Anything unusual goes to Python unchanged. */
static void handle_fault(struct uswap_engine *e, const struct uffd_msg *m)
{
	uint64_t address = m->arg.pagefault.address, flags = m->arg.pagefault.flags;
	if (e->store_fd < 0 || address < e->addr || address >= e->addr + e->map->pages * e->page_size)
		return forward(e, m, -ENODEV);
	uint64_t page = (address - e->addr) / e->page_size, entry;
	stream_reached(e, page);
	if (uswap_map_claim(e->map, page, &entry) < 0)
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
		ret = swap_in(e, page, entry, (flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0);
	} else if (s == USWAP_ABSENT) {
		ret = zero_fill(e, page);
	} else {
		uswap_map_publish(e->map, page, s, slot_of(entry), -1);
		ret = is_resident(s) ? uswap_uffd_wake(e->uffd, address & ~(uint64_t)(e->page_size - 1), e->page_size)
				     : -EAGAIN;   /* POISONED: Python installs the marker */
	}
	if (ret < 0)
		return forward(e, m, ret);
	count(&e->stats.engine_faults, 1);
}

static void *engine_main(void *arg)
{
	struct uswap_engine *e = arg;
	struct uffd_msg msgs[64];
	for (;;) {
		/* the readahead ring is readable when its reads completed: install them then */
		int reading = 0;
		for (int i = 0; i < AHEAD_DEPTH; i++)
			reading |= e->ahead[i].active;
		struct pollfd fds[3] = { { .fd = e->uffd, .events = POLLIN }, { .fd = e->stop_fd, .events = POLLIN },
					 { .fd = reading ? e->ahead_ring.ring_fd : -1, .events = POLLIN } };
		if (poll(fds, 3, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (fds[1].revents)
			break;
		if (fds[0].revents & (POLLERR | POLLNVAL))
			break;
		if (fds[2].revents)
			stream_completed(e);
		if (!(fds[0].revents & POLLIN))
			continue;
		ssize_t got = read(e->uffd, msgs, sizeof(msgs));
		if (got < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			break;
		}
		for (ssize_t i = 0; i < got / (ssize_t)sizeof(msgs[0]); i++) {
			if (msgs[i].event == UFFD_EVENT_PAGEFAULT)
				handle_fault(e, &msgs[i]);
			else if (msgs[i].event == UFFD_EVENT_FORK)
				close((int)msgs[i].arg.fork.ufd);   /* refused at MAP; never keep an fd not asked for */
		}
	}
	for (int i = 0; i < AHEAD_DEPTH; i++)   /* quiesced: nothing is installed after stop */
		if (e->ahead[i].active)
			finish_window(e, i, 0);
	return NULL;
}

int uswap_engine_start(struct uswap_swapmap *m, int uffd, int memfd, uint64_t addr, uint32_t page_size,
		       int store_fd, const struct uswap_codec *codec, struct uswap_slots *slots, uint32_t readahead,
		       struct uswap_engine **out)
{
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
	e->ra_size = 1;
	e->last_fault = -(1LL << 40);
	e->notify_fd = e->stop_fd = -1;
	int ret = -ENOMEM;
	e->buf = uswap_map_buffer(page_size, (size_t)e->ra_max * page_size);
	if (!e->buf)
		goto fail;
	e->uring_ok = io_uring_queue_init(MAX_WINDOW, &e->uring, 0) == 0;   /* else: one pread per run */
	e->ahead_ring_ok = io_uring_queue_init(AHEAD_DEPTH * MAX_WINDOW, &e->ahead_ring, 0) == 0;   /* else none */
	for (int i = 0; i < AHEAD_DEPTH; i++) {
		e->ahead[i].buf = uswap_map_buffer(page_size, (size_t)MAX_WINDOW * page_size);
		if (!e->ahead[i].buf)
			goto fail;
	}
	e->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	e->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (e->notify_fd < 0 || e->stop_fd < 0) {
		ret = NEG_ERRNO();
		goto fail;
	}
	pthread_mutex_init(&e->lock, NULL);
	pthread_cond_init(&e->space, NULL);
	ret = uswap_start_thread(&e->thread, engine_main, e, "uswap-engine");
	if (ret < 0)
		goto fail;
	e->started = 1;
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
	pthread_cond_signal(&e->space);
	pthread_mutex_unlock(&e->lock);
	return n;
}

void uswap_engine_stats(struct uswap_engine *e, struct uswap_engine_stats *out)
{
	uswap_copy_counters((const uint64_t *)&e->stats, (uint64_t *)out, sizeof(*out) / sizeof(uint64_t));
}

/* Quiesce: the thread has returned when this returns (a fault it was serving is
 * finished or given back).  Messages still queued stay for drain.  Idempotent. */
void uswap_engine_stop(struct uswap_engine *e)
{
	if (!e->started)
		return;
	uswap_stop_thread(e->thread, e->stop_fd, &e->lock, &e->space, &e->stopping);
	e->started = 0;
}

void uswap_engine_free(struct uswap_engine *e)
{
	if (!e)
		return;
	uswap_engine_stop(e);
	if (e->uring_ok)
		io_uring_queue_exit(&e->uring);
	if (e->ahead_ring_ok)
		io_uring_queue_exit(&e->ahead_ring);
	for (int i = 0; i < AHEAD_DEPTH; i++)
		uswap_unmap_buffer(e->ahead[i].buf, (size_t)MAX_WINDOW * e->page_size);
	if (e->notify_fd >= 0)
		close(e->notify_fd);
	if (e->stop_fd >= 0)
		close(e->stop_fd);
	uswap_unmap_buffer(e->buf, (size_t)e->ra_max * e->page_size);
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

/* Encode (crc or seal, in place) and write the buffer's pages to their slots
 * (-1: an all-zero page, not written), one pwrite per run of contiguous slots.
 * Slots are trusted (valid) only once their write completed. */
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
		memset(c->valid + slots[i], 0, n);
		char *p = (char *)buf + i * c->page_size;
		int ret = uswap_codec_encode(c, p, (uint64_t)slots[i], n);
		if (ret < 0)
			return ret;
		int64_t done = uswap_pwrite_full(store_fd, p, n * c->page_size, (slots[i] + 1) * (int64_t)c->page_size);
		if (write_ios)
			(*write_ios)++;
		if (done != (int64_t)(n * c->page_size))
			return done < 0 ? (int)done : -EIO;
		memset(c->valid + slots[i], 1, n);
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
