/* mirror's disk server: the NBD protocol QEMU speaks over the unix socket (fixed newstyle
 * negotiation; READ, WRITE, FLUSH, FUA, TRIM, WRITE_ZEROES, DISC), served by a pool of
 * worker threads.  Each request is a read, a change or a flush of the disk (diskstorage.c:
 * the local image or B's replica, and the stream to B); this file knows only the protocol. */
#include "diskserver_internal.h"

#define NBD_MAGIC 0x4e42444d41474943ULL
#define NBD_IHAVEOPT 0x49484156454F5054ULL
#define NBD_REP_MAGIC 0x3e889045565a9ULL
#define NBD_REQ_MAGIC 0x25609513U
#define NBD_SIMPLE_REPLY 0x67446698U
#define NBD_OPT_EXPORT_NAME 1
#define NBD_OPT_ABORT 2
#define NBD_OPT_INFO 6
#define NBD_OPT_GO 7
#define NBD_REP_ACK 1
#define NBD_REP_INFO 3
#define NBD_REP_ERR_UNSUP 0x80000001U
#define NBD_REP_ERR_INVALID 0x80000003U
#define NBD_CMD_READ 0
#define NBD_CMD_WRITE 1
#define NBD_CMD_DISC 2
#define NBD_CMD_FLUSH 3
#define NBD_CMD_TRIM 4
#define NBD_CMD_WRITE_ZEROES 6
#define NBD_CMD_FLAG_FUA 1
#define NBD_FLAGS (1 | 4 | 8 | 0x20 | 0x40) /* HAS_FLAGS SEND_FLUSH SEND_FUA SEND_TRIM SEND_WRITE_ZEROES */

/* ---- NBD serving ---------------------------------------------------------------- */

struct conn {
    int fd;
    pthread_mutex_t wmu; /* one reply at a time on the socket */
    int refs;
};

struct job {
    struct change ch; /* a change's (diskstorage.c): first, so a change is its job */
    struct conn *c;
    uint16_t flags, type;
    uint64_t handle, offset;
    uint32_t len;
    char *data;
    struct job *next;
};

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct job *head, *tail;
} Q = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, NULL};

static int open_conns; /* NBD connections whose reader runs (QEMU's) */

static void conn_put(struct conn *c) {
    pthread_mutex_lock(&Q.mu);
    int last = --c->refs == 0;
    pthread_mutex_unlock(&Q.mu);
    if (last) { close(c->fd); pthread_mutex_destroy(&c->wmu); free(c); }
}

/* one reference less on a job: its worker's, and a takeover's (diskstorage.c) */
static void job_put(struct change *ch) {
    struct job *j = (struct job *)ch;
    if (__atomic_sub_fetch(&ch->refs, 1, __ATOMIC_ACQ_REL)) return;
    free(j->data);
    conn_put(j->c);
    free(j);
}

/* the reply: its header and data in one send */
static void reply(struct conn *c, uint64_t handle, uint32_t err, const void *data, uint32_t len) {
    struct { uint32_t magic, err; uint64_t handle; } __attribute__((packed)) h = {
        htobe32(NBD_SIMPLE_REPLY), htobe32(err), handle};
    struct iovec v[2] = {{&h, sizeof h}, {(void *)data, data ? len : 0}};
    pthread_mutex_lock(&c->wmu);
    writev_full(c->fd, v, data && len ? 2 : 1, 0);
    pthread_mutex_unlock(&c->wmu);
}

static uint32_t nbd_errno(int e) {
    switch (e) {
    case EPERM: case EIO: case ENOMEM: case EINVAL: case ENOSPC: return (uint32_t)e;
    default: return EIO;
    }
}

/* a change whose local call hung, answered by the takeover's thread, which then serves as
   a worker in the place of the one left in the call */
static void job_resume(struct change *ch, int e) {
    struct job *j = (struct job *)ch;
    reply(j->c, j->handle, e ? nbd_errno(-e) : 0, NULL, 0);
    job_put(ch);
    nbd_worker(NULL);
}

void *nbd_worker(void *arg) {
    (void)arg;
    char *rbuf = NULL;
    size_t rcap = 0;
    for (;;) {
        pthread_mutex_lock(&Q.mu);
        while (!Q.head) pthread_cond_wait(&Q.cv, &Q.mu);
        struct job *j = Q.head;
        Q.head = j->next;
        if (!Q.head) Q.tail = NULL;
        pthread_mutex_unlock(&Q.mu);
        uint32_t err = 0;
        int fua = j->flags & NBD_CMD_FLAG_FUA;
        if (j->type != NBD_CMD_FLUSH && (j->offset > S.size || j->len > S.size - j->offset)) {
            err = EINVAL;
            reply(j->c, j->handle, err, NULL, 0);
        } else switch (j->type) {
        case NBD_CMD_READ: {
            if (rcap < j->len) { free(rbuf); rcap = j->len; rbuf = malloc(rcap); }
            int e = disk_read(j->offset, j->len, rbuf);
            err = e ? nbd_errno(-e) : 0;
            reply(j->c, j->handle, err, err ? NULL : rbuf, j->len);
            break;
        }
        case NBD_CMD_WRITE:
        case NBD_CMD_WRITE_ZEROES:
        case NBD_CMD_TRIM: {
            if (!j->len) { reply(j->c, j->handle, 0, NULL, 0); break; }
            j->ch.type = j->type == NBD_CMD_WRITE ? R_WRITE : j->type == NBD_CMD_TRIM ? R_TRIM : R_ZERO;
            j->ch.off = j->offset, j->ch.len = j->len, j->ch.data = j->data, j->ch.fua = fua;
            j->ch.resume = job_resume, j->ch.put = job_put;
            int e = disk_change(&j->ch);
            if (e == DISK_TAKEN) { /* answered by a takeover long ago: this thread's place is taken */
                job_put(&j->ch);
                free(rbuf);
                return NULL;
            }
            err = e ? nbd_errno(-e) : 0;
            reply(j->c, j->handle, err, NULL, 0);
            break;
        }
        case NBD_CMD_FLUSH: {
            int e = disk_flush();
            err = e ? nbd_errno(-e) : 0;
            reply(j->c, j->handle, err, NULL, 0);
            break;
        }
        default:
            reply(j->c, j->handle, EINVAL, NULL, 0);
        }
        job_put(&j->ch);
    }
    return NULL;
}

static int opt_reply(int fd, uint32_t opt, uint32_t type, const void *data, uint32_t len) {
    struct { uint64_t magic; uint32_t opt, type, len; } __attribute__((packed)) h = {
        htobe64(NBD_REP_MAGIC), htobe32(opt), htobe32(type), htobe32(len)};
    if (write_full(fd, &h, sizeof h)) return -1;
    return len ? write_full(fd, data, len) : 0;
}

/* fixed newstyle negotiation; 0: go to transmission */
static int negotiate(int fd) {
    struct { uint64_t a, b; uint16_t flags; } __attribute__((packed)) g = {
        htobe64(NBD_MAGIC), htobe64(NBD_IHAVEOPT), htobe16(1 | 2)};
    uint32_t cflags;
    if (write_full(fd, &g, sizeof g) || read_full(fd, &cflags, 4)) return -1;
    int no_zeroes = be32toh(cflags) & 2;
    for (;;) {
        struct { uint64_t magic; uint32_t opt, len; } __attribute__((packed)) o;
        if (read_full(fd, &o, sizeof o) || be64toh(o.magic) != NBD_IHAVEOPT) return -1;
        uint32_t opt = be32toh(o.opt), len = be32toh(o.len);
        if (len > 65536) return -1;
        char data[65536];
        if (len && read_full(fd, data, len)) return -1;
        if (opt == NBD_OPT_EXPORT_NAME) {
            struct { uint64_t size; uint16_t flags; } __attribute__((packed)) e = {htobe64(S.size), htobe16(NBD_FLAGS)};
            static const char zeros[124];
            if (write_full(fd, &e, sizeof e) || (!no_zeroes && write_full(fd, zeros, sizeof zeros))) return -1;
            return 0;
        }
        if (opt == NBD_OPT_ABORT) { opt_reply(fd, opt, NBD_REP_ACK, NULL, 0); return -1; }
        if (opt == NBD_OPT_GO || opt == NBD_OPT_INFO) {
            struct { uint16_t type; uint64_t size; uint16_t flags; } __attribute__((packed)) info = {
                0, htobe64(S.size), htobe16(NBD_FLAGS)};
            if (opt_reply(fd, opt, NBD_REP_INFO, &info, sizeof info) || opt_reply(fd, opt, NBD_REP_ACK, NULL, 0)) return -1;
            if (opt == NBD_OPT_GO) return 0;
            continue;
        }
        if (opt_reply(fd, opt, NBD_REP_ERR_UNSUP, NULL, 0)) return -1;
    }
}

static void *conn_thread(void *arg) {
    struct conn *c = arg;
    if (negotiate(c->fd) == 0) {
        for (;;) {
            struct { uint32_t magic; uint16_t flags, type; uint64_t handle, offset; uint32_t len; } __attribute__((packed)) r;
            if (read_full(c->fd, &r, sizeof r) || be32toh(r.magic) != NBD_REQ_MAGIC) break;
            struct job *j = calloc(1, sizeof *j);
            j->ch.refs = 1;
            j->c = c, j->flags = be16toh(r.flags), j->type = be16toh(r.type);
            j->handle = r.handle, j->offset = be64toh(r.offset), j->len = be32toh(r.len);
            if (j->type == NBD_CMD_DISC) { free(j); break; }
            if (j->len > MAX_REQ && j->type != NBD_CMD_TRIM && j->type != NBD_CMD_WRITE_ZEROES) { free(j); break; }
            if (j->type == NBD_CMD_WRITE) {
                j->data = malloc(j->len ? j->len : 1);
                if (read_full(c->fd, j->data, j->len)) { free(j->data); free(j); break; }
            }
            pthread_mutex_lock(&Q.mu);
            c->refs++;
            if (Q.tail) Q.tail->next = j; else Q.head = j;
            Q.tail = j;
            pthread_cond_signal(&Q.cv);
            pthread_mutex_unlock(&Q.mu);
        }
    }
    shutdown(c->fd, SHUT_RD);
    __atomic_sub_fetch(&open_conns, 1, __ATOMIC_SEQ_CST);
    conn_put(c);
    return NULL;
}

int nbd_open_conns(void) { return __atomic_load_n(&open_conns, __ATOMIC_SEQ_CST); }

void *nbd_accept(void *arg) {
    int lfd = (int)(intptr_t)arg;
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) { if (errno == EINTR || errno == ECONNABORTED) continue; return NULL; }
        struct conn *c = calloc(1, sizeof *c);
        c->fd = fd, c->refs = 1;
        __atomic_add_fetch(&open_conns, 1, __ATOMIC_SEQ_CST);
        pthread_mutex_init(&c->wmu, NULL);
        pthread_t t;
        pthread_create(&t, NULL, conn_thread, c);
        pthread_detach(t);
    }
}
