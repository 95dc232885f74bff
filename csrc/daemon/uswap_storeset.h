/*
 * A store set: several stores (local fds or remote stores) behind one virtual
 * slot space, as `swapon -p` puts several swap areas behind one swap cache.
 *
 * The set is installed as the daemon's codec's remote store (uswap_engine.h,
 * struct uswap_codec: remote_pread/remote_pwrite/remote), so every C path that
 * reads or writes a slot reaches the members through uswap_storeset_pread/
 * _pwrite, with byte offsets of the virtual store: slot v at (v + 1) * page_size.
 *
 * Layout of the virtual slots:
 *   - members with equal priority form a group; the groups follow each other,
 *     highest priority first (the slot allocator's groups: uswap_slots.h), each
 *     ordered as the members were given;
 *   - within a group, slots are striped across its members by clusters of
 *     USWAP_SET_CLUSTER slots, round-robin (the kernel's equal-priority swap
 *     areas take turns); once the smaller members are full, the rest go on
 *     taking turns (a phase per distinct member size);
 *   - each member gives its whole clusters only: up to USWAP_SET_CLUSTER - 1
 *     slots at its end are not used.
 * Invariant: virtual slots of one cluster are contiguous in one member, so a
 * transfer is split only where it crosses a cluster boundary.
 *
 * Copies (copies > 1, like RAID 1 over the members of a group): every
 * virtual cluster has `copies` places on as many distinct members of its group.
 * A member's space is cut into units of copies clusters; in a round of a phase
 * (n >= copies members), virtual cluster k = round * n + i has copy c at
 * member (i + c) % n of the phase, in cluster c of that member's unit.  A phase
 * of fewer than `copies` members gives nothing.
 *   - A write goes to every copy whose member is not down.  It succeeds if one
 *     copy was written; a copy that failed or was skipped is then marked stale
 *     for its whole cluster (the slots around it are not rewritten), and its
 *     member down.  If every copy failed, nothing is marked: the write failed
 *     as a whole (the caller keeps the page), and the cluster's other slots are
 *     as good as before on every copy.
 *   - A read takes the first copy that is neither stale nor down, then the next
 *     on a failure (counted as a fallback of the member that failed).
 *   - uswap_storeset_resync brings members back: a down member is probed
 *     (its header page read); once it answers, each stale cluster is copied
 *     whole from a good copy, and the mark is cleared only if no write to the
 *     cluster began or ended meanwhile (RS1 at struct uswap_storeset).
 * The marks live in memory only: swap is not kept across daemon restarts.
 *
 * Counters per member (reads, writes, bytes, errors) are atomic: engine
 * threads, writeback threads and Python's worker threads transfer at once.
 * The layout is immutable after uswap_storeset_new; the marks and members'
 * down flags are atomic words.
 *
 * Conventions as in uswap_core.h: -errno on failure, no Python, no globals.
 */
#ifndef USWAP_STORESET_H
#define USWAP_STORESET_H

#include <stdint.h>

/* Slots per stripe cluster: 64 (256 KiB of 4 KiB pages) is the writeback batch (server.py WRITEBACK_BATCH),
 * so a batch's next-fit run mostly lands on one member in one write, twice the largest readahead window (32),
 * so a window is split at most once, and small enough that the stores of a group fill evenly (the kernel's
 * SWAPFILE_CLUSTER, 256, is an allocation unit per CPU, not a stripe). */
#define USWAP_SET_CLUSTER 64
#define USWAP_SET_MAX_MEMBERS 16
#define USWAP_SET_MAX_COPIES 2

/* CDEF-BEGIN */

struct uswap_slots;
struct uswap_storeset;

struct uswap_set_member {
	int32_t prio;                   /* higher fills first */
	uint64_t slots;                 /* the member's slot count (its header's) */
	int32_t fd;                     /* an O_DIRECT fd on it, or -1: the remote functions */
	int64_t (*remote_pread)(void *remote, void *buf, uint64_t len, uint64_t off);
	int64_t (*remote_pwrite)(void *remote, const void *buf, uint64_t len, uint64_t off);
	void *remote;
	/* With copies: 0 if the remote store is known unreachable now (its reads and writes would only wait),
	 * else 1; NULL: always try. */
	int (*remote_up)(void *remote);
};

struct uswap_set_member_stats {
	uint64_t reads, writes;         /* transfers (a set transfer split across members counts once per piece) */
	uint64_t read_bytes, write_bytes;
	uint64_t errors;                /* transfers that failed or came up short */
	int32_t last_error;             /* -errno of the last transfer (-EIO: short), 0 if it succeeded */
	uint64_t slots;                 /* slots it holds for the set (whole clusters; with copies, its copies') */
	uint64_t stale_slots;           /* with copies: slots in its clusters marked stale (copied back by resync) */
	uint64_t fallbacks;             /* with copies: reads it failed or skipped that another copy served */
	uint64_t resynced_slots;        /* with copies: slots copied back to it by resync */
	int32_t down;                   /* with copies: 1 from a failure until a resync probe succeeds */
};

/* n members (1 to USWAP_SET_MAX_MEMBERS), each of at least USWAP_SET_CLUSTER * copies slots; copies 1 to
 * USWAP_SET_MAX_COPIES, and with copies > 1 every priority group of at least `copies` members (-EINVAL). */
int uswap_storeset_new(uint32_t page_size, const struct uswap_set_member *members, uint32_t n, uint32_t copies,
		       struct uswap_storeset **out);
void uswap_storeset_free(struct uswap_storeset *set);
uint64_t uswap_storeset_slot_count(const struct uswap_storeset *set);
/* The priority groups' ends (for uswap_slots_set_groups): their number, at most max written. */
uint32_t uswap_storeset_groups(const struct uswap_storeset *set, uint64_t *ends, uint32_t max);
uint32_t uswap_storeset_copies(const struct uswap_storeset *set);
/* Where copy `copy` (0: the first) of virtual slot v lives: its member (given order), the member's slot,
 * and how many slots from v on are contiguous there.  0 or -ERANGE. */
int uswap_storeset_locate(const struct uswap_storeset *set, uint64_t v, uint32_t copy, uint32_t *member,
			  uint64_t *member_slot, uint64_t *run);
/* The remote store functions (struct uswap_codec): whole pages of slots, split at cluster boundaries.
 * len, fewer (a member came up short), or -errno (-EINVAL: not whole slots). */
int64_t uswap_storeset_pread(void *set, void *buf, uint64_t len, uint64_t off);
int64_t uswap_storeset_pwrite(void *set, const void *buf, uint64_t len, uint64_t off);
/* struct uswap_codec's remote_local, for a set of one copy whose members are all local files: the member's
 * fd and offset of the bytes at off, and how many of len are contiguous there; -EINVAL (not whole slots, or past the
 * end), -ENXIO (the member there has no fd).  Counted as a read of that member, as a transfer would be;
 * a failure of the read itself is the engine's to report. */
int64_t uswap_storeset_local(void *set, uint64_t off, uint64_t len, int *fd, uint64_t *local_off);
void uswap_storeset_stats(const struct uswap_storeset *set, uint32_t member, struct uswap_set_member_stats *out);
/* With copies: probe the members that are down (their header page read) and copy at most max_clusters
 * stale clusters back from a good copy.  Blocking (a probe of a server that is down waits as a read does);
 * one caller at a time.  The number of clusters still stale, or -ENOMEM. */
int64_t uswap_storeset_resync(struct uswap_storeset *set, uint64_t max_clusters);
/* Slots in use per member (used[member], given order), from the allocator's bitmap over the set's slots;
 * with copies, a slot in use counts at each member holding a copy. */
int uswap_storeset_used(const struct uswap_storeset *set, const struct uswap_slots *slots, uint64_t *used);

/* CDEF-END */

#endif
