/*
 * Many fork children under `uswap run` (issue 18: per-uid bounds count fork children).  Fills MIB MiB
 * (malloc: anonymous memory the daemon swaps) with a pattern, waits until the daemon swapped some of it out,
 * then forks N children, raw (SYS_fork: no atfork handler, no agent) or through libc's fork() (the preload's
 * handler connects each child).  Every child waits until the parent's stdin gives a line, then verifies every
 * word it inherited and exits 0 (all right), 1 (a wrong word: must never happen) or dies of SIGBUS (a page
 * with a slot it cannot be given: the daemon refused it).
 *
 *   run_forks MIB N raw|libc   ->  "forked N" once every child exists; after a line on stdin
 *                                  "ok A bad B sigbus C other D" and "parent ok" (exit 0) or "parent BAD"
 * Output with write(2) from the stack only (stdio's buffer is heap memory the daemon may swap).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static uint64_t *mem;
static size_t words;

static uint64_t word(size_t i) { return (1ull << 48) ^ (i * 0x9e3779b97f4a7c15ull); }

static int verify(void)
{
	for (size_t i = 0; i < words; i++)
		if (mem[i] != word(i))
			return 1;
	return 0;
}

static void say(const char *text)
{
	if (write(1, text, strlen(text)) < 0)
		_exit(4);
}

int main(int argc, char **argv)
{
	if (argc != 4)
		return 2;
	size_t bytes = (size_t)atol(argv[1]) << 20;
	int n = atoi(argv[2]), raw = strcmp(argv[3], "raw") == 0;
	words = bytes / 8;
	mem = malloc(bytes);
	if (!mem)
		return 2;
	for (size_t i = 0; i < words; i++)
		mem[i] = word(i);
	usleep(300 * 1000);                  /* the daemon evicts down to the budget meanwhile */
	int go[2];
	if (pipe(go) < 0)
		return 2;
	pid_t *pids = calloc((size_t)n, sizeof(*pids));
	if (!pids)
		return 2;
	for (int k = 0; k < n; k++) {
		pid_t pid = raw ? (pid_t)syscall(SYS_fork) : fork();
		if (pid == 0) {
			char c;
			close(go[1]);
			while (read(go[0], &c, 1) < 0 && errno == EINTR)
				;
			_exit(verify());
		}
		if (pid < 0) {
			say("fork failed\n");
			return 3;
		}
		pids[k] = pid;
	}
	close(go[0]);
	char buf[128];
	snprintf(buf, sizeof(buf), "forked %d\n", n);
	say(buf);
	while (read(0, buf, 1) == 1 && buf[0] != '\n')
		;
	close(go[1]);
	int ok = 0, bad = 0, bus = 0, other = 0;
	for (int k = 0; k < n; k++) {
		int status;
		if (waitpid(pids[k], &status, 0) != pids[k])
			other++;
		else if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
			ok++;
		else if (WIFEXITED(status) && WEXITSTATUS(status) == 1)
			bad++;
		else if (WIFSIGNALED(status) && WTERMSIG(status) == SIGBUS)
			bus++;
		else
			other++;
	}
	snprintf(buf, sizeof(buf), "ok %d bad %d sigbus %d other %d\n", ok, bad, bus, other);
	say(buf);
	say(verify() ? "parent BAD\n" : "parent ok\n");
	return 0;
}
