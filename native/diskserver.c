/* mirror's disk server: a guest disk served over NBD, replicated per epoch (Remus).
 *
 * One process per host and guest disk (started by mirror.guests.disk):
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
 * BARRIER record closes epoch N.  Changes and the barrier are serialised by one
 * mutex, so the stream's order is the local image's order.
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
 * lacks (see cmd_replicate); a promoted replica re-protected by its old primary's image
 * sends the blocks whose hashes differ (hashsync, see hash_thread).
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
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "diskserver.h"

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
#define MAX_REQ (32u << 20)

/* stream records: 32-byte header (little endian), then len bytes for WRITE/SYNC */
enum { R_HELLO = 1, R_WRITE, R_ZERO, R_TRIM, R_BARRIER, R_SYNC, R_SYNC_DONE,
       R_READ,        /* A -> B: read B's view (epoch: the request's id); no data */
       R_READ_REPLY,  /* B -> A: epoch: the id, offset: 0 or an errno, len bytes of data if 0 */
       R_HASHES };    /* B -> A after a hashsync's answer: offset: the first block, len bytes of HASH_LEN each */
#define HASH_LEN 16   /* per 4 KiB block: the first 16 bytes of its SHA-256 */
#define REC_MAGIC 0x4d524431U /* "MRD1" */
struct rec {
    uint32_t magic, type;
    uint64_t epoch, offset, len;
};
#define SYNC_CHUNK (1u << 20)
#define TAG 16          /* AES-256-GCM tag after every record */
#define HS_MAX 16       /* handshakes in progress at once on a replica */
#define HS_MS 3000      /* a handshake's deadline */

struct chan { /* one direction of an authenticated stream */
    EVP_CIPHER_CTX *ctx; /* NULL: plain records (tests and benches only) */
    uint64_t ctr;        /* the next record's nonce */
    int enc;
};

enum role { PRIMARY, REPLICA };
enum storage { LOCAL, REMOTE, SUSPENDED }; /* where the primary's disk I/O goes */
#define BS 4096u                           /* one bit of a dirty bitmap */

struct rreq { /* a read sent to B, waiting for its reply */
    uint64_t id, gen;
    uint32_t len;
    char *buf;
    int done, err;
    struct rreq *next;
};

struct entry { /* one journaled record on the replica */
    uint64_t epoch, offset, len, pos; /* pos: where its data starts in the ring (monotonic) */
    uint32_t type;
};

static struct {
    enum role role;
    int img;
    uint64_t size;
    const char *nbd_path, *ctl_path, *pair;
    uint64_t generation;
    int workers, stall_ms;
    /* primary */
    pthread_mutex_t stream_mu;
    int peer;            /* stream socket to B, -1: none */
    uint64_t cur_epoch;  /* the open epoch (records carry it) */
    int synced;          /* B has the whole image and every change since */
    uint64_t sync_done_bytes, sync_total;
    char lost[256];      /* why the stream to B ended, if it did */
    uint64_t writes, write_bytes, barriers;
    const char *snap_dir; /* tests: a copy of the image at each barrier */
    int snap_keep;
    /* replica */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int listen_fd, stream_fd;
    int jfd;
    uint64_t jsize, jhead, jtail; /* ring, monotonic byte counters */
    struct entry *ents;
    size_t nents, cap, first; /* live entries are ents[first..nents) */
    uint64_t open_epoch, closed_epoch, committed;
    int consistent, streaming; /* consistent: the replica is the disk at `committed` */
    int copied;                /* the current stream's initial copy is complete */
    uint64_t sync_epoch;       /* the first epoch after it */
    uint64_t applied_records, dropped_records, commits, drops;
    /* component-level storage failover (primary): stream_mu guards these */
    enum storage storage;
    char storage_err[256], peer_host[300];
    uint64_t *dirty_local; /* blocks the local image lacks (written while remote) */
    uint64_t *unflushed;   /* blocks written locally since the last good fdatasync */
    uint64_t *flushing;    /* ... being flushed now */
    size_t bm_words;
    uint64_t failovers, switchbacks, resynced_local, storage_seq, remote_reads;
    double failed_at_ms;
    int probe_ms, probing;
    int hang_ms;              /* a call on the local image longer than this: it hangs */
    int draining;             /* the switch back's last pass: the guest's writes wait */
    pthread_cond_t io_cv;     /* (stream_mu) suspended I/O waits here */
    pthread_mutex_t flush_mu; /* one local flush at a time */
    /* remote reads over the stream: rmu guards these */
    pthread_mutex_t rmu;
    pthread_cond_t rcv;
    struct rreq *rq;
    uint64_t next_id, conn_gen, dead_gen;
    /* resync of a returning replica (primary; stream_mu): what B may lack */
    uint64_t sid;          /* this server's life: a replica's disk is known only to it */
    int known;             /* B's disk is this disk as of a commit, less the blocks below */
    uint64_t *dirty_peer;  /* blocks written while no stream, or in epochs B never committed */
    uint64_t *resync_set;  /* the blocks of the resync in progress (back to dirty_peer if it fails) */
    int copy_pending, copy_resync; /* a copy (full or resync) sent, not yet committed by B */
    uint64_t copy_epoch, resync_blocks;
    /* a promoted replica re-protected by its old primary (hashsync): origin is the sid of the
       primary whose committed copy this disk was; hashing: the connection (conn_gen) whose
       hashes are being compared; hash_differ: the blocks that differed */
    uint64_t origin, hashing, hash_differ;
    int primary_meta; /* this primary's identity file written ("PAIR GEN SID primary") */
    struct wl { uint64_t epoch, off, len; } *wlog; /* streamed changes of uncommitted epochs */
    size_t wl_head, wl_n, wl_cap;
    /* replica: the file saying whose disk this replica is (pair, generation, sid) */
    const char *meta_path;
    int meta_written;
    uint64_t hello_sid;
    /* the pair's session (control `session`): stream_mu and mu both held to change */
    unsigned char key[32];
    int have_key, plain;      /* plain: --test-plain-stream, records without AEAD */
    struct chan tx;           /* primary: records to B (stream_mu) */
    unsigned char *txbuf;     /* primary: a sealed record (stream_mu) */
    size_t txcap;
    int hs_threads;           /* replica: handshake threads alive (mu) */
    struct { int fd; uint64_t seq; } hs_slot[HS_MAX]; /* handshakes in progress (mu; seq 0: free) */
    uint64_t hs_seq, hs_evicted;
    uint64_t takeover, preempt, hs_refused, max_pending; /* (mu) */
} S;

static void logmsg(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "diskserver: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static int read_full(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r, n -= (size_t)r;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t n) {
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

static int pread_full(int fd, void *buf, size_t n, uint64_t off) {
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

static int pwrite_full(int fd, const void *buf, size_t n, uint64_t off) {
    const char *p = buf;
    while (n) {
        ssize_t r = pwrite(fd, p, n, (off_t)off);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -errno;
        p += r, n -= (size_t)r, off += (uint64_t)r;
    }
    return 0;
}

static int zero_range(int fd, uint64_t off, uint64_t len, int punch) {
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

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

/* ---- the stream's keys: handshake MACs, record AEAD ------------------------------ */

static void hmac256(const unsigned char *key, const void *msg, size_t n, unsigned char out[32]) {
    unsigned int l = 32;
    HMAC(EVP_sha256(), key, 32, msg, n, out, &l);
}

/* a per-connection key: HMAC(session key, label || B's nonce || A's nonce) */
static void conn_key(const unsigned char *key, const char *label, const unsigned char *nb, const unsigned char *na,
                     unsigned char out[32]) {
    unsigned char m[80];
    memset(m, 0, 16);
    memcpy(m, label, strlen(label) < 16 ? strlen(label) : 16);
    memcpy(m + 16, nb, 32);
    memcpy(m + 48, na, 32);
    hmac256(key, m, sizeof m, out);
}

static void chan_free(struct chan *c) {
    if (c->ctx) EVP_CIPHER_CTX_free(c->ctx);
    c->ctx = NULL;
    c->ctr = 0;
}

static int chan_init(struct chan *c, const unsigned char key[32], int enc, int plain) {
    chan_free(c);
    c->enc = enc;
    if (plain) return 0;
    c->ctx = EVP_CIPHER_CTX_new();
    if (!c->ctx) return -1;
    if (enc ? !EVP_EncryptInit_ex(c->ctx, EVP_aes_256_gcm(), NULL, key, NULL)
            : !EVP_DecryptInit_ex(c->ctx, EVP_aes_256_gcm(), NULL, key, NULL)) { chan_free(c); return -1; }
    return 0;
}

static void chan_iv(struct chan *c, unsigned char iv[12]) {
    uint64_t n = htole64(c->ctr++);
    memset(iv, 0, 4);
    memcpy(iv + 4, &n, 8);
}

/* header (associated data) and n bytes of data into out: header, ciphertext, tag; its length */
static size_t seal(struct chan *c, const struct rec *h, const void *data, size_t n, unsigned char *out) {
    memcpy(out, h, sizeof *h);
    if (!c->ctx) { if (n) memcpy(out + sizeof *h, data, n); return sizeof *h + n; }
    unsigned char iv[12];
    int l;
    chan_iv(c, iv);
    EVP_EncryptInit_ex(c->ctx, NULL, NULL, NULL, iv);
    EVP_EncryptUpdate(c->ctx, NULL, &l, (const unsigned char *)h, sizeof *h);
    if (n) EVP_EncryptUpdate(c->ctx, out + sizeof *h, &l, data, (int)n);
    EVP_EncryptFinal_ex(c->ctx, out + sizeof *h + n, &l);
    EVP_CIPHER_CTX_ctrl(c->ctx, EVP_CTRL_GCM_GET_TAG, TAG, out + sizeof *h + n);
    return sizeof *h + n + TAG;
}

/* one sealed record to fd (buf: room for the record; the caller's own) */
static int send_sealed(int fd, struct chan *c, const struct rec *h, const void *data, size_t n, unsigned char *buf) {
    return write_full(fd, buf, seal(c, h, data, n, buf));
}

/* after the header h: n bytes of data (to buf, decrypted in place) and the tag; 0 if they
   are intact and in order, -1 if the connection ended, -2 if they fail the check */
static int open_rec(int fd, struct chan *c, const struct rec *h, unsigned char *buf, size_t n) {
    unsigned char tag[TAG], iv[12];
    if ((n && read_full(fd, buf, n)) || (c->ctx && read_full(fd, tag, TAG))) return -1;
    if (!c->ctx) return 0;
    int l;
    chan_iv(c, iv);
    EVP_DecryptInit_ex(c->ctx, NULL, NULL, NULL, iv);
    EVP_DecryptUpdate(c->ctx, NULL, &l, (const unsigned char *)h, sizeof *h);
    if (n) EVP_DecryptUpdate(c->ctx, buf, &l, buf, (int)n);
    EVP_CIPHER_CTX_ctrl(c->ctx, EVP_CTRL_GCM_SET_TAG, TAG, tag);
    return EVP_DecryptFinal_ex(c->ctx, buf + n, &l) > 0 ? 0 : -2;
}

/* read n bytes before an absolute deadline (now_ms) */
static int read_until(int fd, void *buf, size_t n, double deadline) {
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

/* the HELLO's MAC: over B's challenge, the header and the text */
static void hello_mac(const unsigned char *key, const unsigned char *nb, const struct rec *h, const char *text,
                      size_t n, unsigned char out[32]) {
    unsigned char full[32 + 32 + sizeof *h + 256];
    memset(full, 0, 32);
    memcpy(full, "mirror-disk-hello", 17);
    memcpy(full + 32, nb, 32);
    memcpy(full + 64, h, sizeof *h);
    memcpy(full + 64 + sizeof *h, text, n);
    hmac256(key, full, 64 + sizeof *h + n, out);
}

/* B's answer's MAC: over both nonces and the verdict */
static void answer_mac(const unsigned char *key, const unsigned char *nb, const unsigned char *na, uint64_t verdict,
                       unsigned char out[32]) {
    unsigned char m[32 + 64 + 8];
    memset(m, 0, 32);
    memcpy(m, "mirror-disk-answer", 18);
    memcpy(m + 32, nb, 32);
    memcpy(m + 64, na, 32);
    uint64_t v = htole64(verdict);
    memcpy(m + 96, &v, 8);
    hmac256(key, m, sizeof m, out);
}

/* for the agents (cffi): the session key both ends of a pair derive on their own, from
   X25519 of this host's secret and the peer's public key (both NULL: insecure mode, no
   secret) and ctx (pair, generation, interconnect session): HMAC-SHA256(shared, ctx) */
int mirror_disk_session_key(const unsigned char *secret, const unsigned char *peer, const unsigned char *ctx,
                            size_t n, unsigned char *out) {
    unsigned char shared[32] = {0};
    if (secret && peer) {
        size_t sl = sizeof shared;
        EVP_PKEY *sk = EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, NULL, secret, 32);
        EVP_PKEY *pk = EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, NULL, peer, 32);
        EVP_PKEY_CTX *pc = sk ? EVP_PKEY_CTX_new(sk, NULL) : NULL;
        int ok = pc && pk && EVP_PKEY_derive_init(pc) > 0 && EVP_PKEY_derive_set_peer(pc, pk) > 0 &&
                 EVP_PKEY_derive(pc, shared, &sl) > 0 && sl == 32;
        EVP_PKEY_CTX_free(pc);
        EVP_PKEY_free(pk);
        EVP_PKEY_free(sk);
        if (!ok) return -1;
    }
    unsigned int l = 32;
    if (!HMAC(EVP_sha256(), shared, 32, ctx, n, out, &l)) return -1;
    OPENSSL_cleanse(shared, sizeof shared);
    return 0;
}

/* ---- the local image, with a deadline ----------------------------------------------- *
 *
 * A local image can hang instead of failing (an NFS server gone, a dying disk): a call
 * that never returns would hold stream_mu, so the barrier, so the checkpoint and the
 * guest.  The primary's calls on its image are therefore made by I/O threads, each on a
 * buffer of its own, and the caller waits at most --hang-ms.  Past that, a call of the
 * guest's (LIO_FAILOVER) is abandoned and returns -ETIMEDOUT when the disk can run on
 * B's replica (the caller then fails over as for an error); without a replica holding
 * the whole disk it waits on (a slow disk is no error).  An abandoned call keeps its
 * thread until it returns (maybe never; the thread holds no lock) and is counted in
 * L.stuck: the switch back waits until none is left, so that no late write lands on
 * blocks copied back.  A call abandoned before a thread took it never runs.
 * A read or write the kernel can do without blocking (RWF_NOWAIT: in the page cache) is
 * made by the caller itself, with no hand-off; only the rest goes to an I/O thread
 * (a file system without RWF_NOWAIT, as FUSE or NFS, always). */

enum { LIO_READ, LIO_WRITE, LIO_ZERO, LIO_TRIM, LIO_SYNC };
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

enum { LIO_DEADLINE, LIO_FAILOVER };

/* op on the local image (buf: len bytes in or out for reads and writes); 0, -errno, or
   -ETIMEDOUT past --hang-ms (mode above; locked: the caller holds stream_mu) */
static int lio_run(int op, char *buf, uint64_t len, uint64_t off, int mode, int locked) {
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

/* ---- primary: the stream to B ------------------------------------------------- */

/* a switch of the disk's path (stream_mu held); readers check storage_seq around a local read */
static void set_storage(enum storage st) {
    __atomic_store_n(&S.storage, st, __ATOMIC_RELEASE);
    __atomic_add_fetch(&S.storage_seq, 1, __ATOMIC_RELEASE);
}

static void wlog_fold(void);
static void bm_or(uint64_t *dst, const uint64_t *src);

static void peer_lost(const char *why) { /* stream_mu held */
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
static void stream_send(uint32_t type, uint64_t epoch, uint64_t off, uint64_t len, const void *data) {
    if (S.peer < 0) return;
    struct rec r = {htole32(REC_MAGIC), htole32(type), htole64(epoch), htole64(off), htole64(len)};
    size_t n = data ? len : 0;
    if (S.txcap < sizeof r + n + TAG) {
        free(S.txbuf);
        S.txcap = sizeof r + (n > SYNC_CHUNK ? n : SYNC_CHUNK) + TAG;
        S.txbuf = malloc(S.txcap);
        if (!S.txbuf) { S.txcap = 0; peer_lost("out of memory for a record"); return; }
    }
    if (send_sealed(S.peer, &S.tx, &r, data, n, S.txbuf))
        peer_lost(errno == EAGAIN || errno == EWOULDBLOCK
                      ? "the replica stopped reading (its journal is full with one epoch)"
                      : strerror(errno));
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

static void bm_set(uint64_t *bm, uint64_t off, uint64_t len) {
    if (!len) return;
    for (uint64_t b = off / BS, e = (off + len - 1) / BS; b <= e; b++) bm[b >> 6] |= 1ull << (b & 63);
}

static uint64_t bm_count(const uint64_t *bm) {
    uint64_t n = 0;
    for (size_t i = 0; i < S.bm_words; i++) n += (uint64_t)__builtin_popcountll(bm[i]);
    return n;
}

static void bm_or(uint64_t *dst, const uint64_t *src) {
    for (size_t i = 0; i < S.bm_words; i++) dst[i] |= src[i];
}

/* every change B may not have committed, into dirty_peer (stream_mu held) */
static void wlog_fold(void) {
    for (size_t i = S.wl_head; i < S.wl_n; i++) bm_set(S.dirty_peer, S.wlog[i].off, S.wlog[i].len);
    S.wl_head = S.wl_n = 0;
}

/* a change streamed to B in `epoch`, until B commits it (stream_mu held) */
static void wlog_add(uint64_t epoch, uint64_t off, uint64_t len) {
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
static void cmd_committed(uint64_t n, char *out, size_t outlen) {
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

struct reader_arg { int fd; uint64_t gen; struct chan rx; };

/* B's answers to READ records on one stream connection; it owns (closes) the socket */
static void *reply_reader(void *arg) {
    struct reader_arg a = *(struct reader_arg *)arg;
    free(arg);
    const char *why = "the replica closed the stream";
    for (;;) {
        struct rec r;
        if (read_full(a.fd, &r, sizeof r)) break;
        uint64_t id = le64toh(r.epoch), err = le64toh(r.offset), len = le64toh(r.len);
        if (le32toh(r.magic) != REC_MAGIC || le32toh(r.type) != R_READ_REPLY) { why = "a bad record from the replica"; break; }
        pthread_mutex_lock(&S.rmu);
        struct rreq *q = S.rq;
        while (q && q->id != id) q = q->next;
        pthread_mutex_unlock(&S.rmu);
        if (!q || (err == 0 && len != q->len) || (err && len)) { why = "a read reply that matches no request"; break; }
        /* q stays linked until done or this connection is dead: its buffer is ours to fill
           (a reply that fails its check is never marked done: the connection ends) */
        int o = open_rec(a.fd, &a.rx, &r, (unsigned char *)q->buf, err ? 0 : len);
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
    return NULL;
}

static void start_reply_reader(int fd, uint64_t gen, struct chan rx) {
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
        pthread_mutex_unlock(&S.stream_mu);
        if (lio_stuck()) continue; /* a hung call may still land: copying back must come after it */
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

/* tests only: a copy of the image into `path` (reads with the deadline: a hung image
   leaves no copy rather than a barrier that never returns) */
static void copy_image(const char *path) {
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

/* the first HASH_LEN bytes of SHA-256 of each 4 KiB block of buf (n bytes) into out */
static void hash_blocks(EVP_MD_CTX *md, const char *buf, uint64_t n, unsigned char *out) {
    unsigned char d[EVP_MAX_MD_SIZE];
    unsigned int l;
    for (uint64_t i = 0; i < n; i += BS, out += HASH_LEN) {
        EVP_DigestInit_ex(md, EVP_sha256(), NULL);
        EVP_DigestUpdate(md, buf + i, n - i < BS ? n - i : BS);
        EVP_DigestFinal_ex(md, d, &l);
        memcpy(out, d, HASH_LEN);
    }
}

static void meta_write_primary(void);

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
    for (uint64_t off = 0; !why && off < S.size; off += SYNC_CHUNK) { /* chunk by chunk, both sides in order */
        uint64_t n = S.size - off < SYNC_CHUNK ? S.size - off : SYNC_CHUNK, k = (n + BS - 1) / BS;
        if (lio_run(LIO_READ, buf, n, off, LIO_DEADLINE, 0)) { why = "reading the local image to hash it failed"; break; }
        hash_blocks(md, buf, n, mine);
        struct rec r;
        if (read_full(a->fd, &r, sizeof r)) { why = "the replica sent no block hashes (closed, or 120 s silent)"; break; }
        if (le32toh(r.magic) != REC_MAGIC || le32toh(r.type) != R_HASHES || le64toh(r.offset) != off / BS ||
            le64toh(r.len) != k * HASH_LEN) { why = "a bad block hash record from the replica"; break; }
        int o = open_rec(a->fd, &a->rx, &r, theirs, k * HASH_LEN);
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
static void cmd_replicate(const char *host, const char *port, uint64_t first, int resync, char *out, size_t outlen) {
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

static void cmd_barrier(uint64_t n, char *out, size_t outlen) {
    pthread_mutex_lock(&S.stream_mu);
    if (S.role != PRIMARY) snprintf(out, outlen, "err not a primary");
    else if (n != S.cur_epoch) snprintf(out, outlen, "err barrier %" PRIu64 " but the open epoch is %" PRIu64, n, S.cur_epoch);
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
    pthread_mutex_unlock(&S.stream_mu);
}

/* ---- replica: receiving, journaling, committing ------------------------------- */

static uint64_t jused(void) { return S.jtail - S.jhead; }

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

static void meta_write_primary(void) {
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
    const char *why = buf && obuf ? NULL : "out of memory for the stream's buffers";
    if (!why && x->resync == 2) { /* the hashes of this image's blocks, for the primary to compare */
        EVP_MD_CTX *md = EVP_MD_CTX_new();
        if (!md) why = "out of memory for the block hashes";
        for (uint64_t off = 0; !why && off < S.size; off += SYNC_CHUNK) {
            uint64_t n = S.size - off < SYNC_CHUNK ? S.size - off : SYNC_CHUNK;
            if (pread_full(S.img, buf, n, off)) { why = "reading the replica to hash it failed"; break; }
            hash_blocks(md, (const char *)buf, n, buf + SYNC_CHUNK); /* (buf holds MAX_REQ: room for both) */
            uint64_t hl = (n + BS - 1) / BS * HASH_LEN;
            struct rec hr = {htole32(REC_MAGIC), htole32(R_HASHES), 0, htole64(off / BS), htole64(hl)};
            if (send_sealed(fd, &x->tx, &hr, buf + SYNC_CHUNK, hl, obuf)) why = "the primary closed the stream";
        }
        if (md) EVP_MD_CTX_free(md);
    }
    while (!why) {
        if (read_full(fd, &r, sizeof r)) { why = "the primary closed the stream"; break; }
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
        int o = open_rec(fd, &x->rx, &r, buf, has_data ? len : 0);
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
            if (send_sealed(fd, &x->tx, &a, buf, e ? 0 : len, obuf)) { why = "answering a read failed"; break; }
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

static void *stream_thread(void *arg) {
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

static void cmd_commit(uint64_t n, int timeout_ms, char *out, size_t outlen) {
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
    memcpy(todo, S.ents + a, cnt * sizeof *todo);
    uint64_t head = b < S.nents ? S.ents[b].pos : S.jtail, drops = S.drops;
    pthread_mutex_unlock(&S.mu);
    char *buf = NULL;
    size_t bufcap = 0;
    int err = 0;
    for (size_t i = 0; i < cnt && !err; i++) { /* the receiver only appends: no lock needed */
        struct entry *e = &todo[i];
        if (e->type == R_WRITE) {
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

static void cmd_promote(char *out, size_t outlen) {
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

/* ---- NBD serving ---------------------------------------------------------------- */

struct conn {
    int fd;
    pthread_mutex_t wmu; /* one reply at a time on the socket */
    int refs;
};

struct job {
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

static void conn_put(struct conn *c) {
    pthread_mutex_lock(&Q.mu);
    int last = --c->refs == 0;
    pthread_mutex_unlock(&Q.mu);
    if (last) { close(c->fd); pthread_mutex_destroy(&c->wmu); free(c); }
}

static void reply(struct conn *c, uint64_t handle, uint32_t err, const void *data, uint32_t len) {
    struct { uint32_t magic, err; uint64_t handle; } __attribute__((packed)) h = {
        htobe32(NBD_SIMPLE_REPLY), htobe32(err), handle};
    pthread_mutex_lock(&c->wmu);
    if (write_full(c->fd, &h, sizeof h) == 0 && data && len) write_full(c->fd, data, len);
    pthread_mutex_unlock(&c->wmu);
}

static uint32_t nbd_errno(int e) {
    switch (e) {
    case EPERM: case EIO: case ENOMEM: case EINVAL: case ENOSPC: return (uint32_t)e;
    default: return EIO;
    }
}

/* one change of the image: local, then the stream, under one lock (stream order = image order) */
static int change(uint32_t type, uint64_t off, uint32_t len, const char *data, int fua) {
    pthread_mutex_lock(&S.stream_mu);
    while (S.draining) pthread_cond_wait(&S.io_cv, &S.stream_mu);
    if (S.role != PRIMARY) { pthread_mutex_unlock(&S.stream_mu); return EPERM; }
    int e = 0;
    if (S.storage == LOCAL) {
        e = lio_run(type == R_WRITE ? LIO_WRITE : type == R_TRIM ? LIO_TRIM : LIO_ZERO, (char *)data, len, off,
                    LIO_FAILOVER, 1);
        if (e && failover(e, type == R_WRITE ? "write" : "zero")) e = 0;
    }
    if (!e) {
        if (S.storage != LOCAL) wait_for_peer(); /* B alone holds the disk: on to B, or wait */
        bm_set(S.storage == LOCAL ? S.unflushed : S.dirty_local, off, len);
        stream_send(type, S.cur_epoch, off, len, type == R_WRITE ? data : NULL);
        if (S.peer >= 0) wlog_add(S.cur_epoch, off, len);
        else bm_set(S.dirty_peer, off, len); /* no stream: a returning replica needs it */
        if (S.storage != LOCAL) wait_for_peer(); /* not known to be on B: never answered */
        S.writes++, S.write_bytes += len;
    }
    pthread_mutex_unlock(&S.stream_mu);
    if (!e && fua) e = flush_local();
    return e ? (int)nbd_errno(-e) : 0;
}

static void *worker(void *arg) {
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
            int e = -EAGAIN;
            while (e == -EAGAIN) {
                uint64_t seq = __atomic_load_n(&S.storage_seq, __ATOMIC_ACQUIRE);
                if (__atomic_load_n(&S.storage, __ATOMIC_ACQUIRE) != LOCAL) {
                    e = remote_read(j->offset, j->len, rbuf);
                    break;
                }
                e = lio_run(LIO_READ, rbuf, j->len, j->offset, LIO_FAILOVER, 0);
                if (e) {
                    pthread_mutex_lock(&S.stream_mu);
                    if (S.role == PRIMARY && failover(e, "read")) e = -EAGAIN;
                    pthread_mutex_unlock(&S.stream_mu);
                } else if (__atomic_load_n(&S.storage_seq, __ATOMIC_ACQUIRE) != seq) {
                    e = -EAGAIN; /* the path switched under the read: read again */
                }
            }
            err = e ? nbd_errno(-e) : 0;
            reply(j->c, j->handle, err, err ? NULL : rbuf, j->len);
            break;
        }
        case NBD_CMD_WRITE:
            err = change(R_WRITE, j->offset, j->len, j->data, fua);
            reply(j->c, j->handle, err, NULL, 0);
            break;
        case NBD_CMD_WRITE_ZEROES:
        case NBD_CMD_TRIM:
            err = j->len ? change(j->type == NBD_CMD_TRIM ? R_TRIM : R_ZERO, j->offset, j->len, NULL, fua) : 0;
            reply(j->c, j->handle, err, NULL, 0);
            break;
        case NBD_CMD_FLUSH:
            /* on B, every commit ends with fdatasync: a flushed write is durable there
               when its epoch commits, before the guest's acknowledgement is released */
            err = S.role == PRIMARY ? (uint32_t)-flush_local() : fdatasync(S.img) ? (uint32_t)errno : 0;
            err = err ? nbd_errno((int)err) : 0;
            reply(j->c, j->handle, err, NULL, 0);
            break;
        default:
            reply(j->c, j->handle, EINVAL, NULL, 0);
        }
        free(j->data);
        conn_put(j->c);
        free(j);
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
    conn_put(c);
    return NULL;
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

static void *nbd_accept(void *arg) {
    int lfd = (int)(intptr_t)arg;
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) { if (errno == EINTR || errno == ECONNABORTED) continue; return NULL; }
        struct conn *c = calloc(1, sizeof *c);
        c->fd = fd, c->refs = 1;
        pthread_mutex_init(&c->wmu, NULL);
        pthread_t t;
        pthread_create(&t, NULL, conn_thread, c);
        pthread_detach(t);
    }
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
    size_t l = strlen(out); /* the local image's hung calls (the section "with a deadline") */
    pthread_mutex_lock(&L.mu);
    if (l > 3 && out[l - 1] == '}')
        snprintf(out + l - 1, outlen - l + 1, ",\"hang_ms\":%d,\"local_timeouts\":%" PRIu64 ",\"local_stuck\":%d}",
                 S.hang_ms, L.timeouts, L.stuck);
    pthread_mutex_unlock(&L.mu);
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
    pthread_mutex_init(&S.stream_mu, NULL);
    pthread_mutex_init(&S.mu, NULL);
    pthread_cond_init(&S.cv, NULL);
    pthread_cond_init(&S.io_cv, NULL);
    pthread_mutex_init(&S.flush_mu, NULL);
    pthread_mutex_init(&S.rmu, NULL);
    pthread_cond_init(&S.rcv, NULL);
    pthread_condattr_init(&L.mono);
    pthread_condattr_setclock(&L.mono, CLOCK_MONOTONIC);
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
    for (int i = 0; i < S.workers; i++) { pthread_create(&t, NULL, worker, NULL); pthread_detach(t); }
    pthread_create(&t, NULL, nbd_accept, (void *)(intptr_t)nfd);
    pthread_detach(t);
    if (listen_at) { pthread_create(&t, NULL, stream_thread, NULL); pthread_detach(t); }
    fprintf(stdout, "ready\n");
    fflush(stdout);
    ctl_accept((void *)(intptr_t)cfd);
    return 0;
}
