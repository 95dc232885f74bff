/*
 * See uswap_nfs_io.h.  One service thread per struct uswap_nfs_io; everything libnfs happens in it.
 *
 * Ownership (the invariants the rest of this file relies on):
 *   - The libnfs context (ctx, fh) and the lists `waiting`, `inflight`, `completed` belong to the service
 *     thread alone: no lock, and no other thread ever calls libnfs for this io.
 *   - `submitted`, every request's `done` and `result`, `st` (the stats), `callers`, `closing` and the
 *     open handshake are guarded by `lock`.
 *   - A request (struct io_req) lives on its caller's stack, and its buffer stays the caller's: the caller
 *     sleeps in pread/pwrite until `done`, which the service thread sets (under `lock`) only once no libnfs
 *     callback for it is pending (it is in no list then).  After setting `done` the service thread does
 *     not touch the request again.
 *   - libnfs calls our callbacks only from inside nfs_service, nfs_*_async or nfs_destroy_context, all
 *     called by the service thread.  Callbacks record and move the request to `completed`; they never call
 *     into libnfs (except nfs_get_error, a getter) and never take `lock`.
 *   - Destroying the context runs the callback of every request in flight (with an error), so after
 *     reset_context() `inflight` is empty and nothing of the old context can call back later.
 *
 * libnfs 4.0 splits a pread/pwrite larger than the server's rtmax/wtmax (READ3/WRITE3 at most 1 MiB,
 * ganesha's default) into chunks it sends in parallel, and answers the caller once
 * (nfs3_pread_async_internal / nfs3_pwrite_async_internal in lib/nfs_v3.c): one libnfs call per request.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/time.h>  /* libnfs.h needs struct timeval */
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <nfsc/libnfs.h>

#include "uswap_nfs_io.h"

/* Messages are one line cut at their buffer's length, on purpose. */
#pragma GCC diagnostic ignored "-Wformat-truncation"

#define TICK_MS 100                  /* longest poll(): deadlines are checked at least this often */
#define BACKOFF_FIRST_MS 50
#define BACKOFF_MAX_MS 1000
#define SERVICE_STACK (256u << 10)   /* bytes: libnfs's frames need a few KiB (as uswap_start_thread's) */
#define MAX_TRANSFER (1u << 30)      /* libnfs passes counts as 32-bit and answers with an int */

enum { OP_READ, OP_WRITE };
enum { PHASE_TRANSFER, PHASE_COMMIT };

struct io_req {
    struct io_req *prev, *next;      /* in at most one list (see the top of the file) */
    struct uswap_nfs_io *io;
    int op, phase;
    void *buf;                       /* read: where the data goes; write: what is sent */
    uint64_t len, off;
    uint64_t deadline;               /* ns: start + timeout_ms; after it a retryable failure is -ETIMEDOUT */
    uint64_t sent;                   /* ns: when the current attempt was sent */
    uint64_t sent_generation;        /* the context the current attempt went out on */
    uint64_t write_generation;       /* commit mode: the context that answered the WRITE */
    struct io_req *commit_next;      /* commit mode: the other requests the same COMMIT is for */
    int cb_err;                      /* what the callback reported: bytes, 0, or -errno */
    char cb_error[120];              /* libnfs's message when cb_err < 0 */
    int done;                        /* under lock; set last */
    int64_t result;
    pthread_cond_t cond;             /* the caller waits on it (with lock) */
};

struct req_list {
    struct io_req *head, *tail;
};

struct uswap_nfs_io {
    /* set at open, read-only afterwards */
    char *libnfs_url, *server, *export_path, *file;
    int commit;
    uint64_t timeout_ns;
    int efd;                          /* eventfd: wakes the service thread */
    pthread_t thread;

    pthread_mutex_t lock;
    struct req_list submitted;        /* lock: queued by callers, not yet seen by the service thread */
    int closing;                      /* lock: close has begun; new calls get -ESHUTDOWN */
    int callers;                      /* lock: threads inside pread/pwrite */
    pthread_cond_t idle;              /* lock: signalled when callers drops to 0 while closing */
    int open_done, open_result;       /* lock: the first connect's outcome, for uswap_nfs_io_open */
    char open_error[200];
    pthread_cond_t opened;
    struct uswap_nfs_io_stats st;     /* lock */

    /* the service thread's own */
    struct nfs_context *ctx;
    struct nfsfh *fh;
    int state;                        /* USWAP_NFS_*; published to st under lock */
    uint64_t generation;              /* bumped whenever a context ends */
    int destroying;                   /* inside nfs_destroy_context: callbacks report cancelled requests */
    struct req_list waiting;          /* to send when connected (new, or to retry) */
    struct req_list inflight;         /* sent on ctx, callback pending; oldest first */
    struct req_list completed;        /* callback ran, not yet looked at */
    uint64_t in_flight, most_in_flight;
    uint64_t retries, connects, commits;
    /* connecting: MOUNT, then open the file; each step's callback sets step_done */
    int step;                         /* STEP_MOUNT or STEP_OPEN */
    int step_done, step_err;
    char step_error[160];
    struct nfsfh *step_fh;
    uint64_t connect_deadline;        /* ns: give up this connect attempt */
    uint64_t next_connect;            /* ns: DOWN: not before this */
    uint64_t backoff_ms;              /* the next wait; back to the first once a connection has served */
    int served;                       /* a request succeeded on the current context */
    int first_connect;                /* the open's connect: any failure is final */
    int shutting;                     /* closing: a failed attempt is not retried but -ESHUTDOWN */
    char reset_reason[200];           /* a request failure that ends the context (set by process_completed) */
};

enum { STEP_MOUNT, STEP_OPEN };

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double wall_time(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* -- lists ---------------------------------------------------------------------------------------- */

static void list_append(struct req_list *l, struct io_req *r)
{
    r->next = NULL;
    r->prev = l->tail;
    if (l->tail)
        l->tail->next = r;
    else
        l->head = r;
    l->tail = r;
}

static void list_unlink(struct req_list *l, struct io_req *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else
        l->head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        l->tail = r->prev;
    r->prev = r->next = NULL;
}

static void list_splice(struct req_list *to, struct req_list *from)
{
    if (!from->head)
        return;
    if (to->tail) {
        to->tail->next = from->head;
        from->head->prev = to->tail;
    } else {
        to->head = from->head;
    }
    to->tail = from->tail;
    from->head = from->tail = NULL;
}

/* -- failure policy (uswap/nfs/connection.py's RETRYABLE) ---------------------------------------------- */

static int retryable(int err)
{
    switch (-err) {
    case EFAULT: case EINTR: case EAGAIN: case ECONNREFUSED: case ECONNRESET: case ECONNABORTED:
    case EPIPE: case ENOTCONN: case ETIMEDOUT: case EHOSTUNREACH: case ENETUNREACH:
        return 1;
    }
    return 0;
}

/* libnfs 4.0 reports a READ or WRITE the server refused (NFS3ERR_ROFS, _NOSPC, _STALE, ...) as -EFAULT,
 * like a transport error, after setting the context's message to "NFS: Write failed with
 * NFS3ERR_NOSPC(-28)" just before calling back.  Transport errors set no such message, and during our
 * own nfs_destroy_context every request fails as cancelled whatever the message says. */
static int server_errno(struct uswap_nfs_io *io, struct nfs_context *nfs, int err)
{
    if (err != -EFAULT || io->destroying)
        return err;
    const char *msg = nfs_get_error(nfs);
    const char *p = msg ? strstr(msg, "failed with NFS3ERR_") : NULL;
    int code;
    if (p && (p = strstr(p, "(-")) && sscanf(p, "(-%d)", &code) == 1 && code > 0 && code < 4096)
        return -code;
    return err;
}

/* -- callbacks: record, move to `completed`; nothing else ------------------------------------------- */

static void record(struct uswap_nfs_io *io, struct nfs_context *nfs, struct io_req *r, int err)
{
    r->cb_err = err;
    r->cb_error[0] = 0;
    if (err < 0) {
        const char *msg = io->destroying ? "connection ended" : nfs_get_error(nfs);
        snprintf(r->cb_error, sizeof(r->cb_error), "%s", msg && *msg ? msg : strerror(-err));
        r->cb_err = server_errno(io, nfs, err);
    }
    list_unlink(&io->inflight, r);
    io->in_flight--;
    list_append(&io->completed, r);
}

static void read_cb(int err, struct nfs_context *nfs, void *data, void *private_data)
{
    struct io_req *r = private_data;
    /* data is libnfs's reply buffer, valid only during this call; r->buf is the caller's (it waits) */
    if (err > 0)
        memcpy(r->buf, data, (uint64_t)err < r->len ? (uint64_t)err : r->len);
    record(r->io, nfs, r, err);
}

static void transfer_cb(int err, struct nfs_context *nfs, void *data, void *private_data)
{
    struct io_req *r = private_data;
    record(r->io, nfs, r, err);
}

/* One COMMIT for every request in the chain (see send_request) */
static void commit_cb(int err, struct nfs_context *nfs, void *data, void *private_data)
{
    struct io_req *r = private_data;
    struct uswap_nfs_io *io = r->io;
    if (err == 0)
        io->commits++;
    for (; r; r = r->commit_next)
        record(io, nfs, r, err);
}

static void step_cb(int err, struct nfs_context *nfs, void *data, void *private_data)
{
    struct uswap_nfs_io *io = private_data;
    io->step_done = 1;
    io->step_err = err;
    io->step_error[0] = 0;
    if (err < 0) {
        const char *msg = io->destroying ? "connection ended" : nfs_get_error(nfs);
        snprintf(io->step_error, sizeof(io->step_error), "%s", msg && *msg ? msg : strerror(-err));
    } else if (io->step == STEP_OPEN) {
        io->step_fh = data;
    }
}

/* Under lock: the request's final outcome; its caller may return (and its stack go) once lock is
 * dropped, so the service thread does not touch it afterwards. */
static void complete(struct io_req *r, int64_t result)
{
    r->result = result;
    r->done = 1;
    pthread_cond_signal(&r->cond);
}

/* -- the connection ------------------------------------------------------------------------------- */

static void set_state(struct uswap_nfs_io *io, int state, const char *error)
{
    pthread_mutex_lock(&io->lock);
    if (state != io->st.state) {
        __atomic_store_n(&io->st.state, state, __ATOMIC_RELAXED);   /* read without the lock: uswap_nfs_io_up */
        io->st.since = wall_time();
    }
    if (error && *error)
        snprintf(io->st.last_error, sizeof(io->st.last_error), "%s", error);
    pthread_mutex_unlock(&io->lock);
    io->state = state;
}

/* End the context: every request in flight moves to `completed` with an error (and is retried or failed
 * by process_completed), a connect in progress ends.  The service thread only. */
static void reset_context(struct uswap_nfs_io *io, const char *why)
{
    if (io->ctx) {
        io->destroying = 1;
        nfs_destroy_context(io->ctx);
        io->destroying = 0;
    }
    io->ctx = NULL;
    io->fh = NULL;
    io->generation++;
    /* libnfs fails every PDU it holds on destroy; anything it did not call back can no longer be */
    while (io->inflight.head) {
        struct io_req *r = io->inflight.head;
        r->cb_err = -EINTR;
        snprintf(r->cb_error, sizeof(r->cb_error), "connection ended");
        list_unlink(&io->inflight, r);
        io->in_flight--;
        list_append(&io->completed, r);
    }
    set_state(io, USWAP_NFS_DOWN, why);
}

static void mount_error(struct uswap_nfs_io *io, int code, const char *text, char *out, size_t n)
{
    if (code == EPERM || code == ENOENT)   /* libnfs maps MNT3ERR_NOENT to EPERM */
        snprintf(out, n, "export %s not found on NFS server %s (or not exported to this client): %s",
                 io->export_path, io->server, text);
    else if (code == EACCES)
        snprintf(out, n, "NFS server %s refused to mount %s (no such export, or not exported to this "
                 "client): %s", io->server, io->export_path, text);
    else
        snprintf(out, n, "cannot reach NFS server %s to mount %s:%s: %s", io->server, io->server,
                 io->export_path, text);
}

static void open_error(struct uswap_nfs_io *io, int code, const char *text, char *out, size_t n)
{
    if (code == ENOENT)
        snprintf(out, n, "no file %s in export %s", io->file, io->export_path);
    else if (code == EACCES || code == EPERM || code == EROFS)
        snprintf(out, n, "cannot open %s for writing (read-only export, or permission denied): %s",
                 io->file, text);
    else
        snprintf(out, n, "open %s: %s", io->file, text);
}

/* The next connect after a wait, each twice as long as the last up to BACKOFF_MAX_MS: a server that is
 * down, or a connection that breaks before serving anything, is not hammered. */
static void back_off(struct uswap_nfs_io *io)
{
    io->next_connect = now_ns() + io->backoff_ms * 1000000u;
    io->backoff_ms = io->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : io->backoff_ms * 2;
}

/* A connect attempt failed: -errno and its one-line message. */
static void connect_failed(struct uswap_nfs_io *io, int err, const char *msg)
{
    reset_context(io, msg);
    back_off(io);
    pthread_mutex_lock(&io->lock);
    if (io->first_connect) {   /* the open's: no retry, the error goes to uswap_nfs_io_open */
        io->open_result = err;
        snprintf(io->open_error, sizeof(io->open_error), "%s", msg);
        io->open_done = 1;
        pthread_cond_signal(&io->opened);
    } else if (!retryable(err)) {
        /* the server's answer (the export or file is gone, permissions changed): the requests that
         * needed this connection fail with it, as in connection.py's _reconnect */
        while (io->waiting.head) {
            struct io_req *r = io->waiting.head;
            list_unlink(&io->waiting, r);
            complete(r, err);   /* last_error keeps msg, the reason */
        }
    }
    pthread_mutex_unlock(&io->lock);
}

/* one connect attempt lasts at most this (as connection.py's _wait_driving) */
static uint64_t connect_attempt_ns(struct uswap_nfs_io *io)
{
    uint64_t attempt = (uint64_t)USWAP_NFS_ATTEMPT_MS * 1000000u;
    return io->timeout_ns < attempt ? io->timeout_ns : attempt;
}

static void start_connect(struct uswap_nfs_io *io)
{
    char msg[200];
    set_state(io, USWAP_NFS_CONNECTING, NULL);
    io->connect_deadline = now_ns() + connect_attempt_ns(io);
    io->ctx = nfs_init_context();
    if (!io->ctx) {
        connect_failed(io, -ENOMEM, "nfs_init_context failed");
        return;
    }
    /* only the side effects of parsing are wanted: the URL's options (version, ports) applied */
    struct nfs_url *url = nfs_parse_url_full(io->ctx, io->libnfs_url);
    if (!url) {
        snprintf(msg, sizeof(msg), "%s: %s", io->libnfs_url, nfs_get_error(io->ctx));
        connect_failed(io, -EINVAL, msg);
        return;
    }
    nfs_destroy_url(url);
    nfs_set_autoreconnect(io->ctx, 0);   /* a broken connection ends the context (see the header) */
    io->step = STEP_MOUNT;
    io->step_done = 0;
    if (nfs_mount_async(io->ctx, io->server, io->export_path, step_cb, io) != 0) {
        mount_error(io, ECONNREFUSED, nfs_get_error(io->ctx), msg, sizeof(msg));
        connect_failed(io, -ECONNREFUSED, msg);
    }
}

/* After a pass: move the connect on if its step has been answered, or give it up at its deadline. */
static void advance_connect(struct uswap_nfs_io *io)
{
    char msg[200];
    if (!io->step_done) {
        if (now_ns() >= io->connect_deadline) {
            snprintf(msg, sizeof(msg), "no answer for %gs", (double)connect_attempt_ns(io) / 1e9);
            char full[200];
            if (io->step == STEP_MOUNT)
                mount_error(io, ETIMEDOUT, msg, full, sizeof(full));
            else
                snprintf(full, sizeof(full), "open %s: %s", io->file, msg);
            connect_failed(io, -ETIMEDOUT, full);
        }
        return;
    }
    io->step_done = 0;
    int err = io->step_err;
    if (io->step == STEP_MOUNT) {
        if (err < 0) {
            mount_error(io, -err, io->step_error, msg, sizeof(msg));
            connect_failed(io, err, msg);
            return;
        }
        io->step = STEP_OPEN;
        /* commit == 0: O_SYNC, and libnfs sends every WRITE as FILE_SYNC */
        int flags = O_RDWR | (io->commit ? 0 : O_SYNC);
        if (nfs_open_async(io->ctx, io->file, flags, step_cb, io) != 0) {
            snprintf(msg, sizeof(msg), "open %s: %s", io->file, nfs_get_error(io->ctx));
            connect_failed(io, -ECONNREFUSED, msg);
        }
        return;
    }
    if (err < 0) {
        open_error(io, -err, io->step_error, msg, sizeof(msg));
        connect_failed(io, err, msg);
        return;
    }
    io->fh = io->step_fh;
    io->connects++;
    io->served = 0;
    set_state(io, USWAP_NFS_UP, NULL);
    pthread_mutex_lock(&io->lock);
    io->st.connects = io->connects;
    if (io->first_connect) {
        io->first_connect = 0;
        io->open_result = 0;
        io->open_done = 1;
        pthread_cond_signal(&io->opened);
    }
    pthread_mutex_unlock(&io->lock);
}

/* -- requests ------------------------------------------------------------------------------------- */

/* Send the request at the head of `waiting` on the current context; 0, or -1 when libnfs could not queue
 * it (the context is then treated as broken).
 * Commit mode: every request waiting for its COMMIT goes with one COMMIT (of the whole file, as libnfs
 * sends it), which covers each of their WRITEs: all were answered before it is sent. */
static int send_request(struct uswap_nfs_io *io)
{
    struct io_req *r = io->waiting.head, *x, *next, **tail = &r->commit_next;
    uint64_t now = now_ns();
    list_unlink(&io->waiting, r);
    r->commit_next = NULL;
    if (r->phase == PHASE_COMMIT) {
        for (x = io->waiting.head; x; x = next) {
            next = x->next;
            if (x->phase == PHASE_COMMIT) {
                list_unlink(&io->waiting, x);
                x->commit_next = NULL;
                *tail = x;
                tail = &x->commit_next;
            }
        }
    }
    /* in `inflight` before the call: a callback may run inside it */
    for (x = r; x; x = x->commit_next) {
        x->sent = now;
        x->sent_generation = io->generation;
        list_append(&io->inflight, x);
        io->in_flight++;
    }
    if (io->in_flight > io->most_in_flight)
        io->most_in_flight = io->in_flight;
    int rc;
    if (r->op == OP_READ)
        rc = nfs_pread_async(io->ctx, io->fh, r->off, r->len, read_cb, r);
    else if (r->phase == PHASE_TRANSFER)
        rc = nfs_pwrite_async(io->ctx, io->fh, r->off, r->len, r->buf, transfer_cb, r);
    else
        rc = nfs_fsync_async(io->ctx, io->fh, commit_cb, r);
    if (rc == 0)
        return 0;
    for (x = r; x; x = x->commit_next) {   /* sent again on the next context */
        list_unlink(&io->inflight, x);
        io->in_flight--;
        list_append(&io->waiting, x);
    }
    snprintf(io->reset_reason, sizeof(io->reset_reason), "cannot queue a request: %s", nfs_get_error(io->ctx));
    return -1;
}

/* Under lock: complete, with the counters and last_error. */
static void finish(struct uswap_nfs_io *io, struct io_req *r, int64_t result)
{
    if (result >= 0) {
        if (r->op == OP_READ) {
            io->st.reads++;
            io->st.read_bytes += r->len;
        } else {
            io->st.writes++;
            io->st.write_bytes += r->len;
        }
    } else if (result != -ESHUTDOWN && result != -ETIMEDOUT) {
        /* the server's answer (a timeout's reason is the connection's, already in last_error) */
        snprintf(io->st.last_error, sizeof(io->st.last_error), "%s %" PRIu64 " bytes at %" PRIu64 ": %s",
                 r->op == OP_READ ? "read" : "write", r->len, r->off,
                 r->cb_err >= 0 ? "short transfer" : r->cb_error[0] ? r->cb_error : strerror((int)-result));
    }
    complete(r, result);
}

/* Under lock: a failed attempt that may be sent again, until the request's deadline. */
static void retry(struct uswap_nfs_io *io, struct io_req *r, uint64_t now)
{
    if (io->shutting) {
        finish(io, r, -ESHUTDOWN);
        return;
    }
    if (now >= r->deadline) {
        finish(io, r, -ETIMEDOUT);
        return;
    }
    io->retries++;
    list_append(&io->waiting, r);
}

/* Under lock: decide about every request whose callback has run.  A retryable failure that did not come
 * from our own reset means the connection broke: it asks for a reset (reset_reason). */
static void process_completed(struct uswap_nfs_io *io, uint64_t now)
{
    struct io_req *r;
    while ((r = io->completed.head)) {
        list_unlink(&io->completed, r);
        int err = r->cb_err;
        if (err >= 0) {
            if (r->sent_generation == io->generation && !io->served) {
                io->served = 1;
                io->backoff_ms = BACKOFF_FIRST_MS;
            }
            if (r->phase == PHASE_COMMIT) {
                /* the server may have lost the unstable data if the COMMIT went to another connection
                 * than the one that acknowledged the WRITE: both are sent again */
                if (r->sent_generation == r->write_generation) {
                    finish(io, r, (int64_t)r->len);
                } else {
                    r->phase = PHASE_TRANSFER;
                    retry(io, r, now);
                }
            } else if ((uint64_t)err != r->len) {
                finish(io, r, -EIO);   /* short transfer */
            } else if (r->op == OP_WRITE && io->commit) {
                r->phase = PHASE_COMMIT;
                r->write_generation = r->sent_generation;
                list_append(&io->waiting, r);
            } else {
                finish(io, r, (int64_t)r->len);
            }
            continue;
        }
        if (!retryable(err)) {
            finish(io, r, err);
            continue;
        }
        if (r->sent_generation == io->generation && !io->reset_reason[0])
            snprintf(io->reset_reason, sizeof(io->reset_reason), "%s", r->cb_error);
        if (r->phase == PHASE_COMMIT)
            r->phase = PHASE_TRANSFER;   /* a failed COMMIT: the WRITE again too */
        retry(io, r, now);
    }
}

/* Under lock: requests that waited (unsent) past their deadline. */
static void expire_waiting(struct uswap_nfs_io *io, uint64_t now)
{
    struct io_req *r = io->waiting.head;
    while (r) {
        struct io_req *next = r->next;
        if (now >= r->deadline) {
            list_unlink(&io->waiting, r);
            finish(io, r, -ETIMEDOUT);
        }
        r = next;
    }
}

/* -- the service thread --------------------------------------------------------------------------- */

static int poll_timeout(struct uswap_nfs_io *io, uint64_t now)
{
    if (!io->inflight.head && !io->waiting.head && io->state != USWAP_NFS_CONNECTING)
        return -1;   /* idle: only a caller (eventfd) or the server (socket) has something to say */
    uint64_t until = now + (uint64_t)TICK_MS * 1000000u;
    if (io->inflight.head) {
        uint64_t t = io->inflight.head->sent + (uint64_t)USWAP_NFS_ATTEMPT_MS * 1000000u;
        if (t < until)
            until = t;
    }
    if (io->state == USWAP_NFS_CONNECTING && io->connect_deadline < until)
        until = io->connect_deadline;
    if (io->state == USWAP_NFS_DOWN && io->waiting.head && io->next_connect < until)
        until = io->next_connect;
    return until <= now ? 0 : (int)((until - now + 999999) / 1000000);
}

static void shut_down(struct uswap_nfs_io *io)
{
    io->shutting = 1;
    reset_context(io, NULL);
    pthread_mutex_lock(&io->lock);
    process_completed(io, now_ns());   /* what the reset failed ends as -ESHUTDOWN */
    list_splice(&io->waiting, &io->submitted);
    struct io_req *r;
    while ((r = io->waiting.head)) {
        list_unlink(&io->waiting, r);
        finish(io, r, -ESHUTDOWN);
    }
    pthread_mutex_unlock(&io->lock);
}

static void *service(void *arg)
{
    struct uswap_nfs_io *io = arg;
    io->backoff_ms = BACKOFF_FIRST_MS;
    start_connect(io);
    for (;;) {
        uint64_t now = now_ns();
        pthread_mutex_lock(&io->lock);
        int closing = io->closing;
        int opened = !io->first_connect;
        list_splice(&io->waiting, &io->submitted);
        process_completed(io, now);
        expire_waiting(io, now);
        io->st.retries = io->retries;
        io->st.most_in_flight = io->most_in_flight;
        io->st.commits = io->commits;
        pthread_mutex_unlock(&io->lock);
        if (closing || (!opened && io->open_done))
            break;   /* closing; or the open's connect failed (its error is with uswap_nfs_io_open) */

        if (io->reset_reason[0]) {
            if (io->state == USWAP_NFS_UP) {
                reset_context(io, io->reset_reason);
                if (io->served)
                    io->next_connect = now;   /* at once: it worked until now (a server restart) */
                else
                    back_off(io);             /* it broke before serving anything (or a server error
                                               * libnfs reported as a transport error) */
            }
            io->reset_reason[0] = 0;
            continue;   /* what the reset failed is decided about first */
        }
        if (io->state == USWAP_NFS_DOWN && io->waiting.head && now >= io->next_connect)
            start_connect(io);
        if (io->state == USWAP_NFS_CONNECTING)
            advance_connect(io);
        if (io->first_connect && io->open_done)
            continue;   /* the open's connect failed: the top of the loop ends the thread */
        if (io->state == USWAP_NFS_UP) {
            while (io->waiting.head && !io->reset_reason[0])
                send_request(io);
            /* send now what was queued, rather than after a poll() (as connection.py's _send_now) */
            if (!io->reset_reason[0] && (nfs_which_events(io->ctx) & POLLOUT) &&
                nfs_service(io->ctx, POLLOUT) < 0)
                snprintf(io->reset_reason, sizeof(io->reset_reason), "%s", nfs_get_error(io->ctx));
            if (io->inflight.head && !io->reset_reason[0] &&
                now_ns() >= io->inflight.head->sent + (uint64_t)USWAP_NFS_ATTEMPT_MS * 1000000u)
                snprintf(io->reset_reason, sizeof(io->reset_reason), "no answer for %gs",
                         USWAP_NFS_ATTEMPT_MS / 1000.0);
            if (io->reset_reason[0] || io->completed.head)
                continue;
        }
        if (io->state == USWAP_NFS_CONNECTING && io->step_done)
            continue;

        struct pollfd fds[2] = {{.fd = io->efd, .events = POLLIN}, {.fd = -1}};
        if (io->ctx && io->state != USWAP_NFS_DOWN) {
            fds[1].fd = nfs_get_fd(io->ctx);
            fds[1].events = (short)nfs_which_events(io->ctx);
        }
        int n = poll(fds, 2, poll_timeout(io, now_ns()));
        if (n < 0)
            continue;   /* EINTR */
        if (fds[0].revents) {
            uint64_t count;
            if (read(io->efd, &count, sizeof(count)) < 0) {
                /* EAGAIN: another pass took it */
            }
        }
        if (fds[1].fd >= 0 && fds[1].revents && nfs_service(io->ctx, fds[1].revents) < 0) {
            const char *msg = nfs_get_error(io->ctx);
            if (io->state == USWAP_NFS_CONNECTING && io->step_done) {
                /* the step's callback has the error: advance_connect reports it */
            } else if (io->state == USWAP_NFS_CONNECTING) {
                char full[200];
                mount_error(io, ECONNREFUSED, msg && *msg ? msg : "connection failed", full, sizeof(full));
                connect_failed(io, -ECONNREFUSED, full);
            } else {
                snprintf(io->reset_reason, sizeof(io->reset_reason), "%s", msg && *msg ? msg : "connection failed");
            }
        }
    }
    shut_down(io);
    return NULL;
}

/* -- the API -------------------------------------------------------------------------------------- */

static void free_io(struct uswap_nfs_io *io)
{
    if (io->efd >= 0)
        close(io->efd);
    pthread_mutex_destroy(&io->lock);
    pthread_cond_destroy(&io->idle);
    pthread_cond_destroy(&io->opened);
    free(io->libnfs_url);
    free(io->server);
    free(io->export_path);
    free(io->file);
    free(io);
}

int uswap_nfs_io_open(const char *libnfs_url, const char *server, const char *export_path, const char *file,
                      int commit, uint32_t timeout_ms, struct uswap_nfs_io **out, char *err, uint32_t errlen)
{
    *out = NULL;
    if (errlen)
        err[0] = 0;
    struct uswap_nfs_io *io = calloc(1, sizeof(*io));
    if (!io) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    io->efd = -1;
    pthread_mutex_init(&io->lock, NULL);
    pthread_cond_init(&io->idle, NULL);
    pthread_cond_init(&io->opened, NULL);
    io->libnfs_url = strdup(libnfs_url);
    io->server = strdup(server);
    io->export_path = strdup(export_path);
    io->file = strdup(file);
    io->commit = commit != 0;
    io->timeout_ns = (uint64_t)timeout_ms * 1000000u;
    io->first_connect = 1;
    io->st.state = USWAP_NFS_DOWN;
    io->st.since = wall_time();
    io->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!io->libnfs_url || !io->server || !io->export_path || !io->file || io->efd < 0) {
        int e = io->efd < 0 ? errno : ENOMEM;
        snprintf(err, errlen, "cannot set up the NFS client: %s", strerror(e));
        free_io(io);
        return -e;
    }
    /* the service thread takes no signals (it inherits this mask): they go to the process's other threads */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    /* A small stack: the daemon is mlockall'd, and glibc's default (8 MiB) would all be resident. */
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, SERVICE_STACK);
    int e = pthread_create(&io->thread, &attr, service, io);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (e) {
        snprintf(err, errlen, "cannot start the NFS service thread: %s", strerror(e));
        free_io(io);
        return -e;
    }
    pthread_mutex_lock(&io->lock);
    while (!io->open_done)
        pthread_cond_wait(&io->opened, &io->lock);
    int rc = io->open_result;
    snprintf(err, errlen, "%s", io->open_error);
    pthread_mutex_unlock(&io->lock);
    if (rc < 0) {
        pthread_join(io->thread, NULL);   /* it stops after a failed first connect */
        free_io(io);
        return rc;
    }
    *out = io;
    return 0;
}

static int64_t run(struct uswap_nfs_io *io, int op, void *buf, uint64_t len, uint64_t off)
{
    if (len == 0)
        return 0;
    if (len > MAX_TRANSFER)
        return -EINVAL;
    struct io_req r;
    memset(&r, 0, sizeof(r));
    r.io = io;
    r.op = op;
    r.buf = buf;
    r.len = len;
    r.off = off;
    r.deadline = now_ns() + io->timeout_ns;
    pthread_cond_init(&r.cond, NULL);
    pthread_mutex_lock(&io->lock);
    if (io->closing) {
        pthread_mutex_unlock(&io->lock);
        pthread_cond_destroy(&r.cond);
        return -ESHUTDOWN;
    }
    io->callers++;
    int wake = io->submitted.head == NULL;   /* a wake-up is already on its way otherwise */
    list_append(&io->submitted, &r);
    if (wake) {
        uint64_t one = 1;
        if (write(io->efd, &one, sizeof(one)) < 0) {
            /* EAGAIN: the counter is full, so the thread is woken anyway */
        }
    }
    while (!r.done)
        pthread_cond_wait(&r.cond, &io->lock);
    /* done: no list holds r, no libnfs callback is pending for it */
    if (--io->callers == 0 && io->closing)
        pthread_cond_broadcast(&io->idle);
    pthread_mutex_unlock(&io->lock);
    pthread_cond_destroy(&r.cond);
    return r.result;
}

int64_t uswap_nfs_io_pread(void *ctx, void *buf, uint64_t len, uint64_t off)
{
    return run(ctx, OP_READ, buf, len, off);
}

int64_t uswap_nfs_io_pwrite(void *ctx, const void *buf, uint64_t len, uint64_t off)
{
    /* the buffer is only read (libnfs copies it into the WRITE, and re-reads it for a short write's rest) */
    return run(ctx, OP_WRITE, (void *)buf, len, off);
}

int uswap_nfs_io_up(void *ctx)
{
    struct uswap_nfs_io *io = ctx;
    return __atomic_load_n(&io->st.state, __ATOMIC_RELAXED) == USWAP_NFS_UP;
}

void uswap_nfs_io_stats(struct uswap_nfs_io *io, struct uswap_nfs_io_stats *out)
{
    pthread_mutex_lock(&io->lock);
    *out = io->st;
    pthread_mutex_unlock(&io->lock);
}

void uswap_nfs_io_close(struct uswap_nfs_io *io)
{
    pthread_mutex_lock(&io->lock);
    io->closing = 1;
    pthread_mutex_unlock(&io->lock);
    uint64_t one = 1;
    if (write(io->efd, &one, sizeof(one)) < 0) {
        /* EAGAIN: full counter, the thread wakes anyway */
    }
    pthread_join(io->thread, NULL);   /* it fails everything queued or in flight with -ESHUTDOWN */
    pthread_mutex_lock(&io->lock);
    while (io->callers > 0)
        pthread_cond_wait(&io->idle, &io->lock);
    pthread_mutex_unlock(&io->lock);
    free_io(io);
}
