/* A store set (uswap_storeset.h): priority groups of members striped by clusters, one virtual slot space. */
#include "uswap_storeset.h"
#include "uswap_core.h"
#include "uswap_slots.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define C USWAP_SET_CLUSTER

/* A run of rounds in which the same members take turns, one cluster each. */
struct phase {
	uint64_t vstart;                /* its first cluster, relative to the group's */
	uint64_t base;                  /* the members' cluster of its first round */
	uint64_t rounds;
	uint32_t n;
	uint32_t member[USWAP_SET_MAX_MEMBERS];
};

struct group {
	uint64_t start, end;            /* virtual slots [start, end) */
	uint32_t nphases;
	struct phase phases[USWAP_SET_MAX_MEMBERS];
};

struct member {
	struct uswap_set_member spec;
	uint64_t units;                 /* its units of `copies` clusters */
	struct uswap_set_member_stats stats;   /* atomic counters; stats.down is the down flag */
};

/* A virtual cluster's word (copies > 1):
 *   bits 0-7   STALE(c): copy c is stale (it missed a write);
 *   bits 8-15  writes to the cluster in flight;
 *   bits 16-31 writes to the cluster ended (wrapping).
 * RS1: resync clears STALE(c) with one compare-and-swap against the word it read before copying the cluster,
 * with no write in flight then: any write that began or ended during the copy changed the word, so the mark
 * stays and the cluster is copied again later; a copy is never marked good over data a write left behind. */
#define STALE(c) (1u << (c))
#define STALE_MASK 0xffu
#define WRITE_BEGUN (1u << 8)
#define IN_FLIGHT_MASK 0xff00u
#define WRITE_ENDED (1u << 16)

struct uswap_storeset {
	uint32_t page_size;
	uint32_t copies;
	uint32_t nmembers, ngroups;
	uint64_t slot_count;
	uint32_t *cluster_words;        /* copies > 1: one per virtual cluster (RS1) */
	struct member members[USWAP_SET_MAX_MEMBERS];
	struct group groups[USWAP_SET_MAX_MEMBERS];
};

/* The group's phases: one per distinct member size, the members that reach it taking turns; a phase of
 * fewer members than copies ends the group (those that remain hold nothing). */
static void plan_group(struct uswap_storeset *set, struct group *g, const uint32_t *idx, uint32_t n)
{
	uint64_t level = 0, vstart = 0;
	for (;;) {
		uint64_t next = UINT64_MAX;     /* the smallest size above level */
		for (uint32_t i = 0; i < n; i++)
			if (set->members[idx[i]].units > level && set->members[idx[i]].units < next)
				next = set->members[idx[i]].units;
		if (next == UINT64_MAX)
			break;
		struct phase *p = &g->phases[g->nphases];
		p->n = 0;
		for (uint32_t i = 0; i < n; i++)
			if (set->members[idx[i]].units >= next)
				p->member[p->n++] = idx[i];
		if (p->n < set->copies)
			break;
		g->nphases++;
		p->vstart = vstart;
		p->base = level;
		p->rounds = next - level;
		for (uint32_t i = 0; i < p->n; i++)
			set->members[p->member[i]].stats.slots += p->rounds * C * set->copies;
		vstart += p->rounds * p->n;
		level = next;
	}
	g->end = g->start + vstart * C;
}

int uswap_storeset_new(uint32_t page_size, const struct uswap_set_member *members, uint32_t n, uint32_t copies,
		       struct uswap_storeset **out)
{
	if (n == 0 || n > USWAP_SET_MAX_MEMBERS || page_size == 0 || copies == 0 || copies > USWAP_SET_MAX_COPIES)
		return -EINVAL;
	for (uint32_t i = 0; i < n; i++)
		if (members[i].slots < (uint64_t)C * copies ||
		    (members[i].fd < 0 && (!members[i].remote_pread || !members[i].remote_pwrite)))
			return -EINVAL;
	struct uswap_storeset *set = calloc(1, sizeof(*set));
	if (!set)
		return -ENOMEM;
	set->page_size = page_size;
	set->copies = copies;
	set->nmembers = n;
	for (uint32_t i = 0; i < n; i++) {
		set->members[i].spec = members[i];
		set->members[i].units = members[i].slots / ((uint64_t)C * copies);
	}
	/* Groups by priority, highest first; members of a group in the order given. */
	uint8_t placed[USWAP_SET_MAX_MEMBERS] = {0};
	for (uint32_t done = 0; done < n;) {
		int32_t prio = INT32_MIN;
		for (uint32_t i = 0; i < n; i++)
			if (!placed[i] && members[i].prio >= prio)
				prio = members[i].prio;
		uint32_t idx[USWAP_SET_MAX_MEMBERS], k = 0;
		for (uint32_t i = 0; i < n; i++)
			if (!placed[i] && members[i].prio == prio) {
				idx[k++] = i;
				placed[i] = 1;
			}
		if (k < copies) {
			free(set);
			return -EINVAL;
		}
		struct group *g = &set->groups[set->ngroups++];
		g->start = set->slot_count;
		plan_group(set, g, idx, k);
		set->slot_count = g->end;
		done += k;
	}
	if (copies > 1) {
		set->cluster_words = calloc(set->slot_count / C, sizeof(*set->cluster_words));
		if (!set->cluster_words) {
			free(set);
			return -ENOMEM;
		}
	}
	*out = set;
	return 0;
}

void uswap_storeset_free(struct uswap_storeset *set)
{
	if (set)
		free(set->cluster_words);
	free(set);
}

uint64_t uswap_storeset_slot_count(const struct uswap_storeset *set)
{
	return set->slot_count;
}

uint32_t uswap_storeset_copies(const struct uswap_storeset *set)
{
	return set->copies;
}

uint32_t uswap_storeset_groups(const struct uswap_storeset *set, uint64_t *ends, uint32_t max)
{
	for (uint32_t g = 0; g < set->ngroups && g < max; g++)
		ends[g] = set->groups[g].end;
	return set->ngroups;
}

int uswap_storeset_locate(const struct uswap_storeset *set, uint64_t v, uint32_t copy, uint32_t *member,
			  uint64_t *member_slot, uint64_t *run)
{
	if (v >= set->slot_count || copy >= set->copies)
		return -ERANGE;
	const struct group *g = set->groups;
	while (v >= g->end)
		g++;
	uint64_t cluster = (v - g->start) / C, within = (v - g->start) % C;
	const struct phase *p = g->phases;
	while (cluster >= p->vstart + p->rounds * p->n)
		p++;
	uint64_t k = cluster - p->vstart;
	*member = p->member[(k % p->n + copy) % p->n];
	*member_slot = ((p->base + k / p->n) * set->copies + copy) * C + within;
	*run = C - within;
	return 0;
}

static void count(uint64_t *counter, uint64_t n)
{
	__atomic_add_fetch(counter, n, __ATOMIC_RELAXED);
}

static int64_t member_io(struct member *mb, void *p, uint64_t bytes, uint64_t moff, int write)
{
	int64_t r;
	if (write)
		r = mb->spec.fd >= 0 ? uswap_pwrite_full(mb->spec.fd, p, bytes, (int64_t)moff)
				     : mb->spec.remote_pwrite(mb->spec.remote, p, bytes, moff);
	else
		r = mb->spec.fd >= 0 ? uswap_pread_full(mb->spec.fd, p, bytes, (int64_t)moff)
				     : mb->spec.remote_pread(mb->spec.remote, p, bytes, moff);
	count(write ? &mb->stats.writes : &mb->stats.reads, 1);
	if (r != (int64_t)bytes) {
		r = r < 0 ? r : -EIO;
		count(&mb->stats.errors, 1);
		__atomic_store_n(&mb->stats.last_error, (int32_t)r, __ATOMIC_RELAXED);
		return r;
	}
	count(write ? &mb->stats.write_bytes : &mb->stats.read_bytes, bytes);
	__atomic_store_n(&mb->stats.last_error, 0, __ATOMIC_RELAXED);
	return r;
}

/* With copies: a member that failed, or whose remote store says it is unreachable, is down until a resync
 * probe succeeds. */
static int member_down(struct member *mb)
{
	if (__atomic_load_n(&mb->stats.down, __ATOMIC_ACQUIRE))
		return 1;
	if (mb->spec.remote_up && !mb->spec.remote_up(mb->spec.remote)) {
		__atomic_store_n(&mb->stats.down, 1, __ATOMIC_RELEASE);
		return 1;
	}
	return 0;
}

static void mark_down(struct member *mb)
{
	__atomic_store_n(&mb->stats.down, 1, __ATOMIC_RELEASE);
}

/* Copy c of virtual slot v: its member and byte offset there. */
static struct member *place(struct uswap_storeset *set, uint64_t v, uint32_t c, uint64_t *moff)
{
	uint32_t m;
	uint64_t mslot, run;
	uswap_storeset_locate(set, v, c, &m, &mslot, &run);
	*moff = (mslot + 1) * set->page_size;
	return &set->members[m];
}

struct copy_write {
	struct member *mb;
	void *p;
	uint64_t bytes, moff;
	int64_t r;
};

static void *copy_write_thread(void *arg)
{
	struct copy_write *w = arg;
	w->r = member_io(w->mb, w->p, w->bytes, w->moff, 1);
	return NULL;
}

/* The writes at once: the first on this thread, the others each on a thread of its own (the members are
 * different stores, often different servers: a write costs the slowest, not the sum); inline if a thread
 * cannot be made. */
static void write_at_once(struct copy_write *w, uint32_t n)
{
	pthread_t threads[USWAP_SET_MAX_COPIES];
	int started[USWAP_SET_MAX_COPIES] = {0};
	for (uint32_t i = 1; i < n; i++)
		started[i] = pthread_create(&threads[i], NULL, copy_write_thread, &w[i]) == 0;
	copy_write_thread(&w[0]);
	for (uint32_t i = 1; i < n; i++) {
		if (started[i])
			pthread_join(threads[i], NULL);
		else
			copy_write_thread(&w[i]);
	}
}

/* k slots from virtual slot v, all in one cluster, to every copy that is not down (see the header); if every
 * copy is down, to each anyway, as a set of one copy would (the member may be back: a write that fails keeps
 * its pages). */
static int64_t write_copies(struct uswap_storeset *set, const void *p, uint64_t v, uint64_t k)
{
	uint32_t *word = &set->cluster_words[v / C], failed = 0, skipped = 0, written = 0;
	int64_t err = -EIO;
	__atomic_add_fetch(word, WRITE_BEGUN, __ATOMIC_ACQ_REL);
	for (uint32_t pass = 0; pass < 2 && !written; pass++) {
		struct copy_write w[USWAP_SET_MAX_COPIES];
		uint32_t copy[USWAP_SET_MAX_COPIES], n = 0;
		for (uint32_t c = 0; c < set->copies; c++) {
			struct copy_write *wc = &w[n];
			wc->mb = place(set, v, c, &wc->moff);
			if (pass == 0 && member_down(wc->mb))
				skipped |= STALE(c);
			else if (pass == 0 || (skipped & STALE(c))) {
				wc->p = (void *)p;
				wc->bytes = k * set->page_size;
				copy[n++] = c;
			}
		}
		write_at_once(w, n);
		for (uint32_t i = 0; i < n; i++) {
			if (w[i].r == (int64_t)w[i].bytes) {
				written++;
				continue;
			}
			failed |= STALE(copy[i]);
			err = w[i].r;
			mark_down(w[i].mb);
		}
	}
	/* End the write, marking the copies it missed if it is a write at all (one copy or more). */
	uint32_t missed = written ? (failed | skipped) : 0, old = __atomic_load_n(word, __ATOMIC_ACQUIRE), new;
	do
		new = (old | missed) + WRITE_ENDED - WRITE_BEGUN;
	while (!__atomic_compare_exchange_n(word, &old, new, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
	for (uint32_t c = 0; c < set->copies; c++)
		if ((missed & STALE(c)) && !(old & STALE(c))) {
			uint64_t moff;
			count(&place(set, v, c, &moff)->stats.stale_slots, C);
		}
	return written ? (int64_t)k * set->page_size : err;
}

/* k slots from virtual slot v, all in one cluster, from the first copy that is neither stale nor down; if
 * every good copy is down, from each anyway. */
static int64_t read_copies(struct uswap_storeset *set, void *p, uint64_t v, uint64_t k)
{
	uint64_t bytes = k * set->page_size;
	uint32_t stale = __atomic_load_n(&set->cluster_words[v / C], __ATOMIC_ACQUIRE) & STALE_MASK, skipped = 0;
	struct member *missed[USWAP_SET_MAX_COPIES];
	uint32_t nmissed = 0;
	int64_t err = -EIO;
	for (uint32_t pass = 0; pass < 2; pass++)
		for (uint32_t c = 0; c < set->copies; c++) {
			uint64_t moff;
			struct member *mb = place(set, v, c, &moff);
			if ((stale & STALE(c)) || (pass == 1 && !(skipped & STALE(c))))
				continue;
			if (pass == 0 && member_down(mb)) {
				skipped |= STALE(c);
				missed[nmissed++] = mb;
				continue;
			}
			int64_t r = member_io(mb, p, bytes, moff, 0);
			if (r == (int64_t)bytes) {
				for (uint32_t i = 0; i < nmissed; i++)
					if (missed[i] != mb)
						count(&missed[i]->stats.fallbacks, 1);
				return r;
			}
			err = r;
			mark_down(mb);
			if (pass == 0)
				missed[nmissed++] = mb;
		}
	return err;
}

/* Whole slots of the virtual store at byte off, one piece per cluster run, each to its member(s). */
static int64_t transfer(struct uswap_storeset *set, void *buf, uint64_t len, uint64_t off, int write)
{
	uint64_t ps = set->page_size;
	if (off % ps || len % ps || off < ps || (off / ps - 1) + len / ps > set->slot_count)
		return -EINVAL;
	uint64_t first = off / ps - 1, n = len / ps, done = 0;
	while (done < n) {
		/* SS1: a cluster is one piece (groups start on cluster boundaries) */
		uint64_t v = first + done, k = C - v % C < n - done ? C - v % C : n - done, bytes = k * ps;
		char *p = (char *)buf + done * ps;
		int64_t r;
		if (set->copies > 1) {
			r = write ? write_copies(set, p, v, k) : read_copies(set, p, v, k);
		} else {
			uint64_t moff;
			struct member *mb = place(set, v, 0, &moff);
			r = member_io(mb, p, bytes, moff, write);
		}
		if (r != (int64_t)bytes)
			return done ? (int64_t)(done * ps) : r;
		done += k;
	}
	return (int64_t)len;
}

int64_t uswap_storeset_pread(void *set, void *buf, uint64_t len, uint64_t off)
{
	return transfer(set, buf, len, off, 0);
}

int64_t uswap_storeset_pwrite(void *set, const void *buf, uint64_t len, uint64_t off)
{
	return transfer(set, (void *)buf, len, off, 1);
}

int64_t uswap_storeset_local(void *setp, uint64_t off, uint64_t len, int *fd, uint64_t *local_off)
{
	struct uswap_storeset *set = setp;
	uint64_t ps = set->page_size;
	if (off % ps || len % ps || len == 0 || off < ps || (off / ps - 1) + len / ps > set->slot_count)
		return -EINVAL;
	if (set->copies > 1)
		return -ENXIO;   /* reads choose among copies: uswap_storeset_pread */
	uint32_t m;
	uint64_t mslot, run;
	uswap_storeset_locate(set, off / ps - 1, 0, &m, &mslot, &run);
	struct member *mb = &set->members[m];
	if (mb->spec.fd < 0)
		return -ENXIO;
	uint64_t bytes = (run < len / ps ? run : len / ps) * ps;
	count(&mb->stats.reads, 1);
	count(&mb->stats.read_bytes, bytes);
	*fd = mb->spec.fd;
	*local_off = (mslot + 1) * ps;
	return (int64_t)bytes;
}

/* A down member answers again: its header page reads back.  buf: a page, aligned. */
static int probe(struct member *mb, void *buf, uint32_t page_size)
{
	/* not remote_up: an idle remote store that is down does not reconnect by itself; this read asks it to */
	int64_t r = mb->spec.fd >= 0 ? uswap_pread_full(mb->spec.fd, buf, page_size, 0)
				     : mb->spec.remote_pread(mb->spec.remote, buf, page_size, 0);
	if (r != (int64_t)page_size)
		return 0;
	__atomic_store_n(&mb->stats.down, 0, __ATOMIC_RELEASE);
	__atomic_store_n(&mb->stats.last_error, 0, __ATOMIC_RELAXED);
	return 1;
}

/* Copy the virtual cluster vc's good copy over its stale copy c (buf: a cluster, aligned); RS1. */
static void resync_cluster(struct uswap_storeset *set, uint64_t vc, uint32_t c, void *buf)
{
	uint32_t *word = &set->cluster_words[vc], before = __atomic_load_n(word, __ATOMIC_ACQUIRE);
	uint64_t v = vc * C, bytes = (uint64_t)C * set->page_size, moff;
	if (before & IN_FLIGHT_MASK)
		return;     /* a write is under way: the next pass */
	struct member *to = place(set, v, c, &moff);
	if (member_down(to))
		return;
	int64_t r = -EIO;
	for (uint32_t g = 0; g < set->copies && r != (int64_t)bytes; g++) {
		uint64_t goff;
		struct member *from = place(set, v, g, &goff);
		if (g != c && !(before & STALE(g)) && !member_down(from) &&
		    (r = member_io(from, buf, bytes, goff, 0)) < 0)
			mark_down(from);
	}
	if (r != (int64_t)bytes)
		return;     /* no good copy readable now */
	if (member_io(to, buf, bytes, moff, 1) != (int64_t)bytes) {
		mark_down(to);
		return;
	}
	if (__atomic_compare_exchange_n(word, &before, before & ~STALE(c), 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
		__atomic_sub_fetch(&to->stats.stale_slots, C, __ATOMIC_RELAXED);
		count(&to->stats.resynced_slots, C);
	}
}

int64_t uswap_storeset_resync(struct uswap_storeset *set, uint64_t max_clusters)
{
	if (set->copies == 1)
		return 0;
	void *buf;
	if (posix_memalign(&buf, 4096, (size_t)C * set->page_size))
		return -ENOMEM;
	for (uint32_t m = 0; m < set->nmembers; m++)
		if (__atomic_load_n(&set->members[m].stats.down, __ATOMIC_ACQUIRE))
			probe(&set->members[m], buf, set->page_size);
	int64_t left = 0;
	for (uint64_t vc = 0; vc < set->slot_count / C; vc++) {
		uint32_t stale = __atomic_load_n(&set->cluster_words[vc], __ATOMIC_ACQUIRE) & STALE_MASK;
		for (uint32_t c = 0; stale && c < set->copies; c++)
			if ((stale & STALE(c)) && max_clusters) {
				max_clusters--;
				resync_cluster(set, vc, c, buf);
			}
		left += (__atomic_load_n(&set->cluster_words[vc], __ATOMIC_ACQUIRE) & STALE_MASK) != 0;
	}
	free(buf);
	return left;
}

void uswap_storeset_stats(const struct uswap_storeset *set, uint32_t member, struct uswap_set_member_stats *out)
{
	memset(out, 0, sizeof(*out));
	if (member >= set->nmembers)
		return;
	const struct uswap_set_member_stats *s = &set->members[member].stats;
	out->reads = __atomic_load_n(&s->reads, __ATOMIC_RELAXED);
	out->writes = __atomic_load_n(&s->writes, __ATOMIC_RELAXED);
	out->read_bytes = __atomic_load_n(&s->read_bytes, __ATOMIC_RELAXED);
	out->write_bytes = __atomic_load_n(&s->write_bytes, __ATOMIC_RELAXED);
	out->errors = __atomic_load_n(&s->errors, __ATOMIC_RELAXED);
	out->stale_slots = __atomic_load_n(&s->stale_slots, __ATOMIC_RELAXED);
	out->fallbacks = __atomic_load_n(&s->fallbacks, __ATOMIC_RELAXED);
	out->resynced_slots = __atomic_load_n(&s->resynced_slots, __ATOMIC_RELAXED);
	out->down = __atomic_load_n(&s->down, __ATOMIC_RELAXED);
	out->last_error = __atomic_load_n(&s->last_error, __ATOMIC_RELAXED);
	out->slots = s->slots;
}

int uswap_storeset_used(const struct uswap_storeset *set, const struct uswap_slots *slots, uint64_t *used)
{
	if (slots->count != set->slot_count)
		return -EINVAL;
	for (uint32_t m = 0; m < set->nmembers; m++)
		used[m] = 0;
	for (uint32_t gi = 0; gi < set->ngroups; gi++) {
		const struct group *g = &set->groups[gi];
		for (uint32_t pi = 0; pi < g->nphases; pi++) {
			const struct phase *p = &g->phases[pi];
			for (uint64_t c = 0; c < p->rounds * p->n; c++) {
				uint64_t u = uswap_slots_used_in(slots, g->start + (p->vstart + c) * C, C);
				for (uint32_t copy = 0; copy < set->copies; copy++)
					used[p->member[(c % p->n + copy) % p->n]] += u;
			}
		}
	}
	return 0;
}
