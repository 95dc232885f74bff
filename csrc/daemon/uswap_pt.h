/*
 * The page table of a run's process (`uswap run`): the pages of an address
 * space that are not plainly resident, keyed by address (a run's memory is
 * sparse and moves: mremap, fork), as the kernel's page tables hold a swap
 * entry where a page was.  A page absent from the table is resident or never
 * touched.  Shared by the process's fault thread (uswap_runeng.c) and the
 * daemon's trio thread; every call takes the table's lock.
 *
 * Conventions as in uswap_core.h: -errno on failure, no Python, no globals.
 */
#ifndef USWAP_PT_H
#define USWAP_PT_H

#include <stdint.h>

/* CDEF-BEGIN */

/* A page's entry: its state, the BUSY bit, slot + 1 in the high half (0: no slot). */
enum {
	USWAP_PT_SWAPPED = 1,   /* out of the process; its data is in the slot */
	USWAP_PT_CLAIMED = 2,   /* chosen by eviction (write-protected or about to be), no slot written yet */
	USWAP_PT_INFLIGHT = 3,  /* written to its slot, still resident and write-protected: the agent's drop pending */
	USWAP_PT_SHARED = 4,    /* the agent's MOVE refused it (copy-on-write shared): reclaim skips it until written */
	USWAP_PT_CLEAN = 5,     /* swapped in by a read (or readahead): resident, write-protected, equal to its slot,
				 * which it keeps (the swap cache): evicting it again is a drop, no write; a write
				 * (its WP fault) frees the slot */
	USWAP_PT_STATES = 6,
	USWAP_PT_STATE_MASK = 7,
	USWAP_PT_BUSY = 8,      /* a swap-in holds it: only the holder installs it and drops its slot */
	USWAP_PT_SLOT_SHIFT = 32
};

struct uswap_pt;

int uswap_pt_new(struct uswap_pt **out);
void uswap_pt_free(struct uswap_pt *pt);
/* The entry of the page at addr, 0 if none. */
uint64_t uswap_pt_get(struct uswap_pt *pt, uint64_t addr);
/* Set the page's entry (0 removes it); *old: what it replaced (0: nothing).  -ENOMEM. */
int uswap_pt_set(struct uswap_pt *pt, uint64_t addr, uint64_t entry, uint64_t *old);
/* Set it only if its entry is now `expect` (0: none): 1 if set, 0 if not; -ENOMEM. */
int uswap_pt_swap(struct uswap_pt *pt, uint64_t addr, uint64_t expect, uint64_t entry);
/* Claim a SWAPPED page for a swap-in (sets BUSY): 0 and *entry, -ENOENT not swapped, -EBUSY held. */
int uswap_pt_claim(struct uswap_pt *pt, uint64_t addr, uint64_t *entry);
/* Entries whose state bit (1 << state) is in `states`, in [start, end): up to max of them from *cursor on
 * (start at 0; the table's order, not addresses'); with `take`, removed as they are returned.  The
 * number returned; fewer than max: the walk is complete. */
int uswap_pt_walk(struct uswap_pt *pt, uint64_t *cursor, uint64_t start, uint64_t end, uint32_t states,
		  int take, uint64_t *addrs, uint64_t *entries, int max);
/* Entries in a state. */
uint64_t uswap_pt_count(struct uswap_pt *pt, uint32_t state);

/* Batches for eviction, one lock each (pages are 4096 bytes, addresses page-aligned): */
/* Eviction's claim of pages a..a+n-1: if every one has no entry or is CLEAN (not BUSY), those without
 * one become CLAIMED (no slot) and the CLEAN ones INFLIGHT (their slot kept: written already), and it
 * returns 1; else none changes (0).  -ENOMEM. */
int uswap_pt_claim_evict(struct uswap_pt *pt, uint64_t a, uint64_t n);
/* Pages a..a+n-1 whose state bit (1 << state; bit 0: no entry) is in from_mask and that are not BUSY
 * change to_state, keeping their slot (to_state 0: removed); old[i]: the entry changed, else 0 (old may
 * be NULL).  How many changed.  Never -ENOMEM unless from_mask has bit 0. */
int64_t uswap_pt_change(struct uswap_pt *pt, uint64_t a, uint64_t n, uint32_t from_mask, uint32_t to_state,
			uint64_t *old);
/* Page addrs[i] in state `from` becomes `to` with slot first_slot + i; ok[i] says whether it did. */
int64_t uswap_pt_assign(struct uswap_pt *pt, const uint64_t *addrs, uint64_t n, uint32_t from, uint32_t to,
			int64_t first_slot, uint8_t *ok);
/* The spans of pages in `state` (not BUSY) in a..a+n-1: first[k], len[k] (pages), at most max of them. */
int uswap_pt_spans(struct uswap_pt *pt, uint64_t a, uint64_t n, uint32_t state, uint64_t *first, uint64_t *len,
		   int max);

/* CDEF-END */

/* For the fault thread (uswap_runeng.c): the same, with the caller holding the lock. */
void uswap_pt_lock(struct uswap_pt *pt);
void uswap_pt_unlock(struct uswap_pt *pt);
uint64_t uswap_pt_get_locked(struct uswap_pt *pt, uint64_t addr);
int uswap_pt_set_locked(struct uswap_pt *pt, uint64_t addr, uint64_t entry, uint64_t *old);

#endif
