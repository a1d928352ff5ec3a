/*
 * dirtylog.c: see dirtylog.h.  Debian 12's kernel headers predate PAGEMAP_SCAN
 * and UFFD_FEATURE_WP_ASYNC, so their definitions (Linux 6.7 uapi) are here.
 */
#define _GNU_SOURCE
#include "dirtylog.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PS 4096ull

#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif

#ifndef PAGEMAP_SCAN
#define PAGE_IS_WRITTEN (1 << 1)
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
struct page_region {
    uint64_t start, end, categories;
};
struct pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

#define NEEDED (UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | \
                UFFD_FEATURE_WP_HUGETLBFS_SHMEM)

int dl_uffd_create(void)
{
    long fd = syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    return fd < 0 ? -errno : (int)fd;
}

int64_t dl_uffd_features(void)
{
    int fd = dl_uffd_create();
    if (fd < 0)
        return fd;
    struct uffdio_api api = {.api = UFFD_API, .features = 0};
    int rc = ioctl(fd, UFFDIO_API, &api) < 0 ? -errno : 0;
    close(fd);
    return rc < 0 ? rc : (int64_t)(api.features & INT64_MAX);
}

int dl_missing_features(uint64_t f)
{
    return (f & UFFD_FEATURE_WP_ASYNC ? 0 : DL_NEED_WP_ASYNC) |
           (f & UFFD_FEATURE_WP_UNPOPULATED ? 0 : DL_NEED_WP_UNPOPULATED) |
           (f & UFFD_FEATURE_WP_HUGETLBFS_SHMEM ? 0 : DL_NEED_WP_SHMEM);
}

int dl_uffd_setup(int uffd, uint64_t start, uint64_t len)
{
    if (uffd < 0 || start % PS || len % PS || !len)
        return -EINVAL;
    struct uffdio_api api = {.api = UFFD_API, .features = NEEDED};
    if (ioctl(uffd, UFFDIO_API, &api) < 0)
        return -errno;
    struct uffdio_register reg = {
        .range = {.start = start, .len = len},
        .mode = UFFDIO_REGISTER_MODE_WP,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    return 0;
}

#define VEC 512

int64_t dl_scan(int pagemap_fd, uint64_t start, uint64_t npages, int protect,
                uint32_t *dirty, uint64_t cap)
{
    if (pagemap_fd < 0 || start % PS || npages > UINT32_MAX || (!dirty && cap))
        return -EINVAL;
    struct page_region vec[VEC];
    uint64_t end = start + npages * PS, n = 0;
    struct pm_scan_arg a;
    memset(&a, 0, sizeof a);
    a.size = sizeof a;
    a.flags = PM_SCAN_CHECK_WPASYNC | (protect ? PM_SCAN_WP_MATCHING : 0);
    a.start = start;
    a.end = end;
    a.vec = (uintptr_t)vec;
    a.vec_len = VEC;
    a.category_mask = a.category_anyof_mask = a.return_mask = PAGE_IS_WRITTEN;
    while (a.start < end) {
        int got = ioctl(pagemap_fd, PAGEMAP_SCAN, &a);
        if (got < 0)
            return -errno;
        for (int r = 0; r < got; r++) {
            for (uint64_t p = vec[r].start; p < vec[r].end; p += PS) {
                if (n >= cap)
                    return -ENOSPC;
                dirty[n++] = (uint32_t)((p - start) / PS);
            }
        }
        if (a.walk_end <= a.start)  /* no progress: should not happen */
            return -EIO;
        a.start = a.walk_end;
    }
    return (int64_t)n;
}

int dl_self_test(int *step)
{
    int rc = 0, fd = -1, pm = -1;
    uint32_t dirty[4];
    uint8_t *p = mmap(NULL, 2 * PS, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return *step = 0, -errno;
    *step = 1;
    if ((fd = dl_uffd_create()) < 0) {
        rc = fd;
        goto out;
    }
    *step = 3;
    if ((rc = dl_uffd_setup(fd, (uintptr_t)p, 2 * PS)) < 0)
        goto out;
    *step = 4;
    if ((pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)) < 0) {
        rc = -errno;
        goto out;
    }
    *step = 5;
    int64_t n = dl_scan(pm, (uintptr_t)p, 2, 1, dirty, 4); /* protect all */
    if (n >= 0) {
        p[PS + 7] = 1;
        n = dl_scan(pm, (uintptr_t)p, 2, 1, dirty, 4);
    }
    if (n < 0) {
        rc = (int)n;
        goto out;
    }
    *step = 6;
    rc = n == 1 && dirty[0] == 1 ? 0 : -EIO;
out:
    if (pm >= 0)
        close(pm);
    if (fd >= 0)
        close(fd);
    munmap(p, 2 * PS);
    return rc;
}
