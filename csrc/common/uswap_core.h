/*
 * uswap C core: the few things Python should not do itself.
 *
 *   - the userfaultfd ioctls (our own binding; there is no package for it),
 *   - aligned buffers, page copies, zero-page detection and crc32c,
 *   - full-length pread/pwrite, FIEMAP and inode flags for the swap store.
 *
 * Convention: every function that can fail returns a negative errno and
 * leaves errno alone; the Python layer turns that into OSError.
 */
#ifndef USWAP_CORE_H
#define USWAP_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <linux/userfaultfd.h>
#include <linux/fiemap.h>
#include <linux/fs.h>

/*
 * Debian 12 ships Linux 6.1 headers; the kernel we run on is newer.  Define
 * what the headers lack, guarded so newer headers win.  Values are the
 * kernel's uapi (include/uapi/linux/userfaultfd.h).
 */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif
#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP ((__u64)1 << 1)
#endif

#ifndef UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
struct uffdio_poison {
	struct uffdio_range range;
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1 << 0)
	__u64 mode;
	__s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif

#ifndef UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
struct uffdio_move {
	__u64 dst;
	__u64 src;
	__u64 len;
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1 << 0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1 << 1)
	__u64 mode;
	__s64 move;
};
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif

#ifndef FS_NOCOW_FL
#define FS_NOCOW_FL 0x00800000
#endif

/* PAGEMAP_SCAN (Linux 6.7; Debian 12's headers are 6.1): <linux/fs.h> has it on newer systems */
#ifndef PAGEMAP_SCAN
#include <linux/types.h>
#define PAGE_IS_PRESENT (1 << 3)
struct page_region {
	__u64 start;
	__u64 end;
	__u64 categories;
};
struct pm_scan_arg {
	__u64 size;
	__u64 flags;
	__u64 start;
	__u64 end;
	__u64 walk_end;
	__u64 vec;
	__u64 vec_len;
	__u64 max_pages;
	__u64 category_inverted;
	__u64 category_mask;
	__u64 category_anyof_mask;
	__u64 return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif
#ifndef PAGE_IS_PFNZERO
#define PAGE_IS_PFNZERO (1 << 5)   /* mapped to the zero page (a read of fresh memory): PAGEMAP_SCAN has it from 6.7 on */
#endif

/*
 * Everything from here to CDEF-END is also read by build.py as cffi
 * declarations: keep it plain C (no macros, no includes).
 */
/* CDEF-BEGIN */

/* One userfaultfd message, flattened so that cffi needs no packed unions. */
struct uswap_uffd_event {
	uint8_t event;      /* UFFD_EVENT_* */
	uint64_t flags;     /* pagefault: UFFD_PAGEFAULT_FLAG_* */
	uint64_t address;   /* pagefault: faulting address; remove: start; remap: from */
	uint64_t arg2;      /* remove: end; remap: to; fork: the child's uffd */
	uint64_t arg3;      /* remap: len */
	uint32_t ptid;      /* pagefault with UFFD_FEATURE_THREAD_ID */
};

/* One FIEMAP extent, as the store checks need it. */
struct uswap_extent {
	uint64_t logical;
	uint64_t physical;
	uint64_t length;
	uint32_t flags;     /* FIEMAP_EXTENT_* */
};

/* userfaultfd */
int uswap_uffd_open(int flags);
int uswap_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out);
int uswap_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out);
int uswap_uffd_unregister(int fd, uint64_t start, uint64_t len);
int uswap_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *copied);
int uswap_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *zeroed);
int uswap_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *mapped);
int uswap_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *updated);
int uswap_uffd_poison_evicted(int fd, uint64_t start, uint64_t len, int64_t *done);

/* /proc/PID/pagemap: up to vec_len runs of present pages in [start, end), as (start, end) pairs in vec (two
 * words a run), at most max_pages pages (0: no limit); *walk_end is where the walk stopped.  The number of runs,
 * or -errno (-ENOTTY/-EINVAL: a kernel without PAGEMAP_SCAN). */
int uswap_pagemap_present(int fd, uint64_t start, uint64_t end, uint64_t *vec, uint64_t vec_len, uint64_t max_pages,
			  uint64_t *walk_end);
/* The same walk, counted in C: the present pages in [start, end) into *pages, at most max_pages of them (the
 * walk stops there), *walk_end where it stopped (end: the range is done).  Pages mapped to the zero page are
 * not counted (nor walked): they are nobody's memory (a memory cgroup charges nothing for them, reclaim cannot
 * take them) until written, and a write replaces them.  exclusive: only those mapped by this process alone
 * (pagemap's bit 56: a fork child's own pages), read from pagemap's entries of the present runs.  0, or -errno
 * as above. */
int uswap_pagemap_count(int fd, uint64_t start, uint64_t end, uint64_t max_pages, int exclusive, uint64_t *pages,
			uint64_t *walk_end);
int uswap_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *moved);
int uswap_uffd_wake(int fd, uint64_t start, uint64_t len);
int uswap_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);
int uswap_uffd_read_events(int fd, struct uswap_uffd_event *out, int max);

/* pages */
void *uswap_alloc_aligned(size_t align, size_t size);
void uswap_free(void *p);
/* A zeroed buffer that is a mapping of its own (aligned to align, a power of two; out of core dumps), given
 * back to the system by uswap_unmap_buffer(p, size): what a run process or region held goes when it ends,
 * which a malloc'd buffer in the mlockall'd daemon did not (freed into the brk heap, it stays locked).
 * NULL if it cannot be mapped. */
void *uswap_map_buffer(size_t align, size_t size);
void uswap_unmap_buffer(void *p, size_t size);
void uswap_page_copy(void *dst, const void *src, size_t len);
int uswap_is_zero(const void *p, size_t len);
uint32_t uswap_crc32c(uint32_t crc, const void *p, size_t len);
int uswap_crc32c_hardware(void);

/* store I/O */
int64_t uswap_pread_full(int fd, void *buf, size_t len, int64_t off);
int64_t uswap_pwrite_full(int fd, const void *buf, size_t len, int64_t off);
int uswap_fiemap(int fd, uint64_t start, uint64_t len, uint32_t flags,
		 struct uswap_extent *out, unsigned int max);
int uswap_get_inode_flags(int fd, uint32_t *flags);
int uswap_set_inode_flags(int fd, uint32_t flags);
int uswap_dio_alignment(int fd, uint32_t *mem_align, uint32_t *offset_align);
int uswap_fs_magic(int fd, int64_t *magic);
int uswap_punch_hole(int fd, int64_t offset, int64_t length);
int uswap_mlockall(void);
int uswap_set_io_flusher(void);
int uswap_set_undumpable(void);        /* no core dumps, no ptrace by non-root, /proc/PID/mem root-only */
int uswap_same_file(int fd1, int fd2);   /* 1 if both fds name one open file (kcmp) */

/* sealing (uswap_seal.c): AES-256-GCM per slot under a key only this process holds */
enum { USWAP_SEAL_KEY_BYTES = 32, USWAP_SEAL_TAG_BYTES = 16 };
struct uswap_sealer;   /* opaque: one locked, undumpable page holding the key and the write counter */
int uswap_sealer_new(struct uswap_sealer **out);
void uswap_sealer_free(struct uswap_sealer *s);
/* Encrypt count pages in place; page i gets a fresh generation gens_out[i] (its nonce) and its tag at
 * tags_out + i * USWAP_SEAL_TAG_BYTES, with slot first_slot + i as additional authenticated data. */
int uswap_seal_pages(struct uswap_sealer *s, void *buf, size_t count, size_t page_size, uint64_t first_slot,
		     uint64_t *gens_out, uint8_t *tags_out);
/* Decrypt and verify count pages in place; -EBADMSG with *bad_index set (that page zeroed) on any mismatch. */
int uswap_open_pages(struct uswap_sealer *s, void *buf, size_t count, size_t page_size, uint64_t first_slot,
		     const uint64_t *gens, const uint8_t *tags, int *bad_index);

/* CDEF-END */

/* A uffd message, flattened (read_events; the run engine's forwarded messages). */
void uswap_uffd_decode(const struct uffd_msg *m, struct uswap_uffd_event *e);

/* The fault threads' plumbing (uswap_engine.c, uswap_runeng.c). */
#include <pthread.h>
/* Start fn(arg) named `name`, every signal blocked in it, on a small stack: the daemon is mlockall'd, and
 * a default 8 MiB stack per thread was locked and populated for every region and run process (measured:
 * 12 MiB per forked run process); the stack is the caller's mapping, unmapped at uswap_stop_thread.  0, or -errno. */
int uswap_start_thread(pthread_t *thread, void *(*fn)(void *), void *arg, const char *name);
/* Stop a thread started so: tell it through its eventfd and, under its lock, its stopping flag (a wait on
 * cond ends), join it and unmap its stack. */
void uswap_stop_thread(pthread_t thread, int stop_fd, pthread_mutex_t *lock, pthread_cond_t *cond, int *stopping);
/* Copy n atomic counters. */
void uswap_copy_counters(const uint64_t *src, uint64_t *dst, size_t n);

#endif
