/*
 * pagecrypt: the checkpoint stream's page sealing (AES-256-GCM through OpenSSL's EVP,
 * with AES-NI/VAES where the CPU has them).  mirror.replication.pagecrypt drives it; the
 * key is the pairing session's (docs/security.md, "What is encrypted").
 *
 * The nonce is never chosen by the caller: it is built here from the send number of
 * the message (64 bits) and the part of it (32 bits), 12 bytes little endian, so that
 * one key never seals two parts under the same nonce as long as the send numbers of a
 * session never repeat (the primary's never do) and a session's key is new (it is
 * derived from the session's random number).
 *
 * The block between cdef-begin and cdef-end is read verbatim by the cffi build script.
 */
#ifndef MIRROR_PAGECRYPT_H
#define MIRROR_PAGECRYPT_H

#include <stddef.h>
#include <stdint.h>

/* cdef-begin */
enum {
    PC_KEY_SIZE = 32,
    PC_TAG_SIZE = 16,
    PC_ERROR = -1,   /* OpenSSL failed (or a length above 2^31 - 1) */
    PC_FORGED = -2   /* the tag does not verify: nothing of it may be used */
};

/* Seal len bytes of in into out (len bytes, then the 16-byte tag; out may equal in) under
 * key, the nonce of (seq, part) and aad (authenticated, not encrypted).  0 or PC_ERROR. */
int pc_seal(const uint8_t *key, uint64_t seq, uint32_t part, const uint8_t *aad,
            size_t aad_len, const uint8_t *in, size_t len, uint8_t *out);

/* Open a sealed part in place: buf holds len bytes of ciphertext and then its tag; on 0
 * its first len bytes are the plaintext.  PC_FORGED when the tag does not verify (a bit
 * flipped, another key, another nonce: a replayed or reordered part), PC_ERROR. */
int pc_open(const uint8_t *key, uint64_t seq, uint32_t part, const uint8_t *aad,
            size_t aad_len, uint8_t *buf, size_t len);
/* cdef-end */

#endif
