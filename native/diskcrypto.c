/* mirror's disk server: the stream's keys.  The session key (derived by both roles,
 * mirror_disk_session_key), per-connection keys, the handshake's MACs, the records'
 * AES-256-GCM (struct chan), and the block hashes a hashsync compares. */
#include "diskserver_internal.h"

/* ---- the stream's keys: handshake MACs, record AEAD ------------------------------ */

static void hmac256(const unsigned char *key, const void *msg, size_t n, unsigned char out[32]) {
    unsigned int l = 32;
    HMAC(EVP_sha256(), key, 32, msg, n, out, &l);
}

/* a per-connection key: HMAC(session key, label || B's nonce || A's nonce) */
void conn_key(const unsigned char *key, const char *label, const unsigned char *nb, const unsigned char *na,
                     unsigned char out[32]) {
    unsigned char m[80];
    memset(m, 0, 16);
    memcpy(m, label, strlen(label) < 16 ? strlen(label) : 16);
    memcpy(m + 16, nb, 32);
    memcpy(m + 48, na, 32);
    hmac256(key, m, sizeof m, out);
}

void chan_free(struct chan *c) {
    if (c->ctx) EVP_CIPHER_CTX_free(c->ctx);
    c->ctx = NULL;
    c->ctr = 0;
}

int chan_init(struct chan *c, const unsigned char key[32], int enc, int plain) {
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

/* a large record sealed and sent a chunk at a time (the peer decrypts one chunk while this
   side encrypts the next); 0 or -1 */
static int send_chunked(int fd, struct chan *c, const struct rec *h, const void *data, size_t n, unsigned char *buf,
                        int more) {
    unsigned char iv[12];
    int l;
    chan_iv(c, iv);
    EVP_EncryptInit_ex(c->ctx, NULL, NULL, NULL, iv);
    EVP_EncryptUpdate(c->ctx, NULL, &l, (const unsigned char *)h, sizeof *h);
    memcpy(buf, h, sizeof *h);
    size_t at = sizeof *h;
    for (size_t done = 0; done < n;) {
        size_t k = n - done < SEAL_CHUNK ? n - done : SEAL_CHUNK;
        if (!EVP_EncryptUpdate(c->ctx, buf + at, &l, (const unsigned char *)data + done, (int)k) || (size_t)l != k)
            return -1;
        at += k, done += k;
        if (done == n) {
            EVP_EncryptFinal_ex(c->ctx, buf + at, &l);
            EVP_CIPHER_CTX_ctrl(c->ctx, EVP_CTRL_GCM_GET_TAG, TAG, buf + at);
            at += TAG;
        }
        struct iovec v = {buf, at};
        if (writev_full(fd, &v, 1, done < n || more ? MSG_MORE : 0)) return -1;
        at = 0;
    }
    return 0;
}

/* one sealed record to fd in one send (buf: room for the record; the caller's own); plain
   records go without a copy: the header and the data as they are; a large sealed one a
   chunk at a time.  more: another record follows before anyone waits on this one
   (MSG_MORE: TCP may hold it to fill a segment) */
int send_sealed(int fd, struct chan *c, const struct rec *h, const void *data, size_t n, unsigned char *buf, int more) {
    if (!c->ctx) {
        struct iovec v[2] = {{(void *)h, sizeof *h}, {(void *)data, n}};
        return writev_full(fd, v, n ? 2 : 1, more ? MSG_MORE : 0);
    }
    if (n > 2 * SEAL_CHUNK) return send_chunked(fd, c, h, data, n, buf, more);
    struct iovec v = {buf, seal(c, h, data, n, buf)};
    return writev_full(fd, &v, 1, more ? MSG_MORE : 0);
}

/* after the header h: n bytes of data (to buf, decrypted in place) and the tag; 0 if they
   are intact and in order, -1 if the connection ended, -2 if they fail the check */
int open_rec(struct rd *in, struct chan *c, const struct rec *h, unsigned char *buf, size_t n) {
    unsigned char tag[TAG], iv[12];
    if (!c->ctx) return n && rd_read(in, buf, n) ? -1 : 0;
    int l;
    chan_iv(c, iv);
    EVP_DecryptInit_ex(c->ctx, NULL, NULL, NULL, iv);
    EVP_DecryptUpdate(c->ctx, NULL, &l, (const unsigned char *)h, sizeof *h);
    for (size_t done = 0; done < n;) { /* a chunk at a time, as it arrives (nothing is used before the tag's check) */
        size_t k = n - done < SEAL_CHUNK ? n - done : SEAL_CHUNK;
        if (rd_read(in, buf + done, k)) return -1;
        EVP_DecryptUpdate(c->ctx, buf + done, &l, buf + done, (int)k);
        done += k;
    }
    if (rd_read(in, tag, TAG)) return -1;
    EVP_CIPHER_CTX_ctrl(c->ctx, EVP_CTRL_GCM_SET_TAG, TAG, tag);
    return EVP_DecryptFinal_ex(c->ctx, buf + n, &l) > 0 ? 0 : -2;
}

/* the HELLO's MAC: over B's challenge, the header and the text */
void hello_mac(const unsigned char *key, const unsigned char *nb, const struct rec *h, const char *text,
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
void answer_mac(const unsigned char *key, const unsigned char *nb, const unsigned char *na, uint64_t verdict,
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

/* the first HASH_LEN bytes of SHA-256 of each 4 KiB block of buf (n bytes) into out */
void hash_blocks(EVP_MD_CTX *md, const char *buf, uint64_t n, unsigned char *out) {
    unsigned char d[EVP_MAX_MD_SIZE];
    unsigned int l;
    for (uint64_t i = 0; i < n; i += BS, out += HASH_LEN) {
        EVP_DigestInit_ex(md, EVP_sha256(), NULL);
        EVP_DigestUpdate(md, buf + i, n - i < BS ? n - i : BS);
        EVP_DigestFinal_ex(md, d, &l);
        memcpy(out, d, HASH_LEN);
    }
}
