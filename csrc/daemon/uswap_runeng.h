/*
 * The fault thread of a run's process (`uswap run`): the fault engine's fast
 * path for memory the daemon reaches only through the process's own uffd.  It
 * serves swap-ins (with readahead of pages whose slots follow), zero-fills and
 * first writes in C, keyed by the process's page table (uswap_pt.h), and hands
 * everything else to Python in order through a ring: faults it does not serve
 * (FORWARD), and every event (FORK, REMAP, REMOVE, UNMAP), after which it
 * serves nothing until Python has handled the event (resume): an event changes
 * the table, and a fault queued after it must see the change.
 *
 * Conventions as in uswap_core.h: -errno on failure, no Python, no globals.
 */
#ifndef USWAP_RUNENG_H
#define USWAP_RUNENG_H

#include <stdint.h>

#include "uswap_core.h"   /* struct uswap_uffd_event */

/* CDEF-BEGIN */

/* One run's budget, shared by its processes' threads.  Above `soft` (the run's line) Python is woken to
 * reclaim; at `hard` faults go to Python, which serves them between reclaims (the throttle). */
struct uswap_run_budget {
	int64_t counted;      /* resident pages at the members' last pagemap counts (written by Python) */
	int64_t filled;       /* atomic: pages faulted in since, by all members */
	int64_t soft;
	int64_t hard;
	int64_t fill_line;    /* first-touch windows stop below it: the hard line, or the line while the hard line is
			       * lifted (a run reclaim cannot bring down: runtree.Run.set_share) */
};

enum {
	USWAP_RUNENG_FORWARD = 1,   /* a fault not served: ev; slot: why (-errno; 0: forward_all) */
	USWAP_RUNENG_EVENT = 2,     /* an event: ev; the thread waits for uswap_runeng_resume */
	USWAP_RUNENG_FREED = 3      /* the process's references to slots slot..slot+count-1 are gone (a swap-in by a
				     * write, a CLEAN page written); swapped_in: pages a swap-in brought in (pswpin) */
};

struct uswap_runeng_msg {
	uint32_t kind;
	uint32_t count;
	int64_t slot;
	uint32_t swapped_in;
	struct uswap_uffd_event ev;
};

struct uswap_runeng_stats {
	uint64_t engine_faults;    /* served in C */
	uint64_t forwarded;
	uint64_t pswpin;
	uint64_t readahead;        /* pages swapped in without a fault of their own (in pswpin too) */
	uint64_t zero_fills;
	uint64_t wp_faults;
	uint64_t clean_written;    /* WP faults on CLEAN pages: written after a clean swap-in, their slots freed */
	uint64_t read_ios;
	uint64_t events;
	uint64_t throttled;        /* faults that waited their whole time above the hard line */
};

struct uswap_runeng;
struct uswap_pt;
struct uswap_codec;

/* store_fd < 0: every fault is forwarded (a store Python serves, e.g. NFS).  forward_all: so until
 * uswap_runeng_forward_all(e, 0) (a fork child: its first fault names it). */
int uswap_runeng_start(struct uswap_pt *pt, struct uswap_run_budget *budget, int uffd, uint32_t page_size,
		       int store_fd, const struct uswap_codec *codec, uint32_t readahead, int forward_all,
		       struct uswap_runeng **out);
int uswap_runeng_notify_fd(struct uswap_runeng *e);
int uswap_runeng_drain(struct uswap_runeng *e, struct uswap_runeng_msg *out, int max);
void uswap_runeng_resume(struct uswap_runeng *e);
void uswap_runeng_forward_all(struct uswap_runeng *e, int on);
/* Pages faulted in since the last take, taken out of the budget's `filled` (Python counts them now). */
int64_t uswap_runeng_take_filled(struct uswap_runeng *e);
int64_t uswap_runeng_filled(struct uswap_runeng *e);
void uswap_runeng_add_filled(struct uswap_runeng *e, int64_t n);
void uswap_runeng_stats(struct uswap_runeng *e, struct uswap_runeng_stats *out);
/* Quiesce: the thread has returned (a fault it was serving is finished or forwarded).  Idempotent. */
void uswap_runeng_stop(struct uswap_runeng *e);
void uswap_runeng_free(struct uswap_runeng *e);

/* CDEF-END */

#endif
