/*
 * The fault thread of a run's process (see uswap_runeng.h).
 *
 * Invariants (docs/DESIGN.md "Runs"; each relied on below):
 *   - A page with a slot is filled from that slot, never with zeros: a
 *     MISSING fault zero-fills only a page the table does not hold, and the
 *     table changes by events only while this thread waits (EVENT ... resume),
 *     so a fault read after REMOVE, UNMAP or REMAP sees the table after it.
 *   - Only the holder of a page's BUSY bit installs it and drops its slot
 *     reference; this thread claims under the table's lock and never waits
 *     for a held page: it forwards the fault.
 *   - A page eviction has chosen (CLAIMED, INFLIGHT) is never made writable
 *     here: its write fault goes to Python, which cancels the eviction.  The
 *     lock is held from the lookup to the end of the un-protect, so a claim
 *     either precedes the lookup (forwarded) or follows the un-protect
 *     (eviction write-protects after claiming).
 *   - Slot references are dropped by Python only (FREED), in ring order.
 *     A reference this thread takes out of the table (a swap-in for a write
 *     clears the faulting page's entry, a write to a CLEAN page its entry,
 *     then posts FREED) is always in the ring: posts after stop began use
 *     the ring's reserve, never dropped (post).  A fault posts at most one
 *     message.
 *   - A CLEAN page (swapped in, write-protected, equal to its slot) is
 *     un-protected here only with its entry dropped in the same hold of the
 *     table's lock.  Eviction claims a CLEAN page (it becomes INFLIGHT) under
 *     that lock, so either the claim came first (the write fault finds
 *     INFLIGHT and goes to Python, which cancels the eviction: the page is
 *     never dropped after a write) or the un-protect did (no entry: eviction
 *     claims it as any resident page, protects, reads and writes it).  A
 *     swap-in publishes CLEAN only after the page is installed protected;
 *     until then its entry is BUSY, which eviction never claims.
 *   - The thread never calls into Python; every signal is blocked in it.
 */
#define _GNU_SOURCE
#include "uswap_runeng.h"
#include "uswap_core.h"
#include "uswap_engine.h"
#include "uswap_pool.h"
#include "uswap_pt.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define RING_SIZE 1024                 /* messages; a power of two */
#define RING_NOTIFY_AT (RING_SIZE / 4) /* wake Python at this fill even when nothing is urgent */
#define READ_MSGS 32                   /* uffd messages read at a time */
#define RING_RESERVE READ_MSGS         /* left free for the posts once stop began: the rest of one read */
#define THROTTLE_POLLS 50             /* above the hard line: waits of THROTTLE_POLL_US for reclaim */
#define THROTTLE_POLL_US 100
#define MAX_WINDOW 32
#define MAX_FILL 32                    /* pages of a first-touch window at most */

struct uswap_runeng {
	struct uswap_pt *pt;
	struct uswap_run_budget *budget;
	int uffd, store_fd;
	int notify_fd, stop_fd;
	uint32_t page_size, ra_max;
	uint32_t ra_size;              /* the readahead window now (adaptive: window()) */
	uint64_t last_fault;           /* the page number of the last swap-in fault */
	uint32_t fill_size;            /* the first-touch window now (adaptive: fill_window()) */
	uint64_t fill_next;            /* the page after the last first-touch window */
	struct uswap_codec codec;
	void *buf;                     /* ra_max pages, aligned for O_DIRECT */
	int forward_all;               /* atomic */
	int64_t filled;                /* atomic: pages faulted in since Python's last take */
	int told;                      /* atomic: Python was woken for the soft line since its last take */

	pthread_mutex_t lock;          /* guards the ring, paused, stopping */
	pthread_cond_t cond;           /* room in the ring; resumed; stopping */
	struct uswap_runeng_msg ring[RING_SIZE];
	uint64_t head, tail;
	int paused, stopping;

	struct uswap_runeng_stats stats;   /* atomic fields */
	pthread_t thread;
	int started;
};

static inline uint32_t state_of(uint64_t e) { return (uint32_t)(e & USWAP_PT_STATE_MASK); }
static inline int64_t slot_of(uint64_t e) { return (int64_t)(e >> USWAP_PT_SLOT_SHIFT) - 1; }

static void count(uint64_t *counter, uint64_t n)
{
	__atomic_add_fetch(counter, n, __ATOMIC_RELAXED);
}

static void notify(struct uswap_runeng *e)
{
	uint64_t one = 1;
	if (write(e->notify_fd, &one, sizeof(one)) < 0) {
		/* saturated: Python has a wake-up pending anyway */
	}
}

/* Queue a message; an EVENT also pauses the thread until Python resumes it.  Forwarded
 * faults and events wake Python at once, FREED only when the ring fills up.
 *
 * Once stop began nothing waits: Python drains the ring after the thread is gone (a swap-in's FREED, a
 * FORK's child uffd, which Python poisons before closing it).  The thread then posts at most what is
 * left of the read it is in (it serves no fault more, and reads nothing more), so the RING_RESERVE
 * entries that other posts leave free always take it: a FREED lost here leaked its slots for good. */
static void post(struct uswap_runeng *e, const struct uswap_runeng_msg *msg)
{
	pthread_mutex_lock(&e->lock);
	while (e->tail - e->head >= RING_SIZE - RING_RESERVE && !e->stopping)
		pthread_cond_wait(&e->cond, &e->lock);
	if (e->tail - e->head == RING_SIZE) {   /* cannot happen (above) */
		pthread_mutex_unlock(&e->lock);
		if (msg->kind == USWAP_RUNENG_EVENT && msg->ev.event == UFFD_EVENT_FORK)
			close((int)msg->ev.arg2);
		return;
	}
	uint64_t queued = e->tail - e->head;
	e->ring[e->tail++ % RING_SIZE] = *msg;
	int urgent = msg->kind != USWAP_RUNENG_FREED || queued + 1 == RING_NOTIFY_AT;
	if (msg->kind == USWAP_RUNENG_EVENT)
		e->paused = 1;
	pthread_mutex_unlock(&e->lock);
	if (urgent)
		notify(e);
	if (msg->kind != USWAP_RUNENG_EVENT)
		return;
	pthread_mutex_lock(&e->lock);
	while (e->paused && !e->stopping)
		pthread_cond_wait(&e->cond, &e->lock);
	pthread_mutex_unlock(&e->lock);
}

static void forward(struct uswap_runeng *e, const struct uffd_msg *m, int why)
{
	struct uswap_runeng_msg msg = { .kind = USWAP_RUNENG_FORWARD, .slot = why };
	uswap_uffd_decode(m, &msg.ev);
	count(&e->stats.forwarded, 1);
	post(e, &msg);
}

static int64_t budget_total(const struct uswap_run_budget *b)
{
	return __atomic_load_n(&b->counted, __ATOMIC_RELAXED) + __atomic_load_n(&b->filled, __ATOMIC_RELAXED);
}

/* n pages faulted in: counted, and Python woken once when the run crosses its line. */
static void filled(struct uswap_runeng *e, uint64_t n)
{
	__atomic_add_fetch(&e->filled, (int64_t)n, __ATOMIC_RELAXED);
	__atomic_add_fetch(&e->budget->filled, (int64_t)n, __ATOMIC_RELAXED);
	if (budget_total(e->budget) > __atomic_load_n(&e->budget->soft, __ATOMIC_RELAXED)
	    && !__atomic_exchange_n(&e->told, 1, __ATOMIC_RELAXED))
		notify(e);
}

/* Above the run's hard line: wait for Python's reclaim to make room, as an allocation waits in direct
 * reclaim (each eviction batch lowers the count), at most THROTTLE_POLLS * THROTTLE_POLL_US; still
 * above it, the fault goes to Python, which serves it between reclaims.  Whether it is still above. */
static int throttled(struct uswap_runeng *e)
{
	for (int i = 0; i < THROTTLE_POLLS; i++) {
		if (budget_total(e->budget) < __atomic_load_n(&e->budget->hard, __ATOMIC_RELAXED))
			return 0;
		if (i == 0)
			notify(e);
		if (__atomic_load_n(&e->stopping, __ATOMIC_RELAXED))
			break;
		usleep(THROTTLE_POLL_US);
	}
	count(&e->stats.throttled, 1);
	return budget_total(e->budget) >= __atomic_load_n(&e->budget->hard, __ATOMIC_RELAXED);
}

static void wake(struct uswap_runeng *e, uint64_t a)
{
	uswap_uffd_wake(e->uffd, a, e->page_size);
}

/* Read and check slot..slot+n-1 into buf: the pooled ones from the codec's compressed pool (checked
 * there: P2), the rest from the store, one read per run of them.  0, or -errno. */
static int read_slots(struct uswap_runeng *e, int64_t slot, uint64_t n)
{
	uint64_t ios = 0;
	int ret = uswap_pool_read_slots(&e->codec, e->store_fd, e->buf, (uint64_t)slot, n, &ios, NULL);
	count(&e->stats.read_ios, ios);
	return ret;
}

/* Give back the claims on pages a..a+n-1 (entries as claimed: BUSY set). */
static void unclaim(struct uswap_runeng *e, uint64_t a, uint64_t n, int64_t slot)
{
	uint64_t old;
	uswap_pt_lock(e->pt);
	for (uint64_t i = 0; i < n; i++)
		uswap_pt_set_locked(e->pt, a + i * e->page_size,
				    USWAP_PT_SWAPPED | (uint64_t)(slot + (int64_t)i + 1) << USWAP_PT_SLOT_SHIFT, &old);
	uswap_pt_unlock(e->pt);
}

/* The readahead window for a swap-in fault at page (adaptive, as the engine's for regions): it
 * doubles while faults come near the last one and halves when they jump, so random access reads
 * only what it faults and a stream reads ahead. */
static uint32_t window(struct uswap_runeng *e, uint64_t page)
{
	uint64_t dist = page > e->last_fault ? page - e->last_fault : e->last_fault - page;
	uint64_t near = e->ra_size > 2 ? e->ra_size : 2;
	if (dist <= near)
		e->ra_size = e->ra_size * 2 < e->ra_max ? e->ra_size * 2 : e->ra_max;
	else
		e->ra_size = e->ra_size / 2 > 1 ? e->ra_size / 2 : 1;
	e->last_fault = page;
	return e->ra_size;
}

/* do_swap_page: the faulting page and the swapped pages after it whose slots follow its slot, read in
 * one I/O and installed write-protected, CLEAN with their slots (the swap cache: evicting one again is a
 * drop, no write).  A write's page is then un-protected and its slot freed, as the kernel frees the slot
 * of a page swapped in for a write; if that is refused it stays CLEAN and the write comes back as a WP
 * fault. */
static int swap_in(struct uswap_runeng *e, uint64_t a, uint64_t entry, int write)
{
	int64_t slot = slot_of(entry);
	uint64_t n = 1, old, ps = e->page_size;
	uint32_t limit = window(e, a / ps);
	/* claimed: the faulting page (by the caller), and the window after it */
	uswap_pt_lock(e->pt);
	while (n < limit) {
		uint64_t next = uswap_pt_get_locked(e->pt, a + n * ps);
		if (next != (USWAP_PT_SWAPPED | (uint64_t)(slot + (int64_t)n + 1) << USWAP_PT_SLOT_SHIFT))
			break;
		uswap_pt_set_locked(e->pt, a + n * ps, next | USWAP_PT_BUSY, &old);   /* replaces: cannot fail */
		n++;
	}
	uswap_pt_unlock(e->pt);
	int ret = read_slots(e, slot, n);
	if (ret < 0 && n > 1) {   /* a bad page in the window need not stop the faulting one */
		unclaim(e, a + ps, n - 1, slot + 1);
		n = 1;
		ret = read_slots(e, slot, 1);
	}
	if (ret < 0) {
		unclaim(e, a, n, slot);
		return ret;   /* Python reads it again and poisons it if it must */
	}
	int64_t done = 0;
	uint64_t mode = UFFDIO_COPY_MODE_WP | (write ? UFFDIO_COPY_MODE_DONTWAKE : 0);
	ret = uswap_uffd_copy(e->uffd, a, (uint64_t)(uintptr_t)e->buf, n * ps, mode, &done);
	uint64_t in = (uint64_t)done / ps;
	uint32_t freed = 0;   /* the faulting page's slot goes (a write, or it was not installed here) */
	if (in == 0 && n > 1 && ret != -EAGAIN) {
		/* ENOENT for the whole window when it crosses a VMA boundary (a split by madvise or
		 * mprotect, which has no event): the faulting page alone */
		ret = uswap_uffd_copy(e->uffd, a, (uint64_t)(uintptr_t)e->buf, ps, mode, &done);
		in = (uint64_t)done / ps;
	}
	if (in == 0) {
		if (ret == -EAGAIN) {   /* events pending: Python retries it after reading them */
			unclaim(e, a, n, slot);
			return ret;
		}
		/* EEXIST: there already (counted as in); else the range or the process is gone:
		 * either way the fault is over and the page's slot with it, as Python's path does */
		wake(e, a);
		in = 1;
		freed = 1;
	} else if (write) {
		/* still BUSY: nobody else changes it; un-protected, it is dirty at once */
		if (uswap_uffd_writeprotect(e->uffd, a, ps, 0) == 0)
			freed = 1;
		else
			wake(e, a);   /* the write faults again (WP), on a CLEAN page */
	}
	if (in < n)
		unclaim(e, a + in * ps, n - in, slot + (int64_t)in);
	uswap_pt_lock(e->pt);
	for (uint64_t i = 0; i < in; i++)
		uswap_pt_set_locked(e->pt, a + i * ps,
				    i < freed ? 0 : USWAP_PT_CLEAN | (uint64_t)(slot + (int64_t)i + 1) << USWAP_PT_SLOT_SHIFT,
				    &old);   /* replaces: cannot fail */
	uswap_pt_unlock(e->pt);
	struct uswap_runeng_msg msg = { .kind = USWAP_RUNENG_FREED, .slot = slot, .count = freed,
					.swapped_in = (uint32_t)in };
	post(e, &msg);
	count(&e->stats.pswpin, in);
	count(&e->stats.readahead, in - 1);
	filled(e, in);
	return 0;
}

/* The first-touch window for a fault at page: it doubles while each first touch comes where the last
 * window ended (a program filling fresh memory in order) and is one page otherwise; it is cut to what
 * fits below the run's fill line: its hard line, where faults wait for reclaim (throttled), or its line
 * while the hard line is lifted (nothing waits: windows there took a streaming run from 2,000 to 4,256
 * pages resident in the 10 ms one reclaim pass that evicted nothing lifts it for). */
static uint64_t fill_window(struct uswap_runeng *e, uint64_t page)
{
	if (page == e->fill_next)
		e->fill_size = e->fill_size * 2 < MAX_FILL ? e->fill_size * 2 : MAX_FILL;
	else
		e->fill_size = 1;
	int64_t room = __atomic_load_n(&e->budget->fill_line, __ATOMIC_RELAXED) - budget_total(e->budget);
	return room < 2 ? 1 : (uint64_t)room < e->fill_size ? (uint64_t)room : e->fill_size;
}

/* A first touch at page a (no entry), the table locked by the caller: the zero page mapped over the
 * window's pages up to the first one the table holds (never over a slot: R2), in one UFFDIO_ZEROPAGE
 * that stops at the first present page.  One fault round trip for up to MAX_FILL pages of a stream of
 * first touches (a round trip costs 12-60 us; 256 MiB of first writes took 65,697 of them).  The zero
 * page costs the program nothing until it writes a page (the kernel's own copy-on-write fault, no round
 * trip): a window's pages the program never writes are never charged to it, and a sparse program is
 * given no memory it does not use.  They are counted as filled all the same (their writes raise no
 * message: the count is high, never low, until the next pagemap count, which counts no zero page).
 * Pages mapped, or -errno (EAGAIN: events pending). */
static int64_t first_touch(struct uswap_runeng *e, uint64_t a)
{
	uint64_t ps = e->page_size, n = 1, limit = fill_window(e, a / ps);
	int64_t done = 0;
	while (n < limit && !uswap_pt_get_locked(e->pt, a + n * ps))
		n++;
	int ret = uswap_uffd_zeropage(e->uffd, a, n * ps, 0, &done);
	if (done <= 0 && n > 1 && ret != -EAGAIN && ret != -EEXIST)   /* ENOENT: the window crosses the VMA's end */
		ret = uswap_uffd_zeropage(e->uffd, a, ps, 0, &done);
	e->fill_next = a / ps + (done > 0 ? (uint64_t)done / ps : 1);
	return done > 0 ? done / (int64_t)ps : ret;
}

/* A missing page, decided with one lookup under the table's lock: no entry, a first touch (the lock
 * held to the end of the ioctl: an eviction claims under it, so a page it takes out after this lookup (a
 * stale fault on a page another thread's fault filled) is present here (EEXIST), never zero-filled over
 * its slot); SWAPPED and not held, claimed (BUSY) and swapped in; anything else is Python's (CLAIMED,
 * INFLIGHT: the agent may be moving it; SHARED; held). */
static int missing(struct uswap_runeng *e, uint64_t a, int write)
{
	uint64_t old;
	uswap_pt_lock(e->pt);
	uint64_t entry = uswap_pt_get_locked(e->pt, a);
	if (state_of(entry) == USWAP_PT_SWAPPED && !(entry & USWAP_PT_BUSY)) {
		uswap_pt_set_locked(e->pt, a, entry | USWAP_PT_BUSY, &old);   /* replaces: cannot fail */
		uswap_pt_unlock(e->pt);
		return swap_in(e, a, entry, write);
	}
	if (entry) {
		uswap_pt_unlock(e->pt);
		return -EBUSY;
	}
	int64_t in = first_touch(e, a);
	uswap_pt_unlock(e->pt);
	if (in == -EAGAIN)
		return (int)in;
	if (in < 0) {   /* EEXIST: another thread's fault filled it; else gone */
		wake(e, a);
		return 0;
	}
	count(&e->stats.zero_fills, (uint64_t)in);
	filled(e, (uint64_t)in);
	return 0;
}

/* A write to a write-protected page that no eviction holds: a SHARED mark goes (the page is
 * this process's alone once written), a CLEAN page's slot goes (its copy is stale from now on:
 * FREED), the protection is lifted, all under the table's lock (the CLEAN invariant above). */
static int unprotect(struct uswap_runeng *e, uint64_t a)
{
	uint64_t old;
	uswap_pt_lock(e->pt);
	uint64_t entry = uswap_pt_get_locked(e->pt, a);
	if (entry && state_of(entry) != USWAP_PT_SHARED && state_of(entry) != USWAP_PT_CLEAN) {
		uswap_pt_unlock(e->pt);
		return -EBUSY;   /* CLAIMED, INFLIGHT: Python cancels that eviction */
	}
	if (entry)
		uswap_pt_set_locked(e->pt, a, 0, &old);
	int ret = uswap_uffd_writeprotect(e->uffd, a, e->page_size, 0);
	if (ret == -EAGAIN && entry)
		uswap_pt_set_locked(e->pt, a, entry, &old);
	uswap_pt_unlock(e->pt);
	if (ret == -EAGAIN)
		return ret;
	if (state_of(entry) == USWAP_PT_CLEAN) {   /* out of the table: its reference is the ring's now */
		struct uswap_runeng_msg msg = { .kind = USWAP_RUNENG_FREED, .slot = slot_of(entry), .count = 1 };
		post(e, &msg);
		count(&e->stats.clean_written, 1);
	}
	if (ret < 0)
		wake(e, a);
	else
		count(&e->stats.wp_faults, 1);
	return 0;
}

static void handle_fault(struct uswap_runeng *e, const struct uffd_msg *m)
{
	uint64_t a = m->arg.pagefault.address & ~(uint64_t)(e->page_size - 1);
	int ret;
	if ((e->store_fd < 0 && !e->codec.remote_pread) || __atomic_load_n(&e->forward_all, __ATOMIC_RELAXED))
		return forward(e, m, 0);
	if (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) {
		ret = unprotect(e, a);
	} else if (budget_total(e->budget) >= __atomic_load_n(&e->budget->hard, __ATOMIC_RELAXED) && throttled(e)) {
		ret = -ENOMEM;   /* Python serves it after its reclaim */
	} else {
		ret = missing(e, a, !!(m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WRITE));
	}
	if (ret < 0)
		return forward(e, m, ret);
	count(&e->stats.engine_faults, 1);
}

static void *runeng_main(void *arg)
{
	struct uswap_runeng *e = arg;
	struct uffd_msg msgs[READ_MSGS];
	for (;;) {
		struct pollfd fds[2] = { { .fd = e->uffd, .events = POLLIN }, { .fd = e->stop_fd, .events = POLLIN } };
		if (poll(fds, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (fds[1].revents || (fds[0].revents & (POLLERR | POLLNVAL)))
			break;
		ssize_t got = read(e->uffd, msgs, sizeof(msgs));
		if (got < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			break;
		}
		for (ssize_t i = 0; i < got / (ssize_t)sizeof(msgs[0]); i++) {
			if (msgs[i].event == UFFD_EVENT_PAGEFAULT) {
				/* once stopping, faults are left to the uffd's close (post's reserve) */
				if (!__atomic_load_n(&e->stopping, __ATOMIC_RELAXED))
					handle_fault(e, &msgs[i]);
				continue;
			}
			struct uswap_runeng_msg msg = { .kind = USWAP_RUNENG_EVENT };
			uswap_uffd_decode(&msgs[i], &msg.ev);
			count(&e->stats.events, 1);
			post(e, &msg);   /* returns once Python has handled it, or at stop */
		}
	}
	return NULL;
}

int uswap_runeng_start(struct uswap_pt *pt, struct uswap_run_budget *budget, int uffd, uint32_t page_size,
		       int store_fd, const struct uswap_codec *codec, uint32_t readahead, int forward_all,
		       struct uswap_runeng **out)
{
	struct uswap_runeng *e = uswap_map_buffer(sizeof(uint64_t), sizeof(*e));   /* its ring: 64 KiB */
	if (!e)
		return -ENOMEM;
	e->pt = pt;
	e->budget = budget;
	e->uffd = uffd;
	e->store_fd = store_fd;
	e->page_size = page_size;
	e->ra_max = readahead < 1 ? 1 : readahead > MAX_WINDOW ? MAX_WINDOW : readahead;
	e->ra_size = 1;
	e->fill_size = 1;
	e->forward_all = forward_all;
	if (codec)
		e->codec = *codec;
	e->notify_fd = e->stop_fd = -1;
	int ret = -ENOMEM;
	e->buf = uswap_map_buffer(page_size, (size_t)e->ra_max * page_size);
	if (!e->buf)
		goto fail;
	e->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	e->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (e->notify_fd < 0 || e->stop_fd < 0) {
		ret = -errno;
		goto fail;
	}
	pthread_mutex_init(&e->lock, NULL);
	pthread_cond_init(&e->cond, NULL);
	ret = uswap_start_thread(&e->thread, runeng_main, e, "uswap-run");
	if (ret < 0)
		goto fail;
	e->started = 1;
	*out = e;
	return 0;
fail:
	uswap_runeng_free(e);
	return ret;
}

int uswap_runeng_notify_fd(struct uswap_runeng *e)
{
	return e->notify_fd;
}

int uswap_runeng_drain(struct uswap_runeng *e, struct uswap_runeng_msg *out, int max)
{
	int n = 0;
	pthread_mutex_lock(&e->lock);
	while (n < max && e->head != e->tail)
		out[n++] = e->ring[e->head++ % RING_SIZE];
	pthread_cond_broadcast(&e->cond);
	pthread_mutex_unlock(&e->lock);
	return n;
}

void uswap_runeng_resume(struct uswap_runeng *e)
{
	pthread_mutex_lock(&e->lock);
	e->paused = 0;
	pthread_cond_broadcast(&e->cond);
	pthread_mutex_unlock(&e->lock);
}

void uswap_runeng_forward_all(struct uswap_runeng *e, int on)
{
	__atomic_store_n(&e->forward_all, on, __ATOMIC_RELAXED);
}

int64_t uswap_runeng_take_filled(struct uswap_runeng *e)
{
	int64_t n = __atomic_exchange_n(&e->filled, 0, __ATOMIC_RELAXED);
	__atomic_sub_fetch(&e->budget->filled, n, __ATOMIC_RELAXED);
	__atomic_store_n(&e->told, 0, __ATOMIC_RELAXED);
	return n;
}

int64_t uswap_runeng_filled(struct uswap_runeng *e)
{
	return __atomic_load_n(&e->filled, __ATOMIC_RELAXED);
}

void uswap_runeng_add_filled(struct uswap_runeng *e, int64_t n)
{
	__atomic_add_fetch(&e->filled, n, __ATOMIC_RELAXED);
	__atomic_add_fetch(&e->budget->filled, n, __ATOMIC_RELAXED);
}

void uswap_runeng_stats(struct uswap_runeng *e, struct uswap_runeng_stats *out)
{
	uswap_copy_counters((const uint64_t *)&e->stats, (uint64_t *)out, sizeof(*out) / sizeof(uint64_t));
}

void uswap_runeng_stop(struct uswap_runeng *e)
{
	if (!e->started)
		return;
	uswap_stop_thread(e->thread, e->stop_fd, &e->lock, &e->cond, &e->stopping);
	e->started = 0;
}

void uswap_runeng_free(struct uswap_runeng *e)
{
	if (!e)
		return;
	uswap_runeng_stop(e);
	if (e->notify_fd >= 0)
		close(e->notify_fd);
	if (e->stop_fd >= 0)
		close(e->stop_fd);
	uswap_unmap_buffer(e->buf, (size_t)e->ra_max * e->page_size);
	uswap_unmap_buffer(e, sizeof(*e));
}
