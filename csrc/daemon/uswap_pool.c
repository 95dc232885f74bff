/*
 * The compressed pool (see uswap_pool.h): zswap's place in uswap.
 *
 * An entry per pooled slot: its page compressed (lz4 or zstd) with the page's
 * crc32c (P2), or a same-filled page's word and no data (P3).  The index by
 * slot has two levels: a table of chunks of CHUNK_SLOTS entry pointers, each
 * chunk made on the first store into it and freed with its last entry, the
 * table itself made with the first chunk and freed with the last, so an empty
 * pool holds no memory.  The entries in the index are on a list in LRU order
 * (a store or a load puts its entry at the tail); write-back takes batches
 * from the head, oldest first, as zswap's shrinker does.
 *
 * Memory (charged): every malloc'd block at malloc_usable_size (entries, index
 * chunks, the table, zstd's cached contexts) and each write-back's buffer at
 * its mapped size, summed in bytes; the charge counter holds
 * ceil(bytes / page_size), moved by the difference at every change.  max_bytes
 * bounds bytes at every store; a write-back's buffer (at most WB_BATCH pages)
 * is charged while it lives, so during a write-back bytes may exceed max_bytes
 * by that buffer.  zstd's contexts are kept only while the pool holds entries.
 *
 * Locking: one mutex guards the index, the list, the counters and every
 * entry's header.  It is never held across compression, decompression or
 * I/O: an entry's data is read outside it under a pin (pins); an entry taken
 * out of the index while pinned is freed by its last unpin.  One write-back
 * batch is in flight at a time (writing_back); a thread that needs room while
 * one is in flight waits for it and looks again.
 *
 * P1 (a slot's old data written back never lands after new data of that slot):
 * an entry being written back is marked writing, stays in the index (loads are
 * served from it meanwhile) and is left only by its writer, which sets the
 * slot's valid flag once the write completed and then, under the lock, takes
 * the entry out and clears writing.  Whatever else would take a slot's entry
 * out or replace it (drop, which uswap_slots_release calls before the slot is
 * free; a store of the slot, accepted or rejected) first waits, under the
 * lock, until that slot's entry is not writing (settled).  So when drop
 * returns, or store returns 0 and its caller writes the page itself, no
 * write of the slot's old data is in flight and the codec's record of it
 * (crc or tag, valid) is final; the caller's own write (after encode) comes
 * after it.  A loader that finds no entry reads the store: an entry leaves
 * the index only after its data is there (valid set) or its slot was freed.
 *
 * Cost per 4 KiB page (2026-12-07, c5b3947; thread CPU time on this 2-vCPU VM
 * under a load average of 11, medians of 3 runs of 4096 pages): lz4 on
 * text-like pages (1940 bytes kept) store 12.2 us (of which LZ4_compress_default
 * 9.1, crc32c 0.6), load 4.8 us (LZ4_decompress_safe 3.8); a random page is
 * rejected in 2.1 us; zstd level 3 (1024 bytes kept) store 34 us, load 15 us,
 * a random page rejected in 14.6 us.
 */
#define _GNU_SOURCE
#include "uswap_pool.h"
#include "uswap_core.h"
#include "uswap_engine.h"

#include <errno.h>
#include <malloc.h>
#include <stddef.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <lz4.h>
#include <zstd.h>

#define CHUNK_SLOTS 512   /* slots per index chunk: 4 KiB of entry pointers */
#define WB_BATCH 64       /* entries a write-back takes at once (its buffer: as many pages) */
#define WB_SLACK 16       /* room made by a write-back for a store: 1/WB_SLACK of the pool beyond the store's */
#define CTX_CACHE 8       /* zstd contexts kept for reuse, each way (compression and decompression) */

struct pool_entry {
	struct pool_entry *prev, *next;   /* the LRU list (oldest at the head), while in_lru */
	uint64_t slot;
	uint64_t word;        /* same-filled (len 0): the word */
	size_t size;          /* charged: malloc_usable_size */
	uint32_t len;         /* compressed bytes in data; 0: same-filled */
	uint32_t crc;         /* crc32c of the page as stored (P2) */
	uint32_t pins;        /* readers of data outside the lock (loads, its write-back) */
	uint8_t in_lru;
	uint8_t writing;      /* its write-back is in flight (P1) */
	uint8_t dead;         /* out of the index: its last unpin frees it */
	char data[];
};

struct chunk_ref {
	struct pool_entry **e;   /* CHUNK_SLOTS pointers, or NULL */
	uint64_t used;
};

struct ctx_cache {
	void *ctx[CTX_CACHE];
	size_t size[CTX_CACHE];  /* what each is charged */
	int n;
};

struct uswap_pool {
	pthread_mutex_t lock;
	pthread_cond_t written;        /* a write-back batch finished (P1 waits, waits for room) */
	uint64_t slot_count;
	uint32_t page_size, cap;       /* cap: the most compressed bytes an entry keeps, 3/4 of a page */
	int compressor, level;
	int store_fd;
	const struct uswap_codec *codec;
	int64_t *charge;

	struct chunk_ref *table;       /* (slot_count + CHUNK_SLOTS - 1) / CHUNK_SLOTS, or NULL: no chunk */
	uint64_t chunks;               /* chunks allocated */
	struct pool_entry *head, *tail;
	uint64_t bytes;                /* allocated now (charged) */
	uint64_t charged;              /* pages added to *charge: ceil(bytes / page_size) */
	int writing_back;              /* a batch is in flight */
	uint32_t reject_run;           /* pages in a row that did not compress, up to USWAP_POOL_REJECT_RUN (atomic) */
	uint32_t probe;                /* stores during an incompressible run (atomic): every PROBE_EVERY-th tries */
	struct ctx_cache cctx, dctx;   /* zstd's (ZSTD_CCtx, ZSTD_DCtx) */
	struct uswap_pool_stats st;    /* gauges and counters (charged_pages, pool_bytes filled in by get_stats) */
};

/* ------------------------------------------------------------------ */
/* memory, charged (all under lock)                                    */
/* ------------------------------------------------------------------ */

static void account(struct uswap_pool *p, int64_t delta)
{
	p->bytes = (uint64_t)((int64_t)p->bytes + delta);
	uint64_t pages = (p->bytes + p->page_size - 1) / p->page_size;
	if (pages != p->charged) {
		if (p->charge)
			__atomic_add_fetch(p->charge, (int64_t)pages - (int64_t)p->charged, __ATOMIC_RELAXED);
		p->charged = pages;
	}
}

static void *charged_calloc(struct uswap_pool *p, size_t n, size_t size)
{
	void *x = calloc(n, size);
	if (x)
		account(p, (int64_t)malloc_usable_size(x));
	return x;
}

static void charged_free(struct uswap_pool *p, void *x)
{
	if (x) {
		account(p, -(int64_t)malloc_usable_size(x));
		free(x);
	}
}

/* ------------------------------------------------------------------ */
/* zstd's contexts: made on demand, kept (charged) while the pool holds entries */
/* ------------------------------------------------------------------ */

static size_t ctx_size(int compress, void *ctx)
{
	return compress ? ZSTD_sizeof_CCtx(ctx) : ZSTD_sizeof_DCtx(ctx);
}

static void ctx_destroy(int compress, void *ctx)
{
	if (compress)
		ZSTD_freeCCtx(ctx);
	else
		ZSTD_freeDCtx(ctx);
}

/* A context for this thread's use (give it back with ctx_put), or NULL. */
static void *ctx_take(struct uswap_pool *p, int compress, size_t *size)
{
	struct ctx_cache *c = compress ? &p->cctx : &p->dctx;
	pthread_mutex_lock(&p->lock);
	if (c->n > 0) {
		c->n--;
		*size = c->size[c->n];
		void *ctx = c->ctx[c->n];   /* read under the lock: a ctx_put may refill slot n at once */
		pthread_mutex_unlock(&p->lock);
		return ctx;
	}
	pthread_mutex_unlock(&p->lock);
	void *ctx = compress ? (void *)ZSTD_createCCtx() : (void *)ZSTD_createDCtx();
	if (!ctx)
		return NULL;
	*size = ctx_size(compress, ctx);
	pthread_mutex_lock(&p->lock);
	account(p, (int64_t)*size);
	pthread_mutex_unlock(&p->lock);
	return ctx;
}

/* Back into the cache (charged at its size now: a context grows with use), or freed when the cache is
 * full or the pool holds nothing. */
static void ctx_put(struct uswap_pool *p, int compress, void *ctx, size_t size)
{
	struct ctx_cache *c = compress ? &p->cctx : &p->dctx;
	size_t now = ctx_size(compress, ctx);
	pthread_mutex_lock(&p->lock);
	if (c->n < CTX_CACHE && p->st.stored_pages > 0) {
		account(p, (int64_t)now - (int64_t)size);
		c->ctx[c->n] = ctx;
		c->size[c->n++] = now;
		ctx = NULL;
	} else {
		account(p, -(int64_t)size);
	}
	pthread_mutex_unlock(&p->lock);
	if (ctx)
		ctx_destroy(compress, ctx);
}

/* The pool holds nothing: its contexts go (under lock). */
static void release_idle(struct uswap_pool *p)
{
	for (int compress = 0; compress < 2; compress++) {
		struct ctx_cache *c = compress ? &p->cctx : &p->dctx;
		while (c->n > 0) {
			c->n--;
			account(p, -(int64_t)c->size[c->n]);
			ctx_destroy(compress, c->ctx[c->n]);
		}
	}
}

/* ------------------------------------------------------------------ */
/* pages in and out                                                    */
/* ------------------------------------------------------------------ */

/* 1 if the page is one 64-bit word repeated (*word: it). */
static int same_filled(const void *page, size_t len, uint64_t *word)
{
	const uint64_t *w = page;
	uint64_t v = w[0];
	if (w[len / 8 - 1] != v)
		return 0;
	for (size_t i = 1; i < len / 8 - 1; i++)
		if (w[i] != v)
			return 0;
	*word = v;
	return 1;
}

/* Compress a page into dst (p->cap bytes): its length, 0 if it does not fit (rejected), or -ENOMEM. */
static int compress_page(struct uswap_pool *p, const void *page, char *dst)
{
	if (p->compressor == USWAP_POOL_LZ4) {
		int n = LZ4_compress_default(page, dst, (int)p->page_size, (int)p->cap);
		return n > 0 ? n : 0;
	}
	size_t size;
	ZSTD_CCtx *cctx = ctx_take(p, 1, &size);
	if (!cctx)
		return -ENOMEM;
	size_t n = ZSTD_compressCCtx(cctx, dst, p->cap, page, p->page_size, p->level);
	ctx_put(p, 1, cctx, size);
	return ZSTD_isError(n) ? 0 : (int)n;
}

/* An entry's page into buf (pinned, or under lock): 0, or -EBADMSG when it does not decompress to exactly
 * a page whose crc32c is the one taken at store (P2), or -ENOMEM. */
static int decompress_entry(struct uswap_pool *p, const struct pool_entry *e, void *buf)
{
	if (e->len == 0) {
		uint64_t *w = buf;
		for (size_t i = 0; i < p->page_size / 8; i++)
			w[i] = e->word;
		return 0;
	}
	int64_t n;
	if (p->compressor == USWAP_POOL_LZ4) {
		n = LZ4_decompress_safe(e->data, buf, (int)e->len, (int)p->page_size);
	} else {
		size_t size;
		ZSTD_DCtx *dctx = ctx_take(p, 0, &size);
		if (!dctx)
			return -ENOMEM;
		size_t r = ZSTD_decompressDCtx(dctx, buf, p->page_size, e->data, e->len);
		ctx_put(p, 0, dctx, size);
		n = ZSTD_isError(r) ? -1 : (int64_t)r;
	}
	if (n != (int64_t)p->page_size || uswap_crc32c(0, buf, p->page_size) != e->crc)
		return -EBADMSG;
	return 0;
}

/* ------------------------------------------------------------------ */
/* the index and the LRU list (all under lock)                         */
/* ------------------------------------------------------------------ */

static struct pool_entry *lookup(struct uswap_pool *p, uint64_t slot)
{
	if (!p->table)
		return NULL;
	struct chunk_ref *c = &p->table[slot / CHUNK_SLOTS];
	return c->e ? c->e[slot % CHUNK_SLOTS] : NULL;
}

/* Does storing into slot need a new chunk (or the table)?  Its bytes, before malloc's rounding. */
static uint64_t index_cost(struct uswap_pool *p, uint64_t slot)
{
	uint64_t cost = 0;
	if (!p->table)
		cost += (p->slot_count + CHUNK_SLOTS - 1) / CHUNK_SLOTS * sizeof(struct chunk_ref);
	if (!p->table || !p->table[slot / CHUNK_SLOTS].e)
		cost += CHUNK_SLOTS * sizeof(struct pool_entry *);
	return cost;
}

static int index_set(struct uswap_pool *p, uint64_t slot, struct pool_entry *e)
{
	if (!p->table) {
		p->table = charged_calloc(p, (p->slot_count + CHUNK_SLOTS - 1) / CHUNK_SLOTS, sizeof(struct chunk_ref));
		if (!p->table)
			return -ENOMEM;
	}
	struct chunk_ref *c = &p->table[slot / CHUNK_SLOTS];
	if (!c->e) {
		c->e = charged_calloc(p, CHUNK_SLOTS, sizeof(struct pool_entry *));
		if (!c->e) {
			if (p->chunks == 0) {
				charged_free(p, p->table);
				p->table = NULL;
			}
			return -ENOMEM;
		}
		p->chunks++;
	}
	c->e[slot % CHUNK_SLOTS] = e;
	c->used++;
	return 0;
}

/* The slot's pointer goes; an empty chunk with it, and the table with the last chunk. */
static void index_clear(struct uswap_pool *p, uint64_t slot)
{
	struct chunk_ref *c = &p->table[slot / CHUNK_SLOTS];
	c->e[slot % CHUNK_SLOTS] = NULL;
	if (--c->used == 0) {
		charged_free(p, c->e);
		c->e = NULL;
		if (--p->chunks == 0) {
			charged_free(p, p->table);
			p->table = NULL;
		}
	}
}

static void lru_unlink(struct uswap_pool *p, struct pool_entry *e)
{
	if (!e->in_lru)
		return;
	if (e->prev)
		e->prev->next = e->next;
	else
		p->head = e->next;
	if (e->next)
		e->next->prev = e->prev;
	else
		p->tail = e->prev;
	e->prev = e->next = NULL;
	e->in_lru = 0;
}

static void lru_add_tail(struct uswap_pool *p, struct pool_entry *e)
{
	e->next = NULL;
	e->prev = p->tail;
	if (p->tail)
		p->tail->next = e;
	else
		p->head = e;
	p->tail = e;
	e->in_lru = 1;
}

static void lru_add_head(struct uswap_pool *p, struct pool_entry *e)
{
	e->prev = NULL;
	e->next = p->head;
	if (p->head)
		p->head->prev = e;
	else
		p->tail = e;
	p->head = e;
	e->in_lru = 1;
}

/* Encode (crc or seal, in place) and write pages to contiguous slots first..first+n-1, one pwrite; the
 * slots are trusted (valid) only once the write completed.  0, or -errno.  *ios (if not NULL) counts it. */
static int write_span(const struct uswap_codec *c, int fd, char *at, uint64_t first, uint64_t n, uint64_t *ios)
{
	size_t ps = c->page_size;
	memset(c->valid + first, 0, n);
	int ret = uswap_codec_encode(c, at, first, n);
	if (ret < 0)
		return ret;
	int64_t done = uswap_store_pwrite(c, fd, at, n * ps, (int64_t)((first + 1) * ps));
	if (ios)
		(*ios)++;
	if (done != (int64_t)(n * ps))
		return done < 0 ? (int)done : -EIO;
	memset(c->valid + first, 1, n);
	return 0;
}

static void free_entry(struct uswap_pool *p, struct pool_entry *e)
{
	account(p, -(int64_t)e->size);
	free(e);
}

static void unpin(struct uswap_pool *p, struct pool_entry *e)
{
	if (--e->pins == 0 && e->dead)
		free_entry(p, e);
}

/* Take e out of the index and the list; freed now, or by its last unpin. */
static void remove_entry(struct uswap_pool *p, struct pool_entry *e)
{
	index_clear(p, e->slot);
	lru_unlink(p, e);
	p->st.stored_pages--;
	p->st.same_filled_pages -= e->len == 0;
	p->st.compressed_bytes -= e->len;
	e->dead = 1;
	if (e->pins == 0)
		free_entry(p, e);
	if (p->st.stored_pages == 0)
		release_idle(p);
}

/* The slot's entry (or NULL) once no write-back of it is in flight: waits for its writer (P1). */
static struct pool_entry *settled(struct uswap_pool *p, uint64_t slot)
{
	struct pool_entry *e;
	while ((e = lookup(p, slot)) && e->writing)
		pthread_cond_wait(&p->written, &p->lock);
	return e;
}

/* ------------------------------------------------------------------ */
/* write-back (zswap_writeback_entry, a batch at a time)               */
/* ------------------------------------------------------------------ */

enum { WB_PENDING = 0, WB_WRITTEN = 1, WB_CORRUPT = 2 };

static int by_slot(const void *a, const void *b)
{
	uint64_t x = (*(struct pool_entry *const *)a)->slot, y = (*(struct pool_entry *const *)b)->slot;
	return x < y ? -1 : x > y;
}

/* Unlocked, the batch pinned and writing: decompress it into buf (in slot order), then encode and write
 * each run of contiguous slots with one pwrite, the codec's valid flags set once a write completed.
 * An entry that fails its check (P2) is not written: its slot keeps valid 0, so a read of it fails
 * (-ENODATA) as one of a corrupted slot.  done[i]: what became of b[i].  0, or the first error (the
 * entries not written stay in the pool). */
static int write_batch(struct uswap_pool *p, struct pool_entry **b, int n, char *buf, uint8_t *done,
		       uint64_t *ios)
{
	const struct uswap_codec *c = p->codec;
	size_t ps = p->page_size;
	qsort(b, (size_t)n, sizeof(*b), by_slot);
	for (int i = 0; i < n; i++) {
		int r = decompress_entry(p, b[i], buf + (size_t)i * ps);
		if (r == -ENOMEM)
			return r;
		done[i] = r < 0 ? WB_CORRUPT : WB_PENDING;
	}
	for (int i = 0, k; i < n; i += k) {
		k = 1;
		if (done[i] == WB_CORRUPT)
			continue;
		while (i + k < n && done[i + k] != WB_CORRUPT && b[i + k]->slot == b[i]->slot + (uint64_t)k)
			k++;
		int ret = write_span(c, p->store_fd, buf + (size_t)i * ps, b[i]->slot, (uint64_t)k, ios);
		if (ret < 0)
			return ret;
		memset(done + i, WB_WRITTEN, (size_t)k);
	}
	return 0;
}

/* Write the oldest entries to the store and drop them: as many as free want bytes, up to WB_BATCH.
 * Under lock, dropped for the decompression and the I/O.  1: a batch was written, or another thread's
 * finished meanwhile (look again); 0: nothing to write back; -errno: the write failed (the entries not
 * written stay in the pool, oldest again).  *pages (if not NULL): entries written, added. */
static int write_back(struct uswap_pool *p, uint64_t want, uint64_t *pages)
{
	if (p->writing_back) {
		pthread_cond_wait(&p->written, &p->lock);
		return 1;
	}
	if (!p->head)
		return 0;
	struct pool_entry *b[WB_BATCH];
	uint8_t done[WB_BATCH];
	int n = 0;
	uint64_t freed = 0;
	while (n < WB_BATCH && p->head && freed < want) {
		struct pool_entry *e = p->head;
		freed += e->size;
		lru_unlink(p, e);
		e->writing = 1;
		e->pins++;
		b[n++] = e;
	}
	size_t len = (size_t)n * p->page_size;
	char *buf = uswap_map_buffer(p->page_size, len);
	if (!buf) {
		for (int i = n - 1; i >= 0; i--) {
			b[i]->writing = 0;
			lru_add_head(p, b[i]);
			unpin(p, b[i]);
		}
		return -ENOMEM;
	}
	p->writing_back = 1;
	account(p, (int64_t)len);
	pthread_mutex_unlock(&p->lock);

	uint64_t ios = 0;
	memset(done, WB_PENDING, sizeof(done));
	int ret = write_batch(p, b, n, buf, done, &ios);
	uswap_unmap_buffer(buf, len);

	pthread_mutex_lock(&p->lock);
	account(p, -(int64_t)len);
	p->st.write_ios += ios;
	for (int i = n - 1; i >= 0; i--) {   /* backwards: those put back keep their order at the head */
		struct pool_entry *e = b[i];
		e->writing = 0;
		if (done[i] == WB_PENDING) {
			lru_add_head(p, e);
		} else {
			if (done[i] == WB_WRITTEN) {
				p->st.written_back++;
				if (pages)
					(*pages)++;
			} else {
				p->st.corrupted++;
			}
			e->pins--;   /* out of the index first: remove_entry frees it when nothing else pins it */
			remove_entry(p, e);
			continue;
		}
		unpin(p, e);
	}
	p->writing_back = 0;
	pthread_cond_broadcast(&p->written);
	return ret < 0 ? ret : 1;
}

/* Room for need more bytes within max_bytes, writing the oldest entries back while there are any,
 * WB_SLACK of the pool more than need (zswap's accept threshold: a full pool is not written back one
 * page per store).  Under lock.  1: room; 0: none; -errno: a write-back failed. */
static int make_room(struct uswap_pool *p, uint64_t need)
{
	if (need > p->st.max_bytes)
		return 0;   /* it would not fit in an empty pool */
	while (p->bytes + need > p->st.max_bytes) {
		int r = write_back(p, p->bytes + need - p->st.max_bytes + p->st.max_bytes / WB_SLACK, NULL);
		if (r <= 0)
			return r;
	}
	return 1;
}

/* ------------------------------------------------------------------ */
/* the interface                                                       */
/* ------------------------------------------------------------------ */

int uswap_pool_new(uint64_t slot_count, uint32_t page_size, int compressor, int level, uint64_t max_bytes,
		   int store_fd, const struct uswap_codec *codec, int64_t *charge, struct uswap_pool **out)
{
	if (page_size < 64 || page_size > 65536 || page_size % 8 || !codec || codec->page_size != page_size || slot_count == 0
	    || slot_count > codec->slot_count)
		return -EINVAL;
	if (compressor == USWAP_POOL_ZSTD) {
		if (level == 0)
			level = ZSTD_CLEVEL_DEFAULT;
		if (level < ZSTD_minCLevel() || level > ZSTD_maxCLevel())
			return -EINVAL;
	} else if (compressor != USWAP_POOL_LZ4 || level != 0) {
		return -EINVAL;   /* lz4 has no level (LZ4_compress_default) */
	}
	struct uswap_pool *p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->written, NULL);
	p->slot_count = slot_count;
	p->page_size = page_size;
	p->cap = page_size / 4 * 3;
	p->compressor = compressor;
	p->level = level;
	p->store_fd = store_fd;
	p->codec = codec;
	p->charge = charge;
	p->st.max_bytes = max_bytes;
	*out = p;
	return 0;
}

/* Nothing may use the pool any more (its users are stopped): every entry goes, unwritten. */
void uswap_pool_free(struct uswap_pool *p)
{
	if (!p)
		return;
	pthread_mutex_lock(&p->lock);
	while (p->head) {
		struct pool_entry *e = p->head;
		e->pins = 0;
		remove_entry(p, e);
	}
	release_idle(p);
	if (p->charge)
		__atomic_sub_fetch(p->charge, (int64_t)p->charged, __ATOMIC_RELAXED);
	pthread_mutex_unlock(&p->lock);
	pthread_cond_destroy(&p->written);
	pthread_mutex_destroy(&p->lock);
	free(p);
}

int uswap_pool_store(struct uswap_pool *p, uint64_t slot, const void *page)
{
	if (slot >= p->slot_count)
		return -ERANGE;
	uint64_t word = 0;
	int same = same_filled(page, p->page_size, &word);
	/* An incompressible run: most pages skip the attempt (USWAP_POOL_REJECT_RUN).  The counters are a
	 * heuristic shared by every storing thread: relaxed atomics, a lost update only moves a probe. */
	uint32_t run = __atomic_load_n(&p->reject_run, __ATOMIC_RELAXED);
	int skip = !same && run >= USWAP_POOL_REJECT_RUN &&
		   __atomic_fetch_add(&p->probe, 1, __ATOMIC_RELAXED) % USWAP_POOL_PROBE_EVERY != 0;
	/* Compressed on the stack (at most 48 KiB: page_size <= 64 KiB), then allocated at its length: an entry
	 * allocated at the cap and shrunk by realloc would leave a hole behind every entry, memory the charge
	 * does not see. */
	char tmp[skip || same ? 1 : p->cap];
	int len = 0;
	if (!skip && !same) {
		len = compress_page(p, page, tmp);
		if (len > 0 && run)
			__atomic_store_n(&p->reject_run, 0, __ATOMIC_RELAXED);
		else if (len <= 0 && run < USWAP_POOL_REJECT_RUN)   /* incompressible (or no zstd context) */
			__atomic_store_n(&p->reject_run, run + 1, __ATOMIC_RELAXED);
	}
	struct pool_entry *e = NULL;
	if (same || len > 0) {
		e = malloc(offsetof(struct pool_entry, data) + (size_t)len);
		if (e && len > 0)
			memcpy(e->data, tmp, (size_t)len);
	}
	if (e) {   /* field by field: data may begin inside sizeof(*e) (its tail padding) */
		e->prev = e->next = NULL;
		e->pins = 0;
		e->in_lru = e->writing = e->dead = 0;
		e->slot = slot;
		e->word = word;
		e->len = (uint32_t)len;
		e->crc = same ? 0 : uswap_crc32c(0, page, p->page_size);
		e->size = malloc_usable_size(e);
	}
	pthread_mutex_lock(&p->lock);
	struct pool_entry *old = settled(p, slot);
	if (old)
		remove_entry(p, old);   /* replaced, or the caller writes the store: either way it is stale */
	int ret = e ? make_room(p, e->size + index_cost(p, slot)) : 0;
	if (ret == 1) {
		old = settled(p, slot);   /* the lock was dropped for a write-back: a store of the slot meanwhile */
		if (old)
			remove_entry(p, old);
		if (index_set(p, slot, e) < 0)
			ret = 0;
	}
	if (ret == 1) {
		account(p, (int64_t)e->size);
		lru_add_tail(p, e);
		p->st.stored_pages++;
		p->st.same_filled_pages += same;
		p->st.compressed_bytes += e->len;
		p->st.stores++;
		__atomic_store_n(&p->codec->valid[slot], 0, __ATOMIC_RELAXED);   /* the store's copy is stale */
	} else if (ret == 0) {
		p->st.rejected++;
		p->st.skipped += skip;
	}
	pthread_mutex_unlock(&p->lock);
	if (ret != 1)
		free(e);
	return ret;
}

int uswap_pool_load(struct uswap_pool *p, uint64_t slot, void *buf)
{
	if (slot >= p->slot_count)
		return 0;
	pthread_mutex_lock(&p->lock);
	struct pool_entry *e = lookup(p, slot);
	if (!e) {
		pthread_mutex_unlock(&p->lock);
		return 0;
	}
	if (e->in_lru) {   /* LRU: a load makes it the newest */
		lru_unlink(p, e);
		lru_add_tail(p, e);
	}
	int ret;
	if (e->len == 0) {
		ret = decompress_entry(p, e, buf);   /* a fill: no data to pin */
	} else {
		e->pins++;
		pthread_mutex_unlock(&p->lock);
		ret = decompress_entry(p, e, buf);
		pthread_mutex_lock(&p->lock);
		unpin(p, e);
	}
	if (ret < 0)
		p->st.corrupted += ret == -EBADMSG;
	else
		p->st.loads++;
	pthread_mutex_unlock(&p->lock);
	return ret < 0 ? ret : 1;
}

void uswap_pool_drop(struct uswap_pool *p, uint64_t first, uint64_t count)
{
	uint64_t end = first + count < p->slot_count && first + count >= first ? first + count : p->slot_count;
	pthread_mutex_lock(&p->lock);
	for (uint64_t s = first; s < end && p->table; s++) {
		if (!p->table[s / CHUNK_SLOTS].e) {   /* a chunk with nothing in it: skip it whole */
			s = (s / CHUNK_SLOTS + 1) * CHUNK_SLOTS - 1;
			continue;
		}
		struct pool_entry *e = settled(p, s);
		if (e)
			remove_entry(p, e);
	}
	pthread_mutex_unlock(&p->lock);
}

int64_t uswap_pool_shrink(struct uswap_pool *p, uint64_t target_bytes)
{
	uint64_t pages = 0;
	int ret = 1;
	pthread_mutex_lock(&p->lock);
	while (p->bytes > target_bytes && ret == 1)
		ret = write_back(p, p->bytes - target_bytes, &pages);
	pthread_mutex_unlock(&p->lock);
	return ret < 0 ? ret : (int64_t)pages;
}

void uswap_pool_get_stats(struct uswap_pool *p, struct uswap_pool_stats *out)
{
	pthread_mutex_lock(&p->lock);
	*out = p->st;
	out->charged_pages = p->charged;
	out->pool_bytes = p->bytes;
	pthread_mutex_unlock(&p->lock);
}

int uswap_pool_damage(struct uswap_pool *p, uint64_t slot)
{
	int ret = -ENOENT;
	pthread_mutex_lock(&p->lock);
	struct pool_entry *e = slot < p->slot_count ? lookup(p, slot) : NULL;
	if (e && e->len) {
		e->data[e->len / 2] ^= 0x10;
		ret = 0;
	}
	pthread_mutex_unlock(&p->lock);
	return ret;
}

/* ------------------------------------------------------------------ */
/* contiguous runs of slots, pool first (Python's store paths, the run engine, writeback) */
/* ------------------------------------------------------------------ */

int uswap_pool_write_slots(const struct uswap_codec *c, int fd, void *buf, uint64_t first, uint64_t count,
			   uint64_t *ios)
{
	size_t ps = c->page_size;
	if (first + count > c->slot_count || first + count < first)
		return -ERANGE;
	for (uint64_t i = 0; i < count;) {
		uint64_t n = 0;   /* pages i..i+n-1: rejected by the pool, written here */
		int kept = 0;
		while (i + n < count && !kept) {
			int r = c->pool ? uswap_pool_store(c->pool, first + i + n, (char *)buf + (i + n) * ps) : 0;
			if (r < 0)
				return r;
			kept = r;
			n += !kept;
		}
		if (n) {
			int ret = write_span(c, fd, (char *)buf + i * ps, first + i, n, ios);
			if (ret < 0)
				return ret;
		}
		i += n + (uint64_t)kept;
	}
	return 0;
}

int uswap_pool_read_slots(const struct uswap_codec *c, int fd, void *buf, uint64_t first, uint64_t count,
			  uint64_t *ios, int *bad)
{
	size_t ps = c->page_size;
	if (bad)
		*bad = -1;
	if (first + count > c->slot_count || first + count < first)
		return -ERANGE;
	for (uint64_t i = 0; i < count;) {
		uint64_t n = 0;   /* pages i..i+n-1: not pooled, read here */
		int pooled = 0;
		while (i + n < count && !pooled) {
			int r = c->pool ? uswap_pool_load(c->pool, first + i + n, (char *)buf + (i + n) * ps) : 0;
			if (r < 0) {
				if (bad)
					*bad = (int)(i + n);
				return r;
			}
			pooled = r;
			n += !pooled;
		}
		if (n) {
			char *at = (char *)buf + i * ps;
			int64_t got = uswap_store_pread(c, fd, at, n * ps, (int64_t)((first + i + 1) * ps));
			if (ios)
				(*ios)++;
			if (got != (int64_t)(n * ps))
				return got < 0 ? (int)got : -EIO;
			int b = 0;
			int ret = uswap_codec_decode(c, at, first + i, n, &b);
			if (ret < 0) {
				if (bad)
					*bad = (int)i + b;
				return ret;
			}
		}
		i += n + (uint64_t)pooled;
	}
	return 0;
}
