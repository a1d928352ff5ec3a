/* mirror's disk server, the replica's side (B): each connection's handshake, the stream
 * received into the ring journal, `commit N` (apply epochs <= N, fdatasync), `promote`
 * (drop the uncommitted epochs, become a primary), the replica's identity file, and B's
 * view for a primary running on this storage (READ records). */
#include "diskserver_internal.h"

#define HS_MS 3000 /* a handshake's deadline */

struct entry { /* one journaled record on the replica */
    uint64_t epoch, offset, len, pos; /* pos: where its data starts in the ring (monotonic) */
    uint32_t type;
};

/* ---- replica: receiving, journaling, committing ------------------------------- */

uint64_t jused(void) { return S.jtail - S.jhead; }

/* room for n contiguous bytes in the ring; its monotonic position (mu held) */
static int jreserve(uint64_t n, uint64_t *pos) {
    for (;;) {
        uint64_t at = S.jtail, in = at % S.jsize;
        if (in + n > S.jsize) at += S.jsize - in; /* no record wraps: skip the tail end */
        if (at + n - S.jhead <= S.jsize) { *pos = at; S.jtail = at + n; return 0; }
        if (!S.streaming || S.preempt) return -1;
        pthread_cond_wait(&S.cv, &S.mu); /* full: stop reading until a commit frees room */
    }
}

static void add_entry(uint32_t type, uint64_t epoch, uint64_t off, uint64_t len, uint64_t pos) {
    if (S.nents == S.cap) {
        if (S.first > S.cap / 2) {
            memmove(S.ents, S.ents + S.first, (S.nents - S.first) * sizeof *S.ents);
            S.nents -= S.first, S.first = 0;
        } else {
            S.cap = S.cap ? S.cap * 2 : 1024;
            S.ents = realloc(S.ents, S.cap * sizeof *S.ents);
            if (!S.ents) { logmsg("out of memory for the journal index"); abort(); }
        }
    }
    S.ents[S.nents++] = (struct entry){epoch, off, len, pos, type};
}

static void apply_now(uint32_t type, uint64_t off, uint64_t len, const char *data) {
    int e = type == R_ZERO ? zero_range(S.img, off, len, 0)
          : type == R_TRIM ? zero_range(S.img, off, len, 1)
                           : pwrite_full(S.img, data, len, off);
    if (e) logmsg("writing the replica at %" PRIu64 ": %s", off, strerror(-e));
    S.applied_records++;
}

/* the uncommitted epochs are dropped (promotion, or a new stream) (mu held) */
static void drop_uncommitted(void) {
    S.dropped_records += S.nents - S.first;
    S.nents = S.first = 0;
    S.drops++;
    S.jhead = S.jtail;
    S.closed_epoch = S.committed;
    pthread_cond_broadcast(&S.cv);
}

/* the replica's identity file: "PAIR GENERATION SID", written (durably) at the first commit
   after a copy or a resync, removed before a full copy and at promotion; a resync is
   taken only when it names the primary asking */
static void sync_dir_of(const char *path) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = 0; else strcpy(dir, ".");
    int d = open(dir[0] ? dir : "/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (d >= 0) { fsync(d); close(d); }
}

static int meta_clear(void) {
    if (unlink(S.meta_path) && errno != ENOENT) return -1;
    sync_dir_of(S.meta_path);
    return 0;
}

/* the replica holds the disk of the primary disk server `sid` of this pair (its life: a
   later generation of the same server resyncs; a promoted or restarted one has another) */
static int meta_matches(uint64_t sid) {
    char want[512], got[512] = "";
    uint64_t gen = 0, had = 0;
    int at = 0;
    snprintf(want, sizeof want, "%s ", S.pair);
    int fd = open(S.meta_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, got, sizeof got - 1);
    close(fd);
    if (n <= 0) return 0;
    got[n] = 0;
    return !strncmp(got, want, strlen(want)) &&
           sscanf(got + strlen(want), "%" SCNu64 " %" SCNx64 "%n", &gen, &had, &at) == 2 && got[strlen(want) + at] == '\n' &&
           had == sid && gen >= 1;
}

/* this image is the disk of the primary disk server `sid` of this pair ("PAIR GEN SID primary",
   written when it first replicates): a replica promoted from its copy may hashsync it back */
static int meta_matches_primary(uint64_t sid) {
    char want[300], got[600] = "";
    uint64_t gen = 0, had = 0;
    int at = 0;
    snprintf(want, sizeof want, "%s ", S.pair);
    int fd = open(S.meta_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, got, sizeof got - 1);
    close(fd);
    if (n <= 0) return 0;
    got[n] = 0;
    size_t w = strlen(want);
    return !strncmp(got, want, w) &&
           sscanf(got + w, "%" SCNu64 " %" SCNx64 " primary%n", &gen, &had, &at) == 2 && at > 0 &&
           !strcmp(got + w + at, "\n") && had == sid && gen >= 1;
}

void meta_write_primary(void) {
    char tmp[4200], line[512];
    snprintf(tmp, sizeof tmp, "%s.tmp", S.meta_path);
    int n = snprintf(line, sizeof line, "%s %" PRIu64 " %016" PRIx64 " primary\n", S.pair, S.generation, S.sid);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || write_full(fd, line, (size_t)n) || fdatasync(fd) || rename(tmp, S.meta_path)) {
        logmsg("cannot write the image's identity file %s: %s (a re-protection by a promoted replica will need "
               "a full copy)", S.meta_path, strerror(errno));
        if (fd >= 0) close(fd);
        return;
    }
    close(fd);
    sync_dir_of(S.meta_path);
    S.primary_meta = 1;
}

static void meta_write(void) {
    char tmp[4200], line[512];
    snprintf(tmp, sizeof tmp, "%s.tmp", S.meta_path);
    int n = snprintf(line, sizeof line, "%s %" PRIu64 " %016" PRIx64 "\n", S.pair, S.generation, S.hello_sid);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || write_full(fd, line, (size_t)n) || fdatasync(fd) || rename(tmp, S.meta_path)) {
        logmsg("cannot write the replica's identity file %s: %s (a return of the primary needs a full copy)",
               S.meta_path, strerror(errno));
        if (fd >= 0) close(fd);
        return;
    }
    close(fd);
    sync_dir_of(S.meta_path);
    S.meta_written = 1;
}

/* the primary's view of the disk: the replica, then every journaled record in stream order
   (receiver thread: nothing is added to the journal meanwhile; a commit removes a record
   from the index only once it is on the replica) */
static int read_view(uint64_t off, uint64_t len, char *buf) {
    pthread_mutex_lock(&S.mu);
    size_t n = 0, cap = 16;
    struct entry *ov = malloc(cap * sizeof *ov);
    for (size_t i = S.first; i < S.nents; i++) {
        struct entry *e = &S.ents[i];
        if (e->offset >= off + len || e->offset + e->len <= off) continue;
        if (n == cap) ov = realloc(ov, (cap *= 2) * sizeof *ov);
        ov[n++] = *e;
    }
    pthread_mutex_unlock(&S.mu);
    int err = pread_full(S.img, buf, len, off);
    for (size_t i = 0; i < n && !err; i++) {
        uint64_t a = ov[i].offset > off ? ov[i].offset : off;
        uint64_t b = ov[i].offset + ov[i].len < off + len ? ov[i].offset + ov[i].len : off + len;
        if (ov[i].type == R_WRITE) err = pread_full(S.jfd, buf + (a - off), b - a, (ov[i].pos + (a - ov[i].offset)) % S.jsize);
        else memset(buf + (a - off), 0, b - a);
    }
    free(ov);
    S.remote_reads++;
    return err;
}

/* a replica's record: the data types carry len bytes */
static int rec_has_data(uint32_t type) { return type == R_WRITE || type == R_SYNC; }

/* one connection's handshake (no lock held): B's challenge, A's HELLO and its MAC under the
   session key; NULL and the channels if it proves the key, else why not (logged) */
struct hs { int fd, slot; uint64_t seq; unsigned char nb[32], na[32], key[32]; int resync; uint64_t sid, hsize, hgen, origin; struct chan rx, tx; };

static const char *handshake(struct hs *x) {
    struct rec c = {htole32(REC_MAGIC), htole32(R_HELLO), 0, 0, htole64(32)}, r;
    char hello[300];
    double dl = now_ms() + HS_MS;
    pthread_mutex_lock(&S.mu);
    int have = S.have_key, plain = S.plain;
    memcpy(x->key, S.key, 32);
    pthread_mutex_unlock(&S.mu);
    if (!have) return "no session key yet (the agent hands one over when a primary pairs)";
    if (RAND_bytes(x->nb, 32) != 1) return "no random bytes for a challenge";
    if (write_full(x->fd, &c, sizeof c) || write_full(x->fd, x->nb, 32)) return "the peer closed the connection";
    if (read_until(x->fd, &r, sizeof r, dl)) return "no HELLO within the handshake's deadline";
    uint64_t hlen = le64toh(r.len);
    if (le32toh(r.magic) != REC_MAGIC || le32toh(r.type) != R_HELLO || hlen <= 32 || hlen > 256 + 32)
        return "the stream does not start with a HELLO record";
    if (read_until(x->fd, hello, hlen, dl)) return "no HELLO within the handshake's deadline";
    size_t tn = hlen - 32;
    unsigned char want[32];
    hello_mac(x->key, x->nb, &r, hello, tn, want);
    if (CRYPTO_memcmp(want, hello + tn, 32)) return "a HELLO without the pair's session key (a stranger, or another session)";
    hello[tn] = 0;
    /* authenticated from here on: A's words, under the key of this session */
    char want_pair[256], mode[32] = "", cipher[16] = "", nahex[65] = "";
    snprintf(want_pair, sizeof want_pair, "%s ", S.pair);
    if (strncmp(hello, want_pair, strlen(want_pair))) return "HELLO from another pair";
    int oat = 0;
    if (sscanf(hello + strlen(want_pair), "%" SCNx64 " %31s %15s %64s", &x->sid, mode, cipher, nahex) != 4 ||
        (strcmp(mode, "copy") && strcmp(mode, "resync") &&
         !(sscanf(mode, "hashsync-%16" SCNx64 "%n", &x->origin, &oat) == 1 && oat == 25 && mode[oat] == 0 && x->origin)) ||
        strlen(nahex) != 64)
        return "a HELLO this replica does not understand";
    for (int i = 0; i < 32; i++) {
        unsigned v;
        if (sscanf(nahex + 2 * i, "%2x", &v) != 1) return "a HELLO this replica does not understand";
        x->na[i] = (unsigned char)v;
    }
    if (strcmp(cipher, plain ? "plain" : "aes-256-gcm")) return "the primary's record cipher differs from this replica's";
    x->resync = !strcmp(mode, "resync") ? 1 : x->origin ? 2 : 0; /* 2: hashsync */
    x->hsize = le64toh(r.offset), x->hgen = le64toh(r.epoch);
    unsigned char kab[32], kba[32];
    conn_key(x->key, "a2b", x->nb, x->na, kab);
    conn_key(x->key, "b2a", x->nb, x->na, kba);
    if (chan_init(&x->rx, kab, 0, plain) || chan_init(&x->tx, kba, 1, plain)) return "cannot set up the stream's cipher";
    return NULL;
}

static int answer(struct hs *x, uint64_t verdict) {
    struct rec a = {htole32(REC_MAGIC), htole32(R_HELLO), 0, htole64(verdict), htole64(32)};
    unsigned char mac[32];
    answer_mac(x->key, x->nb, x->na, verdict, mac);
    return write_full(x->fd, &a, sizeof a) || write_full(x->fd, mac, sizeof mac);
}

/* the stream of an authenticated primary (this thread holds S.stream_fd) */
static const char *receive(struct hs *x) {
    int fd = x->fd;
    struct rec r;
    const char *refused = NULL;
    uint64_t verdict = 0;
    pthread_mutex_lock(&S.mu);
    if (x->hsize != S.size) refused = "the primary's disk size differs from this replica's", verdict = 3;
    else if (x->hgen != S.generation) refused = "HELLO of another generation than this replica's (its agent's, the arbiter's)", verdict = 2;
    else if (x->resync == 1 && !meta_matches(x->sid))
        refused = "a resync, but this replica does not hold that primary's disk (it needs a full copy)", verdict = 1;
    else if (x->resync == 2 && !meta_matches_primary(x->origin))
        refused = "a hashsync, but this image was not the disk of the primary that replica was promoted from "
                  "(it needs a full copy)", verdict = 1;
    pthread_mutex_unlock(&S.mu);
    if (!refused && !x->resync && meta_clear())
        refused = "cannot remove the replica's identity file before a full copy", verdict = 3;
    if (refused) logmsg("stream from the primary refused: %s", refused); /* (before the primary hears it) */
    if (answer(x, verdict)) return "the primary closed the stream";
    if (refused) return refused;
    pthread_mutex_lock(&S.mu);
    uint64_t gen = S.generation;
    S.hello_sid = x->sid;
    S.meta_written = 0;
    drop_uncommitted();
    S.consistent = 0; /* the replica is being overwritten, until a commit after the copy */
    S.copied = 0;
    int syncing = 1;
    pthread_mutex_unlock(&S.mu);
    logmsg("stream from the primary (generation %" PRIu64 ", %s): %s", gen, S.plain ? "plain records" : "AES-256-GCM",
           x->resync == 2 ? "hashsync (this image's block hashes, then the blocks that differ)"
           : x->resync    ? "resync of the blocks written since" : "initial sync");
    unsigned char *buf = malloc(MAX_REQ + TAG), *obuf = malloc(MAX_REQ + sizeof r + TAG);
    struct rd in = {fd, malloc(RD_BUF), 0, 0, RD_BUF};
    const char *why = buf && obuf && in.buf ? NULL : "out of memory for the stream's buffers";
    if (!why && x->resync == 2) { /* the hashes of this image's blocks, for the primary to compare */
        EVP_MD_CTX *md = EVP_MD_CTX_new();
        if (!md) why = "out of memory for the block hashes";
        for (uint64_t off = 0; !why && off < S.size; off += SYNC_CHUNK) {
            uint64_t n = S.size - off < SYNC_CHUNK ? S.size - off : SYNC_CHUNK;
            if (pread_full(S.img, buf, n, off)) { why = "reading the replica to hash it failed"; break; }
            hash_blocks(md, (const char *)buf, n, buf + SYNC_CHUNK); /* (buf holds MAX_REQ: room for both) */
            uint64_t hl = (n + BS - 1) / BS * HASH_LEN;
            struct rec hr = {htole32(REC_MAGIC), htole32(R_HASHES), 0, htole64(off / BS), htole64(hl)};
            if (send_sealed(fd, &x->tx, &hr, buf + SYNC_CHUNK, hl, obuf, 0)) why = "the primary closed the stream";
        }
        if (md) EVP_MD_CTX_free(md);
    }
    while (!why) {
        if (rd_read(&in, &r, sizeof r)) { why = "the primary closed the stream"; break; }
        uint32_t type = le32toh(r.type);
        uint64_t ep = le64toh(r.epoch), off = le64toh(r.offset), len = le64toh(r.len);
        int has_data = rec_has_data(type);
        if (le32toh(r.magic) != REC_MAGIC || type < R_WRITE || type > R_READ) { why = "a record of unknown type"; break; }
        if ((type == R_WRITE || type == R_ZERO || type == R_TRIM || type == R_SYNC || type == R_READ) &&
            (len == 0 || ((has_data || type == R_READ) && len > MAX_REQ) || off > S.size || len > S.size - off)) {
            why = "a record out of the disk's bounds"; /* (TRIM and ZERO carry no data: any size) */
            break;
        }
        if (has_data && !syncing && len > S.jsize) { why = "a record larger than the journal"; break; }
        int o = open_rec(&in, &x->rx, &r, buf, has_data ? len : 0);
        if (o == -2) { why = "a record that fails its integrity check (altered, replayed or out of order)"; break; }
        if (o) { why = "the primary closed the stream"; break; }
        if (syncing) {
            if (type == R_BARRIER) { why = "a BARRIER during the initial sync"; break; }
            if (type == R_READ) { why = "a READ during the initial sync"; break; }
            if (type == R_SYNC_DONE) {
                if (ep == 0) { why = "SYNC_DONE for epoch 0"; break; }
                if (fdatasync(S.img)) logmsg("fdatasync of the replica: %s", strerror(errno));
                pthread_mutex_lock(&S.mu);
                S.open_epoch = ep, S.closed_epoch = S.committed = ep - 1;
                S.copied = 1;
                S.sync_epoch = ep;
                syncing = 0;
                pthread_cond_broadcast(&S.cv);
                pthread_mutex_unlock(&S.mu);
                logmsg("initial copy received: consistent from the commit of epoch %" PRIu64, ep);
                continue;
            }
            apply_now(type, off, len, (const char *)buf);
            continue;
        }
        if (type == R_SYNC || type == R_SYNC_DONE) { why = "a sync record after the sync"; break; }
        if (type == R_READ) { /* the primary runs on this replica's storage: every record before is in */
            int e = read_view(off, len, (char *)buf);
            struct rec a = {htole32(REC_MAGIC), htole32(R_READ_REPLY), htole64(ep), htole64(e ? (uint64_t)-e : 0),
                            htole64(e ? 0 : len)};
            if (send_sealed(fd, &x->tx, &a, buf, e ? 0 : len, obuf, 0)) { why = "answering a read failed"; break; }
            continue;
        }
        pthread_mutex_lock(&S.mu);
        if (ep != S.open_epoch) {
            pthread_mutex_unlock(&S.mu);
            why = "a record of an epoch that is not the open one";
            break;
        }
        if (type == R_BARRIER) {
            S.closed_epoch = ep;
            S.open_epoch = ep + 1;
            pthread_cond_broadcast(&S.cv);
            pthread_mutex_unlock(&S.mu);
            continue;
        }
        /* bounded: at most max_pending records wait for a commit (like the journal's bytes) */
        while (S.nents - S.first >= S.max_pending && S.streaming && !S.preempt) {
            if (S.closed_epoch == S.committed) break; /* all of them in the open epoch: no commit frees any */
            pthread_cond_wait(&S.cv, &S.mu);
        }
        if (S.nents - S.first >= S.max_pending) {
            pthread_mutex_unlock(&S.mu);
            why = S.streaming && !S.preempt ? "an epoch of more records than the journal's index holds (max_pending)" : "stopped";
            break;
        }
        uint64_t pos = 0;
        if (has_data && jreserve(len, &pos)) { pthread_mutex_unlock(&S.mu); why = "stopped"; break; }
        pthread_mutex_unlock(&S.mu);
        if (has_data && pwrite_full(S.jfd, buf, len, pos % S.jsize)) { why = "writing the journal failed"; break; }
        pthread_mutex_lock(&S.mu);
        if (!has_data) pos = S.jtail; /* where the journal's head goes once it is applied */
        add_entry(type, ep, off, len, pos);
        pthread_mutex_unlock(&S.mu);
    }
    free(buf);
    free(obuf);
    free(in.buf);
    return why;
}

/* one connection to the replica's stream port: its handshake under a deadline, then (if it
   proves the session key) it takes over from the stream before it */
static void *conn_stream_thread(void *arg) {
    struct hs *x = arg;
    struct timeval tv = {HS_MS / 1000, (HS_MS % 1000) * 1000}, none = {0, 0};
    setsockopt(x->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    const char *why = handshake(x);
    pthread_mutex_lock(&S.mu);
    S.hs_threads--;
    if (S.hs_slot[x->slot].seq == x->seq) S.hs_slot[x->slot].seq = 0; /* (its fd is ours to close) */
    else if (!why) why = "evicted by newer connections before it proved the key";
    if (why) {
        uint64_t k = ++S.hs_refused;
        pthread_mutex_unlock(&S.mu);
        if (k <= 10 || k % 1000 == 0)
            logmsg("a connection to the stream port refused (%" PRIu64 " so far): %s", k, why);
        goto out;
    }
    uint64_t me = ++S.takeover;
    while (S.streaming && S.takeover == me) { /* the stream before: ended (its primary is back) */
        S.preempt = 1;
        if (S.stream_fd >= 0) shutdown(S.stream_fd, SHUT_RDWR);
        pthread_cond_broadcast(&S.cv);
        pthread_cond_wait(&S.cv, &S.mu);
    }
    if (S.takeover != me || S.role != REPLICA) { pthread_mutex_unlock(&S.mu); goto out; }
    S.preempt = 0;
    S.stream_fd = x->fd;
    S.streaming = 1;
    pthread_mutex_unlock(&S.mu);
    setsockopt(x->fd, SOL_SOCKET, SO_SNDTIMEO, &none, sizeof none);
    int one = 1; /* read answers are a header then data: no Nagle wait between them */
    setsockopt(x->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    why = receive(x);
    pthread_mutex_lock(&S.mu);
    S.streaming = 0;
    S.stream_fd = -1;
    pthread_cond_broadcast(&S.cv);
    pthread_mutex_unlock(&S.mu);
    logmsg("stream from the primary ended: %s", why);
out:
    close(x->fd);
    chan_free(&x->rx);
    chan_free(&x->tx);
    OPENSSL_cleanse(x, sizeof *x);
    free(x);
    return NULL;
}

void *stream_thread(void *arg) {
    (void)arg;
    for (;;) {
        int fd = accept4(S.listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            close(S.listen_fd); /* promoted: no more streams to take */
            return NULL;
        }
        /* at most HS_MAX handshakes at once: a new connection evicts the oldest (a stranger's
           idle connections cannot keep the primary's out: they would have to outnumber
           HS_MAX within its handshake's round trip); evicted threads end at once */
        struct hs *x = calloc(1, sizeof *x);
        pthread_mutex_lock(&S.mu);
        int slot = -1;
        if (x && S.role == REPLICA && S.hs_threads < 4 * HS_MAX) {
            for (int i = 0; i < HS_MAX && slot < 0; i++) if (!S.hs_slot[i].seq) slot = i;
            if (slot < 0) {
                slot = 0;
                for (int i = 1; i < HS_MAX; i++) if (S.hs_slot[i].seq < S.hs_slot[slot].seq) slot = i;
                shutdown(S.hs_slot[slot].fd, SHUT_RDWR);
                S.hs_evicted++;
            }
            S.hs_slot[slot].fd = fd, S.hs_slot[slot].seq = ++S.hs_seq;
            x->fd = fd, x->slot = slot, x->seq = S.hs_seq;
            S.hs_threads++;
        } else if (S.role == REPLICA) {
            S.hs_refused++;
        }
        pthread_mutex_unlock(&S.mu);
        pthread_t t;
        if (slot < 0) { close(fd); free(x); continue; }
        if (pthread_create(&t, NULL, conn_stream_thread, x)) {
            pthread_mutex_lock(&S.mu);
            S.hs_threads--;
            if (S.hs_slot[slot].seq == x->seq) S.hs_slot[slot].seq = 0;
            pthread_mutex_unlock(&S.mu);
            close(fd);
            free(x);
            continue;
        }
        pthread_detach(t);
    }
}

/* a journaled record's data onto the replica by the kernel (copy_file_range: no copy through
   this process); 0, or -1: not done (the caller copies it itself) */
static int copy_range(uint64_t from, uint64_t to, uint64_t len) {
    static int unsupported;
    if (__atomic_load_n(&unsupported, __ATOMIC_RELAXED)) return -1;
    loff_t a = (loff_t)from, b = (loff_t)to;
    while (len) {
        ssize_t r = copy_file_range(S.jfd, &a, S.img, &b, len, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            if (r < 0 && (errno == EXDEV || errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL))
                __atomic_store_n(&unsupported, 1, __ATOMIC_RELAXED);
            return -1; /* (what it copied is copied again: the same bytes) */
        }
        len -= (uint64_t)r;
    }
    return 0;
}

void cmd_commit(uint64_t n, int timeout_ms, char *out, size_t outlen) {
    double t0 = now_ms();
    pthread_mutex_lock(&S.mu);
    if (S.role != REPLICA) { pthread_mutex_unlock(&S.mu); snprintf(out, outlen, "err not a replica"); return; }
    if (n <= S.committed && S.consistent) { pthread_mutex_unlock(&S.mu); snprintf(out, outlen, "ok %" PRIu64, S.committed); return; }
    if (S.copied && n < S.sync_epoch) {
        pthread_mutex_unlock(&S.mu);
        snprintf(out, outlen, "err epoch %" PRIu64 " is older than the disk's copy (epochs from %" PRIu64 ")",
                 n, S.sync_epoch);
        return;
    }
    while (S.closed_epoch < n || !S.copied) {
        if (!S.streaming) {
            pthread_mutex_unlock(&S.mu);
            snprintf(out, outlen, "err epoch %" PRIu64 " not closed on the disk stream (%s; committed %" PRIu64 ")",
                     n, S.copied ? "no stream" : "disk copy not finished", S.committed);
            return;
        }
        struct timespec dl;
        clock_gettime(CLOCK_REALTIME, &dl);
        dl.tv_nsec += 20 * 1000000L;
        if (dl.tv_nsec >= 1000000000L) dl.tv_sec++, dl.tv_nsec -= 1000000000L;
        pthread_cond_timedwait(&S.cv, &S.mu, &dl);
        if (now_ms() - t0 > timeout_ms) {
            pthread_mutex_unlock(&S.mu);
            snprintf(out, outlen, "err epoch %" PRIu64 " not closed on the disk stream in %d ms", n, timeout_ms);
            return;
        }
    }
    size_t a = S.first, b = a;
    while (b < S.nents && S.ents[b].epoch <= n) b++;
    size_t cnt = b - a;
    struct entry *todo = malloc((cnt ? cnt : 1) * sizeof *todo);
    if (cnt) memcpy(todo, S.ents + a, cnt * sizeof *todo);
    uint64_t head = b < S.nents ? S.ents[b].pos : S.jtail, drops = S.drops;
    pthread_mutex_unlock(&S.mu);
    char *buf = NULL;
    size_t bufcap = 0;
    int err = 0;
    for (size_t i = 0; i < cnt && !err; i++) { /* the receiver only appends: no lock needed */
        struct entry *e = &todo[i];
        if (e->type == R_WRITE) {
            if (copy_range(e->pos % S.jsize, e->offset, e->len) == 0) continue; /* in the kernel, one copy */
            if (bufcap < e->len) { free(buf); bufcap = e->len; buf = malloc(bufcap); }
            err = pread_full(S.jfd, buf, e->len, e->pos % S.jsize);
            if (!err) err = pwrite_full(S.img, buf, e->len, e->offset);
        } else {
            err = zero_range(S.img, e->offset, e->len, e->type == R_TRIM);
        }
    }
    free(buf);
    free(todo);
    if (!err && fdatasync(S.img)) err = -errno;
    pthread_mutex_lock(&S.mu);
    if (err) {
        pthread_mutex_unlock(&S.mu);
        snprintf(out, outlen, "err applying epoch %" PRIu64 " to the replica: %s", n, strerror(-err));
        return;
    }
    if (S.drops == drops) { /* a promotion or a new stream may have dropped them meanwhile */
        S.first += cnt; /* (the receiver may have compacted the index: count, not position) */
        S.jhead = head;
        S.applied_records += cnt;
    }
    S.committed = n;
    S.consistent = 1; /* every epoch <= n is applied, and n is after the copy */
    if (!S.meta_written && S.streaming && S.copied && n >= S.sync_epoch) meta_write();
    S.commits++;
    pthread_cond_broadcast(&S.cv);
    pthread_mutex_unlock(&S.mu);
    snprintf(out, outlen, "ok %" PRIu64, n);
}

void cmd_promote(char *out, size_t outlen) {
    pthread_mutex_lock(&S.mu);
    if (S.role == PRIMARY) { pthread_mutex_unlock(&S.mu); snprintf(out, outlen, "err already a primary"); return; }
    if (!S.consistent) {
        pthread_mutex_unlock(&S.mu);
        snprintf(out, outlen, "err the replica holds no committed checkpoint (its disk copy is not finished or not committed yet)");
        return;
    }
    uint64_t dropped = S.nents - S.first;
    meta_clear(); /* this disk goes its own way now: no primary's resync fits it any more */
    S.meta_written = 1;
    uint64_t origin = S.hello_sid; /* the disk of that primary as of a commit: its old image may hashsync */
    S.role = PRIMARY;
    drop_uncommitted();
    if (S.stream_fd >= 0) shutdown(S.stream_fd, SHUT_RDWR);
    if (S.listen_fd >= 0) shutdown(S.listen_fd, SHUT_RDWR); /* the port is free for a new replica */
    uint64_t c = S.committed;
    pthread_mutex_unlock(&S.mu);
    pthread_mutex_lock(&S.stream_mu);
    S.cur_epoch = c + 1;
    S.origin = origin;
    pthread_mutex_unlock(&S.stream_mu);
    if (S.snap_dir) { /* tests: the replica as promoted, before the guest writes it */
        char path[4096];
        snprintf(path, sizeof path, "%s/promoted-%" PRIu64 ".img", S.snap_dir, c);
        copy_image(path);
    }
    logmsg("promoted at epoch %" PRIu64 ": %" PRIu64 " uncommitted records dropped", c, dropped);
    snprintf(out, outlen, "ok %" PRIu64 " %" PRIu64, c, dropped);
}
