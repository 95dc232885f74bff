/*
 * badslots: a uswap region whose pages are read back after the test damaged part of the store
 * (tests/test_region_daemon.py).  Fills every page with words derived from its index, prints "filled",
 * waits for a line on stdin, then touches every page in order: a page that gives SIGBUS is counted
 * (the handler jumps back; the page stays poisoned), every other page is checked word by word.
 *
 *   badslots PAGES  ->  "filled", then "ok N sigbus N wrong N" (wrong: a page handed back with other data)
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "uswap.h"

static sigjmp_buf touched;

static void on_sigbus(int sig)
{
	(void)sig;
	siglongjmp(touched, 1);
}

static uint64_t word(size_t page, size_t i)
{
	return (page + 1) * 0x9E3779B97F4A7C15ULL ^ i;
}

int main(int argc, char **argv)
{
	size_t pages = argc > 1 ? strtoul(argv[1], NULL, 0) : 0, ps = (size_t)sysconf(_SC_PAGESIZE);
	size_t words = ps / sizeof(uint64_t);
	if (!pages) {
		fprintf(stderr, "usage: badslots PAGES\n");
		return 2;
	}
	uint64_t *mem = uswap_map(pages * ps);
	if (!mem) {
		fprintf(stderr, "uswap_map: %s\n", uswap_last_error());
		return 1;
	}
	for (size_t p = 0; p < pages; p++)
		for (size_t i = 0; i < words; i++)
			mem[p * words + i] = word(p, i);
	printf("filled\n");
	fflush(stdout);
	char line[16];
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_sigbus;
	sigaction(SIGBUS, &sa, NULL);
	size_t ok = 0, bus = 0, wrong = 0;
	for (volatile size_t p = 0; p < pages; p++) {
		if (sigsetjmp(touched, 1)) {    /* SIGBUS: the signal mask is restored by siglongjmp */
			bus++;
			continue;
		}
		const volatile uint64_t *w = mem + p * words;
		size_t bad = 0;
		for (size_t i = 0; i < words; i++)
			bad += w[i] != word(p, i);
		if (bad)
			wrong++;
		else
			ok++;
	}
	printf("ok %zu sigbus %zu wrong %zu\n", ok, bus, wrong);
	return 0;
}
