/*
 * run_workload: an unmodified program for `uswap run` tests (issue 12, tests 3-5): run it under a
 * budget smaller than its memory and it checks, on its own, that swapped memory behaves like memory.
 *
 *   run_workload MIB THREADS SECONDS
 *
 * Steps (each prints "ok <step>" or "FAIL <step>: why"; exit status = failures):
 *   fill       MIB of anonymous memory, one pattern word per 512 bytes (swapped out while we sleep)
 *   write2     write(2) of the whole region to a file, read back with pread into a fresh buffer: equal
 *   read2      read(2) from that file into the region (kernel writes into swapped pages): equal
 *   odirect    O_DIRECT pread of a file into swapped pages (the kernel pins them for the DMA): equal
 *   vmreadv    a forked child reads 4 MiB of the parent's swapped pages with process_vm_readv (faults served
 *              on the parent's behalf, no EFAULT): equal
 *   dontneed   MADV_DONTNEED of 1 MiB of swapped memory reads zeros; later writes stay
 *   free       MADV_FREE of 1 MiB of swapped memory reads each word as before or zero; later writes stay
 *   mremap     a 4 MiB malloc'd block grown with realloc (mremap moves it): contents kept
 *   fixed      mmap MAP_FIXED over 1 MiB of swapped memory reads zeros
 *   threads    THREADS threads doing random verified reads and writes for SECONDS, with a 1 ms SIGALRM
 *              whose handler reads random (swapped) words
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define STRIDE 64   /* words: one pattern word per 512 bytes */

static uint64_t *mem;
static size_t words;
static _Atomic uint64_t *ver;   /* per word slot: the generation last written (threads step) */
static volatile sig_atomic_t handler_bad, handler_runs;
static _Atomic int stop;
static int failures;

static uint64_t pat(size_t i, uint64_t g) { return (i * 0x9E3779B97F4A7C15ull) ^ (g * 0xD1B54A32D192ED03ull) ^ 1; }

static void report(const char *step, long bad, const char *why)
{
	if (bad) {
		printf("FAIL %s: %ld %s\n", step, bad, why);
		failures++;
	} else {
		printf("ok %s\n", step);
	}
	fflush(stdout);
}

static long check_region(uint64_t *m, size_t from, size_t to, int zeros)
{
	long bad = 0;
	for (size_t i = from; i < to; i += STRIDE)
		bad += m[i] != (zeros ? 0 : pat(i, 0));
	return bad;
}

static uint64_t rnd(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static void on_alarm(int sig)
{
	static uint64_t s = 88172645463325252ull;
	size_t slot = rnd(&s) % (words / STRIDE);
	uint64_t g = atomic_load(&ver[slot]), v = mem[slot * STRIDE];
	/* a thread may be writing it: the word is one of the generations around g */
	if (v != pat(slot * STRIDE, g) && v != pat(slot * STRIDE, g + 1) && v != pat(slot * STRIDE, g - 1))
		handler_bad++;
	handler_runs++;
}

static void *worker(void *arg)
{
	uint64_t s = 0x1234567 + (uint64_t)(uintptr_t)arg * 7919, bad = 0;
	size_t nth = (size_t)(uintptr_t)arg >> 16, me = (size_t)(uintptr_t)arg & 0xffff;
	size_t slots = words / STRIDE;
	while (!stop) {
		size_t slot = rnd(&s) % slots;
		if (slot % nth != me)      /* each thread writes only its own slots: checks stay exact */
			slot = slot - slot % nth + me;
		if (slot >= slots)
			continue;
		uint64_t g = atomic_load(&ver[slot]);
		if (mem[slot * STRIDE] != pat(slot * STRIDE, g))
			bad++;
		if (rnd(&s) & 1) {
			atomic_store(&ver[slot], g + 1);
			mem[slot * STRIDE] = pat(slot * STRIDE, g + 1);
		}
	}
	return (void *)(uintptr_t)bad;
}

int main(int argc, char **argv)
{
	if (argc != 4)
		return fprintf(stderr, "usage: run_workload MIB THREADS SECONDS\n"), 2;
	size_t bytes = (size_t)atoi(argv[1]) << 20;
	int nthreads = atoi(argv[2]);
	double seconds = atof(argv[3]);
	words = bytes / 8;

	mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		return perror("mmap"), 2;
	for (size_t i = 0; i < words; i += STRIDE)
		mem[i] = pat(i, 0);
	usleep(300000);       /* the server's ticks swap most of it out */
	report("fill", check_region(mem, 0, words, 0), "words wrong");

	/* write(2) from swapped memory, read(2) into swapped memory */
	char path[] = "/tmp/run_workload.XXXXXX";
	int fd = mkstemp(path);
	unlink(path);
	usleep(100000);
	long bad = write(fd, mem, bytes) != (ssize_t)bytes;
	uint64_t *copy = malloc(bytes);
	bad += pread(fd, copy, bytes, 0) != (ssize_t)bytes;
	bad += check_region(copy, 0, words, 0);
	report("write2", bad, "wrong after write(2) from swapped pages");
	free(copy);
	memset(mem, 0, bytes);
	usleep(300000);
	bad = pread(fd, mem, bytes, 0) != (ssize_t)bytes;
	usleep(300000);
	bad += check_region(mem, 0, words, 0);
	report("read2", bad, "wrong after read(2) into swapped pages");

	/* O_DIRECT pread into swapped pages (a file in /var/tmp: tmpfs takes no O_DIRECT) */
	int dfd;
	char dpath[] = "/var/tmp/run_workload.XXXXXX";
	dfd = mkstemp(dpath);
	bad = dfd < 0 || write(dfd, mem, bytes) != (ssize_t)bytes || fsync(dfd) != 0;
	if (dfd >= 0) {
		close(dfd);
		dfd = open(dpath, O_RDONLY | O_DIRECT);
		unlink(dpath);
	}
	memset(mem, 0, bytes);
	usleep(300000);
	bad += dfd < 0 || pread(dfd, mem, bytes, 0) != (ssize_t)bytes;
	bad += check_region(mem, 0, words, 0);
	if (dfd >= 0)
		close(dfd);
	report("odirect", bad, "wrong after an O_DIRECT pread into swapped pages");
	close(fd);

	/* another process reads our swapped pages */
	usleep(300000);
	pid_t reader = fork();
	if (reader == 0) {            /* 4 MiB: the fork shares every resident page (unevictable until written) */
		size_t n = bytes < (4u << 20) ? bytes : (4u << 20);
		uint64_t *mine = malloc(n);
		struct iovec local = { mine, n }, remote = { mem, n };
		long got = process_vm_readv(getppid(), &local, 1, &remote, 1, 0);
		_exit(got != (long)n ? 2 : check_region(mine, 0, n / 8, 0) != 0);
	}
	int status = 0;
	bad = reader < 0 || waitpid(reader, &status, 0) != reader || !WIFEXITED(status) || WEXITSTATUS(status);
	report("vmreadv", bad, "process_vm_readv of swapped pages failed or read wrong words");

	/* MADV_DONTNEED of swapped memory: zeros, and later writes stay */
	size_t mib = (1 << 20) / 8, at = words / 2;
	madvise(mem + at, 1 << 20, MADV_DONTNEED);
	bad = check_region(mem, at, at + mib, 1);
	for (size_t i = at; i < at + mib; i += STRIDE)
		mem[i] = pat(i, 0);
	usleep(300000);
	bad += check_region(mem, at, at + mib, 0);
	bad += check_region(mem, 0, words, 0);
	report("dontneed", bad, "wrong around MADV_DONTNEED");

	/* MADV_FREE of swapped memory: old data or zeros, and later writes stay */
	size_t fr = words / 8;
	usleep(300000);
	madvise(mem + fr, 1 << 20, MADV_FREE);
	bad = 0;
	for (size_t i = fr; i < fr + mib; i += STRIDE)
		bad += mem[i] != 0 && mem[i] != pat(i, 0);
	for (size_t i = fr; i < fr + mib; i += STRIDE)
		mem[i] = pat(i, 0);
	usleep(300000);
	bad += check_region(mem, 0, words, 0);
	report("free", bad, "wrong around MADV_FREE");

	/* realloc that moves (mremap) keeps the contents */
	size_t bw = (4 << 20) / 8;
	uint64_t *b = malloc(bw * 8);
	for (size_t i = 0; i < bw; i += STRIDE)
		b[i] = pat(i, 0);
	usleep(300000);
	b = realloc(b, bw * 8 * 4);
	usleep(100000);
	report("mremap", check_region(b, 0, bw, 0), "words lost by realloc/mremap");
	free(b);

	/* MAP_FIXED over swapped memory: zeros */
	size_t fx = words / 4;
	if (mmap(mem + fx, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
		return perror("mmap fixed"), 2;
	bad = check_region(mem, fx, fx + mib, 1);
	for (size_t i = fx; i < fx + mib; i += STRIDE)
		mem[i] = pat(i, 0);
	report("fixed", bad, "non-zero words after MAP_FIXED");

	/* threads and a 1 ms signal */
	ver = calloc(words / STRIDE, sizeof(*ver));
	usleep(300000);
	struct sigaction sa = { .sa_handler = on_alarm, .sa_flags = SA_RESTART };
	sigaction(SIGALRM, &sa, NULL);
	struct itimerval it = { { 0, 1000 }, { 0, 1000 } };
	setitimer(ITIMER_REAL, &it, NULL);
	pthread_t t[64];
	nthreads = nthreads > 64 ? 64 : nthreads;
	for (int i = 0; i < nthreads; i++)
		pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)(((uintptr_t)nthreads << 16) | (uintptr_t)i));
	sigset_t alrm;                 /* the signal lands on the workers, which touch swapped memory */
	sigemptyset(&alrm);
	sigaddset(&alrm, SIGALRM);
	pthread_sigmask(SIG_BLOCK, &alrm, NULL);
	struct timespec until, now;
	clock_gettime(CLOCK_MONOTONIC, &until);
	until.tv_sec += (time_t)seconds;
	until.tv_nsec += (long)((seconds - (time_t)seconds) * 1e9);
	do {
		usleep(10000);
		clock_gettime(CLOCK_MONOTONIC, &now);
	} while (now.tv_sec < until.tv_sec || (now.tv_sec == until.tv_sec && now.tv_nsec < until.tv_nsec));
	stop = 1;
	bad = 0;
	for (int i = 0; i < nthreads; i++) {
		void *r;
		pthread_join(t[i], &r);
		bad += (long)(uintptr_t)r;
	}
	struct itimerval off = { 0 };
	setitimer(ITIMER_REAL, &off, NULL);
	printf("signal handler runs: %d\n", (int)handler_runs);
	report("threads", bad + handler_bad, "wrong words seen by threads or the signal handler");
	return failures;
}
