/*
 * After the daemon dies: a registered page its agents never moved out reads as zeros, one they moved
 * gives SIGBUS (tests/test_run_probes.py).  Output with write(2) from the stack only: libc's own
 * anonymous memory is registered too, and may be what was swapped.
 *
 *   run_untouched MIB    prints its pid and "built", sleeps 1.5 s (the daemon is killed), then reads an
 *                        untouched MIB ("fresh 0" if all zeros) and the MIB it filled (SIGBUS: "sum" never)
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void say(const char *s, size_t n)
{
	if (write(1, s, n) != (ssize_t)n)
		_exit(3);
}

int main(int argc, char **argv)
{
	size_t n = (size_t)atol(argc > 1 ? argv[1] : "32") << 20;
	volatile char *swapped = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	volatile char *fresh = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (swapped == MAP_FAILED || fresh == MAP_FAILED)
		return 2;
	for (size_t i = 0; i < n; i += 4096)
		swapped[i] = (char)(i >> 12 | 1);
	char line[64];
	int len = snprintf(line, sizeof(line), "%d\nbuilt\n", getpid());
	say(line, (size_t)len);
	struct timespec t = { 1, 500000000 };
	nanosleep(&t, NULL);
	unsigned long sum = 0;
	for (size_t i = 0; i < n; i += 4096)
		sum += (unsigned char)fresh[i];
	if (sum == 0)
		say("fresh 0\n", 8);
	else
		say("fresh NOT ZERO\n", 15);
	for (size_t i = 0; i < n; i += 4096)
		sum += (unsigned char)swapped[i];
	say("sum\n", 4);
	return 0;
}
