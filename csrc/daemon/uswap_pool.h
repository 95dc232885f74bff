/*
 * The compressed pool (zswap's place in uswap): store slots whose data is kept
 * compressed in daemon memory instead of written to the store.
 *
 * It sits at the slot level, under both kinds of client: whatever writes a slot
 * (a region's writeback, a run's eviction) offers the page to the pool first,
 * and whatever reads a slot (the region engine, a run's fault thread, Python's
 * forwarded faults) looks in the pool first.  A pooled slot is allocated in the
 * slot map like any other; its bytes in the store are stale until the pool
 * writes it back (oldest first, when the pool is full).  A slot's data lives in
 * exactly one place: the pool or the store.
 *
 * Memory: every byte the pool allocates (compressed data, entries, its index)
 * is charged, in pages, to an atomic counter the daemon's budget reads, so the
 * pool is paid for out of the budget, never on top of it.
 *
 * Invariants:
 *  P1  A slot's pool entry is dropped before the slot can be allocated again
 *      (uswap_slots_release calls uswap_pool_drop), and a store of new data for
 *      a slot never races the pool's own write-back of that slot's old data:
 *      the old write completes first, so the store never ends with stale bytes.
 *  P2  uswap_pool_load returns a page only if it decompresses to exactly a page
 *      and its crc32c matches the one taken at store time; else -EBADMSG.
 *  P3  Same-filled pages (one 64-bit word repeated) take an entry and no data.
 *
 * Thread safety: every call may come from any thread (fault threads, writeback
 * workers, the event loop).
 *
 * Conventions as in uswap_core.h: -errno on failure, no Python, no globals.
 */
#ifndef USWAP_POOL_H
#define USWAP_POOL_H

#include <stdint.h>

/* CDEF-BEGIN */

struct uswap_codec;   /* uswap_engine.h */

enum {
	USWAP_POOL_LZ4 = 1,
	USWAP_POOL_ZSTD = 2
};

/* Incompressible runs (a heap of random or already compressed pages): after USWAP_POOL_REJECT_RUN pages in a
 * row that did not compress, a store tries to compress only one page in USWAP_POOL_PROBE_EVERY (the others are
 * rejected at once, counted as rejected and as skipped) until a page compresses again. */
enum {
	USWAP_POOL_REJECT_RUN = 64,
	USWAP_POOL_PROBE_EVERY = 16
};

struct uswap_pool_stats {
	uint64_t stored_pages;      /* entries now */
	uint64_t same_filled_pages; /* of which same-filled (no data) */
	uint64_t compressed_bytes;  /* compressed data now */
	uint64_t charged_pages;     /* memory charged to the budget now */
	uint64_t max_bytes;
	uint64_t stores;            /* pages taken in */
	uint64_t loads;             /* pages read back */
	uint64_t rejected;          /* pages offered that did not compress enough (written to the store) */
	uint64_t skipped;           /* of which rejected with no attempt (an incompressible run) */
	uint64_t written_back;      /* pages written from the pool to the store to make room */
	uint64_t corrupted;         /* loads that failed their check (P2) */
	uint64_t pool_bytes;        /* memory allocated now (what max_bytes bounds; charged_pages is it in pages) */
	uint64_t write_ios;         /* pwrites of the pool's write-backs (contiguous slots go in one) */
};

struct uswap_pool;

/* A pool of at most max_bytes for a store of slot_count slots of page_size bytes.  store_fd and codec: where
 * and how it writes entries back (as uswap_wb_write does).  charge: an atomic page counter the pool adds its
 * memory to and takes it back from (e.g. a budget's resident count), or NULL.  level: zstd's (0: its default,
 * 3); lz4 takes 0 (LZ4_compress_default).  -EINVAL for anything else.
 * Memory: every allocation at malloc_usable_size (entries, the index's chunks, zstd's contexts), so 0 when
 * the pool holds nothing; a write-back's I/O buffer (at most 64 pages) is charged while it lives, so during
 * one the pool may hold that much over max_bytes. */
int uswap_pool_new(uint64_t slot_count, uint32_t page_size, int compressor, int level, uint64_t max_bytes,
		   int store_fd, const struct uswap_codec *codec, int64_t *charge, struct uswap_pool **out);
void uswap_pool_free(struct uswap_pool *p);
/* Keep page as slot's data: 1 kept; 0 not (it does not compress to at most 3/4 of a page, or there is no room
 * even after writing old entries back): the caller writes it to the store itself.  -errno: a write-back failed.
 * Whatever it returns, the slot's older entry is gone, after its write-back if one was in flight (P1). */
int uswap_pool_store(struct uswap_pool *p, uint64_t slot, const void *page);
/* Slot's data into buf: 1 if pooled, 0 if not (read the store), -EBADMSG (P2), -ENOMEM (zstd: no context). */
int uswap_pool_load(struct uswap_pool *p, uint64_t slot, void *buf);
/* Forget the entries of slots first..first+count-1 (freed, or about to be written to the store); waits for
 * a write-back of one of them in flight (P1). */
void uswap_pool_drop(struct uswap_pool *p, uint64_t first, uint64_t count);
/* Write the oldest entries to the store until the pool holds at most target_bytes.  Pages written, or -errno. */
int64_t uswap_pool_shrink(struct uswap_pool *p, uint64_t target_bytes);
void uswap_pool_get_stats(struct uswap_pool *p, struct uswap_pool_stats *out);
/* For tests (the negative control of P2): flip one bit of slot's stored data.  0, or -ENOENT: not pooled, or
 * same-filled. */
int uswap_pool_damage(struct uswap_pool *p, uint64_t slot);

/* A contiguous run of slots, pool first, for callers outside the engines (Python's store write_slots and
 * read_slots).  c->pool NULL: the store alone.  Write: each page offered to the pool, the rest encoded in
 * place (crc or seal, as uswap_wb_write) and written, one pwrite per run of rejected pages; valid set once a
 * write completed.  Read: pooled pages decompressed into buf, the rest read (one pread per run) and decoded.
 * 0, or -errno (-EBADMSG: a check failed (P2 or the codec's), -ENODATA: a slot never written); *bad (if not
 * NULL): the run's index of the page that failed a check, else -1.  *ios (if not NULL): pwrites or preads done,
 * added. */
int uswap_pool_write_slots(const struct uswap_codec *c, int fd, void *buf, uint64_t first, uint64_t count,
			   uint64_t *ios);
int uswap_pool_read_slots(const struct uswap_codec *c, int fd, void *buf, uint64_t first, uint64_t count,
			  uint64_t *ios, int *bad);

/* CDEF-END */

#endif
