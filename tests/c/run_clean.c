/*
 * Clean-page retention under `uswap run` (tests/test_run_clean.py): pages swapped in by a read keep
 * their slots, so evicting them again needs no write, and a write to one must never be lost.
 *
 *   run_clean reread PAGES PASSES   write every page, then PASSES read-only passes in order
 *   run_clean rewrite PAGES         write every page; read each page, then write it; read page p and write
 *                                   page p+1 (a page readahead brought in); verify twice
 *   run_clean fork PAGES            write every page, read them all, fork: parent and child each verify,
 *                                   write their own half and verify again, the parent after the child too
 *   run_clean hold PAGES            write every page, read them all, wait for a line on stdin (the test
 *                                   stops the daemon meanwhile), then write every page and verify
 *
 * Every word of page p is a function of (p, gen[p], word): each pass checks every word of every page it
 * reads.  Prints "ok STEP" per step and "mismatches=N" at the end; exit status 0 only without mismatches.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static uint64_t *mem;
static uint8_t *gen;
static size_t pages;
static size_t mismatches;

static inline uint64_t word(size_t p, unsigned g, size_t i)
{
	uint64_t x = (uint64_t)p * 0x9E3779B97F4A7C15ull ^ (uint64_t)g << 48 ^ i;
	x ^= x >> 31;
	x *= 0xBF58476D1CE4E5B9ull;
	return x ^ x >> 29;
}

static void put(size_t p, unsigned g)
{
	uint64_t *w = mem + p * WORDS;
	for (size_t i = 0; i < WORDS; i++)
		w[i] = word(p, g, i);
	gen[p] = (uint8_t)g;
}

static void check(size_t p)
{
	const volatile uint64_t *w = mem + p * WORDS;
	unsigned g = gen[p];
	size_t bad = 0;
	for (size_t i = 0; i < WORDS; i++)
		bad += w[i] != word(p, g, i);
	if (bad && mismatches < 10)
		fprintf(stderr, "page %zu gen %u: %zu bad words (word 0 %#llx)\n", p, g, bad,
			(unsigned long long)w[0]);
	mismatches += bad != 0;
}

static void verify_all(const char *step)
{
	for (size_t p = 0; p < pages; p++)
		check(p);
	printf("ok %s\n", step);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: run_clean reread|rewrite|fork|hold PAGES [PASSES]\n");
		return 2;
	}
	pages = strtoul(argv[2], NULL, 0);
	mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	gen = calloc(pages, 1);
	if (mem == MAP_FAILED || !gen) {
		perror("mmap");
		return 2;
	}
	for (size_t p = 0; p < pages; p++)
		put(p, 1);
	printf("ok fill\n");
	if (!strcmp(argv[1], "reread")) {
		int passes = argc > 3 ? atoi(argv[3]) : 3;
		for (int k = 0; k < passes; k++)
			verify_all("reread");
	} else if (!strcmp(argv[1], "rewrite")) {
		for (size_t p = 0; p < pages; p++) {   /* a read swaps it in clean; the write dirties it */
			check(p);
			put(p, 2);
		}
		printf("ok read-then-write\n");
		for (size_t p = 0; p + 1 < pages; p += 2) {   /* p+1 came in by readahead, clean */
			check(p);
			put(p + 1, 3);
		}
		printf("ok write-readahead\n");
		verify_all("verify");
		verify_all("verify");
	} else if (!strcmp(argv[1], "fork")) {
		verify_all("clean");
		fflush(stdout);
		pid_t child = fork();
		if (child < 0) {
			perror("fork");
			return 2;
		}
		unsigned mine = child == 0 ? 4 : 5;
		size_t first = child == 0 ? 1 : 0;
		verify_all(child == 0 ? "child-read" : "parent-read");
		for (size_t p = first; p < pages; p += 2)
			put(p, mine);
		verify_all(child == 0 ? "child-wrote" : "parent-wrote");
		verify_all(child == 0 ? "child-again" : "parent-again");
		if (child == 0) {
			printf("child mismatches=%zu\n", mismatches);
			fflush(stdout);
			_exit(mismatches ? 1 : 0);
		}
		int status;
		if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
			fprintf(stderr, "child failed: status %#x\n", status);
			mismatches++;
		}
		verify_all("parent-after-child");
	} else if (!strcmp(argv[1], "hold")) {
		verify_all("clean");
		char line[16];
		if (!fgets(line, sizeof(line), stdin))
			return 2;
		for (size_t p = 0; p < pages; p++)
			put(p, 2);
		verify_all("written");
	} else {
		fprintf(stderr, "unknown mode %s\n", argv[1]);
		return 2;
	}
	printf("mismatches=%zu\n", mismatches);
	return mismatches ? 1 : 0;
}
