/*
 * A run process's page table (see uswap_pt.h): an open-addressing hash of
 * page numbers with linear probing, deletion by backward shift (no
 * tombstones), grown at half full.  Page number 0 (address 0, never
 * mappable) marks an empty bucket.
 */
#define _GNU_SOURCE
#include "uswap_pt.h"
#include "uswap_core.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>

#define PAGE_SHIFT 12
#define MIN_BUCKETS 1024

struct uswap_pt {
	pthread_mutex_t lock;
	uint64_t mask;                 /* buckets - 1; buckets a power of two */
	uint64_t used;
	uint64_t *key;                 /* page number, 0: empty */
	uint64_t *val;
	uint64_t count[USWAP_PT_STATES];
};

static inline uint64_t bucket_of(const struct uswap_pt *pt, uint64_t key)
{
	return (key * 0x9E3779B97F4A7C15ull) >> 17 & pt->mask;
}

static inline uint32_t state_of(uint64_t entry) { return (uint32_t)(entry & USWAP_PT_STATE_MASK); }

/* The buckets are mappings of their own (uswap_map_buffer): a process's table goes back to the system with it. */
static void free_buckets(uint64_t *key, uint64_t *val, uint64_t n)
{
	uswap_unmap_buffer(key, n * sizeof(*key));
	uswap_unmap_buffer(val, n * sizeof(*val));
}

static int alloc_buckets(struct uswap_pt *pt, uint64_t n)
{
	uint64_t *key = uswap_map_buffer(sizeof(*key), n * sizeof(*key));
	uint64_t *val = uswap_map_buffer(sizeof(*val), n * sizeof(*val));
	if (!key || !val) {
		free_buckets(key, val, n);
		return -ENOMEM;
	}
	pt->key = key;
	pt->val = val;
	pt->mask = n - 1;
	return 0;
}

int uswap_pt_new(struct uswap_pt **out)
{
	struct uswap_pt *pt = calloc(1, sizeof(*pt));
	if (!pt)
		return -ENOMEM;
	if (alloc_buckets(pt, MIN_BUCKETS) < 0) {
		free(pt);
		return -ENOMEM;
	}
	pthread_mutex_init(&pt->lock, NULL);
	*out = pt;
	return 0;
}

void uswap_pt_free(struct uswap_pt *pt)
{
	if (!pt)
		return;
	pthread_mutex_destroy(&pt->lock);
	free_buckets(pt->key, pt->val, pt->mask + 1);
	free(pt);
}

void uswap_pt_lock(struct uswap_pt *pt) { pthread_mutex_lock(&pt->lock); }
void uswap_pt_unlock(struct uswap_pt *pt) { pthread_mutex_unlock(&pt->lock); }

/* The bucket holding key, or the empty one where it would go. */
static uint64_t find(const struct uswap_pt *pt, uint64_t key)
{
	uint64_t b = bucket_of(pt, key);
	while (pt->key[b] && pt->key[b] != key)
		b = (b + 1) & pt->mask;
	return b;
}

/* Remove the entry in bucket b, shifting back the ones after it that probed past it. */
static void remove_at(struct uswap_pt *pt, uint64_t b)
{
	pt->count[state_of(pt->val[b])]--;
	pt->used--;
	uint64_t hole = b;
	for (uint64_t next = (b + 1) & pt->mask; pt->key[next]; next = (next + 1) & pt->mask) {
		uint64_t home = bucket_of(pt, pt->key[next]);
		/* it may move to the hole if its home is not in (hole, next], cyclically */
		if (((next - home) & pt->mask) >= ((next - hole) & pt->mask)) {
			pt->key[hole] = pt->key[next];
			pt->val[hole] = pt->val[next];
			hole = next;
		}
	}
	pt->key[hole] = 0;
	pt->val[hole] = 0;
}

static int grow(struct uswap_pt *pt)
{
	uint64_t *key = pt->key, *val = pt->val, n = pt->mask + 1;
	if (alloc_buckets(pt, n * 2) < 0)
		return -ENOMEM;
	for (uint64_t b = 0; b < n; b++) {
		if (!key[b])
			continue;
		uint64_t to = find(pt, key[b]);
		pt->key[to] = key[b];
		pt->val[to] = val[b];
	}
	free_buckets(key, val, n);
	return 0;
}

uint64_t uswap_pt_get_locked(struct uswap_pt *pt, uint64_t addr)
{
	uint64_t b = find(pt, addr >> PAGE_SHIFT);
	return pt->key[b] ? pt->val[b] : 0;
}

int uswap_pt_set_locked(struct uswap_pt *pt, uint64_t addr, uint64_t entry, uint64_t *old)
{
	uint64_t key = addr >> PAGE_SHIFT, b = find(pt, key);
	*old = pt->key[b] ? pt->val[b] : 0;
	if (!entry) {
		if (pt->key[b])
			remove_at(pt, b);
		return 0;
	}
	if (pt->key[b]) {
		pt->count[state_of(pt->val[b])]--;
	} else {
		if (2 * (pt->used + 1) > pt->mask + 1) {
			if (grow(pt) < 0)
				return -ENOMEM;
			b = find(pt, key);
		}
		pt->key[b] = key;
		pt->used++;
	}
	pt->val[b] = entry;
	pt->count[state_of(entry)]++;
	return 0;
}

uint64_t uswap_pt_get(struct uswap_pt *pt, uint64_t addr)
{
	uswap_pt_lock(pt);
	uint64_t e = uswap_pt_get_locked(pt, addr);
	uswap_pt_unlock(pt);
	return e;
}

int uswap_pt_set(struct uswap_pt *pt, uint64_t addr, uint64_t entry, uint64_t *old)
{
	uswap_pt_lock(pt);
	int ret = uswap_pt_set_locked(pt, addr, entry, old);
	uswap_pt_unlock(pt);
	return ret;
}

int uswap_pt_swap(struct uswap_pt *pt, uint64_t addr, uint64_t expect, uint64_t entry)
{
	uint64_t old;
	int ret = 0;
	uswap_pt_lock(pt);
	if (uswap_pt_get_locked(pt, addr) == expect)
		ret = uswap_pt_set_locked(pt, addr, entry, &old) < 0 ? -ENOMEM : 1;
	uswap_pt_unlock(pt);
	return ret;
}

int uswap_pt_claim(struct uswap_pt *pt, uint64_t addr, uint64_t *entry)
{
	int ret = 0;
	uswap_pt_lock(pt);
	uint64_t b = find(pt, addr >> PAGE_SHIFT), e = pt->key[b] ? pt->val[b] : 0;
	if (state_of(e) != USWAP_PT_SWAPPED)
		ret = -ENOENT;
	else if (e & USWAP_PT_BUSY)
		ret = -EBUSY;
	else
		pt->val[b] = *entry = e | USWAP_PT_BUSY;
	uswap_pt_unlock(pt);
	return ret;
}

/* A walk goes bucket by bucket, or, when its range has fewer pages than a quarter of the buckets, page by
 * page through the range (an event on a few pages of a process with a big table must not cost a scan of it
 * all: a program that frees memory often raises REMOVE and UNMAP as often).  The cursor's top bit says
 * which, decided at the first call. */
#define WALK_BY_PAGE (1ull << 63)

int uswap_pt_walk(struct uswap_pt *pt, uint64_t *cursor, uint64_t start, uint64_t end, uint32_t states,
		  int take, uint64_t *addrs, uint64_t *entries, int max)
{
	int n = 0;
	uswap_pt_lock(pt);
	uint64_t pages = (end - start) >> PAGE_SHIFT;
	if (*cursor == 0 && pages < (pt->mask + 1) / 4)
		*cursor = WALK_BY_PAGE;
	if (*cursor & WALK_BY_PAGE) {
		uint64_t i = *cursor & ~WALK_BY_PAGE;
		for (; i < pages && n < max; i++) {
			uint64_t a = (start & ~((1ull << PAGE_SHIFT) - 1)) + (i << PAGE_SHIFT), b = find(pt, a >> PAGE_SHIFT);
			if (!pt->key[b] || !(states & (1u << state_of(pt->val[b]))))
				continue;
			addrs[n] = a;
			entries[n++] = pt->val[b];
			if (take)
				remove_at(pt, b);
		}
		*cursor = WALK_BY_PAGE | i;
		uswap_pt_unlock(pt);
		return n;
	}
	uint64_t b = *cursor;
	while (b <= pt->mask && n < max) {
		uint64_t key = pt->key[b], a = key << PAGE_SHIFT;
		if (!key || a < start || a >= end || !(states & (1u << state_of(pt->val[b])))) {
			b++;
			continue;
		}
		addrs[n] = a;
		entries[n++] = pt->val[b];
		if (take)
			remove_at(pt, b);   /* an entry from after b may shift into b: look at b again */
		else
			b++;
	}
	*cursor = b;
	uswap_pt_unlock(pt);
	return n;
}

uint64_t uswap_pt_count(struct uswap_pt *pt, uint32_t state)
{
	uswap_pt_lock(pt);
	uint64_t n = state < USWAP_PT_STATES ? pt->count[state] : 0;
	uswap_pt_unlock(pt);
	return n;
}

int uswap_pt_claim_evict(struct uswap_pt *pt, uint64_t a, uint64_t n)
{
	uint64_t old;
	int ret = 1;
	uswap_pt_lock(pt);
	for (uint64_t i = 0; i < n && ret == 1; i++) {
		uint64_t e = uswap_pt_get_locked(pt, a + (i << PAGE_SHIFT));
		if (e && (state_of(e) != USWAP_PT_CLEAN || (e & USWAP_PT_BUSY)))
			ret = 0;
	}
	for (uint64_t i = 0; i < n && ret == 1; i++) {
		uint64_t p = a + (i << PAGE_SHIFT), e = uswap_pt_get_locked(pt, p);
		uint64_t next = e ? (e & ~(uint64_t)USWAP_PT_STATE_MASK) | USWAP_PT_INFLIGHT : USWAP_PT_CLAIMED;
		if (uswap_pt_set_locked(pt, p, next, &old) < 0) {
			while (i--) {   /* back as it was: CLAIMED pages lose their entry, INFLIGHT ones are CLEAN again */
				p = a + (i << PAGE_SHIFT);
				e = uswap_pt_get_locked(pt, p);
				uswap_pt_set_locked(pt, p, state_of(e) == USWAP_PT_INFLIGHT
						    ? (e & ~(uint64_t)USWAP_PT_STATE_MASK) | USWAP_PT_CLEAN : 0, &old);
			}
			ret = -ENOMEM;
		}
	}
	uswap_pt_unlock(pt);
	return ret;
}

int64_t uswap_pt_change(struct uswap_pt *pt, uint64_t a, uint64_t n, uint32_t from_mask, uint32_t to_state,
			uint64_t *old)
{
	int64_t changed = 0;
	uint64_t was;
	uswap_pt_lock(pt);
	for (uint64_t i = 0; i < n; i++) {
		uint64_t p = a + (i << PAGE_SHIFT), e = uswap_pt_get_locked(pt, p);
		if (old)
			old[i] = 0;
		if ((e & USWAP_PT_BUSY) || !(from_mask & (1u << state_of(e))))
			continue;
		uint64_t next = to_state ? (e & ~(uint64_t)(USWAP_PT_STATE_MASK | USWAP_PT_BUSY)) | to_state : 0;
		if (uswap_pt_set_locked(pt, p, next, &was) < 0)
			break;
		if (old)
			old[i] = e;
		changed++;
	}
	uswap_pt_unlock(pt);
	return changed;
}

int64_t uswap_pt_assign(struct uswap_pt *pt, const uint64_t *addrs, uint64_t n, uint32_t from, uint32_t to,
			int64_t first_slot, uint8_t *ok)
{
	int64_t changed = 0;
	uint64_t was;
	uswap_pt_lock(pt);
	for (uint64_t i = 0; i < n; i++) {
		uint64_t e = uswap_pt_get_locked(pt, addrs[i]);
		ok[i] = e && !(e & USWAP_PT_BUSY) && state_of(e) == from;
		if (ok[i])
			uswap_pt_set_locked(pt, addrs[i], to | (uint64_t)(first_slot + (int64_t)i + 1) << USWAP_PT_SLOT_SHIFT,
					    &was);   /* replaces: cannot fail */
		changed += ok[i];
	}
	uswap_pt_unlock(pt);
	return changed;
}

int uswap_pt_spans(struct uswap_pt *pt, uint64_t a, uint64_t n, uint32_t state, uint64_t *first, uint64_t *len,
		   int max)
{
	int k = 0;
	uswap_pt_lock(pt);
	for (uint64_t i = 0; i < n && k < max; i++) {
		uint64_t e = uswap_pt_get_locked(pt, a + (i << PAGE_SHIFT));
		if (!e || (e & USWAP_PT_BUSY) || state_of(e) != state)
			continue;
		if (k && first[k - 1] + (len[k - 1] << PAGE_SHIFT) == a + (i << PAGE_SHIFT)) {
			len[k - 1]++;
		} else {
			first[k] = a + (i << PAGE_SHIFT);
			len[k++] = 1;
		}
	}
	uswap_pt_unlock(pt);
	return k;
}
