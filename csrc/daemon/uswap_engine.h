/*
 * The fault engine: the swap map of a region (one atomic word per page) and
 * a C thread per region that serves the common faults with no Python in the
 * loop; writeback's per-page work for the reclaimer.  Every decision that is
 * not per-page (budget, victims, slot allocation, error policy, NFS) stays in
 * Python; the engine forwards every fault it does not serve.
 *
 * Conventions as in uswap_core.h: -errno on failure, no Python, no globals.
 * Everything from CDEF-BEGIN to CDEF-END is also read by build.py as cffi
 * declarations.
 */
#ifndef USWAP_ENGINE_H
#define USWAP_ENGINE_H

#include <stddef.h>
#include <stdint.h>

/* The largest swap-in window, in pages: `uswap daemon --readahead` accepts 1 to this (uswap/daemon/options.py
 * reads it through the cdef); the engine's buffers and io_uring are sized for it. */
#define USWAP_MAX_READAHEAD 64

/* The most fault threads a region's engine runs: `uswap daemon --fault-threads` accepts 1 to this. */
#define USWAP_MAX_FAULT_THREADS 16

/* CDEF-BEGIN */

struct uswap_slots;   /* uswap_slots.h */

/* Page states (uswap.daemon.swapmap mirrors these) and the bits of a page's entry. */
enum {
	USWAP_ABSENT = 0,     /* never touched, or evicted while all zeros: a zero page on the next touch */
	USWAP_SWAPPED = 1,    /* in slot (entry >> 32) - 1, not in the memfd */
	USWAP_DIRTY = 2,      /* resident, writable, no slot */
	USWAP_CLEAN = 3,      /* resident, write-protected, identical to its slot (a swap-cache page) */
	USWAP_WRITEBACK = 4,  /* resident, write-protected, being written (busy is held by the writer) */
	USWAP_POISONED = 5,   /* its slot could not be read: SIGBUS for the toucher */
	USWAP_STATE_MASK = 7,
	USWAP_BUSY = 8,       /* claimed: only the holder changes the PTE, the memfd page or the slot */
	USWAP_REFERENCED = 16,/* touched since the CLOCK hand last passed */
	USWAP_SLOT_SHIFT = 32 /* slot + 1 in the high half; 0: no slot */
};

/* Resident pages of all regions, the budget line (above it reclaim runs: the engine wakes Python
 * with what it did) and the hard line (at it, a fault goes to Python, which throttles; below it
 * a readahead or zero-fill window is cut to what fits). */
struct uswap_budget {
	int64_t resident;     /* atomic */
	int64_t soft;
	int64_t hard;
};

struct uswap_swapmap {
	uint64_t pages;
	uint64_t *entry;      /* atomic, one per page */
	int64_t resident;     /* atomic: this region's resident pages */
	struct uswap_budget *budget;
};

/* A span of pages (first..first+count-1) in one state, and what uswap_map_claim_spans did. */
struct uswap_span {
	uint64_t first;
	uint32_t count;
	uint32_t state;
};

struct uswap_claimed {
	int taken;            /* spans claimed, one state each */
	int held;             /* spans of resident pages another holder has */
	uint64_t pages;       /* pages claimed */
	uint64_t end;         /* the first page not looked at */
};

struct uswap_pool;    /* uswap_pool.h */

/* How slots are checked (and decrypted) on the way back; the arrays belong to the store's codec.
 * pool: the compressed pool in front of the store (NULL: none): every writer of a slot through this codec
 * (uswap_wb_write, uswap_pool_write_slots) offers its page to the pool first and every reader (the engines,
 * uswap_pool_read_slots) looks there first; a pooled slot's valid flag is 0 (its bytes in the store are
 * stale) until the pool writes it back. */
struct uswap_codec {
	uint32_t page_size;
	uint64_t slot_count;
	uint8_t *valid;                 /* per slot: 1 = written since the store was opened */
	uint32_t *crc;                  /* crc32c per slot, when sealer is NULL */
	struct uswap_sealer *sealer;    /* AES-256-GCM, else NULL */
	uint64_t *gens;
	uint8_t *tags;
	struct uswap_pool *pool;        /* or NULL */
	/* A store with no file descriptor (nfs://): its slots are read and written through these, and the fd
	 * the engines and writeback are given is -1.  Python sets them from uswap._nfs (uswap_nfs_io_pread and
	 * _pwrite on a struct uswap_nfs_io): the core does not link libnfs.  Both NULL: the fd. */
	int64_t (*remote_pread)(void *remote, void *buf, uint64_t len, uint64_t off);
	int64_t (*remote_pwrite)(void *remote, const void *buf, uint64_t len, uint64_t off);
	void *remote;
	/* A remote store whose slots all lie in local files (a store set of local stores, uswap_storeset.h):
	 * the fd and offset of the bytes at off, and how many of len are contiguous there (> 0), or -errno.
	 * The engine's io_uring rings read through it (readahead in flight as on a local store).  NULL: the
	 * rings are not used on a remote store. */
	int64_t (*remote_local)(void *remote, uint64_t off, uint64_t len, int *fd, uint64_t *local_off);
};

/* What the engine tells Python, in order, through a ring and an eventfd. */
enum {
	USWAP_MSG_INSTALLED = 1,   /* pages first..first+count-1 swapped in (the slots of those that went in
				    * writable are freed by the engine) */
	USWAP_MSG_ZEROED = 2,      /* pages first..first+count-1 zero-filled (DIRTY) */
	USWAP_MSG_DIRTIED = 3,     /* a CLEAN page was written (the engine freed its slot) */
	USWAP_MSG_FORWARD = 4      /* a fault the engine did not serve: address, flags; slot: why (-errno:
				    * -ENOMEM above the hard line, -EBUSY a held page, -EAGAIN a state
				    * Python serves, -ENODEV a store the engine does not read, else the
				    * error of the read, check or install) */
};

struct uswap_engine_msg {
	uint32_t kind;
	uint32_t count;
	uint64_t first;
	uint64_t faulting;
	int64_t slot;              /* a freed span's first slot, or -1 */
	uint64_t address;
	uint64_t flags;
};

struct uswap_engine_stats {
	uint64_t engine_faults;    /* faults served in C */
	uint64_t forwarded;        /* faults handed to Python */
	uint64_t pswpin;
	uint64_t zero_fills;
	uint64_t wp_faults;
	uint64_t read_ios;
	uint64_t readahead;        /* pages installed ahead of a forward stream, before its fault */
};

struct uswap_engine;

/* The swap map. */
int uswap_swapmap_new(uint64_t pages, struct uswap_budget *budget, struct uswap_swapmap **out);
void uswap_swapmap_free(struct uswap_swapmap *m);
uint64_t uswap_map_entry(struct uswap_swapmap *m, uint64_t page);
int uswap_map_claim(struct uswap_swapmap *m, uint64_t page, uint64_t *entry);
void uswap_map_publish(struct uswap_swapmap *m, uint64_t page, uint32_t state, int64_t slot, int referenced);
int uswap_map_test_clear_referenced(struct uswap_swapmap *m, uint64_t first, uint64_t count);
void uswap_map_set_referenced(struct uswap_swapmap *m, uint64_t page);
/* Reclaim's claim of a CLOCK span: the unheld DIRTY and CLEAN pages of first..first+count-1, up to
 * most, as spans of one state (taken); resident pages someone else holds as spans (held: they stay
 * on the CLOCK); out->end: the first page not looked at (the batch or a span list filled up). */
int uswap_map_claim_spans(struct uswap_swapmap *m, uint64_t first, uint64_t count, uint64_t most,
			  struct uswap_span *taken, struct uswap_span *held, int max_spans, struct uswap_claimed *out);
uint64_t uswap_map_count(struct uswap_swapmap *m, uint32_t state);

/* The codec, for the engine and writeback. */
int uswap_codec_encode(const struct uswap_codec *c, void *buf, uint64_t first_slot, uint64_t count);
int uswap_codec_decode(const struct uswap_codec *c, void *buf, uint64_t first_slot, uint64_t count, int *bad);
/* len bytes of the store at byte off: through the codec's remote store if it has one, else fd.  len, or
 * fewer (end of file), or -errno. */
int64_t uswap_store_pread(const struct uswap_codec *c, int fd, void *buf, uint64_t len, int64_t off);
int64_t uswap_store_pwrite(const struct uswap_codec *c, int fd, const void *buf, uint64_t len, int64_t off);

/* The engine: threads (1 to USWAP_MAX_FAULT_THREADS) fault threads reading the region's uffd.
 * store_fd < 0 and no remote store in the codec: forward every fault (Python serves them).
 * slots: the daemon's allocator; the engine frees the slots of pages it makes writable. */
int uswap_engine_start(struct uswap_swapmap *m, int uffd, int memfd, uint64_t addr, uint32_t page_size,
		       int store_fd, const struct uswap_codec *codec, struct uswap_slots *slots,
		       uint32_t readahead, uint32_t threads, struct uswap_engine **out);
int uswap_engine_notify_fd(struct uswap_engine *e);
int uswap_engine_drain(struct uswap_engine *e, struct uswap_engine_msg *out, int max);
void uswap_engine_stats(struct uswap_engine *e, struct uswap_engine_stats *out);
void uswap_engine_stop(struct uswap_engine *e);
void uswap_engine_set_install_dirty(struct uswap_engine *e, int on);
void uswap_engine_free(struct uswap_engine *e);

/* Writeback of claimed pages (busy held by the caller), in three steps. */
int uswap_wb_prepare(struct uswap_swapmap *m, int uffd, int memfd, uint64_t addr, uint32_t page_size,
		     uint64_t first, uint64_t count, void *buf, uint8_t *zero);
int uswap_wb_write(int store_fd, const struct uswap_codec *codec, void *buf, const int64_t *slots, uint64_t count,
		   uint64_t *write_ios);
int uswap_wb_finish(struct uswap_swapmap *m, int uffd, int memfd, uint64_t addr, uint32_t page_size,
		    uint64_t first, uint64_t count, const int64_t *slots, const uint8_t *keep, int ok,
		    uint64_t *punches, uint64_t *swapped);
int uswap_drop_clean(struct uswap_swapmap *m, int memfd, uint32_t page_size, uint64_t first, uint64_t count);

/* The C floor of a random swap-in (uswap_probe.c), for `uswap bench`. */
int uswap_probe_swapin_floor(int store_fd, uint64_t slots, uint32_t page_size, uint32_t n, uint64_t *samples_ns);

/* CDEF-END */

#endif
