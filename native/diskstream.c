/* mirror's disk server, the primary's side of the epoch stream to B: every change as a
 * record (stream_send), the barrier closing an epoch (cmd_barrier, in the checkpoint's
 * pause), the changes B has not committed yet (wlog, `committed`), and `replicate`: the
 * handshake and the live copy of the whole disk, or a resync of the blocks B lacks, or a
 * hashsync of a promoted replica's old primary. */
#include "diskserver_internal.h"

/* ---- primary: the stream to B ------------------------------------------------- */

static void wlog_fold(void);

void peer_lost(const char *why) { /* stream_mu held */
    wlog_fold(); /* B may lack every change of an epoch it did not commit */
    if (S.copy_pending && S.copy_resync) bm_or(S.dirty_peer, S.resync_set);
    S.copy_pending = 0;
    if (S.peer >= 0) {
        logmsg("stream to the replica ended: %s; %s", why,
               S.storage == LOCAL ? "the disk runs unprotected until a resync"
                                  : "the disk ran on the replica's storage: guest I/O suspended");
        shutdown(S.peer, SHUT_RDWR); /* its reply reader closes it */
    }
    if (S.storage == REMOTE) set_storage(SUSPENDED);
    S.peer = -1;
    S.synced = 0;
    snprintf(S.lost, sizeof S.lost, "%s", why);
}

/* one record to B (stream_mu held); a failure ends the stream, never the guest's I/O */
void stream_send(uint32_t type, uint64_t epoch, uint64_t off, uint64_t len, const void *data) {
    if (S.peer < 0) return;
    struct rec r = {htole32(REC_MAGIC), htole32(type), htole64(epoch), htole64(off), htole64(len)};
    size_t n = data ? len : 0;
    if (S.txcap < sizeof r + n + TAG) {
        free(S.txbuf);
        S.txcap = sizeof r + (n > SYNC_CHUNK ? n : SYNC_CHUNK) + TAG;
        S.txbuf = malloc(S.txcap);
        if (!S.txbuf) { S.txcap = 0; peer_lost("out of memory for a record"); return; }
    }
    /* a change or a copy's chunk: no one waits on it before a record that does (a BARRIER,
       a READ, SYNC_DONE): the kernel may gather them into full segments (MSG_MORE) */
    int more = type == R_WRITE || type == R_ZERO || type == R_TRIM || type == R_SYNC;
    if (send_sealed(S.peer, &S.tx, &r, data, n, S.txbuf, more))
        peer_lost(errno == EAGAIN || errno == EWOULDBLOCK
                      ? "the replica stopped reading (its journal is full with one epoch)"
                      : strerror(errno));
}

/* every change B may not have committed, into dirty_peer (stream_mu held) */
static void wlog_fold(void) {
    for (size_t i = S.wl_head; i < S.wl_n; i++) bm_set(S.dirty_peer, S.wlog[i].off, S.wlog[i].len);
    S.wl_head = S.wl_n = 0;
}

/* a change streamed to B in `epoch`, until B commits it (stream_mu held) */
void wlog_add(uint64_t epoch, uint64_t off, uint64_t len) {
    if (S.wl_n == S.wl_cap) {
        if (S.wl_head > S.wl_cap / 2) {
            memmove(S.wlog, S.wlog + S.wl_head, (S.wl_n - S.wl_head) * sizeof *S.wlog);
            S.wl_n -= S.wl_head, S.wl_head = 0;
        } else if (S.wl_cap >= (1u << 20)) {
            wlog_fold(); /* bounded: a resync sends these blocks too (more than needed, never less) */
        } else {
            struct wl *w = realloc(S.wlog, (S.wl_cap ? S.wl_cap * 2 : 4096) * sizeof *w);
            if (!w) { wlog_fold(); bm_set(S.dirty_peer, off, len); return; }
            S.wlog = w, S.wl_cap = S.wl_cap ? S.wl_cap * 2 : 4096;
        }
    }
    S.wlog[S.wl_n++] = (struct wl){epoch, off, len};
}

/* `committed N` (the agent, once checkpoint N is acknowledged): B holds epochs <= N */
void cmd_committed(uint64_t n, char *out, size_t outlen) {
    pthread_mutex_lock(&S.stream_mu);
    while (S.wl_head < S.wl_n && S.wlog[S.wl_head].epoch <= n) S.wl_head++;
    if (S.wl_head == S.wl_n) S.wl_head = S.wl_n = 0;
    if (S.copy_pending && n >= S.copy_epoch) { /* B's replica is this disk as of a commit */
        S.copy_pending = 0;
        S.known = 1;
        memset(S.resync_set, 0, S.bm_words * 8);
    }
    pthread_mutex_unlock(&S.stream_mu);
    snprintf(out, outlen, "ok");
}

/* tests only: a copy of the image into `path` (reads with the deadline: a hung image
   leaves no copy rather than a barrier that never returns) */
void copy_image(const char *path) {
    int out = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (out < 0) return;
    off_t off = 0;
    char *buf = malloc(SYNC_CHUNK);
    while (buf && (uint64_t)off < S.size) {
        uint64_t n = S.size - (uint64_t)off < SYNC_CHUNK ? S.size - (uint64_t)off : SYNC_CHUNK;
        if (lio_run(LIO_READ, buf, n, (uint64_t)off, LIO_DEADLINE, 0) || pwrite_full(out, buf, n, (uint64_t)off)) break;
        off += (off_t)n;
    }
    free(buf);
    close(out);
    if ((uint64_t)off < S.size) unlink(path);
}

static void snapshot(uint64_t epoch) { /* tests only: the image as of this barrier */
    char path[4096];
    snprintf(path, sizeof path, "%s/%" PRIu64 ".img", S.snap_dir, epoch);
    copy_image(path);
    if (epoch > (uint64_t)S.snap_keep) {
        snprintf(path, sizeof path, "%s/%" PRIu64 ".img", S.snap_dir, epoch - (uint64_t)S.snap_keep);
        unlink(path);
    }
}

static int is_zero(const char *p, size_t n) {
    static const char z[4096];
    for (size_t i = 0; i < n; i += sizeof z)
        if (memcmp(p + i, z, n - i < sizeof z ? n - i : sizeof z)) return 0;
    return 1;
}

struct sync_arg { uint64_t gen; int resync; };

/* the live copy to B: the whole image, or (a resync) the blocks in resync_set; then
   SYNC_DONE.  Every chunk is read under stream_mu, so the guest's writes stream after it. */
static void *sync_thread(void *arg) {
    struct sync_arg a = *(struct sync_arg *)arg;
    free(arg);
    char *buf = malloc(SYNC_CHUNK);
    uint64_t nb = (S.size + BS - 1) / BS;
    for (uint64_t b = 0; b < nb && buf;) {
        uint64_t e = b;
        if (a.resync) {
            if (!(S.resync_set[b >> 6] >> (b & 63) & 1)) { b++; continue; }
            while (e < nb && e - b < SYNC_CHUNK / BS && (S.resync_set[e >> 6] >> (e & 63) & 1)) e++;
        } else {
            e = b + SYNC_CHUNK / BS < nb ? b + SYNC_CHUNK / BS : nb;
        }
        uint64_t off = b * BS, n = e * BS > S.size ? S.size - off : (e - b) * BS;
        pthread_mutex_lock(&S.stream_mu);
        if (S.peer < 0 || S.conn_gen != a.gen) { pthread_mutex_unlock(&S.stream_mu); free(buf); return NULL; }
        int err = lio_run(LIO_READ, buf, n, off, LIO_DEADLINE, 1);
        if (err) peer_lost(err == -ETIMEDOUT ? "reading the local image for the disk copy hung"
                                             : "reading the local image for the disk copy failed");
        else if (is_zero(buf, n)) stream_send(R_ZERO, 0, off, n, NULL);
        else stream_send(R_SYNC, 0, off, n, buf);
        if (a.resync) S.resync_blocks += e - b, S.sync_done_bytes += n;
        else S.sync_done_bytes = off + n;
        pthread_mutex_unlock(&S.stream_mu);
        b = e;
    }
    free(buf);
    pthread_mutex_lock(&S.stream_mu);
    if (S.peer >= 0 && S.conn_gen == a.gen) {
        stream_send(R_SYNC_DONE, S.cur_epoch, 0, 0, NULL);
        S.synced = S.peer >= 0;
        S.copy_epoch = S.cur_epoch; /* B's replica is this disk once it commits that epoch */
        S.copy_pending = 1;
        if (a.resync) logmsg("resync sent: %" PRIu64 " blocks of %" PRIu64, S.resync_blocks, nb);
    }
    pthread_mutex_unlock(&S.stream_mu);
    return NULL;
}

static int connect_tcp(const char *host, const char *port, char *err, size_t errlen) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res;
    int e = getaddrinfo(host, port, &hints, &res);
    if (e) { snprintf(err, errlen, "cannot resolve %s: %s", host, gai_strerror(e)); return -1; }
    int fd = -1;
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, 0);
        if (fd < 0) continue;
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) { snprintf(err, errlen, "cannot connect to %s:%s: %s", host, port, strerror(errno)); return -1; }
    int one = 1, buf = 4 << 20;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    struct timeval tv = {S.stall_ms / 1000, (S.stall_ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return fd;
}

/* a stream to B proved both ways: from now on the guest's changes go to it, and the sync
   thread copies the whole disk or (resync) the blocks in dirty_peer (stream_mu held) */
static void stream_begin(int fd, const char *host, const unsigned char kab[32], struct chan rx, int resync) {
    if (S.peer >= 0) peer_lost("replaced by a new stream");
    S.hashing = 0;
    S.peer = fd;
    snprintf(S.peer_host, sizeof S.peer_host, "%s", host);
    S.conn_gen++;
    chan_init(&S.tx, kab, 1, S.plain); /* (the caller checked it can) */
    start_reply_reader(fd, S.conn_gen, rx);
    S.synced = 0;
    S.lost[0] = 0;
    S.sync_done_bytes = 0;
    S.resync_blocks = 0;
    S.copy_resync = resync;
    S.copy_pending = 1, S.copy_epoch = UINT64_MAX; /* (a resync lost midway gives its blocks back) */
    if (resync) { /* what B lacks: written while no stream, or in epochs it never committed */
        memcpy(S.resync_set, S.dirty_peer, S.bm_words * 8);
        S.sync_total = bm_count(S.resync_set) * BS;
    } else {
        S.known = 0;
        S.sync_total = S.size;
    }
    memset(S.dirty_peer, 0, S.bm_words * 8);
    struct sync_arg *sa = malloc(sizeof *sa);
    sa->gen = S.conn_gen, sa->resync = resync;
    pthread_t t;
    pthread_create(&t, NULL, sync_thread, sa);
    pthread_detach(t);
}

struct hash_arg { int fd; uint64_t gen; struct chan rx; unsigned char kab[32]; char host[300]; };

/* hashsync (a promoted replica re-protected by its old primary, whose image also holds
   that primary's writes after the last commit, which never reached this disk): hash this
   image, take the replica's hashes, and resync every block that differs plus every block
   written since promotion (dirty_peer: the guest writes on meanwhile, no stream yet, so a
   block written after it was hashed is in dirty_peer too) */
static void *hash_thread(void *arg) {
    struct hash_arg *a = arg;
    uint64_t nb = (S.size + BS - 1) / BS, differ = 0;
    unsigned char mine[SYNC_CHUNK / BS * HASH_LEN], theirs[SYNC_CHUNK / BS * HASH_LEN];
    uint64_t *diff = calloc(S.bm_words, 8);
    char *buf = malloc(SYNC_CHUNK);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    const char *why = diff && buf && md ? NULL : "out of memory for the disk's block hashes";
    double t0 = now_ms();
    struct timeval tv = {120, 0}, none = {0, 0}; /* the replica hashes its image alongside */
    setsockopt(a->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct rd in = {a->fd, NULL, 0, 0, 0}; /* unbuffered: the socket goes on to the reply reader */
    for (uint64_t off = 0; !why && off < S.size; off += SYNC_CHUNK) { /* chunk by chunk, both sides in order */
        uint64_t n = S.size - off < SYNC_CHUNK ? S.size - off : SYNC_CHUNK, k = (n + BS - 1) / BS;
        if (lio_run(LIO_READ, buf, n, off, LIO_DEADLINE, 0)) { why = "reading the local image to hash it failed"; break; }
        hash_blocks(md, buf, n, mine);
        struct rec r;
        if (rd_read(&in, &r, sizeof r)) { why = "the replica sent no block hashes (closed, or 120 s silent)"; break; }
        if (le32toh(r.magic) != REC_MAGIC || le32toh(r.type) != R_HASHES || le64toh(r.offset) != off / BS ||
            le64toh(r.len) != k * HASH_LEN) { why = "a bad block hash record from the replica"; break; }
        int o = open_rec(&in, &a->rx, &r, theirs, k * HASH_LEN);
        if (o) { why = o == -2 ? "block hashes that fail their integrity check" : "the replica closed the stream"; break; }
        for (uint64_t i = 0; i < k; i++)
            if (memcmp(mine + i * HASH_LEN, theirs + i * HASH_LEN, HASH_LEN)) {
                uint64_t blk = off / BS + i;
                diff[blk >> 6] |= 1ull << (blk & 63);
                differ++;
            }
        pthread_mutex_lock(&S.stream_mu);
        if (S.hashing == a->gen) S.sync_done_bytes = off + n;
        pthread_mutex_unlock(&S.stream_mu);
    }
    setsockopt(a->fd, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
    pthread_mutex_lock(&S.stream_mu);
    int mine_still = S.hashing == a->gen && S.role == PRIMARY;
    if (mine_still && !why) {
        bm_or(S.dirty_peer, diff);
        S.hash_differ = differ;
        logmsg("hashsync: %" PRIu64 " blocks of %" PRIu64 " differ from the replica's (hashed in %.0f ms); with the "
               "blocks written since: %" PRIu64 " to send", differ, nb, now_ms() - t0, bm_count(S.dirty_peer));
        stream_begin(a->fd, a->host, a->kab, a->rx, 1);
        a->fd = -1;
    } else if (mine_still) {
        S.hashing = 0;
        snprintf(S.lost, sizeof S.lost, "hashsync: %s", why);
        logmsg("hashsync with the replica failed: %s", why);
    }
    pthread_mutex_unlock(&S.stream_mu);
    if (a->fd >= 0) { close(a->fd); chan_free(&a->rx); }
    if (md) EVP_MD_CTX_free(md);
    free(diff), free(buf);
    OPENSSL_cleanse(a->kab, sizeof a->kab);
    free(a);
    return NULL;
}

/* `replicate HOST PORT FIRST_EPOCH [resync]`: start the stream and the live copy: the
   whole disk, or with `resync` only the blocks B's replica lacks (B must answer that
   its replica is this disk server's as of a commit: same pair and sid, in any generation).
   A promoted replica (no replica of its own yet) asked for a resync offers a hashsync to
   its old primary's image: B takes it if that image was the primary disk of `origin` */
void cmd_replicate(const char *host, const char *port, uint64_t first, int resync, char *out, size_t outlen) {
    if (S.role != PRIMARY) { snprintf(out, outlen, "err not a primary"); return; }
    pthread_mutex_lock(&S.stream_mu);
    int hashsync = resync && !S.known && S.origin;
    const char *no = S.storage != LOCAL ? "the disk runs on the replica's storage (the local image failed)"
                   : resync && !S.known && !hashsync ? "no replica of this disk server has committed a copy: a full copy is needed"
                   : !S.have_key ? "no session key for the disk stream (the agent hands one over when it pairs)"
                                 : NULL;
    unsigned char key[32];
    memcpy(key, S.key, sizeof key);
    uint64_t gen = S.generation, origin = S.origin;
    pthread_mutex_unlock(&S.stream_mu);
    if (no) { snprintf(out, outlen, "err %s", no); return; }
    if (!S.primary_meta) meta_write_primary();
    char err[300];
    int fd = connect_tcp(host, port, err, sizeof err);
    if (fd < 0) { snprintf(out, outlen, "err %s", err); return; }
    /* B's challenge; our HELLO under the session key; B's verdict under it */
    unsigned char nb[32], na[32], mac[32], want[32];
    char hello[256], mode[40];
    struct rec c, a;
    double dl = now_ms() + 10000;
    if (read_until(fd, &c, sizeof c, dl) || le32toh(c.magic) != REC_MAGIC || le32toh(c.type) != R_HELLO ||
        le64toh(c.len) != sizeof nb || read_until(fd, nb, sizeof nb, dl)) {
        close(fd);
        snprintf(out, outlen, "err the replica at %s:%s did not take the stream (no challenge in 10 s: not a "
                 "disk server of this version, or its log says why)", host, port);
        return;
    }
    if (RAND_bytes(na, sizeof na) != 1) { close(fd); snprintf(out, outlen, "err no random bytes for the stream"); return; }
    if (hashsync) snprintf(mode, sizeof mode, "hashsync-%016" PRIx64, origin);
    else snprintf(mode, sizeof mode, "%s", resync ? "resync" : "copy");
    int n = snprintf(hello, sizeof hello, "%s %016" PRIx64 " %s %s ", S.pair, S.sid, mode,
                     S.plain ? "plain" : "aes-256-gcm");
    if (n < 0 || n + 64 >= (int)sizeof hello) { close(fd); snprintf(out, outlen, "err the pair's name is too long for the stream's HELLO"); return; }
    for (int i = 0; i < 32; i++) n += sprintf(hello + n, "%02x", na[i]);
    struct rec h = {htole32(REC_MAGIC), htole32(R_HELLO), htole64(gen), htole64(S.size), htole64((uint64_t)n + 32)};
    hello_mac(key, nb, &h, hello, (size_t)n, mac);
    if (write_full(fd, &h, sizeof h) || write_full(fd, hello, (size_t)n) || write_full(fd, mac, sizeof mac) ||
        read_until(fd, &a, sizeof a, dl) || le32toh(a.magic) != REC_MAGIC || le32toh(a.type) != R_HELLO ||
        le64toh(a.len) != sizeof mac || read_until(fd, mac, sizeof mac, dl)) {
        close(fd);
        snprintf(out, outlen, "err the replica at %s:%s did not take our HELLO: its session key differs (it has not "
                 "taken this pairing session, or it is not this pair's standby; its log says why)", host, port);
        return;
    }
    uint64_t verdict = le64toh(a.offset);
    answer_mac(key, nb, na, verdict, want);
    if (CRYPTO_memcmp(mac, want, sizeof mac)) {
        close(fd);
        snprintf(out, outlen, "err the disk server at %s:%s did not prove the pair's session key (not this "
                 "pair's standby, or it has not taken this session yet)", host, port);
        return;
    }
    if (verdict != 0) {
        close(fd);
        if (verdict == 1)
            snprintf(out, outlen, "err the replica at %s:%s does not hold this disk: a full copy is needed", host, port);
        else if (verdict == 2)
            snprintf(out, outlen, "err the replica at %s:%s refused the stream: it is in another generation than "
                     "this disk server's %" PRIu64 " (the arbiter's generation moved on?)", host, port, gen);
        else
            snprintf(out, outlen, "err the replica at %s:%s refused the stream (its log says why)", host, port);
        return;
    }
    unsigned char kab[32], kba[32];
    conn_key(key, "a2b", nb, na, kab);
    conn_key(key, "b2a", nb, na, kba);
    struct chan rx = {0}, probe = {0};
    if (chan_init(&rx, kba, 0, S.plain) || chan_init(&probe, kab, 1, S.plain)) {
        chan_free(&rx), chan_free(&probe);
        close(fd);
        snprintf(out, outlen, "err cannot set up the stream's cipher");
        return;
    }
    chan_free(&probe);
    pthread_mutex_lock(&S.stream_mu);
    S.cur_epoch = first;
    if (!hashsync) {
        stream_begin(fd, host, kab, rx, resync);
    } else { /* the block hashes first (a thread: they take a read of both images) */
        if (S.peer >= 0) peer_lost("replaced by a new stream");
        struct hash_arg *ha = calloc(1, sizeof *ha);
        if (!ha) {
            pthread_mutex_unlock(&S.stream_mu);
            chan_free(&rx);
            close(fd);
            snprintf(out, outlen, "err out of memory");
            return;
        }
        S.conn_gen++;
        S.hashing = S.conn_gen;
        S.synced = 0, S.lost[0] = 0, S.sync_done_bytes = 0, S.sync_total = S.size, S.resync_blocks = 0;
        snprintf(S.peer_host, sizeof S.peer_host, "%s", host);
        ha->fd = fd, ha->gen = S.conn_gen, ha->rx = rx;
        memcpy(ha->kab, kab, 32);
        snprintf(ha->host, sizeof ha->host, "%s", host);
        pthread_t t;
        pthread_create(&t, NULL, hash_thread, ha);
        pthread_detach(t);
    }
    pthread_mutex_unlock(&S.stream_mu);
    OPENSSL_cleanse(kab, sizeof kab);
    snprintf(out, outlen, "ok");
}

void cmd_barrier(uint64_t n, char *out, size_t outlen) {
    pthread_mutex_lock(&S.stream_mu);
    if (S.role != PRIMARY) {
        snprintf(out, outlen, "err not a primary");
        pthread_mutex_unlock(&S.stream_mu);
        return;
    }
    changes_hold(); /* the changes in their local call: into this epoch, both image and stream */
    if (n != S.cur_epoch) snprintf(out, outlen, "err barrier %" PRIu64 " but the open epoch is %" PRIu64, n, S.cur_epoch);
    else {
        int had = S.synced;
        if (had) stream_send(R_BARRIER, n, 0, 0, NULL);
        S.cur_epoch = n + 1;
        S.barriers++;
        if (S.snap_dir && S.storage == LOCAL) snapshot(n); /* (remote: the local image is not the disk) */
        if (S.storage == SUSPENDED)
            snprintf(out, outlen, "err no storage: the local image failed (%s) and the stream to the replica, "
                     "whose storage the disk ran on, ended (%s): the guest's I/O is suspended", S.storage_err, S.lost);
        else if (!had) snprintf(out, outlen, "err no replica: %s", S.lost[0] ? S.lost : S.peer >= 0 || S.hashing ? "initial sync running" : "not replicating");
        else if (S.peer < 0) snprintf(out, outlen, "err %s", S.lost);
        else snprintf(out, outlen, "ok");
    }
    changes_release();
    pthread_mutex_unlock(&S.stream_mu);
}
