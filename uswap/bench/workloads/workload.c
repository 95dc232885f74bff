/*
 * workload: page-access patterns for measuring swap, in uswap regions or in
 * plain anonymous memory (kernel swap), timed from inside.
 *
 *   cc -O2 workload.c $(uswap config --cflags --libs) -o workload
 *   workload seq|random|zipf|threads [-s MiB] [-n ACCESSES] [-w WRITE%] [-S SEED] [-a] [-o FILE] [-F] [-f FRACTION]
 *            [-t THREADS]
 *
 *   seq     write every page, then read every page in order
 *   random  write every page, then ACCESSES uniform random page accesses
 *   zipf    write every page, then ACCESSES Zipf(0.99)-distributed accesses
 *   threads THREADS threads (-t, default 8) on the one shared mapping: each writes its share
 *           of the pages, then makes its share of ACCESSES uniform random accesses; a write
 *           bumps the page's write counter, a read verifies the page's name and that its
 *           counter holds at least the writes completed before the read began
 *
 * Every access is timed with the vDSO clock; one that takes over 1 µs is
 * counted as a fault (a resident access takes ~0.1 µs) and goes into the
 * latency percentiles.  Every page is verified at the end, every word of it:
 * its first word names the page, its second counts the writes it got, the
 * next FRACTION of the rest (-f, 0 to 1; default 0) comes from a PRNG seeded
 * per page (incompressible), and the remainder is zeros.
 * Output: one line of key=value pairs; exit 1 on any mismatch.  -o FILE also
 * writes every fault latency (ns, sorted, native-endian uint32) to FILE.  -F leaves the
 * first-touch (fill) phase out of the timing.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "uswap.h"

#define FAULT_NS 1000

static uint64_t rng = 88172645463325252ULL;

static uint64_t next(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static inline uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

/* the random part of page p: xorshift64*, seeded per page, so the check regenerates it */
static uint64_t page_next(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 0x2545F4914F6CDD1DULL;
}

static uint64_t page_seed(uint64_t seed, size_t page)
{
	return (seed ^ (0x9E3779B97F4A7C15ULL * (page + 1))) | 1;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return x < y ? -1 : x > y;
}

struct timing {
	uint32_t *ns;   /* latencies of faulting accesses */
	size_t faults, cap;
};

static void record(struct timing *t, uint64_t ns)
{
	if (ns < FAULT_NS)
		return;
	if (t->faults < t->cap)
		t->ns[t->faults] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
	t->faults++;
}

/* one access to page p: read its words, or bump its write counter */
static inline void access_page(uint64_t *mem, size_t words, size_t p, int write, uint32_t *writes,
			       struct timing *t, volatile uint64_t *sink)
{
	uint64_t *w = mem + p * words;
	uint64_t t0 = now_ns();
	if (write) {
		w[1] += 1;
		writes[p]++;
	} else {
		*sink += w[0];
	}
	record(t, now_ns() - t0);
}

/* The threads mode: one thread's share of the fill and of the random accesses. */
struct worker {
	pthread_t thread;
	uint64_t *mem;
	uint32_t *writes;
	size_t words, pages, first, last, accesses, noise;
	uint64_t seed, rng;
	int write_pct, time_fill;
	struct timing t;
	size_t mismatches;   /* reads that saw a wrong name or fewer writes than were done */
};

static uint64_t worker_next(struct worker *w)
{
	w->rng ^= w->rng << 13;
	w->rng ^= w->rng >> 7;
	w->rng ^= w->rng << 17;
	return w->rng;
}

static void *worker_main(void *arg)
{
	struct worker *k = arg;
	for (size_t p = k->first; p < k->last; p++) {
		uint64_t t0 = now_ns();
		k->mem[p * k->words] = p ^ k->seed;
		if (k->time_fill)
			record(&k->t, now_ns() - t0);
		uint64_t s = page_seed(k->seed, p);
		for (size_t i = 0; i < k->noise; i++)
			k->mem[p * k->words + 2 + i] = page_next(&s);
	}
	return NULL;
}

static void *worker_access(void *arg)
{
	struct worker *k = arg;
	for (size_t i = 0; i < k->accesses; i++) {
		size_t p = worker_next(k) % k->pages;
		uint64_t *w = k->mem + p * k->words;
		int write = (int)(worker_next(k) % 100) < k->write_pct;
		uint64_t t0 = now_ns();
		if (write) {
			__atomic_add_fetch(&w[1], 1, __ATOMIC_RELAXED);
			__atomic_add_fetch(&k->writes[p], 1, __ATOMIC_RELEASE);   /* after the page's: counter >= writes */
		} else {
			uint32_t done = __atomic_load_n(&k->writes[p], __ATOMIC_ACQUIRE);
			uint64_t name = __atomic_load_n(&w[0], __ATOMIC_RELAXED), got = __atomic_load_n(&w[1], __ATOMIC_RELAXED);
			k->mismatches += name != (p ^ k->seed) || got < done;
		}
		record(&k->t, now_ns() - t0);
	}
	return NULL;
}

/* Run fn on every worker at once; 0, or the error of pthread_create. */
static int run_workers(struct worker *ws, int n, void *(*fn)(void *))
{
	int started = 0, err = 0;
	for (; started < n; started++) {
		err = pthread_create(&ws[started].thread, NULL, fn, &ws[started]);
		if (err)
			break;
	}
	for (int i = 0; i < started; i++)
		pthread_join(ws[i].thread, NULL);
	return err;
}

int main(int argc, char **argv)
{
	size_t mib = 256, accesses = 200000;
	int write_pct = 50, anon = 0, time_fill = 1, nthreads = 8, opt;
	double fill = 0;
	const char *dump = NULL;
	uint64_t seed = 1;
	const char *mode = argc > 1 ? argv[1] : "";
	optind = 2;
	while ((opt = getopt(argc, argv, "s:n:w:S:ao:Ff:t:")) != -1) {
		switch (opt) {
		case 's': mib = strtoull(optarg, NULL, 0); break;
		case 'n': accesses = strtoull(optarg, NULL, 0); break;
		case 'w': write_pct = atoi(optarg); break;
		case 'S': seed = strtoull(optarg, NULL, 0); break;
		case 'a': anon = 1; break;
		case 'o': dump = optarg; break;
		case 'F': time_fill = 0; break;
		case 'f': fill = strtod(optarg, NULL); break;
		case 't': nthreads = atoi(optarg); break;
		default: goto usage;
		}
	}
	int seq = !strcmp(mode, "seq"), random_ = !strcmp(mode, "random"), zipf = !strcmp(mode, "zipf");
	int threads = !strcmp(mode, "threads");
	if (!(seq || random_ || zipf || threads) || mib == 0 || !(fill >= 0 && fill <= 1) || nthreads < 1
	    || nthreads > 1024) {
usage:
		fprintf(stderr, "usage: %s seq|random|zipf|threads [-s MiB] [-n accesses] [-w write%%] [-S seed] [-a] "
			"[-o file] [-F] [-f fraction 0..1] [-t threads 1..1024]\n", argv[0]);
		return 2;
	}
	rng ^= seed * 0x9E3779B97F4A7C15ULL;
	long ps = sysconf(_SC_PAGESIZE);
	size_t bytes = mib << 20, pages = bytes / ps, words = ps / 8;
	size_t noise = (size_t)(fill * (words - 2) + 0.5);   /* random words per page, after the 2 header words */
	uint64_t *mem = anon ? mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
			     : uswap_map(bytes);
	if (mem == NULL || mem == MAP_FAILED) {
		fprintf(stderr, "workload: cannot map %zu bytes: %s %s\n", bytes, strerror(errno),
			anon ? "" : uswap_last_error());
		return 2;
	}
	uint32_t *writes = calloc(pages, sizeof(*writes));
	size_t ops = seq ? 2 * pages : pages + accesses;
	struct timing t = { .ns = malloc(ops * sizeof(uint32_t)), .cap = ops };
	double *cdf = NULL;
	if (zipf) { /* cumulative Zipf(0.99) weights over page ranks */
		cdf = malloc(pages * sizeof(*cdf));
		double sum = 0;
		for (size_t i = 0; i < pages; i++)
			cdf[i] = (sum += 1.0 / pow((double)(i + 1), 0.99));
		for (size_t i = 0; i < pages; i++)
			cdf[i] /= sum;
	}
	volatile uint64_t sink = 0;
	size_t read_mismatches = 0;
	uint64_t start = now_ns();
	if (threads) {
		struct worker *ws = calloc((size_t)nthreads, sizeof(*ws));
		for (int i = 0; i < nthreads; i++) {
			struct worker *k = &ws[i];
			*k = (struct worker){ .mem = mem, .writes = writes, .words = words, .pages = pages, .noise = noise,
					      .seed = seed, .rng = next() | 1, .write_pct = write_pct, .time_fill = time_fill,
					      .first = pages * i / nthreads, .last = pages * (i + 1) / nthreads,
					      .accesses = accesses / nthreads + (i < (int)(accesses % nthreads)) };
			k->t.cap = k->last - k->first + k->accesses;
			k->t.ns = malloc(k->t.cap * sizeof(uint32_t));
		}
		int err = run_workers(ws, nthreads, worker_main);
		if (!err)
			err = run_workers(ws, nthreads, worker_access);
		if (err) {
			fprintf(stderr, "workload: cannot start a thread: %s\n", strerror(err));
			return 2;
		}
		for (int i = 0; i < nthreads; i++) {   /* one timing of every thread's faults */
			size_t n = ws[i].t.faults < ws[i].t.cap ? ws[i].t.faults : ws[i].t.cap;
			for (size_t j = 0; j < n && t.faults < t.cap; j++)
				t.ns[t.faults++] = ws[i].t.ns[j];
			read_mismatches += ws[i].mismatches;
			free(ws[i].t.ns);
		}
		free(ws);
	}
	for (size_t p = 0; p < pages && !threads; p++) { /* write every page */
		uint64_t t0 = now_ns();
		mem[p * words] = p ^ seed;
		if (time_fill)
			record(&t, now_ns() - t0);
		uint64_t s = page_seed(seed, p);   /* after the timed first touch: not a fault */
		for (size_t i = 0; i < noise; i++)
			mem[p * words + 2 + i] = page_next(&s);
	}
	if (seq) {
		for (size_t p = 0; p < pages; p++)
			access_page(mem, words, p, 0, writes, &t, &sink);
	} else if (!threads) {
		for (size_t i = 0; i < accesses; i++) {
			size_t p;
			if (zipf) { /* binary search the CDF; rank r maps to a scattered page */
				double u = (next() >> 11) * (1.0 / 9007199254740992.0);
				size_t lo = 0, hi = pages - 1;
				while (lo < hi) {
					size_t mid = (lo + hi) / 2;
					if (cdf[mid] < u) lo = mid + 1; else hi = mid;
				}
				p = (lo * 2654435761u) % pages;
			} else {
				p = next() % pages;
			}
			access_page(mem, words, p, (int)(next() % 100) < write_pct, writes, &t, &sink);
		}
	}
	double wall = (now_ns() - start) / 1e9;
	size_t mismatches = read_mismatches;
	for (size_t p = 0; p < pages; p++) {
		uint64_t *w = mem + p * words, s = page_seed(seed, p);
		int bad = w[0] != (p ^ seed) || w[1] != writes[p];
		for (size_t i = 2; i < words; i++)
			bad |= w[i] != (i - 2 < noise ? page_next(&s) : 0);
		mismatches += bad;
	}
	size_t n = t.faults < t.cap ? t.faults : t.cap;
	qsort(t.ns, n, sizeof(uint32_t), cmp_u32);
	double p50 = n ? t.ns[n / 2] / 1e3 : 0, p99 = n ? t.ns[(size_t)(n * 0.99)] / 1e3 : 0;
	if (dump) {
		FILE *f = fopen(dump, "wb");
		if (!f || fwrite(t.ns, sizeof(uint32_t), n, f) != n || fclose(f) != 0) {
			fprintf(stderr, "workload: cannot write %s: %s\n", dump, strerror(errno));
			return 2;
		}
	}
	printf("mode=%s backend=%s pages=%zu accesses=%zu wall_s=%.3f faults=%zu fault_p50_us=%.1f "
	       "fault_p99_us=%.1f mismatches=%zu random_bytes_per_page=%zu threads=%d\n", mode, anon ? "anon" : "uswap",
	       pages, ops, wall, t.faults, p50, p99, mismatches, noise * 8, threads ? nthreads : 1);
	if (!anon)
		uswap_unmap(mem, bytes);
	return mismatches ? 1 : 0;
}
