/* The slot allocator (uswap_slots.h): a bitmap, next-fit clusters, atomic frees. */
#include "uswap_slots.h"

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

/* The first run of n clear bits in [from, to), or -1.  Whole words are skipped at once. */
static int64_t find_run(struct uswap_slots *s, uint64_t from, uint64_t to, uint64_t n)
{
	uint64_t run = 0, start = from;
	for (uint64_t i = from; i < to;) {
		uint64_t w = __atomic_load_n(&s->bits[WORD(i)], __ATOMIC_ACQUIRE);
		if ((i & 63) == 0 && w == UINT64_MAX) {
			run = 0;
			i += 64;
		} else if ((i & 63) == 0 && w == 0 && i + 64 <= to) {
			if (run == 0)
				start = i;
			run += 64;
			i += 64;
		} else if (w & BIT(i)) {
			run = 0;
			i++;
		} else {
			if (run == 0)
				start = i;
			run++;
			i++;
		}
		if (run >= n)
			return (int64_t)start;
	}
	return -1;
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

/* A run of free slots after the last one handed out (then from the start): the
 * longest up to want, trying halves of want before settling for fewer, like the
 * kernel's cluster allocator settling for a fragment.  Its length, or -ENOSPC. */
int64_t uswap_slots_alloc(struct uswap_slots *s, uint64_t want, uint64_t *first)
{
	for (uint64_t n = want; n >= 1; n /= 2) {
		int64_t at = find_run(s, s->next, s->count, n);
		if (at < 0)
			at = find_run(s, 0, s->count, n);
		if (at >= 0) {
			mark_used(s, (uint64_t)at, n);
			s->next = (uint64_t)at + n < s->count ? (uint64_t)at + n : 0;
			*first = (uint64_t)at;
			return (int64_t)n;
		}
	}
	return -ENOSPC;
}

/* Free slots first..first+count-1: the codec forgets them first (reading one is an
 * error from now on), then the bit clears (release: the allocator sees both).
 * -EINVAL if one was free already (a double free: a bug, reported, the rest freed). */
int uswap_slots_release(struct uswap_slots *s, uint64_t first, uint64_t count)
{
	int ret = 0;
	if (first + count > s->count || first + count < first)
		return -ERANGE;
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
