/*
 * Reads of fresh memory under `uswap run`: a first touch by a read maps the kernel's zero page (the fault
 * thread's first-touch window maps it over up to 32 pages at once), which is nobody's memory: a memory cgroup
 * charges nothing for it, and the daemon may not count it against the run's budget (nor can it evict it).
 *
 *   run_zeroread MiB     (run with a budget of about MiB/4)
 *
 * Reads MiB of fresh memory in order (every word must be zero), then for a while writes and reads back a
 * working set of MiB/8 (under the budget: nothing of it need ever leave), and checks the zeros again.
 * Prints "ok" or "FAIL: why" and exits 1.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PS 4096UL

static char *fresh(size_t pages)
{
	char *p = mmap(NULL, pages * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		exit(2);
	}
	return p;
}

static int zeros(const char *z, size_t pages)
{
	for (size_t i = 0; i < pages; i++)
		for (size_t w = 0; w < PS / 8; w++)
			if (((const volatile uint64_t *)(z + i * PS))[w] != 0) {
				printf("FAIL: fresh page %zu is not zeros\n", i);
				return 0;
			}
	return 1;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 0) : 64, pages = mib * 256, wp = pages / 8;
	char *z = fresh(pages), *w = fresh(wp);
	if (!zeros(z, pages))
		return 1;
	/* about 0.5 s of passes over the working set: the daemon counts many times meanwhile */
	unsigned round = 0;
	for (double end = now() + 0.5; now() < end; round++) {
		for (size_t i = 0; i < wp; i++)
			*(uint64_t *)(w + i * PS) = (uint64_t)round << 32 | i;
		for (size_t i = 0; i < wp; i++)
			if (*(uint64_t *)(w + i * PS) != ((uint64_t)round << 32 | i)) {
				printf("FAIL: working set page %zu, round %u\n", i, round);
				return 1;
			}
		usleep(5000);
	}
	if (!zeros(z, pages))
		return 1;
	printf("ok %u rounds\n", round);
	return 0;
}
