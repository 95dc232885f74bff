/*
 * hog: the integrity hog.  Fills memory from a seeded PRNG, adds to one word
 * of every page for several rounds, then verifies every word against the
 * regenerated stream.  Several processes (and threads) at once.
 *
 *   cc -O2 -pthread hog.c $(uswap config --cflags --libs) -o hog
 *   hog [-s SIZE_MIB] [-r ROUNDS] [-p PROCS] [-t THREADS] [-S SEED] [-a] [-f FRACTION]
 *
 * -f: the fraction of each page's words that are random (default 1: all of
 * it, incompressible); the rest stays zeros, and is verified to be.
 * -a uses plain anonymous memory instead of uswap_map (to compare with kernel
 * swap).  Each process prints one line; the exit status is 0 only if every
 * process saw 0 mismatches.  A process killed by a signal (SIGBUS when uswap
 * could not give a page back) makes the exit status 128 + signal.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "uswap.h"

#define WORDS_PER_PAGE(ps) ((ps) / sizeof(uint64_t))

struct job {
	uint64_t *mem;
	size_t pages, first, last; /* this thread's pages: [first, last) */
	size_t page_words;
	size_t noise;      /* the first `noise` words of a page are random, the rest zeros */
	uint64_t seed;
	int rounds;
	size_t mismatches;
};

/* xorshift64*, seeded per page so threads can regenerate any page alone */
static uint64_t next(uint64_t *s)
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

static void *fill(void *arg)
{
	struct job *j = arg;
	for (size_t p = j->first; p < j->last; p++) {
		uint64_t s = page_seed(j->seed, p);
		uint64_t *w = j->mem + p * j->page_words;
		for (size_t i = 0; i < j->noise; i++)
			w[i] = next(&s);
	}
	return NULL;
}

static void *bump(void *arg)
{
	struct job *j = arg;
	for (size_t p = j->first; p < j->last; p++)
		j->mem[p * j->page_words] += 1;
	return NULL;
}

static void *verify(void *arg)
{
	struct job *j = arg;
	for (size_t p = j->first; p < j->last; p++) {
		uint64_t s = page_seed(j->seed, p);
		uint64_t *w = j->mem + p * j->page_words;
		for (size_t i = 0; i < j->page_words; i++) {
			uint64_t want = (i < j->noise ? next(&s) : 0) + (i == 0 ? (uint64_t)j->rounds : 0);
			if (w[i] != want) {
				if (j->mismatches < 5)
					fprintf(stderr, "hog[%d]: page %zu word %zu: %#llx, expected %#llx\n", getpid(), p,
						i, (unsigned long long)w[i], (unsigned long long)want);
				j->mismatches++;
			}
		}
	}
	return NULL;
}

static void run_threads(void *(*fn)(void *), struct job *jobs, int threads)
{
	pthread_t t[64];
	for (int i = 1; i < threads; i++)
		pthread_create(&t[i], NULL, fn, &jobs[i]);
	fn(&jobs[0]);
	for (int i = 1; i < threads; i++)
		pthread_join(t[i], NULL);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int one_process(size_t bytes, int rounds, int threads, uint64_t seed, int anon, double random_fraction)
{
	long ps = sysconf(_SC_PAGESIZE);
	void *mem;
	if (anon) {
		mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (mem == MAP_FAILED)
			mem = NULL;
	} else {
		mem = uswap_map(bytes);
	}
	if (!mem) {
		fprintf(stderr, "hog[%d]: cannot map %zu bytes: %s%s%s\n", getpid(), bytes, strerror(errno),
			anon ? "" : ": ", anon ? "" : uswap_last_error());
		return 2;
	}
	struct job jobs[64];
	size_t pages = bytes / ps;
	for (int i = 0; i < threads; i++)
		jobs[i] = (struct job){ .mem = mem, .pages = pages, .first = pages * i / threads,
					.last = pages * (i + 1) / threads, .page_words = WORDS_PER_PAGE(ps),
					.noise = (size_t)(random_fraction * WORDS_PER_PAGE(ps) + 0.5),
					.seed = seed, .rounds = rounds };
	double t0 = now();
	run_threads(fill, jobs, threads);
	for (int r = 0; r < rounds; r++)
		run_threads(bump, jobs, threads);
	run_threads(verify, jobs, threads);
	size_t bad = 0;
	for (int i = 0; i < threads; i++)
		bad += jobs[i].mismatches;
	printf("hog[%d]: %zu pages, %d rounds, %d threads, %zu mismatches, %.2f s\n", getpid(), pages, rounds,
	       threads, bad, now() - t0);
	fflush(stdout);
	if (anon)
		munmap(mem, bytes);
	else
		uswap_unmap(mem, bytes);
	return bad ? 1 : 0;
}

int main(int argc, char **argv)
{
	size_t mib = 64;
	int rounds = 3, procs = 1, threads = 1, anon = 0, opt;
	uint64_t seed = 42;
	double random_fraction = 1;
	while ((opt = getopt(argc, argv, "s:r:p:t:S:af:")) != -1) {
		switch (opt) {
		case 's': mib = strtoull(optarg, NULL, 0); break;
		case 'r': rounds = atoi(optarg); break;
		case 'p': procs = atoi(optarg); break;
		case 't': threads = atoi(optarg); break;
		case 'S': seed = strtoull(optarg, NULL, 0); break;
		case 'a': anon = 1; break;
		case 'f': random_fraction = strtod(optarg, NULL); break;
		default:
			fprintf(stderr, "usage: %s [-s MiB] [-r rounds] [-p procs] [-t threads] [-S seed] [-a] [-f fraction]\n",
				argv[0]);
			return 2;
		}
	}
	if (threads < 1 || threads > 64 || procs < 1 || mib < 1 || !(random_fraction >= 0 && random_fraction <= 1)) {
		fprintf(stderr, "hog: bad arguments\n");
		return 2;
	}
	if (procs == 1)
		return one_process(mib << 20, rounds, threads, seed, anon, random_fraction);
	for (int i = 0; i < procs; i++) {
		pid_t pid = fork();
		if (pid == 0)
			_exit(one_process(mib << 20, rounds, threads, seed + i, anon, random_fraction));
		if (pid < 0) {
			perror("fork");
			return 2;
		}
	}
	int status = 0, worst = 0;
	while (wait(&status) > 0) {
		int code = WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
		if (WIFSIGNALED(status))
			fprintf(stderr, "hog: a process died of signal %d\n", WTERMSIG(status));
		if (code > worst)
			worst = code;
	}
	return worst;
}
