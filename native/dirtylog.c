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
#include <stdlib.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <dirent.h>
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

/* ---- a userfaultfd made inside another process (dl_uffd_inject) -------- */

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef __NR_pidfd_open
#define __NR_pidfd_open 434
#endif
#ifndef __NR_pidfd_getfd
#define __NR_pidfd_getfd 438
#endif

#if defined(__x86_64__)

/* the kernel's restart codes (include/linux/errno.h; not in uapi) */
#define K_ERESTARTSYS 512
#define K_ERESTARTNOINTR 513
#define K_ERESTARTNOHAND 514
#define K_ERESTART_RESTARTBLOCK 516

static int wait_stop(int tid)
{
    int status;
    for (;;) {
        if (waitpid(tid, &status, __WALL) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (WIFSTOPPED(status))
            return status;
        return -ESRCH; /* it exited */
    }
}

/* Run one system call in the stopped thread `tid` from the `syscall`
 * instruction at `at`; its result in *ret.  The thread is left stopped at the
 * call's exit. */
static int run_syscall(int tid, const struct user_regs_struct *base, uint64_t at,
                       long nr, long a1, long a2, long *ret)
{
    struct user_regs_struct r = *base;
    r.rip = at;
    r.rax = nr;
    r.orig_rax = (unsigned long long)-1; /* no restart of what it was in */
    r.rdi = a1;
    r.rsi = a2;
    r.rdx = r.r10 = r.r8 = r.r9 = 0;
    if (ptrace(PTRACE_SETREGS, tid, 0, &r) < 0)
        return -errno;
    for (int stop = 0; stop < 2; stop++) { /* to the call's entry, then its exit */
        if (ptrace(PTRACE_SYSCALL, tid, 0, 0) < 0)
            return -errno;
        int st = wait_stop(tid);
        if (st < 0)
            return st;
        if (WSTOPSIG(st) != (SIGTRAP | 0x80))
            return -EINTR; /* another stop came first (a signal): give up */
    }
    if (ptrace(PTRACE_GETREGS, tid, 0, &r) < 0)
        return -errno;
    *ret = (long)r.rax;
    return 0;
}

/* A thread of pid blocked in a system call (its /proc/.../syscall starts with a
 * number; "running" otherwise), the main thread first. */
static int blocked_threads(int pid, int *tids, int cap)
{
    char path[64];
    int n = 0;
    snprintf(path, sizeof path, "/proc/%d/task", pid);
    DIR *d = opendir(path);
    if (!d)
        return -errno;
    struct dirent *e;
    while ((e = readdir(d)) && n < cap) {
        int tid = atoi(e->d_name);
        if (tid <= 0)
            continue;
        char sp[96], buf[32] = {0};
        snprintf(sp, sizeof sp, "/proc/%d/task/%d/syscall", pid, tid);
        int fd = open(sp, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t got = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (got > 0 && buf[0] >= '0' && buf[0] <= '9') {
            if (tid == pid && n) { /* the main thread first */
                tids[n++] = tids[0];
                tids[0] = tid;
            } else {
                tids[n++] = tid;
            }
        }
    }
    closedir(d);
    return n;
}

static int inject_in(int pid, int tid, int pidfd, int *step)
{
    if (ptrace(PTRACE_SEIZE, tid, 0, PTRACE_O_TRACESYSGOOD) < 0) {
        *step = 2;
        return -errno;
    }
    int rc;
    struct user_regs_struct saved;
    if (ptrace(PTRACE_INTERRUPT, tid, 0, 0) < 0 || (rc = wait_stop(tid)) < 0) {
        rc = rc < 0 ? rc : -errno;
        *step = 2;
        goto detach_only;
    }
    if (ptrace(PTRACE_GETREGS, tid, 0, &saved) < 0) {
        rc = -errno;
        *step = 3;
        goto detach_only;
    }
    /* stopped in a system call: the two bytes before rip are its `syscall` (0f 05) */
    errno = 0;
    long word = ptrace(PTRACE_PEEKTEXT, tid, saved.rip - 2, 0);
    if ((word == -1 && errno) || (word & 0xffff) != 0x050f || (long long)saved.orig_rax < 0) {
        rc = -EAGAIN; /* not in a system call after all: try another thread */
        *step = 1;
        goto detach_only;
    }
    uint64_t at = saved.rip - 2;
    long fd = -1;
    *step = 4;
    if ((rc = run_syscall(tid, &saved, at, __NR_userfaultfd, O_CLOEXEC | O_NONBLOCK, 0, &fd)) < 0)
        goto restore;
    if (fd == -EPERM) /* an unprivileged process: user-mode faults only (still sees
                         the kernel's writes into its RAM here: DIRTYLOG-NOTES.md) */
        if ((rc = run_syscall(tid, &saved, at, __NR_userfaultfd,
                              O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY, 0, &fd)) < 0)
            goto restore;
    if (fd < 0) {
        rc = (int)fd;
        goto restore;
    }
    *step = 5;
    long mine = syscall(__NR_pidfd_getfd, pidfd, (int)fd, 0);
    rc = mine < 0 ? -errno : (int)mine;
    long closed = 0;
    int rc2 = run_syscall(tid, &saved, at, __NR_close, fd, 0, &closed);
    if (rc >= 0 && (rc2 < 0 || closed < 0)) {
        close(rc);
        rc = rc2 < 0 ? rc2 : (int)closed;
        *step = 6;
    }
restore:
    {
        /* put the thread back; an interrupted call restarts as the kernel's signal
           path would have restarted it (a restart we stepped past) */
        struct user_regs_struct r = saved;
        long long ax = (long long)r.rax;
        if (ax == -K_ERESTARTSYS || ax == -K_ERESTARTNOINTR || ax == -K_ERESTARTNOHAND) {
            r.rax = r.orig_rax;
            r.rip -= 2;
        } else if (ax == -K_ERESTART_RESTARTBLOCK) {
            r.rax = __NR_restart_syscall;
            r.rip -= 2;
        }
        r.orig_rax = (unsigned long long)-1;
        if (ptrace(PTRACE_SETREGS, tid, 0, &r) < 0 && rc >= 0) {
            close(rc);
            rc = -errno;
            *step = 3;
        }
    }
detach_only:
    ptrace(PTRACE_DETACH, tid, 0, 0);
    (void)pid;
    return rc;
}

int dl_uffd_inject(int pid, int *step)
{
    int tids[64];
    *step = 1;
    int n = blocked_threads(pid, tids, 64);
    if (n < 0)
        return n;
    int pidfd = (int)syscall(__NR_pidfd_open, pid, 0);
    if (pidfd < 0) {
        *step = 2;
        return -errno;
    }
    int rc = -EAGAIN;
    for (int tries = 0; tries < 3 && rc == -EAGAIN; tries++) {
        for (int k = 0; k < n; k++) {
            rc = inject_in(pid, tids[k], pidfd, step);
            if (rc != -EAGAIN && !(rc == -ESRCH && *step == 2))
                break;
        }
        if (rc == -EAGAIN) { /* every thread was between calls: look again */
            usleep(2000);
            n = blocked_threads(pid, tids, 64);
            if (n <= 0)
                break;
        }
    }
    close(pidfd);
    return rc;
}

#else

int dl_uffd_inject(int pid, int *step)
{
    (void)pid;
    *step = 7;
    return -ENOSYS;
}

#endif

/* ---- another process's pages (process_vm_readv) ------------------------ */

#define IOVS 512

int dl_read_range(int pid, uint64_t base, uint64_t first, uint64_t count, uint8_t *out)
{
    uint64_t done = 0, want = count * PS;
    while (done < want) {
        struct iovec l = {.iov_base = out + done, .iov_len = want - done};
        struct iovec r = {.iov_base = (void *)(uintptr_t)(base + first * PS + done),
                          .iov_len = want - done};
        ssize_t got = process_vm_readv(pid, &l, 1, &r, 1, 0);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (got == 0)
            return -EFAULT;
        done += (uint64_t)got;
    }
    return 0;
}

int dl_read_pages(int pid, uint64_t base, uint64_t npages, const uint32_t *idx,
                  uint64_t n, uint8_t *out)
{
    struct iovec rem[IOVS];
    uint64_t k = 0;
    while (k < n) {
        /* runs of consecutive pages, up to IOVS of them, into out from page k on */
        int nr = 0;
        uint64_t from = k;
        while (k < n && nr < IOVS) {
            if (idx[k] >= npages)
                return -EINVAL;
            uint64_t a = idx[k], len = 1;
            while (k + len < n && idx[k + len] == a + len)
                len++;
            rem[nr].iov_base = (void *)(uintptr_t)(base + a * PS);
            rem[nr].iov_len = len * PS;
            nr++;
            k += len;
        }
        uint64_t want = (k - from) * PS, done = 0;
        struct iovec l = {.iov_base = out + from * PS, .iov_len = want};
        ssize_t got = process_vm_readv(pid, &l, 1, rem, (unsigned long)nr, 0);
        if (got < 0)
            return -errno;
        done = (uint64_t)got;
        if (done != want) { /* a short read: the rest page by page (or its error) */
            for (uint64_t p = from + done / PS; p < k; p++) {
                int rc = dl_read_range(pid, base, idx[p], 1, out + p * PS);
                if (rc < 0)
                    return rc;
            }
        }
    }
    return 0;
}
