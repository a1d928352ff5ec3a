/* The checkpoint stream's page sealing: see pagecrypt.h. */
#include "pagecrypt.h"

#include <limits.h>
#include <openssl/evp.h>
#include <string.h>

#define CHUNK (1 << 30) /* EVP takes an int length */

static void nonce_of(uint64_t seq, uint32_t part, unsigned char iv[12]) {
    for (int i = 0; i < 8; i++) iv[i] = (unsigned char)(seq >> (8 * i));
    for (int i = 0; i < 4; i++) iv[8 + i] = (unsigned char)(part >> (8 * i));
}

static int pc_crypt(int enc, const uint8_t *key, uint64_t seq, uint32_t part, const uint8_t *aad,
                 size_t aad_len, const uint8_t *in, size_t len, uint8_t *out) {
    unsigned char iv[12];
    int l, ok;
    if (aad_len > INT_MAX) return PC_ERROR;
    nonce_of(seq, part, iv);
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    if (!c) return PC_ERROR;
    ok = enc ? EVP_EncryptInit_ex(c, EVP_aes_256_gcm(), NULL, key, iv)
             : EVP_DecryptInit_ex(c, EVP_aes_256_gcm(), NULL, key, iv);
    if (ok && aad_len)
        ok = enc ? EVP_EncryptUpdate(c, NULL, &l, aad, (int)aad_len)
                 : EVP_DecryptUpdate(c, NULL, &l, aad, (int)aad_len);
    for (size_t done = 0; ok && done < len;) {
        size_t k = len - done < CHUNK ? len - done : CHUNK;
        ok = enc ? EVP_EncryptUpdate(c, out + done, &l, in + done, (int)k)
                 : EVP_DecryptUpdate(c, out + done, &l, in + done, (int)k);
        ok = ok && (size_t)l == k;
        done += k;
    }
    int rc = ok ? 0 : PC_ERROR;
    if (ok && enc) {
        rc = EVP_EncryptFinal_ex(c, out + len, &l) > 0 &&
                     EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, PC_TAG_SIZE, out + len) > 0
                 ? 0
                 : PC_ERROR;
    } else if (ok) {
        unsigned char tag[PC_TAG_SIZE];
        memcpy(tag, in + len, PC_TAG_SIZE);
        rc = EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, PC_TAG_SIZE, tag) > 0
                 ? (EVP_DecryptFinal_ex(c, out + len, &l) > 0 ? 0 : PC_FORGED)
                 : PC_ERROR;
    }
    EVP_CIPHER_CTX_free(c);
    return rc;
}

int pc_seal(const uint8_t *key, uint64_t seq, uint32_t part, const uint8_t *aad,
            size_t aad_len, const uint8_t *in, size_t len, uint8_t *out) {
    return pc_crypt(1, key, seq, part, aad, aad_len, in, len, out);
}

int pc_open(const uint8_t *key, uint64_t seq, uint32_t part, const uint8_t *aad,
            size_t aad_len, uint8_t *buf, size_t len) {
    int rc = pc_crypt(0, key, seq, part, aad, aad_len, buf, len, buf);
    if (rc == PC_FORGED) memset(buf, 0, len); /* nothing unverified stays readable */
    return rc;
}
