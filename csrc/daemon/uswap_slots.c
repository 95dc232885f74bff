/* The slot allocator (uswap_slots.h): a bitmap, next-fit clusters, atomic frees. */
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
	if (!s->bits) {
		free(s);
		return -ENOMEM;
	}
	s->count = count;
	s->valid = valid;
	*out = s;
	return 0;
}

void uswap_slots_destroy(struct uswap_slots *s)
{
	if (s) {
		free(s->bits);
		free(s);
	}
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

static void mark_used(struct uswap_slots *s, uint64_t first, uint64_t n)
{
	for (uint64_t i = first; i < first + n;) {
		uint64_t k = 64 - (i & 63) < first + n - i ? 64 - (i & 63) : first + n - i;
		uint64_t mask = (k == 64 ? UINT64_MAX : (BIT(k) - 1)) << (i & 63);
		__atomic_fetch_or(&s->bits[WORD(i)], mask, __ATOMIC_RELAXED);
		i += k;
	}
	__atomic_add_fetch(&s->in_use, (int64_t)n, __ATOMIC_RELAXED);
}

/* How far a search looks for a whole cluster before it settles for the longest run
 * it has seen: bounded, so a fragmented store costs a short scan, not a full one. */
#define SCAN_LIMIT 8192

/* A run of free slots from the next-fit position on (wrapping once): the first of
 * length want, else the longest seen in the first SCAN_LIMIT slots looked at (the
 * kernel's cluster allocator likewise settles for a fragment of a free cluster).
 * Its length, or -ENOSPC. */
int64_t uswap_slots_alloc(struct uswap_slots *s, uint64_t want, uint64_t *first)
{
	uint64_t best = 0, best_len = 0, scanned = 0;
	if (want == 0)
		return -EINVAL;
	for (int pass = 0; pass < 2; pass++) {
		uint64_t i = pass ? 0 : s->next, end = pass ? s->next : s->count;
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
		return -ENOSPC;
found:
	mark_used(s, best, best_len);
	s->next = best + best_len < s->count ? best + best_len : 0;
	*first = best;
	return (int64_t)best_len;
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
		if (old & BIT(i))
			__atomic_sub_fetch(&s->in_use, 1, __ATOMIC_RELAXED);
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
