/*
 * dirtylog: a dirty-page log kept by the kernel for another process's mapping
 * of guest RAM (userfaultfd write-protection in async mode + PAGEMAP_SCAN,
 * Linux >= 6.7).  See /work/shared/design/DIRTYLOG-NOTES.md and
 * docs/ARCHITECTURE.md ("Tracking changed memory").
 *
 * Functions return 0 (or a non-negative count) on success and -errno on
 * failure, so the caller can tell an old kernel (ENOTTY/EINVAL/ENOSYS), missing
 * rights (EACCES/EPERM at open) and a lost registration (EPERM at a scan)
 * apart.  The cdef block is read by native/build_pagediff.py.
 */
#ifndef MIRROR_DIRTYLOG_H
#define MIRROR_DIRTYLOG_H

#include <stdint.h>

/* cdef-begin */
/* The userfaultfd features this kernel offers (UFFDIO_API on a fresh fd of
 * this process), or -errno if userfaultfd itself is refused. */
int64_t dl_uffd_features(void);

/* Which of the features the log needs are missing from `features`: a bit
 * mask of DL_NEED_* (0: all there). */
enum {
    DL_NEED_WP_ASYNC = 1,
    DL_NEED_WP_UNPOPULATED = 2,
    DL_NEED_WP_SHMEM = 4
};
int dl_missing_features(uint64_t features);

/* A new userfaultfd of this process (O_CLOEXEC | O_NONBLOCK), or -errno. */
int dl_uffd_create(void);

/* On a userfaultfd made by any process (its mm is the one logged): enable
 * async write-protection (UFFDIO_API) and register [start, start + len) of
 * that process's address space for it (UFFDIO_REGISTER, mode WP). */
int dl_uffd_setup(int uffd, uint64_t start, uint64_t len);

/* PAGEMAP_SCAN over npages pages from `start` of the process whose
 * /proc/PID/pagemap is `pagemap_fd`: writes the indices (relative to start,
 * ascending) of the pages written since they were last protected to dirty
 * (room for `cap` entries) and returns how many.  With `protect` the written
 * pages are write-protected again in the same walk (atomically). */
int64_t dl_scan(int pagemap_fd, uint64_t start, uint64_t npages, int protect,
                uint32_t *dirty, uint64_t cap);

/* Probe the whole mechanism on a page of this process: 0 if it works, or
 * -errno of the step that failed (written to *step: 1 userfaultfd, 3 API or
 * register, 4 pagemap open, 5 PAGEMAP_SCAN, 6 a write that the log missed). */
int dl_self_test(int *step);
/* cdef-end */

#endif
