/*
 * blockverify: concurrent random 4 KiB O_DIRECT writes and reads on a block
 * device or file, every read checked against what was last written there.
 *
 *   blockverify [-j THREADS] [-t SECONDS | -n OPS] [-w WRITE%] [-b BLOCKS]
 *               [-s SEED] [-i SECONDS] [-Z] DEVICE
 *
 *   -j  threads, one request each in flight: the queue depth (default 16)
 *   -t  run this long (default 5 s); -n  stop after this many operations
 *   -w  percentage of operations that are writes (default 50)
 *   -b  use only the first BLOCKS blocks (default: the whole device)
 *   -s  random seed (default: from the clock; printed)
 *   -i  print a progress line every SECONDS (stdout, flushed)
 *   -Z  no fill pass: a block never written must read as all zeros
 *
 * Thread t owns blocks t, t + THREADS, t + 2 * THREADS, ...: no two threads
 * ever touch one block, so each thread knows exactly what each of its blocks
 * must hold, and neighbouring blocks belong to different threads (data that
 * lands in the wrong block shows as the neighbour's).  Every 8-byte word of a
 * block written as generation G of block B is
 *
 *   B << 40 | (G & 0xffffff) << 16 | crc-ish 16 bits of (B, G, word index)
 *
 * so one word names the block and generation it came from, and a word moved
 * within a block, or from another block, or an older generation, fails.
 * Generation 0 is "never written" (all zeros); the fill pass writes
 * generation 1 of every block first, so that reads have something to check.
 * A block whose write failed holds unknown data until it is written again.
 *
 * Output: "seed=S blocks=B threads=T", "filled blocks=B" after the fill pass,
 * optional "progress t=MONOTONIC ops=N mismatches=M eio=K" lines (t is
 * CLOCK_MONOTONIC, the clock of Python's time.monotonic()), up to 10
 * "mismatch: ..." and 10 "error: ..." lines, and last
 * "ops=N mismatches=M eio=K" (eio: every failed or short pread/pwrite).
 * Exit status: 0 clean, 1 any mismatch or I/O error, 2 usage or setup error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define WORDS (BLOCK / 8)
#define UNKNOWN UINT32_MAX /* generation of a block whose last write failed */
#define MAX_REPORTS 10

static int fd, nthreads = 16, write_pct = 50, zero_start;
static uint64_t blocks, max_ops, seed;
static double seconds = 5, progress_every;
static volatile int stop;

/* shared counters (atomics): progress lines and the op budget */
static uint64_t ops_done, ops_claimed, mismatches, io_errors;
static int reports_left = MAX_REPORTS, errors_left = MAX_REPORTS;
static pthread_mutex_t print_lock = PTHREAD_MUTEX_INITIALIZER;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t word_of(uint64_t block, uint32_t gen, unsigned i)
{
	uint64_t h = block * 0x9e3779b97f4a7c15ULL ^ (uint64_t)gen * 0xc2b2ae3d27d4eb4fULL ^
		     (uint64_t)i * 0x165667b19e3779f9ULL;
	h ^= h >> 29;
	h *= 0xbf58476d1ce4e5b9ULL;
	h ^= h >> 32;
	return block << 40 | (uint64_t)(gen & 0xffffff) << 16 | (h & 0xffff);
}

static void fill(uint64_t *buf, uint64_t block, uint32_t gen)
{
	for (unsigned i = 0; i < WORDS; i++)
		buf[i] = gen ? word_of(block, gen, i) : 0;
}

static void say(int *left, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void say(int *left, const char *fmt, ...)
{
	va_list ap;
	pthread_mutex_lock(&print_lock);
	if (*left > 0) {
		(*left)--;
		va_start(ap, fmt);
		vprintf(fmt, ap);
		va_end(ap);
		fflush(stdout);
	}
	pthread_mutex_unlock(&print_lock);
}

/* Check a block read back; returns 1 on a mismatch (and reports the first bad word). */
static int verify(const uint64_t *buf, uint64_t block, uint32_t gen)
{
	if (gen == UNKNOWN)
		return 0;
	for (unsigned i = 0; i < WORDS; i++) {
		uint64_t want = gen ? word_of(block, gen, i) : 0;
		if (buf[i] == want)
			continue;
		uint64_t got = buf[i];
		uint64_t from = got >> 40;
		uint32_t from_gen = (got >> 16) & 0xffffff;
		const char *what = got == 0 ? "zeros" :
			from == block ? (from_gen == gen ? "this block, garbled" : "another generation") :
			from < blocks ? "another block's data" : "garbage";
		say(&reports_left, "mismatch: block %" PRIu64 " generation %u: word %u holds %#018" PRIx64
		    " (block %" PRIu64 " generation %u: %s)\n", block, gen, i, got, from, from_gen, what);
		return 1;
	}
	return 0;
}

static int io(int writing, uint64_t *buf, uint64_t block)
{
	ssize_t n = writing ? pwrite(fd, buf, BLOCK, block * BLOCK) : pread(fd, buf, BLOCK, block * BLOCK);
	if (n == BLOCK)
		return 0;
	__atomic_fetch_add(&io_errors, 1, __ATOMIC_RELAXED);
	say(&errors_left, "error: %s of block %" PRIu64 ": %s\n", writing ? "pwrite" : "pread", block,
	    n < 0 ? strerror(errno) : "short transfer");
	return -1;
}

struct worker {
	pthread_t thread;
	unsigned index;
	uint64_t rng;
	uint64_t count;   /* blocks owned: index, index + nthreads, ... */
	uint32_t *gen;    /* last generation written to each owned block */
	uint64_t *buf;
};

static uint64_t next_random(struct worker *w)
{
	w->rng ^= w->rng << 13;
	w->rng ^= w->rng >> 7;
	w->rng ^= w->rng << 17;
	return w->rng;
}

static void *fill_pass(void *arg)
{
	struct worker *w = arg;
	for (uint64_t k = 0; k < w->count; k++) {
		uint64_t block = w->index + k * nthreads;
		fill(w->buf, block, 1);
		w->gen[k] = io(1, w->buf, block) ? UNKNOWN : 1;
	}
	return NULL;
}

static void *random_pass(void *arg)
{
	struct worker *w = arg;
	while (!stop) {
		if (max_ops && __atomic_fetch_add(&ops_claimed, 1, __ATOMIC_RELAXED) >= max_ops)
			break;
		uint64_t k = next_random(w) % w->count, block = w->index + k * nthreads;
		if ((int)(next_random(w) % 100) < write_pct) {
			uint32_t gen = w->gen[k] == UNKNOWN || w->gen[k] == 0xffffff ? 1 : w->gen[k] + 1;
			fill(w->buf, block, gen);
			w->gen[k] = io(1, w->buf, block) ? UNKNOWN : gen;
		} else {
			memset(w->buf, 0xa5, BLOCK);  /* a read that transfers nothing cannot pass */
			if (io(0, w->buf, block) == 0 && verify(w->buf, block, w->gen[k]))
				__atomic_fetch_add(&mismatches, 1, __ATOMIC_RELAXED);
		}
		__atomic_fetch_add(&ops_done, 1, __ATOMIC_RELAXED);
	}
	return NULL;
}

static int run_all(struct worker *workers, void *(*fn)(void *))
{
	for (int t = 0; t < nthreads; t++)
		if (pthread_create(&workers[t].thread, NULL, fn, &workers[t])) {
			fprintf(stderr, "blockverify: cannot start thread %d\n", t);
			exit(2);
		}
	double start = now(), next = start + progress_every;
	if (fn == random_pass) {
		while (!stop && (max_ops ? __atomic_load_n(&ops_done, __ATOMIC_RELAXED) < max_ops : now() - start < seconds)) {
			usleep(10000);
			if (progress_every > 0 && now() >= next) {
				pthread_mutex_lock(&print_lock);
				printf("progress t=%.3f ops=%" PRIu64 " mismatches=%" PRIu64 " eio=%" PRIu64 "\n", now(),
				       __atomic_load_n(&ops_done, __ATOMIC_RELAXED),
				       __atomic_load_n(&mismatches, __ATOMIC_RELAXED),
				       __atomic_load_n(&io_errors, __ATOMIC_RELAXED));
				fflush(stdout);
				pthread_mutex_unlock(&print_lock);
				next += progress_every;
			}
		}
		stop = 1;
	}
	for (int t = 0; t < nthreads; t++)
		pthread_join(workers[t].thread, NULL);
	return 0;
}

static void usage(void)
{
	fprintf(stderr, "usage: blockverify [-j THREADS] [-t SECONDS | -n OPS] [-w WRITE%%] [-b BLOCKS] [-s SEED] "
	                "[-i SECONDS] [-Z] DEVICE\n");
	exit(2);
}

int main(int argc, char **argv)
{
	int opt;
	seed = (uint64_t)time(NULL) ^ (uint64_t)getpid() << 20;
	while ((opt = getopt(argc, argv, "j:t:n:w:b:s:i:Z")) != -1) {
		switch (opt) {
		case 'j': nthreads = atoi(optarg); break;
		case 't': seconds = atof(optarg); break;
		case 'n': max_ops = strtoull(optarg, NULL, 0); break;
		case 'w': write_pct = atoi(optarg); break;
		case 'b': blocks = strtoull(optarg, NULL, 0); break;
		case 's': seed = strtoull(optarg, NULL, 0); break;
		case 'i': progress_every = atof(optarg); break;
		case 'Z': zero_start = 1; break;
		default: usage();
		}
	}
	if (optind != argc - 1 || nthreads < 1 || write_pct < 0 || write_pct > 100 || seconds <= 0)
		usage();
	const char *path = argv[optind];
	fd = open(path, O_RDWR | O_DIRECT);
	if (fd < 0) {
		fprintf(stderr, "blockverify: %s: %s\n", path, strerror(errno));
		return 2;
	}
	struct stat st;
	uint64_t size = 0;
	if (fstat(fd, &st) == 0 && S_ISBLK(st.st_mode)) {
		if (ioctl(fd, BLKGETSIZE64, &size)) {
			fprintf(stderr, "blockverify: %s: BLKGETSIZE64: %s\n", path, strerror(errno));
			return 2;
		}
	} else {
		size = st.st_size;
	}
	if (!blocks || blocks > size / BLOCK)
		blocks = size / BLOCK;
	if (blocks < (uint64_t)nthreads || blocks >= 1ULL << 24) {
		fprintf(stderr, "blockverify: %s: %" PRIu64 " blocks: need at least one per thread and under 2^24\n",
		        path, blocks);
		return 2;
	}
	printf("seed=%" PRIu64 " blocks=%" PRIu64 " threads=%d\n", seed, blocks, nthreads);
	fflush(stdout);

	struct worker *workers = calloc(nthreads, sizeof(*workers));
	for (int t = 0; t < nthreads; t++) {
		struct worker *w = &workers[t];
		w->index = t;
		w->rng = seed * 0x9e3779b97f4a7c15ULL + t + 1;
		w->count = (blocks - t + nthreads - 1) / nthreads;
		w->gen = calloc(w->count, sizeof(*w->gen));
		if (!w->gen || posix_memalign((void **)&w->buf, BLOCK, BLOCK)) {
			fprintf(stderr, "blockverify: out of memory\n");
			return 2;
		}
	}
	if (!zero_start) {
		run_all(workers, fill_pass);
		printf("filled blocks=%" PRIu64 " eio=%" PRIu64 "\n", blocks, io_errors);
		fflush(stdout);
	}
	run_all(workers, random_pass);
	printf("ops=%" PRIu64 " mismatches=%" PRIu64 " eio=%" PRIu64 "\n", ops_done, mismatches, io_errors);
	return mismatches || io_errors ? 1 : 0;
}
