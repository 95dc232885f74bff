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
 * Priority groups (a store set, uswap_storeset.h): the slots may be split into
 * consecutive groups, highest priority first.  A slot is allocated in the first
 * group that has a free one (the kernel uses its highest-priority swap area
 * until it is full), next-fit within that group.  Each group's in_use is updated
 * with the bit, after it on alloc and after it on free, so a group whose in_use
 * is below its size has a free slot (the allocator's skip test relies on it).
 * Without groups, the whole range is one group: allocation as before.
 *
 * Conventions as in uswap_core.h: -errno on failure, no Python, no globals.
 */
#ifndef USWAP_SLOTS_H
#define USWAP_SLOTS_H

#include <stdint.h>

/* CDEF-BEGIN */

struct uswap_pool;   /* uswap_pool.h */

struct uswap_slot_group;   /* below, outside the cdef */

struct uswap_slots {
	uint64_t count;
	uint64_t *bits;       /* atomic; 1 = in use */
	int64_t in_use;       /* atomic */
	uint32_t ngroups;     /* at least 1 */
	struct uswap_slot_group *groups;
	uint8_t *valid;       /* the codec's per-slot "written" flags (or NULL): a freed slot is forgotten */
	struct uswap_pool *pool;   /* the compressed pool (or NULL): a freed slot's entry is dropped (P1) */
};

int uswap_slots_new(uint64_t count, uint8_t *valid, struct uswap_slots **out);
/* Split the slots into n priority groups: group g is [ends[g-1], ends[g]) (ends[-1] = 0), highest priority
 * first; ends ascending, the last = count.  Only before the first allocation.  0 or -EINVAL/-ENOMEM. */
int uswap_slots_set_groups(struct uswap_slots *s, const uint64_t *ends, uint32_t n);
/* Slots in use in [first, first + count), from the bitmap. */
uint64_t uswap_slots_used_in(const struct uswap_slots *s, uint64_t first, uint64_t count);
void uswap_slots_destroy(struct uswap_slots *s);
int64_t uswap_slots_alloc(struct uswap_slots *s, uint64_t want, uint64_t *first);
int uswap_slots_release(struct uswap_slots *s, uint64_t first, uint64_t count);
int uswap_slots_assign(struct uswap_slots *s, const uint8_t *zero, int64_t *slots, uint64_t count);
int uswap_slots_release_list(struct uswap_slots *s, int64_t *slots, uint64_t count);

/* CDEF-END */

struct uswap_slot_group {
	uint64_t start, end;  /* [start, end) */
	uint64_t next;        /* next-fit within the group: where its next search starts (the allocator's own) */
	int64_t in_use;       /* atomic */
};

#endif
