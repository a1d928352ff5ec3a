/* mirror's disk server: where the primary's disk I/O goes.  The local image, each call
 * under a deadline (a hung image is an error after --hang-ms); or, when the local image
 * fails, B's replica over the stream (storage failover), until a probe finds the local
 * image working again and the blocks written meanwhile are copied back.  The guest's
 * reads, changes and flushes (disknbd.c's requests) enter here. */
#include "diskserver_internal.h"

/* ---- the local image, with a deadline ----------------------------------------------- *
 *
 * A local image can hang instead of failing (an NFS server gone, a dying disk): a call
 * that never returns would hold the guest's request, the barrier, so the checkpoint and
 * the guest.  Every call on the image is therefore made under a deadline, --hang-ms.
 *
 * The guest's changes (the hot path: writes, zeroes, trims) are made by the NBD worker
 * itself, outside any lock, and watched: one watchdog thread wakes at the earliest
 * deadline of the calls in flight.  A call past it is abandoned when the disk can run on
 * B's replica: a takeover thread finishes its request as for an error (storage failover:
 * the change goes to B, the guest gets its answer) and then serves as a worker in the
 * abandoned one's place; the abandoned worker, if its call ever returns, drops the request
 * and ends.  Without a replica holding the whole disk the call is waited for (a slow disk
 * is no error).
 *
 * Every other call (reads, flushes, the copies and probes) is made by I/O threads, each on
 * a buffer of its own, and the caller waits at most --hang-ms.  Past that, a call of the
 * guest's (LIO_FAILOVER) is abandoned and returns -ETIMEDOUT when the disk can run on B's
 * replica (the caller then fails over as for an error); without one it waits on.  A read
 * the kernel can do without blocking (RWF_NOWAIT: in the page cache) is made by the
 * caller itself, with no hand-off.
 *
 * An abandoned call (either kind) is counted in L.stuck until it returns (maybe never;
 * its thread holds no lock): the switch back waits until none is left, so that no late
 * write lands on blocks copied back.  A call abandoned before a thread took it never runs.
 */

#define LIO_MAX_THREADS 64 /* beyond: new calls queue (and time out) until one returns */

struct lio {
    int op, res, started, done, abandoned;
    uint64_t off, len;
    pthread_cond_t cv;
    struct lio *next;
    char data[];
};

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_condattr_t mono;
    struct lio *head, *tail;
    int threads, idle, queued, stuck;
    uint64_t timeouts;
    struct change *watched; /* the guest's changes in their local call (the watchdog's) */
    pthread_cond_t wcv;     /* the watchdog waits here (monotonic) */
    int watchdog, wd_idle;  /* started; asleep without a deadline (a new call wakes it) */
    uint64_t calls;         /* changes watched so far */
} L = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static int lio_do(struct lio *q) {
    switch (q->op) {
    case LIO_READ: return pread_full(S.img, q->data, q->len, q->off);
    case LIO_WRITE: return pwrite_full(S.img, q->data, q->len, q->off);
    case LIO_SYNC: return fdatasync(S.img) ? -errno : 0;
    default: return zero_range(S.img, q->off, q->len, q->op == LIO_TRIM);
    }
}

static void *lio_thread(void *arg) {
    (void)arg;
    pthread_mutex_lock(&L.mu);
    for (;;) {
        L.idle++;
        while (!L.head) pthread_cond_wait(&L.cv, &L.mu);
        L.idle--;
        struct lio *q = L.head;
        L.head = q->next, L.queued--;
        if (!L.head) L.tail = NULL;
        if (q->abandoned) { pthread_cond_destroy(&q->cv); free(q); continue; }
        q->started = 1;
        pthread_mutex_unlock(&L.mu);
        int r = lio_do(q);
        pthread_mutex_lock(&L.mu);
        if (q->abandoned) { /* its caller went on long ago */
            if (--L.stuck == 0) logmsg("the local image answered every abandoned call");
            pthread_cond_destroy(&q->cv);
            free(q);
            continue;
        }
        q->res = r, q->done = 1;
        pthread_cond_signal(&q->cv);
    }
    return NULL;
}

/* may the disk run on B's replica now (so a hung call be abandoned)? */
static int lio_can_fail_over(int locked) {
    if (!locked) pthread_mutex_lock(&S.stream_mu);
    int can = S.role == PRIMARY && (S.storage != LOCAL || (S.synced && S.peer >= 0));
    if (!locked) pthread_mutex_unlock(&S.stream_mu);
    return can;
}

/* op on the local image (buf: len bytes in or out for reads and writes); 0, -errno, or
   -ETIMEDOUT past --hang-ms (mode above; locked: the caller holds stream_mu) */
int lio_run(int op, char *buf, uint64_t len, uint64_t off, int mode, int locked) {
    int io = op == LIO_READ || op == LIO_WRITE;
    if (!S.hang_ms) /* off: the caller's own call (a hung image stalls it, and the guest) */
        return op == LIO_READ ? pread_full(S.img, buf, len, off) : op == LIO_WRITE ? pwrite_full(S.img, buf, len, off)
             : op == LIO_SYNC ? (fdatasync(S.img) ? -errno : 0) : zero_range(S.img, off, len, op == LIO_TRIM);
    static int nowait[2] = {1, 1}; /* reads, writes: the file system has RWF_NOWAIT */
    while (io && len && __atomic_load_n(&nowait[op], __ATOMIC_RELAXED)) { /* what needs no waiting, here */
        struct iovec v = {buf, len};
        ssize_t r = op == LIO_READ ? preadv2(S.img, &v, 1, (off_t)off, RWF_NOWAIT)
                                   : pwritev2(S.img, &v, 1, (off_t)off, RWF_NOWAIT);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno != EAGAIN) {
            if (errno != EOPNOTSUPP && errno != EINVAL && errno != ENOSYS) return -errno;
            __atomic_store_n(&nowait[op], 0, __ATOMIC_RELAXED); /* never here: no more tries */
        }
        if (r <= 0) break; /* it would block (or at the end of the file): an I/O thread's */
        buf += r, off += (uint64_t)r, len -= (uint64_t)r;
    }
    if (io && !len) return 0;
    struct lio *q = malloc(sizeof *q + (io ? len : 0));
    if (!q) return -ENOMEM;
    memset(q, 0, sizeof *q);
    q->op = op, q->off = off, q->len = len;
    if (op == LIO_WRITE) memcpy(q->data, buf, len);
    pthread_mutex_lock(&L.mu);
    pthread_cond_init(&q->cv, &L.mono);
    if (L.tail) L.tail->next = q; else L.head = q;
    L.tail = q, L.queued++;
    pthread_t t;
    if (L.queued > L.idle && L.threads < LIO_MAX_THREADS && pthread_create(&t, NULL, lio_thread, NULL) == 0) {
        pthread_detach(t);
        L.threads++;
    }
    pthread_cond_signal(&L.cv);
    struct timespec dl;
    clock_gettime(CLOCK_MONOTONIC, &dl);
    int logged = 0;
    while (!q->done) {
        dl.tv_sec += S.hang_ms / 1000, dl.tv_nsec += (long)(S.hang_ms % 1000) * 1000000L;
        if (dl.tv_nsec >= 1000000000L) dl.tv_sec++, dl.tv_nsec -= 1000000000L;
        while (!q->done && pthread_cond_timedwait(&q->cv, &L.mu, &dl) != ETIMEDOUT) {}
        if (q->done) break;
        if (mode == LIO_FAILOVER) {
            pthread_mutex_unlock(&L.mu);
            int can = lio_can_fail_over(locked);
            pthread_mutex_lock(&L.mu);
            if (q->done) break;
            if (!can) {
                if (!logged++)
                    logmsg("the local image has not answered for %d ms and no replica has the whole disk: waiting",
                           S.hang_ms);
                continue;
            }
        }
        q->abandoned = 1;
        if (q->started) L.stuck++;
        L.timeouts++;
        pthread_mutex_unlock(&L.mu);
        return -ETIMEDOUT;
    }
    int r = q->res;
    pthread_mutex_unlock(&L.mu);
    if (op == LIO_READ && !r) memcpy(buf, q->data, len);
    pthread_cond_destroy(&q->cv);
    free(q);
    return r;
}

static int lio_stuck(void) {
    pthread_mutex_lock(&L.mu);
    int n = L.stuck;
    pthread_mutex_unlock(&L.mu);
    return n;
}

void lio_init(void) {
    pthread_condattr_init(&L.mono);
    pthread_condattr_setclock(&L.mono, CLOCK_MONOTONIC);
    pthread_cond_init(&L.wcv, &L.mono);
}

/* the hung calls so far: (timeouts) abandoned, (stuck) of them not returned yet */
void lio_counts(uint64_t *timeouts, int *stuck) {
    pthread_mutex_lock(&L.mu);
    *timeouts = L.timeouts, *stuck = L.stuck;
    pthread_mutex_unlock(&L.mu);
}

/* ---- the guest's changes on the local image: the worker's own call, watched ---------- */

enum { W_RUN = 1, W_DONE, W_GONE };

static int change_end(struct change *c, int e);

static void ms_to_ts(double ms, struct timespec *ts) {
    ts->tv_sec = (time_t)(ms / 1000);
    ts->tv_nsec = (long)((ms - (double)ts->tv_sec * 1000) * 1e6);
    if (ts->tv_nsec >= 1000000000L) ts->tv_sec++, ts->tv_nsec -= 1000000000L;
    if (ts->tv_nsec < 0) ts->tv_nsec = 0;
}

/* an abandoned change's request: finished as for an error (stream_mu), answered, and then
   this thread serves as a worker in the abandoned one's place */
static void *takeover(void *arg) {
    struct change *c = arg;
    pthread_mutex_lock(&S.stream_mu);
    int e = change_end(c, -ETIMEDOUT); /* (releases stream_mu) */
    c->resume(c, e);
    return NULL;
}

static void unwatch(struct change *c) { /* L.mu held */
    if (c->wprev) c->wprev->wnext = c->wnext; else L.watched = c->wnext;
    if (c->wnext) c->wnext->wprev = c->wprev;
    c->wnext = c->wprev = NULL;
}

/* wakes at the earliest deadline of the changes' local calls; abandons those past it */
static void *watchdog(void *arg) {
    (void)arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&L.mu);
    for (;;) {
        double first = 0;
        for (struct change *c = L.watched; c; c = c->wnext)
            if (!first || c->wake < first) first = c->wake;
        if (!first && seen == L.calls) { /* no call for a whole period: sleep until the next one */
            L.wd_idle = 1;
            while (L.wd_idle) pthread_cond_wait(&L.wcv, &L.mu);
            continue;
        }
        if (!first) first = now_ms() + S.hang_ms; /* calls come and go: look again in a period */
        seen = L.calls;
        if (now_ms() < first) {
            struct timespec ts;
            ms_to_ts(first, &ts);
            pthread_cond_timedwait(&L.wcv, &L.mu, &ts);
            continue;
        }
        pthread_mutex_unlock(&L.mu); /* (stream_mu before L.mu) */
        int can = lio_can_fail_over(0);
        pthread_mutex_lock(&L.mu);
        double now = now_ms();
        for (struct change *c = L.watched, *next; c; c = next) {
            next = c->wnext;
            if (c->wake > now) continue;
            pthread_t t;
            if (can) {
                c->state = W_GONE;
                __atomic_add_fetch(&c->refs, 1, __ATOMIC_ACQ_REL); /* the takeover's */
                if (pthread_create(&t, NULL, takeover, c) == 0) {
                    pthread_detach(t);
                    unwatch(c);
                    L.stuck++;
                    L.timeouts++;
                    continue;
                }
                c->state = W_RUN;
                __atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL);
            } else if (!c->logged++) {
                logmsg("the local image has not answered for %d ms and no replica has the whole disk: waiting",
                       S.hang_ms);
            }
            c->wake = now + S.hang_ms; /* look again later */
        }
    }
    return NULL;
}

/* the change's call on the local image, by this thread; 0, -errno, or DISK_TAKEN: it hung,
   was abandoned, and a takeover answered its request (this thread must leave it and end) */
static int local_change(struct change *c) {
    int op = c->type == R_WRITE ? LIO_WRITE : c->type == R_TRIM ? LIO_TRIM : LIO_ZERO;
#define LOCAL_CALL() (op == LIO_WRITE ? pwrite_full(S.img, c->data, c->len, c->off) \
                                      : zero_range(S.img, c->off, c->len, op == LIO_TRIM))
    if (!S.hang_ms) return LOCAL_CALL(); /* off: a hung image stalls the guest */
    c->wake = now_ms() + S.hang_ms, c->state = W_RUN, c->logged = 0;
    pthread_mutex_lock(&L.mu);
    if (!L.watchdog) {
        pthread_t t;
        if (pthread_create(&t, NULL, watchdog, NULL)) {
            pthread_mutex_unlock(&L.mu);
            return lio_run(op, (char *)c->data, c->len, c->off, LIO_FAILOVER, 0); /* (no thread: the old way) */
        }
        pthread_detach(t);
        L.watchdog = 1;
    }
    c->wprev = NULL, c->wnext = L.watched;
    if (L.watched) L.watched->wprev = c;
    L.watched = c;
    L.calls++;
    if (L.wd_idle) { /* the watchdog sleeps without a deadline (the first call in a period): wake it */
        L.wd_idle = 0;
        pthread_cond_signal(&L.wcv);
    }
    pthread_mutex_unlock(&L.mu);
    int e = LOCAL_CALL();
#undef LOCAL_CALL
    pthread_mutex_lock(&L.mu);
    if (c->state == W_GONE) { /* its caller went on long ago */
        if (--L.stuck == 0) logmsg("the local image answered every abandoned call");
        pthread_mutex_unlock(&L.mu);
        return DISK_TAKEN;
    }
    unwatch(c);
    c->state = W_DONE;
    pthread_mutex_unlock(&L.mu);
    return e;
}

/* ---- primary: storage failover onto B's replica --------------------------------- *
 *
 * On the first I/O error from the local image (read, write, flush), and if B has
 * the whole disk (synced), the primary's disk path switches to B: writes go only
 * to the stream (still per epoch, still committed on B with the checkpoint),
 * reads are READ records on the same stream, so B answers each after every
 * write sent before it (B's view: its replica plus the journaled, uncommitted
 * records of A's own writes).  The guest sees no error.  A probe thread tries
 * the local image every --probe-ms; once it works again, the blocks written
 * meanwhile (a bitmap) are copied back from B and the path switches back.
 * If the stream to B ends while the disk runs on B, guest I/O is suspended
 * (requests wait, never answered with an error): there is no storage left. */

/* a switch of the disk's path (stream_mu held); readers check storage_seq around a local read */
void set_storage(enum storage st) {
    __atomic_store_n(&S.storage, st, __ATOMIC_RELEASE);
    __atomic_add_fetch(&S.storage_seq, 1, __ATOMIC_RELEASE);
}

struct rreq { /* a read sent to B, waiting for its reply */
    uint64_t id, gen;
    uint32_t len;
    char *buf;
    int done, err;
    struct rreq *next;
};

struct reader_arg { int fd; uint64_t gen; struct chan rx; };

/* B's answers to READ records on one stream connection; it owns (closes) the socket */
static void *reply_reader(void *arg) {
    struct reader_arg a = *(struct reader_arg *)arg;
    free(arg);
    const char *why = "the replica closed the stream";
    struct rd in = {a.fd, malloc(RD_BUF), 0, 0, RD_BUF}; /* (no buffer: unbuffered) */
    for (;;) {
        struct rec r;
        if (rd_read(&in, &r, sizeof r)) break;
        uint64_t id = le64toh(r.epoch), err = le64toh(r.offset), len = le64toh(r.len);
        if (le32toh(r.magic) != REC_MAGIC || le32toh(r.type) != R_READ_REPLY) { why = "a bad record from the replica"; break; }
        pthread_mutex_lock(&S.rmu);
        struct rreq *q = S.rq;
        while (q && q->id != id) q = q->next;
        pthread_mutex_unlock(&S.rmu);
        if (!q || (err == 0 && len != q->len) || (err && len)) { why = "a read reply that matches no request"; break; }
        /* q stays linked until done or this connection is dead: its buffer is ours to fill
           (a reply that fails its check is never marked done: the connection ends) */
        int o = open_rec(&in, &a.rx, &r, (unsigned char *)q->buf, err ? 0 : len);
        if (o == -2) why = "a read reply that fails its integrity check";
        if (o) break;
        pthread_mutex_lock(&S.rmu);
        q->done = 1;
        q->err = err ? -EIO : 0;
        pthread_cond_broadcast(&S.rcv);
        pthread_mutex_unlock(&S.rmu);
    }
    shutdown(a.fd, SHUT_RDWR);
    pthread_mutex_lock(&S.rmu);
    if (a.gen > S.dead_gen) S.dead_gen = a.gen;
    pthread_cond_broadcast(&S.rcv);
    pthread_mutex_unlock(&S.rmu);
    pthread_mutex_lock(&S.stream_mu);
    if (S.peer == a.fd && S.conn_gen == a.gen) peer_lost(why);
    pthread_cond_broadcast(&S.io_cv);
    pthread_mutex_unlock(&S.stream_mu);
    close(a.fd);
    chan_free(&a.rx);
    free(in.buf);
    return NULL;
}

void start_reply_reader(int fd, uint64_t gen, struct chan rx) {
    struct reader_arg *a = malloc(sizeof *a);
    a->fd = fd, a->gen = gen, a->rx = rx;
    pthread_t t;
    pthread_create(&t, NULL, reply_reader, a);
    pthread_detach(t);
}

/* until there is a stream to B again (never, today): the guest's request waits (stream_mu held) */
static void wait_for_peer(void) {
    while (S.peer < 0) pthread_cond_wait(&S.io_cv, &S.stream_mu);
}

/* read B's view: n requests at once (each with its len and buf; off[i] where); while no
   stream, they wait (suspended); 0 or the first error */
static int remote_read_many(struct rreq *q, const uint64_t *off, int n) {
    for (;;) {
        pthread_mutex_lock(&S.stream_mu);
        wait_for_peer();
        uint64_t gen = S.conn_gen;
        pthread_mutex_lock(&S.rmu);
        for (int i = 0; i < n; i++) {
            q[i].id = ++S.next_id, q[i].gen = gen, q[i].done = 0, q[i].err = 0;
            q[i].next = S.rq, S.rq = &q[i];
        }
        pthread_mutex_unlock(&S.rmu);
        for (int i = 0; i < n && S.peer >= 0; i++) stream_send(R_READ, q[i].id, off[i], q[i].len, NULL);
        S.remote_reads += (uint64_t)n;
        pthread_mutex_unlock(&S.stream_mu);
        pthread_mutex_lock(&S.rmu);
        int left = n;
        while (left && S.dead_gen < gen) {
            left = 0;
            for (int i = 0; i < n; i++) left += !q[i].done;
            if (left && S.dead_gen < gen) pthread_cond_wait(&S.rcv, &S.rmu);
        }
        for (int i = 0; i < n; i++) { /* unlink */
            struct rreq **pp = &S.rq;
            while (*pp != &q[i]) pp = &(*pp)->next;
            *pp = q[i].next;
        }
        pthread_mutex_unlock(&S.rmu);
        if (!left) {
            for (int i = 0; i < n; i++) if (q[i].err) return q[i].err;
            return 0;
        }
        /* the stream died under the requests: wait for one (suspended), then ask again */
    }
}

static int remote_read(uint64_t off, uint32_t len, char *buf) {
    struct rreq q = {.len = len, .buf = buf};
    return remote_read_many(&q, &off, 1);
}

static void *probe_thread(void *arg);

/* the local image failed (e: -errno): go remote if B can serve; 1 if the disk now runs
   remote (or suspended), 0 if it cannot and the error is the guest's (stream_mu held) */
static int failover(int e, const char *what) {
    if (S.storage != LOCAL) return 1;
    if (!S.synced || S.peer < 0) {
        logmsg("the local image failed (%s: %s) and no replica has the whole disk: the error goes to the guest",
               what, strerror(-e));
        return 0;
    }
    set_storage(REMOTE);
    S.failovers++;
    S.failed_at_ms = now_ms();
    bm_or(S.dirty_local, S.unflushed); /* not known to be on the local image */
    bm_or(S.dirty_local, S.flushing);
    memset(S.unflushed, 0, S.bm_words * 8);
    if (e == -ETIMEDOUT)
        snprintf(S.storage_err, sizeof S.storage_err, "%s: no answer in %d ms", what, S.hang_ms);
    else
        snprintf(S.storage_err, sizeof S.storage_err, "%s: %s", what, strerror(-e));
    logmsg("the local image failed (%s): the disk runs on the replica's storage at %s", S.storage_err, S.peer_host);
    if (!S.probing) {
        S.probing = 1;
        pthread_t t;
        pthread_create(&t, NULL, probe_thread, NULL);
        pthread_detach(t);
    }
    return 1;
}

/* FLUSH (and FUA) on the local image; 0, or -errno for the guest */
static int flush_local(void) {
    pthread_mutex_lock(&S.flush_mu);
    pthread_mutex_lock(&S.stream_mu);
    if (S.storage != LOCAL) {
        wait_for_peer(); /* durable on B when the epoch commits, before any output is released */
        pthread_mutex_unlock(&S.stream_mu);
        pthread_mutex_unlock(&S.flush_mu);
        return 0;
    }
    uint64_t *t = S.flushing; /* the blocks written so far are what this fdatasync makes durable */
    S.flushing = S.unflushed, S.unflushed = t;
    pthread_mutex_unlock(&S.stream_mu);
    int e = lio_run(LIO_SYNC, NULL, 0, 0, LIO_FAILOVER, 0);
    pthread_mutex_lock(&S.stream_mu);
    if (e && failover(e, "flush")) {
        e = 0;
        wait_for_peer();
    }
    if (e) bm_or(S.unflushed, S.flushing);
    memset(S.flushing, 0, S.bm_words * 8);
    pthread_mutex_unlock(&S.stream_mu);
    pthread_mutex_unlock(&S.flush_mu);
    return e;
}

#define BACK_BATCH 64 /* reads of B's view in flight while copying back (each <= 64 KiB) */
#define BACK_RUN (64u << 10)

/* copy the dirty blocks in bm from B to the local image; 0 or -errno (buf: BACK_BATCH runs) */
static int copy_back(const uint64_t *bm, char *buf) {
    uint64_t nb = (S.size + BS - 1) / BS, offs[BACK_BATCH];
    struct rreq q[BACK_BATCH];
    for (uint64_t b = 0; b < nb;) {
        int n = 0;
        uint64_t blocks = 0;
        while (b < nb && n < BACK_BATCH) {
            if (!(bm[b >> 6] >> (b & 63) & 1)) { b++; continue; }
            uint64_t e = b;
            while (e < nb && e - b < BACK_RUN / BS && (bm[e >> 6] >> (e & 63) & 1)) e++;
            offs[n] = b * BS;
            q[n] = (struct rreq){.len = (uint32_t)(e * BS > S.size ? S.size - b * BS : (e - b) * BS),
                                 .buf = buf + (size_t)n * BACK_RUN};
            blocks += e - b, n++, b = e;
        }
        if (!n) break;
        int r = remote_read_many(q, offs, n);
        for (int i = 0; i < n && !r; i++) r = lio_run(LIO_WRITE, q[i].buf, q[i].len, offs[i], LIO_DEADLINE, 0);
        if (r) return r;
        S.resynced_local += blocks;
    }
    return lio_run(LIO_SYNC, NULL, 0, 0, LIO_DEADLINE, 0);
}

/* while the disk runs remote: probe the local image; when it works, resync and switch back */
static void *probe_thread(void *arg) {
    (void)arg;
    char *blk = malloc(BS), *buf = malloc((size_t)BACK_BATCH * BACK_RUN);
    uint64_t *snap = calloc(S.bm_words, 8);
    for (;;) {
        usleep((useconds_t)S.probe_ms * 1000);
        pthread_mutex_lock(&S.stream_mu);
        if (S.storage != REMOTE) { /* local again, or suspended: B had the writes, nothing to copy from */
            S.probing = 0;
            pthread_mutex_unlock(&S.stream_mu);
            break;
        }
        int busy = S.local_busy; /* changes in a local call begun before the failover */
        pthread_mutex_unlock(&S.stream_mu);
        if (busy || lio_stuck()) continue; /* a hung call may still land: copying back must come after it */
        if (lio_run(LIO_READ, blk, BS, 0, LIO_DEADLINE, 0) || lio_run(LIO_WRITE, blk, BS, 0, LIO_DEADLINE, 0) ||
            lio_run(LIO_SYNC, NULL, 0, 0, LIO_DEADLINE, 0))
            continue;
        logmsg("the local image answers again: copying back the blocks written meanwhile");
        int done = 0;
        for (int round = 0; !done; round++) {
            pthread_mutex_lock(&S.stream_mu);
            if (S.storage != REMOTE) { pthread_mutex_unlock(&S.stream_mu); break; }
            uint64_t left = bm_count(S.dirty_local);
            if (left <= 256 || round >= 8) {
                /* the last pass holds the guest's writes (not stream_mu: barriers, so B's
                   commits, go on while B answers these reads) */
                double t0 = now_ms();
                S.draining = 1;
                memcpy(snap, S.dirty_local, S.bm_words * 8);
                pthread_mutex_unlock(&S.stream_mu);
                int e = copy_back(snap, buf);
                pthread_mutex_lock(&S.stream_mu);
                S.draining = 0;
                pthread_cond_broadcast(&S.io_cv);
                if (e) logmsg("copying the blocks back failed (%s): the disk stays on the replica", strerror(-e));
                if (!e && S.storage == REMOTE) {
                    memset(S.dirty_local, 0, S.bm_words * 8);
                    set_storage(LOCAL);
                    S.switchbacks++;
                    S.storage_err[0] = 0;
                    logmsg("the disk runs on the local image again (%" PRIu64 " blocks copied back; last pass %.1f ms)",
                           S.resynced_local, now_ms() - t0);
                    done = 1;
                }
                pthread_mutex_unlock(&S.stream_mu);
                break;
            }
            memcpy(snap, S.dirty_local, S.bm_words * 8);
            memset(S.dirty_local, 0, S.bm_words * 8);
            pthread_mutex_unlock(&S.stream_mu);
            int e = copy_back(snap, buf); /* writes meanwhile mark their blocks again */
            if (e) {
                logmsg("copying the blocks back failed (%s): the disk stays on the replica", strerror(-e));
                pthread_mutex_lock(&S.stream_mu);
                bm_or(S.dirty_local, snap);
                pthread_mutex_unlock(&S.stream_mu);
                break;
            }
        }
    }
    free(blk), free(buf), free(snap);
    return NULL;
}

/* ---- the guest's I/O (the NBD requests, disknbd.c) ------------------------------------ */

static int overlaps(const struct change *c) { /* stream_mu held */
    for (const struct change *o = S.inflight; o; o = o->rnext)
        if (o->off < c->off + c->len && c->off < o->off + o->len) return 1;
    return 0;
}

/* one change of the image: local, then the stream.  Per range in order: a change waits
   while one under way overlaps it, so overlapping changes reach the image and the stream
   in the same order; changes of different blocks make their local calls at once, outside
   stream_mu (the stream's records of different blocks commute).  A barrier waits for the
   local calls under way (changes_hold), so a change is in the epoch its record is in.
   0, -errno (-EPERM: not a primary), or DISK_TAKEN (local_change) */
int disk_change(struct change *c) {
    pthread_mutex_lock(&S.stream_mu);
    while (S.draining || S.holding || overlaps(c)) pthread_cond_wait(&S.io_cv, &S.stream_mu);
    if (S.role != PRIMARY) { pthread_mutex_unlock(&S.stream_mu); return -EPERM; }
    c->rprev = NULL, c->rnext = S.inflight;
    if (S.inflight) S.inflight->rprev = c;
    S.inflight = c;
    int e = 0;
    c->local = S.storage == LOCAL;
    if (c->local) {
        S.local_busy++;
        pthread_mutex_unlock(&S.stream_mu);
        e = local_change(c);
        if (e == DISK_TAKEN) return e;
        pthread_mutex_lock(&S.stream_mu);
    }
    return change_end(c, e);
}

/* the rest of a change after its local call (e: its result; a change that made none: 0):
   storage failover if it failed, then the stream (stream_mu held; released); 0 or -errno */
static int change_end(struct change *c, int e) {
    if (c->local) S.local_busy--;
    if (e && failover(e, c->type == R_WRITE ? "write" : "zero")) e = 0;
    if (!e) {
        if (S.storage != LOCAL) wait_for_peer(); /* B alone holds the disk: on to B, or wait */
        bm_set(S.storage == LOCAL ? S.unflushed : S.dirty_local, c->off, c->len);
        stream_send(c->type, S.cur_epoch, c->off, c->len, c->type == R_WRITE ? c->data : NULL);
        if (S.peer >= 0) wlog_add(S.cur_epoch, c->off, c->len);
        else bm_set(S.dirty_peer, c->off, c->len); /* no stream: a returning replica needs it */
        if (S.storage != LOCAL) wait_for_peer(); /* not known to be on B: never answered */
        S.writes++, S.write_bytes += c->len;
    }
    if (c->rprev) c->rprev->rnext = c->rnext; else S.inflight = c->rnext;
    if (c->rnext) c->rnext->rprev = c->rprev;
    pthread_cond_broadcast(&S.io_cv); /* an overlapping change, a barrier may wait for this one */
    pthread_mutex_unlock(&S.stream_mu);
    if (!e && c->fua) e = flush_local();
    return e;
}

/* a barrier: the changes in their local call finish (their records go in this epoch), new
   ones wait until changes_release (stream_mu held) */
void changes_hold(void) {
    S.holding++;
    while (S.local_busy) pthread_cond_wait(&S.io_cv, &S.stream_mu);
}

void changes_release(void) {
    S.holding--;
    pthread_cond_broadcast(&S.io_cv);
}

/* FLUSH: on the primary, flush_local; on B, fdatasync of the replica.  On B, every commit
   ends with fdatasync: a flushed write is durable there when its epoch commits, before the
   guest's acknowledgement is released.  0 or -errno */
int disk_flush(void) { return S.role == PRIMARY ? flush_local() : fdatasync(S.img) ? -errno : 0; }

/* len bytes at off, from the local image or B's view (as the disk's path is now); 0 or -errno */
int disk_read(uint64_t off, uint32_t len, char *buf) {
    int e = -EAGAIN;
    while (e == -EAGAIN) {
        uint64_t seq = __atomic_load_n(&S.storage_seq, __ATOMIC_ACQUIRE);
        if (__atomic_load_n(&S.storage, __ATOMIC_ACQUIRE) != LOCAL) {
            e = remote_read(off, len, buf);
            break;
        }
        e = lio_run(LIO_READ, buf, len, off, LIO_FAILOVER, 0);
        if (e) {
            pthread_mutex_lock(&S.stream_mu);
            if (S.role == PRIMARY && failover(e, "read")) e = -EAGAIN;
            pthread_mutex_unlock(&S.stream_mu);
        } else if (__atomic_load_n(&S.storage_seq, __ATOMIC_ACQUIRE) != seq) {
            e = -EAGAIN; /* the path switched under the read: read again */
        }
    }
    return e;
}
