/* uswap C core.  See uswap_core.h for the conventions. */
#define _GNU_SOURCE
#include "uswap_core.h"

#include <errno.h>
#include <signal.h>
#include <fcntl.h>
#include <malloc.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>
#include <linux/stat.h>

#define NEG_ERRNO() (-(errno ? errno : EIO))

/* ------------------------------------------------------------------ */
/* userfaultfd                                                        */
/* ------------------------------------------------------------------ */

/*
 * /dev/userfaultfd first: it works for unprivileged users when the admin
 * grants access to the device, whatever vm.unprivileged_userfaultfd says.
 * The syscall is the fallback for kernels before 6.1 or a missing node.
 */
int uswap_uffd_open(int flags)
{
	int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev >= 0) {
		int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
		int err = errno;
		close(dev);
		if (fd >= 0)
			return fd;
		if (err != ENOTTY && err != EINVAL)
			return -err;
	}
	long fd = syscall(SYS_userfaultfd, flags);
	return fd < 0 ? NEG_ERRNO() : (int)fd;
}

int uswap_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out)
{
	struct uffdio_api api = { .api = UFFD_API, .features = features };
	if (ioctl(fd, UFFDIO_API, &api) < 0)
		return NEG_ERRNO();
	*features_out = api.features;
	*ioctls_out = api.ioctls;
	return 0;
}

int uswap_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out)
{
	struct uffdio_register reg = { .range = { start, len }, .mode = mode };
	if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
		return NEG_ERRNO();
	*ioctls_out = reg.ioctls;
	return 0;
}

int uswap_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range range = { start, len };
	return ioctl(fd, UFFDIO_UNREGISTER, &range) < 0 ? NEG_ERRNO() : 0;
}

/*
 * The "fill" ioctls report progress in their last field even when they fail:
 * with EAGAIN it is the number of bytes done before the kernel gave up (the
 * caller retries the rest); otherwise it is the negated errno.  We hand the
 * count back through *done in both cases and return 0 or -errno.
 */
int uswap_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done)
{
	struct uffdio_copy c = { .dst = dst, .src = src, .len = len, .mode = mode };
	int ret = ioctl(fd, UFFDIO_COPY, &c) < 0 ? NEG_ERRNO() : 0;
	*done = c.copy > 0 ? c.copy : 0;
	return ret;
}

int uswap_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
	struct uffdio_zeropage z = { .range = { start, len }, .mode = mode };
	int ret = ioctl(fd, UFFDIO_ZEROPAGE, &z) < 0 ? NEG_ERRNO() : 0;
	*done = z.zeropage > 0 ? z.zeropage : 0;
	return ret;
}

int uswap_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
	struct uffdio_continue c = { .range = { start, len }, .mode = mode };
	int ret = ioctl(fd, UFFDIO_CONTINUE, &c) < 0 ? NEG_ERRNO() : 0;
	*done = c.mapped > 0 ? c.mapped : 0;
	return ret;
}

int uswap_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
	struct uffdio_poison p = { .range = { start, len }, .mode = mode };
	int ret = ioctl(fd, UFFDIO_POISON, &p) < 0 ? NEG_ERRNO() : 0;
	*done = p.updated > 0 ? p.updated : 0;
	return ret;
}

/*
 * Poison a page that was evicted by a hole punch.  On shmem the punch keeps
 * a uffd-wp marker in the page table if the page was write-protected, and
 * UFFDIO_POISON wants an empty entry (EEXIST otherwise): resolve the marker
 * first.  The daemon (unreadable slot) and the client's watchdog (daemon
 * gone) both need exactly this.
 */
int uswap_uffd_poison_evicted(int fd, uint64_t start, uint64_t len, int64_t *done)
{
	int ret = uswap_uffd_writeprotect(fd, start, len, 0);
	if (ret < 0)
		return ret;
	return uswap_uffd_poison(fd, start, len, 0, done);
}

int uswap_pagemap_present(int fd, uint64_t start, uint64_t end, uint64_t *vec, uint64_t vec_len, uint64_t max_pages,
			  uint64_t *walk_end)
{
	struct page_region regions[64];
	struct pm_scan_arg arg = { .size = sizeof(arg), .start = start, .end = end, .vec = (uint64_t)(uintptr_t)regions,
				   .vec_len = vec_len < 64 ? vec_len : 64, .max_pages = max_pages,
				   .category_mask = PAGE_IS_PRESENT, .return_mask = PAGE_IS_PRESENT };
	long n = ioctl(fd, PAGEMAP_SCAN, &arg);
	if (n < 0)
		return NEG_ERRNO();
	for (long i = 0; i < n; i++) {
		vec[2 * i] = regions[i].start;
		vec[2 * i + 1] = regions[i].end;
	}
	*walk_end = arg.walk_end;
	return (int)n;
}

/* Pages of [start, end) whose pagemap entry says present and exclusively mapped (bits 63 and 56). */
static int64_t count_exclusive(int fd, uint64_t start, uint64_t end, uint64_t page_size)
{
	uint64_t entries[512], n = 0;
	for (uint64_t a = start; a < end;) {
		uint64_t k = (end - a) / page_size < 512 ? (end - a) / page_size : 512;
		int64_t got = uswap_pread_full(fd, entries, k * 8, (int64_t)(a / page_size * 8));
		if (got < 0)
			return got;
		for (uint64_t i = 0; i < (uint64_t)got / 8; i++)
			n += (entries[i] >> 56 & 0x81) == 0x81;   /* bit 63 present, bit 56 exclusive */
		if ((uint64_t)got < k * 8)
			break;
		a += k * page_size;
	}
	return (int64_t)n;
}

int uswap_pagemap_count(int fd, uint64_t start, uint64_t end, uint64_t max_pages, int exclusive, uint64_t *pages,
			uint64_t *walk_end)
{
	struct page_region regions[64];
	uint64_t page_size = (uint64_t)getpagesize(), counted = 0, pos = start;

	while (pos < end && counted < max_pages) {
		struct pm_scan_arg arg = { .size = sizeof(arg), .start = pos, .end = end,
					   .vec = (uint64_t)(uintptr_t)regions, .vec_len = 64,
					   .max_pages = max_pages - counted,
					   .category_inverted = PAGE_IS_PFNZERO,   /* present, not the zero page */
					   .category_mask = PAGE_IS_PRESENT | PAGE_IS_PFNZERO,
					   .return_mask = PAGE_IS_PRESENT };
		long n = ioctl(fd, PAGEMAP_SCAN, &arg);
		if (n < 0)
			return NEG_ERRNO();
		for (long i = 0; i < n; i++) {
			int64_t k = exclusive ? count_exclusive(fd, regions[i].start, regions[i].end, page_size)
					      : (int64_t)((regions[i].end - regions[i].start) / page_size);
			if (k < 0)
				return (int)k;
			counted += (uint64_t)k;
		}
		if (arg.walk_end <= pos)   /* no progress: the kernel said the walk is done */
			break;
		pos = arg.walk_end;
	}
	*pages = counted;
	*walk_end = pos < end ? pos : end;
	return 0;
}

int uswap_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done)
{
	struct uffdio_move m = { .dst = dst, .src = src, .len = len, .mode = mode };
	int ret = ioctl(fd, UFFDIO_MOVE, &m) < 0 ? NEG_ERRNO() : 0;
	*done = m.move > 0 ? m.move : 0;
	return ret;
}

int uswap_uffd_wake(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range range = { start, len };
	return ioctl(fd, UFFDIO_WAKE, &range) < 0 ? NEG_ERRNO() : 0;
}

int uswap_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
	struct uffdio_writeprotect wp = { .range = { start, len }, .mode = mode };
	return ioctl(fd, UFFDIO_WRITEPROTECT, &wp) < 0 ? NEG_ERRNO() : 0;
}

#define EVENT_BATCH 64

/* Read up to max queued messages; -EAGAIN when none is queued (O_NONBLOCK). */
void uswap_uffd_decode(const struct uffd_msg *m, struct uswap_uffd_event *e)
{
	memset(e, 0, sizeof(*e));
	e->event = m->event;
	switch (m->event) {
	case UFFD_EVENT_PAGEFAULT:
		e->flags = m->arg.pagefault.flags;
		e->address = m->arg.pagefault.address;
		e->ptid = m->arg.pagefault.feat.ptid;
		break;
	case UFFD_EVENT_FORK:
		e->arg2 = m->arg.fork.ufd;
		break;
	case UFFD_EVENT_REMAP:
		e->address = m->arg.remap.from;
		e->arg2 = m->arg.remap.to;
		e->arg3 = m->arg.remap.len;
		break;
	case UFFD_EVENT_REMOVE:
	case UFFD_EVENT_UNMAP:
		e->address = m->arg.remove.start;
		e->arg2 = m->arg.remove.end;
		break;
	}
}

int uswap_uffd_read_events(int fd, struct uswap_uffd_event *out, int max)
{
	struct uffd_msg msgs[EVENT_BATCH];
	if (max > EVENT_BATCH)
		max = EVENT_BATCH;
	if (max <= 0)
		return -EINVAL;
	ssize_t n;
	do {
		n = read(fd, msgs, sizeof(msgs[0]) * (size_t)max);
	} while (n < 0 && errno == EINTR);
	if (n < 0)
		return NEG_ERRNO();
	int count = (int)(n / (ssize_t)sizeof(msgs[0]));
	for (int i = 0; i < count; i++)
		uswap_uffd_decode(&msgs[i], &out[i]);
	return count;
}

/* ------------------------------------------------------------------ */
/* pages                                                              */
/* ------------------------------------------------------------------ */

void *uswap_alloc_aligned(size_t align, size_t size)
{
	void *p = NULL;
	if (posix_memalign(&p, align, size) != 0)
		return NULL;
	memset(p, 0, size);
	/* Swapped pages pass through these buffers: keep them out of core dumps
	 * (best effort; the daemon is also not dumpable). */
	long page = sysconf(_SC_PAGESIZE);
	if (align >= (size_t)page)
		madvise(p, (size + page - 1) & ~(size_t)(page - 1), MADV_DONTDUMP);
	return p;
}

static size_t page_round(size_t size)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	return (size + page - 1) & ~(page - 1);
}

void *uswap_map_buffer(size_t align, size_t size)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	if (align < page)
		align = page;
	size = page_round(size);
	size_t len = size + align - page;   /* room for an aligned start; the rest is unmapped again */
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return NULL;
	char *a = (char *)(((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1));
	if (a > p)
		munmap(p, (size_t)(a - p));
	if (p + len > a + size)
		munmap(a + size, (size_t)(p + len - (a + size)));
	madvise(a, size, MADV_DONTDUMP);   /* swapped pages pass through: out of core dumps (best effort) */
	return a;
}

void uswap_unmap_buffer(void *p, size_t size)
{
	if (p)
		munmap(p, page_round(size));
}

int uswap_set_undumpable(void)
{
	return prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0 ? NEG_ERRNO() : 0;
}

int uswap_same_file(int fd1, int fd2)
{
	pid_t self = getpid();
	long ret = syscall(SYS_kcmp, self, self, 0 /* KCMP_FILE */, fd1, fd2);
	return ret < 0 ? NEG_ERRNO() : ret == 0;
}

void uswap_free(void *p)
{
	free(p);
}

void uswap_page_copy(void *dst, const void *src, size_t len)
{
	memcpy(dst, src, len);
}

int uswap_is_zero(const void *p, size_t len)
{
	const uint64_t *w = p;
	size_t n = len / sizeof(uint64_t);
	uint64_t acc = 0;
	/* OR eight words at a time: one branch per 64 bytes. */
	size_t i = 0;
	for (; i + 8 <= n; i += 8) {
		acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
		if (acc)
			return 0;
	}
	for (; i < n; i++)
		acc |= w[i];
	const unsigned char *tail = (const unsigned char *)(w + n);
	for (size_t j = 0; j < len % sizeof(uint64_t); j++)
		acc |= tail[j];
	return acc == 0;
}

/*
 * crc32c (Castagnoli).  The SSE4.2 instruction does 8 bytes per cycle-ish,
 * about 0.2 us for a 4 KiB page; the table is the fallback for CPUs without
 * it.  Same convention as zlib's crc32(): pass 0 to start, chain the result.
 */
static uint32_t crc32c_table[256];

static void crc32c_init_table(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
		crc32c_table[i] = c;
	}
}

static uint32_t crc32c_soft(uint32_t crc, const unsigned char *p, size_t len)
{
	if (!crc32c_table[1])
		crc32c_init_table();
	while (len--)
		crc = crc32c_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t crc32c_sse42(uint32_t crc, const unsigned char *p, size_t len)
{
	uint64_t c = crc;
	while (len >= 8) {
		uint64_t w;
		memcpy(&w, p, 8);
		c = __builtin_ia32_crc32di(c, w);
		p += 8;
		len -= 8;
	}
	uint32_t c32 = (uint32_t)c;
	while (len--)
		c32 = __builtin_ia32_crc32qi(c32, *p++);
	return c32;
}
#endif

int uswap_crc32c_hardware(void)
{
#if defined(__x86_64__)
	return __builtin_cpu_supports("sse4.2");
#else
	return 0;
#endif
}

uint32_t uswap_crc32c(uint32_t crc, const void *p, size_t len)
{
	crc = ~crc;
#if defined(__x86_64__)
	static int hw = -1;
	if (hw < 0)
		hw = uswap_crc32c_hardware();
	if (hw)
		return ~crc32c_sse42(crc, p, len);
#endif
	return ~crc32c_soft(crc, p, len);
}

/* ------------------------------------------------------------------ */
/* store I/O                                                          */
/* ------------------------------------------------------------------ */

/* Returns the bytes transferred: fewer than len only at end of file. */
int64_t uswap_pread_full(int fd, void *buf, size_t len, int64_t off)
{
	size_t done = 0;
	while (done < len) {
		ssize_t n = pread(fd, (char *)buf + done, len - done, off + (int64_t)done);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return NEG_ERRNO();
		}
		if (n == 0)
			break;
		done += (size_t)n;
	}
	return (int64_t)done;
}

int64_t uswap_pwrite_full(int fd, const void *buf, size_t len, int64_t off)
{
	size_t done = 0;
	while (done < len) {
		ssize_t n = pwrite(fd, (const char *)buf + done, len - done, off + (int64_t)done);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return NEG_ERRNO();
		}
		if (n == 0)
			return -EIO; /* a regular file never writes 0 bytes without an error */
		done += (size_t)n;
	}
	return (int64_t)done;
}

/* Fills up to max extents of [start, start+len); returns how many. */
int uswap_fiemap(int fd, uint64_t start, uint64_t len, uint32_t flags,
		 struct uswap_extent *out, unsigned int max)
{
	size_t size = sizeof(struct fiemap) + sizeof(struct fiemap_extent) * max;
	struct fiemap *fm = calloc(1, size);
	if (!fm)
		return -ENOMEM;
	fm->fm_start = start;
	fm->fm_length = len;
	fm->fm_flags = flags;
	fm->fm_extent_count = max;
	int ret;
	if (ioctl(fd, FS_IOC_FIEMAP, fm) < 0) {
		ret = NEG_ERRNO();
	} else {
		ret = (int)fm->fm_mapped_extents;
		for (int i = 0; i < ret; i++) {
			out[i].logical = fm->fm_extents[i].fe_logical;
			out[i].physical = fm->fm_extents[i].fe_physical;
			out[i].length = fm->fm_extents[i].fe_length;
			out[i].flags = fm->fm_extents[i].fe_flags;
		}
	}
	free(fm);
	return ret;
}

int uswap_get_inode_flags(int fd, uint32_t *flags)
{
	int f = 0; /* the ioctl takes an int, whatever its name says */
	if (ioctl(fd, FS_IOC_GETFLAGS, &f) < 0)
		return NEG_ERRNO();
	*flags = (uint32_t)f;
	return 0;
}

int uswap_set_inode_flags(int fd, uint32_t flags)
{
	int f = (int)flags;
	return ioctl(fd, FS_IOC_SETFLAGS, &f) < 0 ? NEG_ERRNO() : 0;
}

/*
 * Direct I/O alignment from statx(STATX_DIOALIGN) (Linux 6.1).  -EOPNOTSUPP
 * when the filesystem does not report it; 0 alignments mean "no O_DIRECT".
 */
int uswap_dio_alignment(int fd, uint32_t *mem_align, uint32_t *offset_align)
{
	struct statx stx;
	memset(&stx, 0, sizeof(stx));
	if (syscall(SYS_statx, fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) < 0)
		return NEG_ERRNO();
	if (!(stx.stx_mask & STATX_DIOALIGN))
		return -EOPNOTSUPP;
	*mem_align = stx.stx_dio_mem_align;
	*offset_align = stx.stx_dio_offset_align;
	return 0;
}

/* The filesystem's magic number (statfs f_type): ext4, xfs, btrfs, nfs, tmpfs... */
int uswap_fs_magic(int fd, int64_t *magic)
{
	struct statfs st;
	if (fstatfs(fd, &st) < 0)
		return NEG_ERRNO();
	*magic = (int64_t)(uint64_t)(unsigned long)st.f_type;
	return 0;
}

/* Drop [offset, offset+length) from a file (a memfd: the pages go back to the
 * system, and the next access through a registered mapping is a MISSING fault). */
int uswap_punch_hole(int fd, int64_t offset, int64_t length)
{
	return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) < 0 ? NEG_ERRNO() : 0;
}

/* Every mapping of an mlockall'd process is locked, so what malloc keeps is locked too.  glibc gives each
 * thread an arena (up to 8 per CPU), each a 64 MiB reservation counted in VmLck and never unmapped; the fault
 * threads allocate in OpenSSL, so 300 run processes left 1.1 GiB of VmLck behind them (issue 18).  One arena.
 * (Buffers a process or region holds are mappings of their own, uswap_map_buffer: freed into the brk heap,
 * they stayed locked there.) */
int uswap_mlockall(void)
{
	mallopt(M_ARENA_MAX, 1);
	return mlockall(MCL_CURRENT | MCL_FUTURE) < 0 ? NEG_ERRNO() : 0;
}

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

/* Mark the process as part of the I/O path: its allocations do not recurse
 * into I/O reclaim (PF_MEMALLOC_NOIO), like loop and nbd workers. */
int uswap_set_io_flusher(void)
{
	return prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) < 0 ? NEG_ERRNO() : 0;
}

/* ------------------------------------------------------------------ */
/* fault threads                                                      */
/* ------------------------------------------------------------------ */

#define THREAD_STACK (256 << 10)   /* bytes; the threads' frames need a few KiB */

int uswap_start_thread(pthread_t *thread, void *(*fn)(void *), void *arg, const char *name)
{
	/* A stack of our own (a guard page below it), unmapped by uswap_stop_thread: glibc keeps up to 40 MiB
	 * of exited threads' stacks for reuse, and in the mlockall'd daemon that cache stayed locked after the
	 * run processes were gone (measured: 157 stacks, 40 MiB). */
	size_t guard = (size_t)sysconf(_SC_PAGESIZE);
	char *stack = mmap(NULL, THREAD_STACK + guard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK,
			   -1, 0);
	if (stack == MAP_FAILED)
		return NEG_ERRNO();
	mprotect(stack, guard, PROT_NONE);
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);   /* the thread inherits a mask that blocks everything */
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setstack(&attr, stack + guard, THREAD_STACK);
	int ret = -pthread_create(thread, &attr, fn, arg);
	pthread_attr_destroy(&attr);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (ret == 0)
		pthread_setname_np(*thread, name);   /* for top -H, perf -t, gdb */
	else
		munmap(stack, THREAD_STACK + guard);
	return ret;
}

void uswap_stop_thread(pthread_t thread, int stop_fd, pthread_mutex_t *lock, pthread_cond_t *cond, int *stopping)
{
	uint64_t one = 1;
	if (write(stop_fd, &one, sizeof(one)) < 0) {
		/* cannot fail for a fresh eventfd counter */
	}
	pthread_mutex_lock(lock);
	*stopping = 1;
	pthread_cond_broadcast(cond);
	pthread_mutex_unlock(lock);
	void *stack = NULL;         /* ours (uswap_start_thread): glibc leaves a caller's stack to the caller */
	size_t size = 0, guard = (size_t)sysconf(_SC_PAGESIZE);
	pthread_attr_t attr;
	if (pthread_getattr_np(thread, &attr) == 0) {
		pthread_attr_getstack(&attr, &stack, &size);
		pthread_attr_destroy(&attr);
	}
	pthread_join(thread, NULL);
	if (stack)
		munmap((char *)stack - guard, size + guard);
}

void uswap_copy_counters(const uint64_t *src, uint64_t *dst, size_t n)
{
	for (size_t i = 0; i < n; i++)
		dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}
