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

/* A userfaultfd made INSIDE process `pid` without its cooperation (a guest
 * started without the preload library): one of its threads that is blocked in
 * a system call is stopped with ptrace (PTRACE_SEIZE + PTRACE_INTERRUPT), made
 * to run userfaultfd(O_CLOEXEC | O_NONBLOCK [| UFFD_USER_MODE_ONLY when the
 * plain call is refused]) from its own `syscall` instruction (no code is
 * written into the process), the fd is copied here (pidfd_getfd), the
 * process's copy closed the same way, and the thread's registers put back as
 * they were (an interrupted system call restarts as the kernel would have
 * restarted it).  x86_64 only.  Returns this process's fd, or -errno of the
 * step written to *step: 1 no thread in a system call, 2 ptrace, 3 the
 * thread's registers, 4 userfaultfd() in the process, 5 pidfd_getfd,
 * 6 close() in the process, 7 not supported on this architecture. */
int dl_uffd_inject(int pid, int *step);

/* Read pages of another process (process_vm_readv: root or ptrace rights):
 * `n` pages listed in idx (ascending or not) of the region of `npages` pages
 * at address `base` of process `pid`, into out (room for n pages), one after
 * another.  Returns 0 or -errno (-EFAULT: the region is not all mapped). */
int dl_read_pages(int pid, uint64_t base, uint64_t npages, const uint32_t *idx,
                  uint64_t n, uint8_t *out);

/* Read [first, first + count) pages of that region into out. */
int dl_read_range(int pid, uint64_t base, uint64_t first, uint64_t count,
                  uint8_t *out);
/* cdef-end */

#endif
