/* A store set (uswap_storeset.h): priority groups of members striped by clusters, one virtual slot space. */
#include "uswap_storeset.h"
#include "uswap_core.h"
#include "uswap_slots.h"

#include <errno.h>
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
	uint64_t clusters;
	struct uswap_set_member_stats stats;   /* atomic counters */
};

struct uswap_storeset {
	uint32_t page_size;
	uint32_t nmembers, ngroups;
	uint64_t slot_count;
	struct member members[USWAP_SET_MAX_MEMBERS];
	struct group groups[USWAP_SET_MAX_MEMBERS];
};

/* The group's phases: one per distinct member size, the members that reach it taking turns. */
static void plan_group(struct uswap_storeset *set, struct group *g, const uint32_t *idx, uint32_t n)
{
	uint64_t level = 0, vstart = 0;
	for (;;) {
		uint64_t next = UINT64_MAX;     /* the smallest size above level */
		for (uint32_t i = 0; i < n; i++)
			if (set->members[idx[i]].clusters > level && set->members[idx[i]].clusters < next)
				next = set->members[idx[i]].clusters;
		if (next == UINT64_MAX)
			break;
		struct phase *p = &g->phases[g->nphases++];
		p->vstart = vstart;
		p->base = level;
		p->rounds = next - level;
		for (uint32_t i = 0; i < n; i++)
			if (set->members[idx[i]].clusters >= next)
				p->member[p->n++] = idx[i];
		vstart += p->rounds * p->n;
		level = next;
	}
	g->end = g->start + vstart * C;
}

int uswap_storeset_new(uint32_t page_size, const struct uswap_set_member *members, uint32_t n,
		       struct uswap_storeset **out)
{
	if (n == 0 || n > USWAP_SET_MAX_MEMBERS || page_size == 0)
		return -EINVAL;
	for (uint32_t i = 0; i < n; i++)
		if (members[i].slots < C || (members[i].fd < 0 && (!members[i].remote_pread || !members[i].remote_pwrite)))
			return -EINVAL;
	struct uswap_storeset *set = calloc(1, sizeof(*set));
	if (!set)
		return -ENOMEM;
	set->page_size = page_size;
	set->nmembers = n;
	for (uint32_t i = 0; i < n; i++) {
		set->members[i].spec = members[i];
		set->members[i].clusters = members[i].slots / C;
		set->members[i].stats.slots = set->members[i].clusters * C;
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
		struct group *g = &set->groups[set->ngroups++];
		g->start = set->slot_count;
		plan_group(set, g, idx, k);
		set->slot_count = g->end;
		done += k;
	}
	*out = set;
	return 0;
}

void uswap_storeset_free(struct uswap_storeset *set)
{
	free(set);
}

uint64_t uswap_storeset_slot_count(const struct uswap_storeset *set)
{
	return set->slot_count;
}

uint32_t uswap_storeset_groups(const struct uswap_storeset *set, uint64_t *ends, uint32_t max)
{
	for (uint32_t g = 0; g < set->ngroups && g < max; g++)
		ends[g] = set->groups[g].end;
	return set->ngroups;
}

int uswap_storeset_locate(const struct uswap_storeset *set, uint64_t v, uint32_t *member, uint64_t *member_slot,
			  uint64_t *run)
{
	if (v >= set->slot_count)
		return -ERANGE;
	const struct group *g = set->groups;
	while (v >= g->end)
		g++;
	uint64_t cluster = (v - g->start) / C, within = (v - g->start) % C;
	const struct phase *p = g->phases;
	while (cluster >= p->vstart + p->rounds * p->n)
		p++;
	uint64_t k = cluster - p->vstart;
	*member = p->member[k % p->n];
	*member_slot = (p->base + k / p->n) * C + within;
	*run = C - within;
	return 0;
}

static void count(uint64_t *counter, uint64_t n)
{
	__atomic_add_fetch(counter, n, __ATOMIC_RELAXED);
}

/* Whole slots of the virtual store at byte off, one piece per cluster run, each to its member. */
static int64_t transfer(struct uswap_storeset *set, void *buf, uint64_t len, uint64_t off, int write)
{
	uint64_t ps = set->page_size;
	if (off % ps || len % ps || off < ps || (off / ps - 1) + len / ps > set->slot_count)
		return -EINVAL;
	uint64_t first = off / ps - 1, n = len / ps, done = 0;
	while (done < n) {
		uint32_t m;
		uint64_t mslot, run;
		uswap_storeset_locate(set, first + done, &m, &mslot, &run);
		uint64_t k = run < n - done ? run : n - done, bytes = k * ps;
		struct member *mb = &set->members[m];
		char *p = (char *)buf + done * ps;
		uint64_t moff = (mslot + 1) * ps;
		int64_t r;
		if (write)
			r = mb->spec.fd >= 0 ? uswap_pwrite_full(mb->spec.fd, p, bytes, (int64_t)moff)
					     : mb->spec.remote_pwrite(mb->spec.remote, p, bytes, moff);
		else
			r = mb->spec.fd >= 0 ? uswap_pread_full(mb->spec.fd, p, bytes, (int64_t)moff)
					     : mb->spec.remote_pread(mb->spec.remote, p, bytes, moff);
		count(write ? &mb->stats.writes : &mb->stats.reads, 1);
		if (r != (int64_t)bytes) {
			count(&mb->stats.errors, 1);
			__atomic_store_n(&mb->stats.last_error, r < 0 ? (int32_t)r : -EIO, __ATOMIC_RELAXED);
			return r < 0 ? r : (int64_t)(done * ps) + r;
		}
		count(write ? &mb->stats.write_bytes : &mb->stats.read_bytes, bytes);
		__atomic_store_n(&mb->stats.last_error, 0, __ATOMIC_RELAXED);
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
	uint32_t m;
	uint64_t mslot, run;
	uswap_storeset_locate(set, off / ps - 1, &m, &mslot, &run);
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
			for (uint64_t c = 0; c < p->rounds * p->n; c++)
				used[p->member[c % p->n]] += uswap_slots_used_in(slots, g->start + (p->vstart + c) * C, C);
		}
	}
	return 0;
}
