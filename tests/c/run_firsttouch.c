/*
 * First touches under `uswap run` (the fault thread's first-touch window, csrc/daemon/uswap_runeng.c):
 *
 *   sparse   writes to every 16th page of fresh memory, in a scattered order: exactly those pages
 *            become resident (mincore), nothing around them
 *   stream   writes MiB of fresh memory in order, then reads every page back (the window's fills)
 *   hole     in memory swapped out, MADV_DONTNEED of 8 pages followed by swapped ones, then writes
 *            through the hole in order: the pages after it keep their contents (a window never
 *            zero-fills over a slot)
 *
 *   run_firsttouch MiB     (run with a budget below MiB, so that the stream pushes out what came before)
 *
 * Prints "ok STEP" per step, or "FAIL STEP: why" and exits 1.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define PS 4096UL

static void fail(const char *step, const char *why, size_t at)
{
	printf("FAIL %s: %s (page %zu)\n", step, why, at);
	exit(1);
}

static char *fresh(size_t pages)
{
	char *p = mmap(NULL, pages * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		exit(2);
	}
	return p;
}

static size_t resident(char *p, size_t pages, unsigned char *vec)
{
	if (mincore(p, pages * PS, vec) < 0) {
		perror("mincore");
		exit(2);
	}
	size_t n = 0;
	for (size_t i = 0; i < pages; i++)
		n += vec[i] & 1;
	return n;
}

static uint64_t word(size_t region, size_t page, unsigned round)
{
	return (uint64_t)region << 48 | (uint64_t)round << 40 | page;
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 0) : 64, pages = mib * 256;
	unsigned char *vec = malloc(pages);

	/* sparse: 256 scattered first writes, 16 pages apart */
	size_t sp = 4096;
	char *s = fresh(sp);
	for (size_t k = 0; k < sp / 16; k++) {
		size_t i = (k * 97 % (sp / 16)) * 16;   /* 97 is prime to 256: every slot once */
		*(uint64_t *)(s + i * PS) = word(1, i, 0);
	}
	size_t got = resident(s, sp, vec);
	if (got != sp / 16) {
		printf("FAIL sparse: %zu pages resident after %zu scattered writes\n", got, sp / 16);
		return 1;
	}
	for (size_t i = 0; i < sp; i++)
		if (*(uint64_t *)(s + i * PS) != (i % 16 ? 0 : word(1, i, 0)))
			fail("sparse", "wrong word", i);
	printf("ok sparse\n");

	/* the region the hole goes in: written once, before the stream pushes it out */
	size_t hp = pages / 2;
	char *h = fresh(hp);
	for (size_t i = 0; i < hp; i++)
		*(uint64_t *)(h + i * PS) = word(2, i, 0);

	/* stream */
	char *m = fresh(pages);
	for (size_t i = 0; i < pages; i++)
		for (size_t w = 0; w < PS / 8; w += 64)
			((uint64_t *)(m + i * PS))[w] = word(3, i, (unsigned)w);
	for (size_t i = 0; i < pages; i++)
		for (size_t w = 0; w < PS / 8; w++)
			if (((uint64_t *)(m + i * PS))[w] != (w % 64 ? 0 : word(3, i, (unsigned)w)))
				fail("stream", "wrong word", i);
	printf("ok stream\n");

	/* hole: 16 pages out of memory (swapped: written above), the first 8 dropped, then written in order */
	resident(h, hp, vec);
	size_t k = 0, run = 0;
	for (size_t i = 0; i < hp && run < 16; i++) {
		run = vec[i] & 1 ? 0 : run + 1;
		k = i + 1 - run;
	}
	if (run < 16)
		fail("hole", "no 16 pages of the first region were swapped out", 0);
	madvise(h + k * PS, 8 * PS, MADV_DONTNEED);
	for (size_t i = k; i < k + 8; i++)
		*(uint64_t *)(h + i * PS) = word(2, i, 1);
	for (size_t i = 0; i < hp; i++) {
		uint64_t want = i >= k && i < k + 8 ? word(2, i, 1) : word(2, i, 0);
		if (*(uint64_t *)(h + i * PS) != want)
			fail("hole", i >= k + 8 && i < k + 16 ? "a swapped page after the hole lost its data"
							      : "wrong word", i);
	}
	printf("ok hole\n");
	return 0;
}
