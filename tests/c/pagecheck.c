/*
 * pagecheck: which pages of a uswap region come back, page by page.
 *
 *   pagecheck PAGES SPARE SEED
 *
 * Maps PAGES pages with uswap_map and writes word w of page p as
 * SEED + p * WORDS + w (WORDS: 64-bit words per page), so a slot holding a
 * page (unsealed: --encrypt off) names the page by its first word.  Then it
 * fills a second region of SPARE pages, which pushes the first one's last
 * pages out too, and unmaps it: what it held of the daemon's budget is free
 * for the swap-ins to come, which then need no writeback.  Prints "filled",
 * then reads page numbers from stdin, one a line, until EOF, and
 * touches each page once in that order, printing "P ok", "P sigbus" (the
 * daemon could not give the page back: caught with a SIGBUS handler and
 * siglongjmp), "P zero" (every word 0) or "P mismatch N" (N words wrong).
 * Ends with "done". A page is touched with reads only: nothing is dirtied.
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

static sigjmp_buf touching;

static void on_sigbus(int sig)
{
	(void)sig;
	siglongjmp(touching, 1);
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: pagecheck PAGES SPARE SEED\n");
		return 2;
	}
	size_t pages = strtoull(argv[1], NULL, 0), spare_pages = strtoull(argv[2], NULL, 0);
	uint64_t seed = strtoull(argv[3], NULL, 0);
	size_t page_size = (size_t)sysconf(_SC_PAGESIZE), words = page_size / sizeof(uint64_t);
	volatile uint64_t *mem = uswap_map(pages * page_size);
	if (!mem) {
		fprintf(stderr, "pagecheck: uswap_map: %s\n", uswap_last_error());
		return 1;
	}
	for (size_t p = 0; p < pages; p++)
		for (size_t w = 0; w < words; w++)
			mem[p * words + w] = seed + p * words + w;
	if (spare_pages) {
		uint64_t *spare = uswap_map(spare_pages * page_size);
		if (!spare) {
			fprintf(stderr, "pagecheck: uswap_map: %s\n", uswap_last_error());
			return 1;
		}
		for (size_t i = 0; i < spare_pages * words; i++)
			spare[i] = ~i;
		if (uswap_unmap(spare, spare_pages * page_size)) {
			perror("pagecheck: uswap_unmap");
			return 1;
		}
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("filled\n");

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_sigbus;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGBUS, &sa, NULL)) {
		perror("pagecheck: sigaction");
		return 1;
	}
	char line[64];
	while (fgets(line, sizeof(line), stdin)) {
		size_t p = strtoull(line, NULL, 10);
		if (p >= pages) {
			fprintf(stderr, "pagecheck: no page %zu\n", p);
			return 2;
		}
		volatile uint64_t *page = mem + p * words;
		if (sigsetjmp(touching, 1)) {      /* the handler jumped here: the mask is restored */
			printf("%zu sigbus\n", p);
			continue;
		}
		size_t wrong = 0, zeros = 0;
		for (size_t w = 0; w < words; w++) {
			uint64_t v = page[w];
			wrong += v != seed + p * words + w;
			zeros += v == 0;
		}
		if (wrong == 0)
			printf("%zu ok\n", p);
		else if (zeros == words)
			printf("%zu zero\n", p);
		else
			printf("%zu mismatch %zu\n", p, wrong);
	}
	printf("done\n");
	return 0;
}
