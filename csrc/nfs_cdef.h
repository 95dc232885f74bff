/* The part of libnfs's API (nfsc/libnfs.h, libnfs 4.0) that Python calls directly. */
struct nfs_context;
struct nfsfh;
struct nfs_url {
    char *server;
    char *path;
    char *file;
};

struct nfs_context *nfs_init_context(void);
void nfs_destroy_context(struct nfs_context *nfs);
char *nfs_get_error(struct nfs_context *nfs);
struct nfs_url *nfs_parse_url_full(struct nfs_context *nfs, const char *url);
void nfs_destroy_url(struct nfs_url *url);
int nfs_get_fd(struct nfs_context *nfs);
int nfs_which_events(struct nfs_context *nfs);
int nfs_service(struct nfs_context *nfs, int revents);
int nfs_queue_length(struct nfs_context *nfs);
void nfs_set_timeout(struct nfs_context *nfs, int milliseconds);
void nfs_set_autoreconnect(struct nfs_context *nfs, int num_retries);
uint64_t nfs_get_readmax(struct nfs_context *nfs);
uint64_t nfs_get_writemax(struct nfs_context *nfs);
