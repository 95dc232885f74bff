/* The slot allocator (uswap_slots.h): a bitmap, next-fit clusters within priority groups, atomic frees. */
#include "uswap_slots.h"
#include "uswap_pool.h"

#include <errno.h>
#include <stdlib.h>

#define WORD(i) ((i) >> 6)
#define BIT(i) (1ULL << ((i) & 63))

int uswap_slots_new(uint64_t count, uint8_t *valid, struct uswap_slots **out)
{
	struct uswap_slots *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->bits = calloc(WORD(count) + 1, sizeof(uint64_t));
	s->groups = calloc(1, sizeof(*s->groups));
	if (!s->bits || !s->groups) {
		uswap_slots_destroy(s);
		return -ENOMEM;
	}
	s->count = count;
	s->valid = valid;
	s->ngroups = 1;
	s->groups[0].end = count;
	*out = s;
	return 0;
}

int uswap_slots_set_groups(struct uswap_slots *s, const uint64_t *ends, uint32_t n)
{
	if (n == 0 || ends[n - 1] != s->count || __atomic_load_n(&s->in_use, __ATOMIC_RELAXED))
		return -EINVAL;
	for (uint32_t g = 0; g < n; g++)
		if (ends[g] <= (g ? ends[g - 1] : 0))
			return -EINVAL;
	struct uswap_slot_group *groups = calloc(n, sizeof(*groups));
	if (!groups)
		return -ENOMEM;
	for (uint32_t g = 0; g < n; g++) {
		groups[g].start = groups[g].next = g ? ends[g - 1] : 0;
		groups[g].end = ends[g];
	}
	free(s->groups);
	s->groups = groups;
	s->ngroups = n;
	return 0;
}

void uswap_slots_destroy(struct uswap_slots *s)
{
	if (s) {
		free(s->bits);
		free(s->groups);
		free(s);
	}
}

/* The group holding slot i (few groups: a look along them). */
static struct uswap_slot_group *group_of(const struct uswap_slots *s, uint64_t i)
{
	uint32_t g = 0;
	while (g + 1 < s->ngroups && i >= s->groups[g].end)
		g++;
	return &s->groups[g];
}

/* The first bit in [i, end) that is set in the bitmap XOR flip (flip 0: the first used
 * slot; all ones: the first free one), or end; whole words at a time. */
static uint64_t next_bit(struct uswap_slots *s, uint64_t i, uint64_t end, uint64_t flip)
{
	while (i < end) {
		uint64_t w = (__atomic_load_n(&s->bits[WORD(i)], __ATOMIC_ACQUIRE) ^ flip) & (UINT64_MAX << (i & 63));
		if (w) {
			uint64_t j = (i & ~63ULL) + (uint64_t)__builtin_ctzll(w);
			return j < end ? j : end;
		}
		i = (i | 63) + 1;
	}
	return end;
}

static void mark_used(struct uswap_slots *s, struct uswap_slot_group *grp, uint64_t first, uint64_t n)
{
	for (uint64_t i = first; i < first + n;) {
		uint64_t k = 64 - (i & 63) < first + n - i ? 64 - (i & 63) : first + n - i;
		uint64_t mask = (k == 64 ? UINT64_MAX : (BIT(k) - 1)) << (i & 63);
		__atomic_fetch_or(&s->bits[WORD(i)], mask, __ATOMIC_RELAXED);
		i += k;
	}
	__atomic_add_fetch(&grp->in_use, (int64_t)n, __ATOMIC_RELAXED);
	__atomic_add_fetch(&s->in_use, (int64_t)n, __ATOMIC_RELAXED);
}

uint64_t uswap_slots_used_in(const struct uswap_slots *s, uint64_t first, uint64_t count)
{
	uint64_t used = 0, end = first + count < s->count ? first + count : s->count;
	for (uint64_t i = first; i < end;) {
		uint64_t k = 64 - (i & 63) < end - i ? 64 - (i & 63) : end - i;
		uint64_t mask = (k == 64 ? UINT64_MAX : (BIT(k) - 1)) << (i & 63);
		used += (uint64_t)__builtin_popcountll(__atomic_load_n(&s->bits[WORD(i)], __ATOMIC_RELAXED) & mask);
		i += k;
	}
	return used;
}

/* How far a search looks for a whole cluster before it settles for the longest run
 * it has seen: bounded, so a fragmented store costs a short scan, not a full one. */
#define SCAN_LIMIT 8192

/* A run of free slots in group grp from its next-fit position on (wrapping once): the
 * first of length want, else the longest seen in the first SCAN_LIMIT slots looked at
 * (the kernel's cluster allocator likewise settles for a fragment of a free cluster).
 * Its length, or 0: the group has no free slot. */
static uint64_t alloc_in(struct uswap_slots *s, struct uswap_slot_group *grp, uint64_t want, uint64_t *first)
{
	uint64_t best = 0, best_len = 0, scanned = 0;
	for (int pass = 0; pass < 2; pass++) {
		uint64_t i = pass ? grp->start : grp->next, end = pass ? grp->next : grp->end;
		while (i < end) {
			uint64_t j = next_bit(s, i, end, UINT64_MAX);   /* a free slot */
			if (j >= end)
				break;
			uint64_t k = next_bit(s, j, j + want < end ? j + want : end, 0);   /* its run's end */
			if (k - j > best_len) {
				best = j;
				best_len = k - j;
			}
			scanned += k - i;
			i = k;
			if (best_len == want || scanned >= SCAN_LIMIT)
				goto found;
		}
	}
	if (best_len == 0)
		return 0;
found:
	mark_used(s, grp, best, best_len);
	grp->next = best + best_len < grp->end ? best + best_len : grp->start;
	*first = best;
	return best_len;
}

/* A run of free slots in the first group (highest priority) that has one: its length
 * (1 to want), or -ENOSPC. */
int64_t uswap_slots_alloc(struct uswap_slots *s, uint64_t want, uint64_t *first)
{
	if (want == 0)
		return -EINVAL;
	for (uint32_t g = 0; g < s->ngroups; g++) {
		struct uswap_slot_group *grp = &s->groups[g];
		/* Only this thread sets bits (and counts them after); a free counts a slot
		 * out after clearing its bit: in_use is never below the bits set, so below the
		 * group's size the group has a free slot. */
		if (__atomic_load_n(&grp->in_use, __ATOMIC_RELAXED) >= (int64_t)(grp->end - grp->start))
			continue;
		uint64_t got = alloc_in(s, grp, want, first);
		if (got)
			return (int64_t)got;
	}
	return -ENOSPC;
}

/* Free slots first..first+count-1: their pool entries go first (P1: drop also waits
 * for a write-back of their old data in flight, and whatever it recorded in the codec
 * is final), then the codec forgets them (reading one is an error from now on), then
 * the bit clears (release: the allocator sees all three).
 * -EINVAL if one was free already (a double free: a bug, reported, the rest freed). */
int uswap_slots_release(struct uswap_slots *s, uint64_t first, uint64_t count)
{
	int ret = 0;
	if (first + count > s->count || first + count < first)
		return -ERANGE;
	if (s->pool)
		uswap_pool_drop(s->pool, first, count);
	for (uint64_t i = first; i < first + count; i++) {
		if (s->valid)
			__atomic_store_n(&s->valid[i], 0, __ATOMIC_RELAXED);
		uint64_t old = __atomic_fetch_and(&s->bits[WORD(i)], ~BIT(i), __ATOMIC_RELEASE);
		if (old & BIT(i)) {
			__atomic_sub_fetch(&group_of(s, i)->in_use, 1, __ATOMIC_RELAXED);
			__atomic_sub_fetch(&s->in_use, 1, __ATOMIC_RELAXED);
		}
		else
			ret = -EINVAL;
	}
	return ret;
}

/* Slots for a writeback batch: slots[i] for each page with zero[i] == 0 (-1 for the
 * all-zero ones, which need none), each run of such pages as few clusters as the
 * free space allows.  0, or -ENOSPC with no slot taken. */
int uswap_slots_assign(struct uswap_slots *s, const uint8_t *zero, int64_t *slots, uint64_t count)
{
	for (uint64_t i = 0; i < count; i++)
		slots[i] = -1;
	for (uint64_t i = 0; i < count;) {
		if (zero[i]) {
			i++;
			continue;
		}
		uint64_t end = i;
		while (end < count && !zero[end])
			end++;
		while (i < end) {
			uint64_t first;
			int64_t got = uswap_slots_alloc(s, end - i, &first);
			if (got < 0) {
				uswap_slots_release_list(s, slots, count);
				return (int)got;
			}
			for (int64_t k = 0; k < got; k++)
				slots[i + (uint64_t)k] = (int64_t)first + k;
			i += (uint64_t)got;
		}
	}
	return 0;
}

/* Free every slot >= 0 of the list, setting it to -1.  0, or the first error. */
int uswap_slots_release_list(struct uswap_slots *s, int64_t *slots, uint64_t count)
{
	int ret = 0;
	for (uint64_t i = 0; i < count; i++) {
		int r = slots[i] >= 0 ? uswap_slots_release(s, (uint64_t)slots[i], 1) : 0;
		if (r < 0 && ret == 0)
			ret = r;
		slots[i] = -1;
	}
	return ret;
}
