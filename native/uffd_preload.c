/*
 * uffd_preload: loaded into a guest's hypervisor process (QEMU, or the
 * synthetic guest) with LD_PRELOAD, so that mirror's agent can keep a
 * dirty-page log of that process's mapping of guest RAM.
 *
 * A userfaultfd belongs to the mm of the process that made it, so one must be
 * made inside the guest process.  If MIRROR_UFFD_SOCK names a path, this
 * library listens there (mode 0600; "@name" is an abstract socket) on a thread of its own; every connection
 * (from a peer with our uid, or root) gets one new userfaultfd over SCM_RIGHTS,
 * with a 4-byte status (0, or the errno of userfaultfd()).  The library keeps
 * no copy: the agent registers and scans from outside, and when it closes the
 * fd the registration is gone (its next scan says EPERM) and it asks for a new
 * one.  Nothing else in the process changes; without the variable it does
 * nothing.  The variable is removed from the environment so that children
 * (QEMU's `exec:` migration helpers) do not take the path.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

static void send_uffd(int conn)
{
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 ||
        (cred.uid != 0 && cred.uid != getuid()))
        return;
    long fd = syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    int32_t status = fd < 0 ? errno : 0;
    struct iovec iov = {.iov_base = &status, .iov_len = sizeof status};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd >= 0) {
        int ifd = (int)fd;
        msg.msg_control = u.buf;
        msg.msg_controllen = sizeof u.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &ifd, sizeof ifd);
    }
    while (sendmsg(conn, &msg, MSG_NOSIGNAL) < 0 && errno == EINTR)
        ;
    if (fd >= 0)
        close((int)fd);
}

static void *serve(void *arg)
{
    int srv = (int)(intptr_t)arg;
    for (;;) {
        int conn = accept4(srv, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return NULL;
        }
        send_uffd(conn);
        close(conn);
    }
}

__attribute__((constructor)) static void mirror_uffd_init(void)
{
    const char *env = getenv("MIRROR_UFFD_SOCK");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (!env || !*env || strlen(env) >= sizeof addr.sun_path)
        return;
    /* "@name": a Linux abstract socket (no file to clean up) */
    int abstract = env[0] == '@';
    strcpy(addr.sun_path, env);
    socklen_t alen = sizeof addr;
    if (abstract) {
        addr.sun_path[0] = 0;
        alen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(env));
    }
    unsetenv("MIRROR_UFFD_SOCK");
    int srv = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (srv < 0)
        return;
    if (!abstract)
        unlink(addr.sun_path);
    mode_t old = umask(077);
    int rc = bind(srv, (struct sockaddr *)&addr, alen);
    umask(old);
    if (rc < 0 || listen(srv, 4) < 0) {
        close(srv);
        return;
    }
    /* The thread takes no signals: the process's own threads handle them. */
    sigset_t all, prev;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &prev);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    pthread_t t;
    if (pthread_create(&t, &attr, serve, (void *)(intptr_t)srv) != 0)
        close(srv);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &prev, NULL);
}
