/* See uswap_nfs.h.  Each callback fills the request and sets `done` last. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>  /* libnfs.h needs struct timeval */
#include <nfsc/libnfs.h>

#include "uswap_nfs.h"

/* On failure `data` is not always a message (for reads and writes it can be the
 * server's reply struct): the context's error string is. */
static void finish(struct nfs_context *nfs, struct uswap_nfs_req *req, int err)
{
    req->result = err;
    if (err < 0) {
        const char *msg = nfs_get_error(nfs);
        snprintf(req->error, sizeof(req->error), "%s", msg && *msg ? msg : strerror(-err));
    }
    req->done = 1;
}

static void transfer_cb(int err, struct nfs_context *nfs, void *data, void *private_data)
{
    finish(nfs, private_data, err);
}

static void read_cb(int err, struct nfs_context *nfs, void *data, void *private_data)
{
    struct uswap_nfs_req *req = private_data;
    /* data is libnfs's reply buffer, valid only during this call */
    if (err > 0 && req->buf)
        memcpy(req->buf, data, (uint64_t)err < req->count ? (uint64_t)err : req->count);
    finish(nfs, req, err);
}

static void handle_cb(int err, struct nfs_context *nfs, void *data, void *private_data)
{
    struct uswap_nfs_req *req = private_data;
    if (err == 0)
        req->fh = data;
    finish(nfs, req, err);
}

static void stat_cb(int err, struct nfs_context *nfs, void *data, void *private_data)
{
    struct uswap_nfs_req *req = private_data;
    if (err == 0) {
        const struct nfs_stat_64 *st = data;
        req->size = st->nfs_size;
        req->mode = st->nfs_mode;
        req->used = st->nfs_used;
    }
    finish(nfs, req, err);
}

/* libnfs's *_async return -1 (message in nfs_get_error) when a request cannot be queued */
static int queued(int ret, struct nfs_context *nfs, struct uswap_nfs_req *req)
{
    if (ret == 0)
        return 0;
    snprintf(req->error, sizeof(req->error), "%s", nfs_get_error(nfs));
    return ret < -1 ? ret : -EIO;
}

static void start(struct uswap_nfs_req *req)
{
    req->done = 0;
    req->result = 0;
    req->error[0] = 0;
}

int uswap_nfs_mount(struct nfs_context *nfs, const char *server, const char *export_path,
                    struct uswap_nfs_req *req)
{
    start(req);
    return queued(nfs_mount_async(nfs, server, export_path, transfer_cb, req), nfs, req);
}

int uswap_nfs_open(struct nfs_context *nfs, const char *path, int flags, struct uswap_nfs_req *req)
{
    start(req);
    return queued(nfs_open_async(nfs, path, flags, handle_cb, req), nfs, req);
}

int uswap_nfs_create(struct nfs_context *nfs, const char *path, int flags, int mode, struct uswap_nfs_req *req)
{
    start(req);
    return queued(nfs_create_async(nfs, path, flags, mode, handle_cb, req), nfs, req);
}

int uswap_nfs_stat(struct nfs_context *nfs, const char *path, struct uswap_nfs_req *req)
{
    start(req);
    return queued(nfs_stat64_async(nfs, path, stat_cb, req), nfs, req);
}

int uswap_nfs_pread(struct nfs_context *nfs, struct nfsfh *fh, uint64_t offset, uint64_t count, void *buf,
                    struct uswap_nfs_req *req)
{
    start(req);
    req->buf = buf;
    req->count = count;
    return queued(nfs_pread_async(nfs, fh, offset, count, read_cb, req), nfs, req);
}

int uswap_nfs_pwrite(struct nfs_context *nfs, struct nfsfh *fh, uint64_t offset, uint64_t count, const void *buf,
                     struct uswap_nfs_req *req)
{
    start(req);
    req->count = count;
    return queued(nfs_pwrite_async(nfs, fh, offset, count, buf, transfer_cb, req), nfs, req);
}

int uswap_nfs_fsync(struct nfs_context *nfs, struct nfsfh *fh, struct uswap_nfs_req *req)
{
    start(req);
    return queued(nfs_fsync_async(nfs, fh, transfer_cb, req), nfs, req);
}

int uswap_nfs_close(struct nfs_context *nfs, struct nfsfh *fh, struct uswap_nfs_req *req)
{
    start(req);
    return queued(nfs_close_async(nfs, fh, transfer_cb, req), nfs, req);
}

int uswap_nfs_unlink(struct nfs_context *nfs, const char *path, struct uswap_nfs_req *req)
{
    start(req);
    return queued(nfs_unlink_async(nfs, path, transfer_cb, req), nfs, req);
}

int uswap_nfs_rename(struct nfs_context *nfs, const char *from, const char *to, struct uswap_nfs_req *req)
{
    start(req);
    return queued(nfs_rename_async(nfs, from, to, transfer_cb, req), nfs, req);
}
