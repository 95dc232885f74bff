/*
 * The C floor of a random swap-in, for `uswap bench` to print next to uswap's
 * own: a handler thread doing what the fault engine does at the least —
 * poll the uffd, read the event, pread one 4 KiB slot with O_DIRECT, install
 * it with UFFDIO_COPY — against a thread touching random pages of a fresh
 * shmem region, timing each touch.  No swap map, no codec, no readahead, no
 * reclaim: whatever uswap adds on top of this is its own cost.  Both threads
 * unpinned, like the engine and its client.
 */
#define _GNU_SOURCE
#include "uswap_engine.h"
#include "uswap_core.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

struct probe {
	int uffd, stop_fd, store_fd;
	uint64_t addr, slots;
	uint32_t page_size;
	void *buf;
	uint64_t rng;
};

static uint64_t next_random(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static void *probe_handler(void *arg)
{
	struct probe *p = arg;
	struct uffd_msg msg;
	for (;;) {
		struct pollfd fds[2] = { { .fd = p->uffd, .events = POLLIN }, { .fd = p->stop_fd, .events = POLLIN } };
		if (poll(fds, 2, -1) < 0 && errno != EINTR)
			break;
		if (fds[1].revents)
			break;
		if (read(p->uffd, &msg, sizeof(msg)) != sizeof(msg) || msg.event != UFFD_EVENT_PAGEFAULT)
			continue;
		uint64_t slot = next_random(&p->rng) % p->slots;
		uswap_pread_full(p->store_fd, p->buf, p->page_size, (int64_t)((slot + 1) * p->page_size));
		int64_t done;
		uint64_t at = msg.arg.pagefault.address & ~(uint64_t)(p->page_size - 1);
		uswap_uffd_copy(p->uffd, at, (uint64_t)(uintptr_t)p->buf, p->page_size, 0, &done);
	}
	return NULL;
}

/* Touch n random pages of a fresh region served by the handler; samples_ns[i]: each touch.
 * store_fd: an O_DIRECT store with slots slots (slot s at (s + 1) * page_size). */
int uswap_probe_swapin_floor(int store_fd, uint64_t slots, uint32_t page_size, uint32_t n, uint64_t *samples_ns)
{
	struct probe p = { .store_fd = store_fd, .slots = slots ? slots : 1, .page_size = page_size,
			   .rng = 0x9e3779b97f4a7c15ULL, .uffd = -1, .stop_fd = -1 };
	size_t pages = (size_t)n * 4 + 16, len = pages * page_size;
	int ret = 0, memfd = -1;
	void *region = MAP_FAILED;
	pthread_t thread;
	uint64_t features, ioctls;
	p.buf = uswap_alloc_aligned(page_size, page_size);
	memfd = memfd_create("uswap-probe", MFD_CLOEXEC);
	if (!p.buf || memfd < 0 || ftruncate(memfd, (off_t)len) < 0) {
		ret = p.buf ? -errno : -ENOMEM;
		goto out;
	}
	region = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (region == MAP_FAILED) {
		ret = -errno;
		goto out;
	}
	p.addr = (uint64_t)(uintptr_t)region;
	p.uffd = uswap_uffd_open(O_CLOEXEC | O_NONBLOCK);
	if (p.uffd < 0) {
		ret = p.uffd;
		goto out;
	}
	ret = uswap_uffd_api(p.uffd, UFFD_FEATURE_MISSING_SHMEM, &features, &ioctls);
	if (ret == 0)
		ret = uswap_uffd_register(p.uffd, p.addr, len, UFFDIO_REGISTER_MODE_MISSING, &ioctls);
	p.stop_fd = eventfd(0, EFD_CLOEXEC);
	if (ret < 0 || p.stop_fd < 0) {
		ret = ret < 0 ? ret : -errno;
		goto out;
	}
	ret = -pthread_create(&thread, NULL, probe_handler, &p);
	if (ret < 0)
		goto out;
	uint64_t rng = 0x2545f4914f6cdd1dULL;
	for (uint32_t i = 0; i < n; i++) {
		size_t page = next_random(&rng) % pages;
		volatile char *at = (volatile char *)region + page * page_size;
		struct timespec t0, t1;
		clock_gettime(CLOCK_MONOTONIC, &t0);
		(void)*at;
		clock_gettime(CLOCK_MONOTONIC, &t1);
		samples_ns[i] = (uint64_t)(t1.tv_sec - t0.tv_sec) * 1000000000ULL + (uint64_t)(t1.tv_nsec - t0.tv_nsec);
		/* drop it again, so the next touch of this page faults too */
		fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(page * page_size), page_size);
	}
	uint64_t one = 1;
	if (write(p.stop_fd, &one, sizeof(one)) < 0)
		ret = -errno;
	pthread_join(thread, NULL);
out:
	if (region != MAP_FAILED)
		munmap(region, len);
	if (p.uffd >= 0)
		close(p.uffd);
	if (p.stop_fd >= 0)
		close(p.stop_fd);
	if (memfd >= 0)
		close(memfd);
	uswap_free(p.buf);
	return ret;
}
