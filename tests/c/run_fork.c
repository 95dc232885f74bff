/*
 * Issue 12, test 2: fork under `uswap run`.  Fills MIB MiB (malloc: plain anonymous memory) with a
 * pattern, lets the daemon swap most of it out, then forks three ways: libc fork() (whose child forks a
 * grandchild), and a raw SYS_fork (no atfork handlers: no agent in the child).  Every process verifies
 * every word it inherited, writes a pattern of its own, sleeps (so that it is swapped again), verifies it
 * again; the parent verifies its own pattern after each child, so no side ever sees the other's writes.
 *
 *   run_fork MIB   ->  "ok <who>" lines, exit 0; "BAD <who> ..." and exit 1 on the first wrong word
 *
 *   run_fork MIB orphan   (the test kills the daemon after "built"): a child forked before, then fork()
 *   after the daemon died, then the parent verifies.  Prints with write(2) from the stack only (stdio's
 *   buffer is heap memory the daemon may have swapped).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static uint64_t *mem;
static size_t words;

static uint64_t word(uint64_t seed, size_t i) { return (seed << 48) ^ (i * 0x9e3779b97f4a7c15ull); }

static void fill(uint64_t seed)
{
	for (size_t i = 0; i < words; i++)
		mem[i] = word(seed, i);
}

static void verify(uint64_t seed, const char *who)
{
	for (size_t i = 0; i < words; i++)
		if (mem[i] != word(seed, i)) {
			printf("BAD %s: word %zu (page %zu) is %#llx, expected %#llx (seed %llu)\n", who, i, i / 512,
			       (unsigned long long)mem[i], (unsigned long long)word(seed, i), (unsigned long long)seed);
			fflush(stdout);
			_exit(1);
		}
}

/* What each forked side does: it saw `inherited`, makes `own` its pattern. */
static void live(uint64_t inherited, uint64_t own, const char *who)
{
	verify(inherited, who);
	fill(own);
	usleep(200 * 1000);
	verify(own, who);
}

static int reap(pid_t pid, const char *who)
{
	int status;
	if (pid < 0 || waitpid(pid, &status, 0) != pid) {
		printf("BAD %s: fork or wait failed\n", who);
		return 1;
	}
	if (!WIFEXITED(status) || WEXITSTATUS(status)) {
		printf("BAD %s: %s %d\n", who, WIFSIGNALED(status) ? "signal" : "exit",
		       WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
		return 1;
	}
	printf("ok %s\n", who);
	fflush(stdout);
	return 0;
}

static void say(const char *what, long n)
{
	char buf[96];
	int len = snprintf(buf, sizeof(buf), "%s %ld\n", what, n);
	if (write(1, buf, (size_t)len) < 0)
		_exit(4);
}

static int orphan(void)
{
	pid_t child = fork();
	if (child == 0) {                 /* forked while the daemon lives */
		usleep(1500 * 1000);
		verify(1, "child");       /* a page swapped in the parent: SIGBUS, never zeros */
		say("child verified", 0);
		_exit(0);
	}
	say("built", child);
	usleep(1000 * 1000);              /* the daemon is killed meanwhile */
	pid_t again = fork();
	if (again == 0)
		_exit(0);
	say(again < 0 ? "fork refused" : "forked", again < 0 ? errno : 0);
	int status;
	waitpid(child, &status, 0);
	say(WIFSIGNALED(status) ? "child signal" : "child exit", WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
	verify(1, "parent");
	say("parent verified", 0);
	return 0;
}

int main(int argc, char **argv)
{
	size_t bytes = (size_t)atol(argc > 1 ? argv[1] : "16") << 20;
	words = bytes / 8;
	mem = malloc(bytes);
	if (!mem)
		return 2;
	fill(1);
	usleep(300 * 1000);
	if (argc > 2 && strcmp(argv[2], "orphan") == 0)
		return orphan();
	verify(1, "parent before fork");
	setvbuf(stdout, NULL, _IONBF, 0);

	pid_t child = fork();
	if (child == 0) {
		live(1, 2, "child");
		pid_t grandchild = fork();
		if (grandchild == 0) {
			live(2, 3, "grandchild");
			_exit(0);
		}
		int bad = reap(grandchild, "grandchild");
		verify(2, "child after its child");
		_exit(bad);
	}
	live(1, 4, "parent");
	int bad = reap(child, "libc fork child");
	verify(4, "parent after libc fork");

	pid_t raw = (pid_t)syscall(SYS_fork);
	if (raw == 0) {
		live(4, 5, "raw fork child");
		syscall(SYS_exit_group, 0);
	}
	fill(6);
	bad |= reap(raw, "raw fork child");
	verify(6, "parent after raw fork");
	printf("%s\n", bad ? "FAILED" : "ok all");
	return bad;
}
