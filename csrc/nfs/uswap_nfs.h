/*
 * uswap's shim over libnfs's asynchronous API (NFSv3).
 *
 * Every call queues one request and returns 0, or -errno if it could not be
 * queued.  Its completion is written into the caller's struct uswap_nfs_req
 * by the callback, which libnfs runs from nfs_service() (or, with a failure
 * status, from nfs_destroy_context()): exactly once per queued request.
 * The caller keeps the request and its buffer alive until `done` is set
 * (libnfs 4.0 copies write data when queuing, but resends a short write
 * from the caller's buffer), or until the context is destroyed.
 * Callbacks only record: libnfs must not be called from inside one.
 */
#ifndef USWAP_NFS_H
#define USWAP_NFS_H

#include <stdint.h>

struct nfs_context;
struct nfsfh;

/* CDEF-BEGIN */
struct uswap_nfs_req {
    int done;                  /* set last, by the callback */
    int64_t result;            /* bytes transferred, or 0, or -errno */
    void *buf;                 /* pread: where the data goes (count bytes); NULL: abandoned, drop it */
    uint64_t count;
    struct nfsfh *fh;          /* open/create: the new handle */
    uint64_t size;             /* stat: the file's size */
    uint64_t mode;             /* stat: st_mode */
    uint64_t used;             /* stat: bytes the server has allocated (st_blocks * 512) */
    char error[200];           /* libnfs's message when result < 0 */
};

int uswap_nfs_mount(struct nfs_context *nfs, const char *server, const char *export_path,
                    struct uswap_nfs_req *req);
int uswap_nfs_open(struct nfs_context *nfs, const char *path, int flags, struct uswap_nfs_req *req);
int uswap_nfs_create(struct nfs_context *nfs, const char *path, int flags, int mode, struct uswap_nfs_req *req);
int uswap_nfs_stat(struct nfs_context *nfs, const char *path, struct uswap_nfs_req *req);
int uswap_nfs_pread(struct nfs_context *nfs, struct nfsfh *fh, uint64_t offset, uint64_t count, void *buf,
                    struct uswap_nfs_req *req);
int uswap_nfs_pwrite(struct nfs_context *nfs, struct nfsfh *fh, uint64_t offset, uint64_t count, const void *buf,
                     struct uswap_nfs_req *req);
int uswap_nfs_fsync(struct nfs_context *nfs, struct nfsfh *fh, struct uswap_nfs_req *req);
int uswap_nfs_close(struct nfs_context *nfs, struct nfsfh *fh, struct uswap_nfs_req *req);
int uswap_nfs_unlink(struct nfs_context *nfs, const char *path, struct uswap_nfs_req *req);
int uswap_nfs_rename(struct nfs_context *nfs, const char *from, const char *to, struct uswap_nfs_req *req);
/* CDEF-END */

#endif
