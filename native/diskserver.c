/* mirror's disk server: a guest disk served over NBD, replicated per epoch (Remus).
 *
 * One process per host and guest disk (started by mirror.guests.disk, driven by
 * mirror.replication.disk):
 *
 *   QEMU --NBD (unix socket)--> [diskserver on A] --records (TCP)--> [diskserver on B]
 *                                 local image                         journal, replica
 *
 * Primary role: serves the image to QEMU (reads, writes, FLUSH, FUA, TRIM,
 * WRITE_ZEROES) with a pool of worker threads; every change is written to the
 * local image and then handed to the stream to B as a record (epoch, offset,
 * data) BEFORE QEMU gets its answer, so when QMP `stop` has drained the guest's
 * I/O, every write the guest saw completed is in the stream.  The agent then
 * sends `barrier N` on the control socket (inside the checkpoint's pause): a
 * BARRIER record closes epoch N.  Changes are ordered per range: overlapping ones
 * reach the local image and the stream one after the other, in the same order;
 * changes of different blocks make their local calls at once (outside the stream's
 * lock; their records commute).  The barrier waits for the local calls under way,
 * so every change is in one epoch on the image and in the stream alike.
 *
 * Replica role: receives the stream into a ring journal file (bounded: when it
 * is full the receiver stops reading, TCP pushes back and the primary's writes
 * wait; an epoch that alone outgrows the journal makes the primary give up the
 * stream after --stall-ms and run unprotected until a resync, while the replica
 * stays at its committed epoch).  `commit N` (sent by the standby with RAM N)
 * waits for barrier N, applies every record of epochs <= N in stream order to
 * the replica, fdatasync, and answers.  `promote` drops every uncommitted epoch
 * and makes the process a primary serving the replica.  The replica serves
 * reads over NBD all along (a ready standby QEMU attaches to it).
 *
 * Initial sync: `replicate HOST PORT FIRST_EPOCH` connects to B and copies the
 * whole image live (SYNC records, all-zero chunks as ZERO records) while the
 * guest writes; B applies everything before SYNC_DONE at once, in stream order,
 * and journals everything after it.  B's replica is consistent (promotable) once the
 * first epoch closed after SYNC_DONE commits: the copy ends mid-epoch, so before that
 * commit the replica holds part of an epoch.  With `resync`, only the blocks the replica
 * lacks (see cmd_replicate, diskstream.c); a promoted replica re-protected by its old
 * primary's image sends the blocks whose hashes differ (hashsync, see hash_thread).
 *
 * Every record from the network is checked (type, epoch order, bounds, size);
 * a bad one drops the stream and is logged.  Control commands are lines of
 * text on a unix socket; each answer is one line ("ok ..." or "err ...").
 *
 * The stream is under the pair's keys (docs/security.md): the agent hands each
 * server the pairing session's key and the pair's generation on the control
 * socket (`session KEYHEX GENERATION`; the key is derived by both agents from
 * their CurveZMQ key pairs and the interconnect session).  B opens every
 * connection with a random challenge; A's HELLO carries an HMAC-SHA256 under
 * the session key over the challenge and the HELLO; B's answer carries one
 * over both nonces and its verdict.  Records then go under AES-256-GCM with
 * per-connection keys (HMAC of the session key and both nonces, one per
 * direction) and counter nonces: the 32-byte header is the associated data,
 * the data is encrypted, a 16-byte tag follows every record.  B takes the
 * generation from its own agent only (a HELLO of another is refused), runs
 * every handshake in its own thread under a deadline (at most HS_MAX at once: a
 * new connection evicts the oldest), and an authenticated stream replaces the
 * one before it.
 *
 * This file: the process (state, command line, control socket) and the I/O helpers its
 * parts share; the parts, one concern each, are listed in diskserver_internal.h.
 */
#include "diskserver_internal.h"

struct disk_state S;

/* ---- I/O helpers (every part's) --------------------------------------------------- */

void logmsg(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "diskserver: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

int read_full(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r, n -= (size_t)r;
    }
    return 0;
}

int write_full(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n) {
        ssize_t r = send(fd, p, n, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == ENOTSOCK) r = write(fd, p, n);
        if (r <= 0) return -1;
        p += r, n -= (size_t)r;
    }
    return 0;
}

/* the buffers of v (n of them, changed as they go) in order, in as few sends as the socket
   takes: one, mostly (a record's header, data and tag; a reply's header and data); flags:
   sendmsg's (MSG_MORE: more follows at once, the kernel may hold this in its buffer) */
int writev_full(int fd, struct iovec *v, int n, int flags) {
    while (n && !v->iov_len) v++, n--;
    while (n) {
        struct msghdr m = {.msg_iov = v, .msg_iovlen = (size_t)n};
        ssize_t r = sendmsg(fd, &m, MSG_NOSIGNAL | flags);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == ENOTSOCK) r = writev(fd, v, n);
        if (r <= 0) return -1;
        while (n && (size_t)r >= v->iov_len) r -= (ssize_t)v->iov_len, v++, n--;
        if (n) v->iov_base = (char *)v->iov_base + r, v->iov_len -= (size_t)r;
        while (n && !v->iov_len) v++, n--;
    }
    return 0;
}

/* n bytes from the stream: what the buffer holds, then one recv of all the socket has (up
   to its size) for a small rest, or straight into place for a large one */
int rd_read(struct rd *r, void *dst, size_t n) {
    char *p = dst;
    size_t have = r->tail - r->head, k = have < n ? have : n;
    if (k) memcpy(p, r->buf + r->head, k), r->head += k, p += k, n -= k;
    if (!n) return 0;
    if (!r->buf || n >= r->cap / 2) return read_full(r->fd, p, n);
    r->head = r->tail = 0;
    while (r->tail < n) {
        ssize_t g = read(r->fd, r->buf + r->tail, r->cap - r->tail);
        if (g < 0 && errno == EINTR) continue;
        if (g <= 0) return -1;
        r->tail += (size_t)g;
    }
    memcpy(p, r->buf, n);
    r->head = n;
    return 0;
}

int pread_full(int fd, void *buf, size_t n, uint64_t off) {
    char *p = buf;
    while (n) {
        ssize_t r = pread(fd, p, n, (off_t)off);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -errno;
        if (r == 0) { memset(p, 0, n); return 0; }
        p += r, n -= (size_t)r, off += (uint64_t)r;
    }
    return 0;
}

int pwrite_full(int fd, const void *buf, size_t n, uint64_t off) {
    const char *p = buf;
    while (n) {
        ssize_t r = pwrite(fd, p, n, (off_t)off);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -errno;
        p += r, n -= (size_t)r, off += (uint64_t)r;
    }
    return 0;
}

int zero_range(int fd, uint64_t off, uint64_t len, int punch) {
    int mode = punch ? (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) : FALLOC_FL_ZERO_RANGE;
    if (fallocate(fd, mode, (off_t)off, (off_t)len) == 0) return 0;
    if (punch && fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
        return 0;
    static const char zeros[65536];
    while (len) { /* a file system without fallocate modes: write zeros */
        size_t n = len < sizeof zeros ? (size_t)len : sizeof zeros;
        int e = pwrite_full(fd, zeros, n, off);
        if (e) return e;
        off += n, len -= n;
    }
    return 0;
}

double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

/* read n bytes before an absolute deadline (now_ms) */
int read_until(int fd, void *buf, size_t n, double deadline) {
    char *p = buf;
    while (n) {
        int left = (int)(deadline - now_ms());
        if (left <= 0) return -1;
        struct pollfd pf = {fd, POLLIN, 0};
        int pr = poll(&pf, 1, left);
        if (pr < 0 && errno == EINTR) continue;
        if (pr <= 0) return -1;
        ssize_t r = recv(fd, p, n, MSG_DONTWAIT);
        if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (r <= 0) return -1;
        p += r, n -= (size_t)r;
    }
    return 0;
}

static int listen_unix(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof a.sun_path) { logmsg("socket path too long: %s", path); return -1; }
    strcpy(a.sun_path, path);
    unlink(path);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 16)) {
        logmsg("cannot listen on %s: %s", path, strerror(errno));
        return -1;
    }
    return fd;
}

/* ---- control ---------------------------------------------------------------------- */

/* `session KEYHEX GENERATION` (the agent, at each pairing): the pair session's key for the
   stream and the pair's generation (the arbiter's); the stream running goes on, a new
   connection must prove this key */
static void cmd_session(const char *hex, uint64_t gen, char *out, size_t outlen) {
    unsigned char key[32];
    if (strlen(hex) != 64 || gen == 0) { snprintf(out, outlen, "err session: a 64-digit hex key and a generation >= 1"); return; }
    for (int i = 0; i < 32; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1) { snprintf(out, outlen, "err session: the key is not hex"); return; }
        key[i] = (unsigned char)v;
    }
    pthread_mutex_lock(&S.stream_mu);
    pthread_mutex_lock(&S.mu);
    memcpy(S.key, key, sizeof key);
    S.have_key = 1;
    S.generation = gen;
    pthread_mutex_unlock(&S.mu);
    pthread_mutex_unlock(&S.stream_mu);
    OPENSSL_cleanse(key, sizeof key);
    snprintf(out, outlen, "ok");
}

static void cmd_status(char *out, size_t outlen) {
    pthread_mutex_lock(&S.stream_mu);
    pthread_mutex_lock(&S.mu);
    snprintf(out, outlen,
             "ok {\"role\":\"%s\",\"size\":%" PRIu64 ",\"open_epoch\":%" PRIu64 ",\"peer\":%s,\"synced\":%s,"
             "\"sync_bytes\":%" PRIu64 ",\"sync_total\":%" PRIu64 ",\"lost\":\"%s\",\"writes\":%" PRIu64
             ",\"write_bytes\":%" PRIu64 ",\"barriers\":%" PRIu64 ",\"committed\":%" PRIu64
             ",\"closed\":%" PRIu64 ",\"consistent\":%s,\"copied\":%s,\"streaming\":%s,\"journal_used\":%" PRIu64
             ",\"journal_size\":%" PRIu64 ",\"pending_records\":%zu,\"applied_records\":%" PRIu64
             ",\"dropped_records\":%" PRIu64 ",\"commits\":%" PRIu64 ",\"storage\":\"%s\",\"storage_error\":\"%s\""
             ",\"storage_peer\":\"%s\",\"failovers\":%" PRIu64 ",\"switchbacks\":%" PRIu64 ",\"dirty_local\":%" PRIu64
             ",\"resynced_local\":%" PRIu64 ",\"remote_reads\":%" PRIu64 ",\"known\":%s,\"dirty_peer\":%" PRIu64
             ",\"resync_blocks\":%" PRIu64 ",\"copy_pending\":%s,\"generation\":%" PRIu64 ",\"session_key\":%s"
             ",\"cipher\":\"%s\",\"refused_connections\":%" PRIu64 ",\"evicted_handshakes\":%" PRIu64
             ",\"max_pending\":%" PRIu64 ",\"hashing\":%s,\"hash_differ\":%" PRIu64 "}",
             S.role == PRIMARY ? "primary" : "replica", S.size, S.cur_epoch, S.peer >= 0 || S.hashing ? "true" : "false",
             S.synced ? "true" : "false", S.sync_done_bytes, S.sync_total, S.lost, S.writes, S.write_bytes,
             S.barriers, S.committed, S.closed_epoch, S.consistent ? "true" : "false", S.copied ? "true" : "false",
             S.streaming ? "true" : "false", jused(), S.jsize, S.nents - S.first, S.applied_records,
             S.dropped_records, S.commits, S.storage == LOCAL ? "local" : S.storage == REMOTE ? "remote" : "suspended",
             S.storage_err, S.peer_host, S.failovers, S.switchbacks, bm_count(S.dirty_local), S.resynced_local,
             S.remote_reads, S.known ? "true" : "false", bm_count(S.dirty_peer), S.resync_blocks,
             S.copy_pending ? "true" : "false", S.generation, S.have_key ? "true" : "false",
             S.plain ? "plain" : "aes-256-gcm", S.hs_refused, S.hs_evicted, S.max_pending, S.hashing ? "true" : "false",
             S.hash_differ);
    pthread_mutex_unlock(&S.mu);
    pthread_mutex_unlock(&S.stream_mu);
    size_t l = strlen(out); /* the local image's hung calls (diskstorage.c, "with a deadline") */
    uint64_t timeouts;
    int stuck;
    lio_counts(&timeouts, &stuck);
    if (l > 3 && out[l - 1] == '}')
        snprintf(out + l - 1, outlen - l + 1, ",\"hang_ms\":%d,\"local_timeouts\":%" PRIu64 ",\"local_stuck\":%d}",
                 S.hang_ms, timeouts, stuck);
}

static void *ctl_conn(void *arg) {
    int fd = (int)(intptr_t)arg;
    FILE *in = fdopen(fd, "r");
    char line[1024], out[4096];
    while (in && fgets(line, sizeof line, in)) {
        char a[300] = "", b[300] = "", mode[16] = "", hex[80] = "";
        uint64_t n = 0;
        int timeout = 0;
        if (sscanf(line, "barrier %" SCNu64, &n) == 1) cmd_barrier(n, out, sizeof out);
        else if (sscanf(line, "commit %" SCNu64 " %d", &n, &timeout) == 2) cmd_commit(n, timeout, out, sizeof out);
        else if (sscanf(line, "replicate %299s %299s %" SCNu64 " %15s", a, b, &n, mode) >= 3)
            cmd_replicate(a, b, n, !strcmp(mode, "resync"), out, sizeof out);
        else if (sscanf(line, "committed %" SCNu64, &n) == 1) cmd_committed(n, out, sizeof out);
        else if (sscanf(line, "session %79s %" SCNu64, hex, &n) == 2) cmd_session(hex, n, out, sizeof out);
        else if (strncmp(line, "promote", 7) == 0) cmd_promote(out, sizeof out);
        else if (strncmp(line, "status", 6) == 0) cmd_status(out, sizeof out);
        else snprintf(out, sizeof out, "err unknown command");
        size_t l = strlen(out);
        out[l++] = '\n';
        if (write_full(fd, out, l)) break;
    }
    if (in) fclose(in); else close(fd);
    return NULL;
}

static void *ctl_accept(void *arg) {
    int lfd = (int)(intptr_t)arg;
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) { if (errno == EINTR || errno == ECONNABORTED) continue; return NULL; }
        pthread_t t;
        pthread_create(&t, NULL, ctl_conn, (void *)(intptr_t)fd);
        pthread_detach(t);
    }
}

/* ---- the role gone (its death signal, SIGUSR2) --------------------------------------
 * The server outlives its role so that the guest's disk does not fail with it: the stream
 * to B ends (no role, no barrier: nothing more could commit there) and QEMU is served on
 * from the local image until it lets go of the disk (the host agent gives it back to
 * libvirt's own file, or the guest ends); then the server exits. */

static int orphan_pipe[2] = {-1, -1};

static void on_orphan(int sig) {
    (void)sig;
    char b = 1;
    if (write(orphan_pipe[1], &b, 1) < 0) { /* nothing to do in a handler */ }
}

static void *orphan_thread(void *arg) {
    (void)arg;
    char b;
    while (read(orphan_pipe[0], &b, 1) < 0 && errno == EINTR) {}
    int n = nbd_open_conns();
    logmsg("its role is gone: the stream ends%s", n ? "; QEMU is served on until it lets go" : "");
    pthread_mutex_lock(&S.stream_mu);
    if (S.peer >= 0) peer_lost("its role is gone");
    pthread_mutex_unlock(&S.stream_mu);
    if (S.listen_fd >= 0) shutdown(S.listen_fd, SHUT_RDWR); /* a replica takes no stream more */
    while (nbd_open_conns() > 0) usleep(50 * 1000);
    logmsg("no role and no client: exiting");
    _exit(0);
    return NULL;
}

static int usage(void) {
    fprintf(stderr,
            "usage: diskserver --image PATH --size BYTES --nbd SOCK --control SOCK --pair NAME\n"
            "         [--generation N] [--workers N] [--stall-ms MS] [--probe-ms MS] [--hang-ms MS] [--meta PATH]\n"
            "         [--replica HOST:PORT --journal PATH --journal-bytes N]\n"
            "         [--test-snapshots DIR --test-keep N --test-plain-stream 0|1]\n");
    return 2;
}

int mirror_diskserver_main(int argc, char **argv) {
    const char *image = NULL, *listen_at = NULL, *journal = NULL;
    memset(&S, 0, sizeof S);
    S.workers = 4, S.stall_ms = 5000, S.generation = 1, S.snap_keep = 8, S.probe_ms = 1000;
    S.hang_ms = 2000;
    S.jsize = 256u << 20;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--image")) image = v;
        else if (!strcmp(k, "--size")) S.size = strtoull(v, NULL, 10);
        else if (!strcmp(k, "--nbd")) S.nbd_path = v;
        else if (!strcmp(k, "--control")) S.ctl_path = v;
        else if (!strcmp(k, "--pair")) S.pair = v;
        else if (!strcmp(k, "--generation")) S.generation = strtoull(v, NULL, 10);
        else if (!strcmp(k, "--workers")) S.workers = atoi(v);
        else if (!strcmp(k, "--stall-ms")) S.stall_ms = atoi(v);
        else if (!strcmp(k, "--probe-ms")) S.probe_ms = atoi(v);
        else if (!strcmp(k, "--hang-ms")) S.hang_ms = atoi(v);
        else if (!strcmp(k, "--meta")) S.meta_path = v;
        else if (!strcmp(k, "--replica")) listen_at = v;
        else if (!strcmp(k, "--journal")) journal = v;
        else if (!strcmp(k, "--journal-bytes")) S.jsize = strtoull(v, NULL, 10);
        else if (!strcmp(k, "--test-snapshots")) S.snap_dir = v;
        else if (!strcmp(k, "--test-keep")) S.snap_keep = atoi(v);
        else if (!strcmp(k, "--test-plain-stream")) S.plain = !strcmp(v, "1");
        else return usage();
    }
    if (!image || !S.size || !S.nbd_path || !S.ctl_path || !S.pair || S.workers < 1 || S.workers > 64 ||
        S.probe_ms < 1 || S.hang_ms < 0 ||
        (listen_at && (!journal || S.jsize < 4096)))
        return usage();
    signal(SIGPIPE, SIG_IGN);
    if (pipe2(orphan_pipe, O_CLOEXEC)) { logmsg("pipe: %s", strerror(errno)); return 1; }
    pthread_mutex_init(&S.stream_mu, NULL);
    pthread_mutex_init(&S.mu, NULL);
    pthread_cond_init(&S.cv, NULL);
    pthread_cond_init(&S.io_cv, NULL);
    pthread_mutex_init(&S.flush_mu, NULL);
    pthread_mutex_init(&S.rmu, NULL);
    pthread_cond_init(&S.rcv, NULL);
    lio_init();
    S.peer = -1, S.stream_fd = -1, S.listen_fd = -1, S.jfd = -1;
    S.cur_epoch = 1;
    S.max_pending = S.jsize / 512 + 65536; /* the journal index's bound (about 40 bytes a record) */
    S.role = listen_at ? REPLICA : PRIMARY;
    S.bm_words = ((S.size + BS - 1) / BS + 63) / 64;
    S.dirty_local = calloc(S.bm_words, 8), S.unflushed = calloc(S.bm_words, 8), S.flushing = calloc(S.bm_words, 8);
    S.dirty_peer = calloc(S.bm_words, 8), S.resync_set = calloc(S.bm_words, 8);
    int rfd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (rfd < 0 || read(rfd, &S.sid, sizeof S.sid) != sizeof S.sid) S.sid = (uint64_t)getpid() ^ (uint64_t)now_ms();
    if (rfd >= 0) close(rfd);
    static char meta_default[4200];
    if (!S.meta_path) snprintf(meta_default, sizeof meta_default, "%s.replica-id", image), S.meta_path = meta_default;
    if (!S.dirty_local || !S.unflushed || !S.flushing || !S.dirty_peer || !S.resync_set) { logmsg("out of memory for the disk's bitmaps"); return 1; }
    S.img = open(image, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    struct stat st;
    if (S.img < 0 || fstat(S.img, &st)) { logmsg("cannot open the image %s: %s", image, strerror(errno)); return 1; }
    if ((uint64_t)st.st_size != S.size) {
        if (st.st_size != 0) {
            logmsg("the image %s is %lld bytes, the disk is %" PRIu64 ": refusing to resize it", image,
                   (long long)st.st_size, S.size);
            return 1;
        }
        if (ftruncate(S.img, (off_t)S.size)) { logmsg("cannot size the image %s: %s", image, strerror(errno)); return 1; }
    }
    if (listen_at) {
        S.jfd = open(journal, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (S.jfd < 0 || ftruncate(S.jfd, (off_t)S.jsize)) {
            logmsg("cannot create the journal %s: %s", journal, strerror(errno));
            return 1;
        }
        char host[256];
        const char *colon = strrchr(listen_at, ':');
        if (!colon || (size_t)(colon - listen_at) >= sizeof host) return usage();
        memcpy(host, listen_at, (size_t)(colon - listen_at));
        host[colon - listen_at] = 0;
        struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *res;
        if (getaddrinfo(host[0] ? host : NULL, colon + 1, &hints, &res)) { logmsg("bad --replica %s", listen_at); return 1; }
        S.listen_fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        int one = 1, rbuf = 4 << 20;
        setsockopt(S.listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        setsockopt(S.listen_fd, SOL_SOCKET, SO_RCVBUF, &rbuf, sizeof rbuf);
        if (bind(S.listen_fd, res->ai_addr, res->ai_addrlen) || listen(S.listen_fd, 64)) {
            logmsg("cannot listen on %s: %s", listen_at, strerror(errno));
            return 1;
        }
        freeaddrinfo(res);
        S.consistent = 0; /* nothing received yet: not promotable */
    }
    int nfd = listen_unix(S.nbd_path), cfd = listen_unix(S.ctl_path);
    if (nfd < 0 || cfd < 0) return 1;
    pthread_t t;
    pthread_create(&t, NULL, orphan_thread, NULL);
    pthread_detach(t);
    struct sigaction sa = {.sa_handler = on_orphan};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR2, &sa, NULL);
    if (getppid() == 1) on_orphan(SIGUSR2); /* (its role died while it started) */
    for (int i = 0; i < S.workers; i++) { pthread_create(&t, NULL, nbd_worker, NULL); pthread_detach(t); }
    pthread_create(&t, NULL, nbd_accept, (void *)(intptr_t)nfd);
    pthread_detach(t);
    if (listen_at) { pthread_create(&t, NULL, stream_thread, NULL); pthread_detach(t); }
    fprintf(stdout, "ready\n");
    fflush(stdout);
    ctl_accept((void *)(intptr_t)cfd);
    return 0;
}
