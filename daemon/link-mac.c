/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Session keys and per-frame MACs of the replication link (link-mac.h). */
#include <errno.h>
#include <limits.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <stdlib.h>
#include <string.h>

#include "link-mac.h"

#define INFO_LABEL   "dirtyrep-session"
#define HKDF_SALT    "dirtyrep-link-v2"
#define FIELD_MAX    255u
#define GCM_IV_BYTES 12u

struct LinkMac {
        EVP_CIPHER_CTX *ctx; /* AES-256-GCM with the key set; the IV is set per frame */
};

static size_t append_field(uint8_t *buf, size_t n, const void *p, size_t len)
{
        put_le32(buf + n, (uint32_t) len);
        if (len > 0)
                memcpy(buf + n + 4, p, len);
        return n + 4 + len;
}

int link_session_keys(const uint8_t *secret, size_t secret_len, const uint8_t *nonce_primary,
                      const uint8_t *nonce_standby, size_t nonce_len, const char *vm_name,
                      const uint8_t *vm_uuid, size_t uuid_len, const uint8_t *binding, size_t binding_len,
                      uint8_t ret_primary_to_standby[LINK_KEY_BYTES],
                      uint8_t ret_standby_to_primary[LINK_KEY_BYTES])
{
        /* Six length prefixes, the label, four fields of up to FIELD_MAX (two nonces, name, UUID), the
         * binding. */
        uint8_t info[6 * 4 + sizeof(INFO_LABEL) + 4 * FIELD_MAX + LINK_BINDING_MAX], out[2 * LINK_KEY_BYTES];
        EVP_KDF *kdf = NULL;
        EVP_KDF_CTX *kctx = NULL;
        size_t name_len, n = 0;
        int r = -EIO;

        if (!secret || secret_len == 0 || !nonce_primary || !nonce_standby || nonce_len == 0 ||
            nonce_len > FIELD_MAX || !vm_name || !vm_uuid || uuid_len > FIELD_MAX ||
            binding_len > LINK_BINDING_MAX || (binding_len > 0 && !binding))
                return -EINVAL;
        name_len = strlen(vm_name);
        if (name_len == 0 || name_len > FIELD_MAX)
                return -EINVAL;

        n = append_field(info, n, INFO_LABEL, strlen(INFO_LABEL));
        n = append_field(info, n, nonce_primary, nonce_len);
        n = append_field(info, n, nonce_standby, nonce_len);
        n = append_field(info, n, vm_name, name_len);
        n = append_field(info, n, vm_uuid, uuid_len);
        n = append_field(info, n, binding, binding_len);

        kdf = EVP_KDF_fetch(NULL, "HKDF", NULL);
        if (kdf)
                kctx = EVP_KDF_CTX_new(kdf);
        if (kctx) {
                OSSL_PARAM params[] = {
                        OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *) "SHA256", 0),
                        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *) secret, secret_len),
                        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, (void *) HKDF_SALT,
                                                          strlen(HKDF_SALT)),
                        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, info, n),
                        OSSL_PARAM_construct_end(),
                };
                if (EVP_KDF_derive(kctx, out, sizeof(out), params) == 1) {
                        memcpy(ret_primary_to_standby, out, LINK_KEY_BYTES);
                        memcpy(ret_standby_to_primary, out + LINK_KEY_BYTES, LINK_KEY_BYTES);
                        r = 0;
                }
        }
        OPENSSL_cleanse(out, sizeof(out));
        EVP_KDF_CTX_free(kctx);
        EVP_KDF_free(kdf);
        return r;
}

int link_mac_new(const uint8_t key[LINK_KEY_BYTES], LinkMac **ret)
{
        LinkMac *m;

        if (!key || !ret)
                return -EINVAL;
        m = calloc(1, sizeof(*m));
        if (!m)
                return -ENOMEM;
        m->ctx = EVP_CIPHER_CTX_new();
        if (!m->ctx) {
                free(m);
                return -ENOMEM;
        }
        if (EVP_EncryptInit_ex(m->ctx, EVP_aes_256_gcm(), NULL, key, NULL) != 1) {
                link_mac_free(m);
                return -EIO;
        }
        *ret = m;
        return 0;
}

LinkMac *link_mac_free(LinkMac *m)
{
        if (!m)
                return NULL;
        EVP_CIPHER_CTX_free(m->ctx); /* clears the key schedule */
        free(m);
        return NULL;
}

/* GMAC: GCM with everything as additional data and no plaintext. */
static int mac_compute(LinkMac *m, uint64_t seq, const uint8_t header[FRAME_HEADER_SIZE],
                       const void *payload, size_t len, uint8_t tag[LINK_MAC_TAG_BYTES])
{
        uint8_t iv[GCM_IV_BYTES] = {};
        int outl = 0;

        if (len > INT_MAX)
                return -EINVAL;
        put_le64(iv + 4, seq);
        if (EVP_EncryptInit_ex(m->ctx, NULL, NULL, NULL, iv) != 1 ||
            EVP_EncryptUpdate(m->ctx, NULL, &outl, header, FRAME_HEADER_SIZE) != 1 ||
            (len > 0 && EVP_EncryptUpdate(m->ctx, NULL, &outl, payload, (int) len) != 1) ||
            EVP_EncryptFinal_ex(m->ctx, NULL, &outl) != 1 ||
            EVP_CIPHER_CTX_ctrl(m->ctx, EVP_CTRL_GCM_GET_TAG, LINK_MAC_TAG_BYTES, tag) != 1)
                return -EIO;
        return 0;
}

int link_mac_seal(LinkMac *m, uint64_t seq, const uint8_t header[FRAME_HEADER_SIZE], const void *payload,
                  size_t len, uint8_t ret_trailer[LINK_MAC_TRAILER_BYTES])
{
        if (!m || !header || (len > 0 && !payload) || !ret_trailer)
                return -EINVAL;
        if (seq == UINT64_MAX)
                return -EOVERFLOW;
        put_le64(ret_trailer, seq);
        return mac_compute(m, seq, header, payload, len, ret_trailer + 8);
}

int link_mac_check(LinkMac *m, uint64_t expected_seq, const uint8_t header[FRAME_HEADER_SIZE],
                   const void *payload, size_t len, const uint8_t trailer[LINK_MAC_TRAILER_BYTES],
                   uint64_t *ret_seq)
{
        uint8_t tag[LINK_MAC_TAG_BYTES];
        uint64_t seq;
        int r;

        if (!m || !header || (len > 0 && !payload) || !trailer)
                return -EINVAL;
        seq = get_le64(trailer);
        if (ret_seq)
                *ret_seq = seq;
        if (seq != expected_seq)
                return -ERANGE;
        if (seq == UINT64_MAX)
                return -EOVERFLOW;
        r = mac_compute(m, seq, header, payload, len, tag);
        if (r < 0)
                return r;
        return CRYPTO_memcmp(tag, trailer + 8, LINK_MAC_TAG_BYTES) == 0 ? 0 : -EBADMSG;
}
