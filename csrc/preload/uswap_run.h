/*
 * The `uswap run` wire protocol (issue 12, docs/RUN-DESIGN.md): between the preload library
 * (libuswaprun.so, in the program) and the daemon that serves the run (uswap/daemon/runproto.py, runaccept.py).
 * One SOCK_SEQPACKET connection per process; the path is in USWAP_RUN_SOCKET.
 *
 *   server -> lib   DEVFD  + an fd of /dev/userfaultfd (the lib makes its uffd from it)
 *   lib -> server   HELLO  + the process's uffd (not yet API'd: the server negotiates); it names the proof
 *                   page, which the server fills with a nonce through that uffd and reads back through
 *                   /proc/PID/mem: the uffd must be this process's (uswap/daemon/procimage.py)
 *   server -> lib   READY  (status 0: registered, the constructor returns; else -errno: unbudgeted)
 * A forked child (the preload's atfork handler) connects with CONNECT flags USWAP_RUN_CHILD, after it touched
 * the doorbell page (its fault on the child's uffd, which only the server holds, names the child to the server):
 *   server -> lib   DEVFD  (for the child's private staging uffd)
 *   lib -> server   HELLO  (no fd: the child's uffd is the one fork made, read by the server from EVENT_FORK)
 *   server -> lib   READY  + that uffd (the agent answers faults through it if the server goes away)
 *   server -> agent DROP   runs to move out of the process (they are write-protected, their data written)
 *   server -> agent DETACH every page is back and nothing registered (the daemon stops): the program goes on
 *                   unbudgeted, and may fork
 *   agent -> server DROPPED bytes moved and errno per run (EAGAIN: events pending, drain and retry;
 *                   EBUSY: shared copy-on-write; ENOENT: the program dropped the page itself)
 */
#ifndef USWAP_RUN_H
#define USWAP_RUN_H

#include <stdint.h>

#define USWAP_RUN_MAGIC 0x4e525355u   /* "USRN" */
#define USWAP_RUN_VERSION 4
#define USWAP_RUN_ENV_SOCKET "USWAP_RUN_SOCKET"
#define USWAP_RUN_ENV_RESIDENT "USWAP_RUN_RESIDENT"
#define USWAP_RUN_ENV_REQUIRED "USWAP_RUN_REQUIRED"   /* not "0": exit USWAP_RUN_REFUSED_EXIT if not budgeted */
#define USWAP_RUN_REFUSED_EXIT 1
#define USWAP_RUN_MAX_SPANS 64

/* CDEF-BEGIN */

enum { USWAP_RUN_DEVFD = 1, USWAP_RUN_HELLO = 2, USWAP_RUN_READY = 3, USWAP_RUN_DROP = 4, USWAP_RUN_DROPPED = 5,
       USWAP_RUN_CONNECT = 6, USWAP_RUN_DETACH = 7 };
enum { USWAP_RUN_CHILD = 1 };   /* CONNECT flags: a forked child of a process of a run */

struct uswap_run_msg {
	uint32_t magic;
	uint16_t version;
	uint16_t op;
	int32_t status;
	uint32_t count;          /* DROP/DROPPED: spans */
	uint64_t pid;            /* HELLO */
	uint64_t staging, staging_len;          /* HELLO: never register these */
	uint64_t agent_stack, agent_stack_len;  /* HELLO: the agent's stack: never register */
	uint64_t addr[USWAP_RUN_MAX_SPANS];     /* DROP: span start */
	uint64_t len[USWAP_RUN_MAX_SPANS];      /* DROP: span length; DROPPED: bytes moved */
	int32_t err[USWAP_RUN_MAX_SPANS];       /* DROPPED: errno of the span, 0 if all moved */
	uint64_t resident;                      /* CONNECT: the run's budget in bytes (0: the server's) */
	uint32_t flags;                         /* CONNECT: USWAP_RUN_CHILD */
	uint32_t reserved;
	uint64_t doorbell;                      /* HELLO: a page the program never touches (see above) */
	uint64_t proof;                         /* HELLO: an untouched page, never registered; a fork child's
						   holds its parent's nonce (uswap/daemon/procimage.py) */
};

/* CDEF-END */

#endif
