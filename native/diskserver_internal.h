/* mirror's disk server, its parts' shared header (the cffi binding is diskserver.h).
 *
 * One process, one state (S, below), in six files along their concerns:
 *
 *   diskserver.c   the process: its overview, state, command line, control socket, and the
 *                  small I/O helpers every part uses
 *   disknbd.c      the NBD protocol QEMU speaks: negotiation, requests, replies; each request
 *                  is a read, a change or a flush of diskstorage.c
 *   diskstorage.c  where the primary's disk I/O goes: the local image (with a deadline), or
 *                  B's replica over the stream (storage failover, probe, copy back, switch back)
 *   diskstream.c   the primary's stream to B: records, barrier, `committed`, the live copy,
 *                  resync and hashsync, `replicate`
 *   diskjournal.c  the replica: handshake, receiving, the journal, commit, promotion, the
 *                  identity file
 *   diskcrypto.c   the stream's keys: the handshake's MACs, the records' AEAD, block hashes
 *
 * Locks: stream_mu (the primary's stream and storage path), mu (the replica's journal),
 * rmu (remote reads), L.mu (diskstorage.c's I/O threads and watchdog), Q.mu (disknbd.c's
 * queue).  Order: stream_mu before mu, stream_mu before L.mu.
 */
#ifndef MIRROR_DISKSERVER_INTERNAL_H
#define MIRROR_DISKSERVER_INTERNAL_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
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

#pragma GCC visibility push(hidden) /* the parts' own: not the extension module's symbols */

#define MAX_REQ (32u << 20) /* the largest NBD request, and the largest stream record's data */

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
#define RD_BUF (256u << 10) /* a stream reader's buffer */
#define TAG 16          /* AES-256-GCM tag after every record */
#define SEAL_CHUNK (128u << 10) /* a large record is sealed, sent and opened in chunks of this */
#define HS_MAX 16       /* handshakes in progress at once on a replica */

struct chan { /* one direction of an authenticated stream */
    EVP_CIPHER_CTX *ctx; /* NULL: plain records (tests and benches only) */
    uint64_t ctr;        /* the next record's nonce */
    int enc;
};

enum role { PRIMARY, REPLICA };
enum storage { LOCAL, REMOTE, SUSPENDED }; /* where the primary's disk I/O goes */
#define BS 4096u                           /* one bit of a dirty bitmap */

struct rreq;  /* a read sent to B, waiting for its reply (diskstorage.c) */

/* a guest's change of the disk (a request of disknbd.c's), on its way through diskstorage.c */
struct change {
    uint32_t type, len;  /* R_WRITE, R_ZERO, R_TRIM */
    uint64_t off;
    const char *data;    /* R_WRITE: len bytes */
    int fua, local;      /* local: it makes a call on the local image */
    int refs;            /* its owner's, and a takeover's (atomic) */
    /* answer the request from a takeover's thread, then serve as a worker (never returns) */
    void (*resume)(struct change *c, int e);
    void (*put)(struct change *c); /* one reference less (the last frees it) */
    /* diskstorage.c's: the changes in flight (stream_mu), the local calls watched (L.mu) */
    struct change *rnext, *rprev, *wnext, *wprev;
    double wake;         /* when the watchdog looks at its local call next */
    int state, logged;
};
#define DISK_TAKEN 1 /* disk_change: its local call hung, and a takeover answered the request */
struct entry; /* one journaled record on the replica (diskjournal.c) */

struct disk_state { /* the server's state: one per process (diskserver.c defines it) */
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
    pthread_cond_t io_cv;     /* (stream_mu) suspended I/O waits here, and changes for each other */
    struct change *inflight;  /* (stream_mu) the changes under way: an overlapping one waits */
    int local_busy;           /* (stream_mu) changes in their local call (outside stream_mu) */
    int holding;              /* (stream_mu) a barrier waits for them: new changes wait */
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
};
extern struct disk_state S;

/* the dirty bitmaps (one bit per BS bytes of the disk) */
static inline void bm_set(uint64_t *bm, uint64_t off, uint64_t len) {
    if (!len) return;
    for (uint64_t b = off / BS, e = (off + len - 1) / BS; b <= e; b++) bm[b >> 6] |= 1ull << (b & 63);
}

static inline uint64_t bm_count(const uint64_t *bm) {
    uint64_t n = 0;
    for (size_t i = 0; i < S.bm_words; i++) n += (uint64_t)__builtin_popcountll(bm[i]);
    return n;
}

static inline void bm_or(uint64_t *dst, const uint64_t *src) {
    for (size_t i = 0; i < S.bm_words; i++) dst[i] |= src[i];
}

/* diskserver.c: I/O helpers (0, or -1 / -errno as each says) */
void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int read_full(int fd, void *buf, size_t n);
int write_full(int fd, const void *buf, size_t n);
int writev_full(int fd, struct iovec *v, int n, int flags);
struct rd { /* a stream read through a buffer: a record's header, data and tag in one recv (mostly) */
    int fd;
    unsigned char *buf; /* NULL: unbuffered (a reader that hands the socket on) */
    size_t head, tail, cap;
};
int rd_read(struct rd *r, void *dst, size_t n);
int pread_full(int fd, void *buf, size_t n, uint64_t off);
int pwrite_full(int fd, const void *buf, size_t n, uint64_t off);
int zero_range(int fd, uint64_t off, uint64_t len, int punch);
double now_ms(void);
int read_until(int fd, void *buf, size_t n, double deadline);

/* diskcrypto.c */
void conn_key(const unsigned char *key, const char *label, const unsigned char *nb, const unsigned char *na,
              unsigned char out[32]);
void chan_free(struct chan *c);
int chan_init(struct chan *c, const unsigned char key[32], int enc, int plain);
int send_sealed(int fd, struct chan *c, const struct rec *h, const void *data, size_t n, unsigned char *buf, int more);
int open_rec(struct rd *in, struct chan *c, const struct rec *h, unsigned char *buf, size_t n);
void hello_mac(const unsigned char *key, const unsigned char *nb, const struct rec *h, const char *text, size_t n,
               unsigned char out[32]);
void answer_mac(const unsigned char *key, const unsigned char *nb, const unsigned char *na, uint64_t verdict,
                unsigned char out[32]);
void hash_blocks(EVP_MD_CTX *md, const char *buf, uint64_t n, unsigned char *out);

/* diskstorage.c */
enum { LIO_READ, LIO_WRITE, LIO_ZERO, LIO_TRIM, LIO_SYNC };
enum { LIO_DEADLINE, LIO_FAILOVER };
void lio_init(void);
int lio_run(int op, char *buf, uint64_t len, uint64_t off, int mode, int locked);
void lio_counts(uint64_t *timeouts, int *stuck);
void set_storage(enum storage st);
void start_reply_reader(int fd, uint64_t gen, struct chan rx);
int disk_read(uint64_t off, uint32_t len, char *buf);
int disk_change(struct change *c);
void changes_hold(void);
void changes_release(void);
int disk_flush(void);

/* diskstream.c */
void peer_lost(const char *why);
void stream_send(uint32_t type, uint64_t epoch, uint64_t off, uint64_t len, const void *data);
void wlog_add(uint64_t epoch, uint64_t off, uint64_t len);
void copy_image(const char *path);
void cmd_committed(uint64_t n, char *out, size_t outlen);
void cmd_replicate(const char *host, const char *port, uint64_t first, int resync, char *out, size_t outlen);
void cmd_barrier(uint64_t n, char *out, size_t outlen);

/* diskjournal.c */
uint64_t jused(void);
void meta_write_primary(void);
void *stream_thread(void *arg);
void cmd_commit(uint64_t n, int timeout_ms, char *out, size_t outlen);
void cmd_promote(char *out, size_t outlen);

/* disknbd.c */
void *nbd_worker(void *arg);
void *nbd_accept(void *arg);
int nbd_open_conns(void); /* QEMU's connections open now */

#pragma GCC visibility pop
#endif
