/*
 * hammer: one thread keeps writing a few hot pages while another streams
 * through the rest of the region, so reclaim keeps picking the hot pages
 * (their referenced bit is only set by faults) and the writer keeps hitting
 * them under writeback.  Every write must survive.
 *
 *   hammer MIB PASSES   (the streamer's passes; exit 0: every hot page holds
 *                        exactly as many increments as the writer made)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "uswap.h"

#define HOT 16

static volatile uint64_t *mem;
static size_t pages, words;
static volatile int done;

static long passes;

static void *stream(void *arg)
{
	uint64_t sum = 0;
	(void)arg;
	for (long i = 0; i < passes; i++)
		for (size_t p = HOT; p < pages; p++)
			sum += mem[p * words];
	done = 1;
	return (void *)(uintptr_t)sum;
}

int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	size_t bytes = strtoull(argv[1], NULL, 0) << 20;
	long iterations = 0, ps = sysconf(_SC_PAGESIZE);
	passes = atol(argv[2]);
	mem = uswap_map(bytes);
	if (!mem) {
		fprintf(stderr, "hammer: %s\n", uswap_last_error());
		return 2;
	}
	pages = bytes / ps;
	words = ps / 8;
	pthread_t t;
	pthread_create(&t, NULL, stream, NULL);
	while (!done) {
		for (size_t p = 0; p < HOT; p++)
			mem[p * words + (iterations % words)] += 1;
		iterations++;
	}
	pthread_join(t, NULL);
	size_t bad = 0;
	for (size_t p = 0; p < HOT; p++) {
		uint64_t total = 0;
		for (size_t w = 0; w < words; w++)
			total += mem[p * words + w];
		if (total != (uint64_t)iterations)
			bad++;
	}
	printf("hammer: %ld writes to each of %d hot pages, %zu wrong\n", iterations, HOT, bad);
	uswap_unmap((void *)mem, bytes);
	return bad ? 1 : 0;
}
