/*
 * Which store slots are in use: the swap map's free list, one bit per slot
 * (the kernel's swap_map, reduced to used/free), allocated in clusters.
 *
 * One thread allocates (the daemon's event loop); any thread frees (the
 * event loop, and a region's engine thread when a swapped-in page goes in
 * writable: its slot is stale at once).  A bit is set only by the allocator
 * and cleared only by whoever owns the slot, so the allocator may trust a
 * clear bit it sees: nobody else can set it.
 *
 * Conventions as in uswap_core.h: -errno on failure, no Python, no globals.
 */
#ifndef USWAP_SLOTS_H
#define USWAP_SLOTS_H

#include <stdint.h>

/* CDEF-BEGIN */

struct uswap_pool;   /* uswap_pool.h */

struct uswap_slots {
	uint64_t count;
	uint64_t *bits;       /* atomic; 1 = in use */
	int64_t in_use;       /* atomic */
	uint64_t next;        /* next-fit: where the next search starts (the allocator's own) */
	uint8_t *valid;       /* the codec's per-slot "written" flags (or NULL): a freed slot is forgotten */
	struct uswap_pool *pool;   /* the compressed pool (or NULL): a freed slot's entry is dropped (P1) */
};

int uswap_slots_new(uint64_t count, uint8_t *valid, struct uswap_slots **out);
void uswap_slots_destroy(struct uswap_slots *s);
int64_t uswap_slots_alloc(struct uswap_slots *s, uint64_t want, uint64_t *first);
int uswap_slots_release(struct uswap_slots *s, uint64_t first, uint64_t count);
int uswap_slots_assign(struct uswap_slots *s, const uint8_t *zero, int64_t *slots, uint64_t count);
int uswap_slots_release_list(struct uswap_slots *s, int64_t *slots, uint64_t count);

/* CDEF-END */

#endif
