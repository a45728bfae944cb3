/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The replication link's TLS context (tls.h). Files are read into memory
 * with a size cap and parsed from there, so a misconfigured path (a device,
 * a huge file) costs nothing and every error names the file.
 */
#include <errno.h>
#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "macros.h"
#include "tls.h"
#include "util.h"

static _printf_(3, 4) int tls_error(char **ret_error, int r, const char *fmt, ...)
{
        va_list ap;

        ERR_clear_error();
        if (!ret_error)
                return r;
        va_start(ap, fmt);
        if (vasprintf(ret_error, fmt, ap) < 0)
                *ret_error = NULL;
        va_end(ap);
        return r;
}

const char *tls_last_error(const char *fallback)
{
        unsigned long e = ERR_peek_last_error();
        const char *s = e ? ERR_reason_error_string(e) : NULL;
        return s ?: fallback;
}

static void bio_freep(BIO **b)
{
        BIO_free(*b);
}

static void ssl_ctx_freep(SSL_CTX **c)
{
        SSL_CTX_free(*c);
}

static void x509_freep(X509 **x)
{
        X509_free(*x);
}

static void evp_pkey_freep(EVP_PKEY **k)
{
        EVP_PKEY_free(*k);
}

/* Reads a whole PEM file into a memory BIO. `what` names the file in messages. */
static int read_pem(const char *path, const char *what, bool secret, BIO **ret, char **ret_error)
{
        _cleanup_close_ int fd = -EBADF;
        _cleanup_free_ char *buf = NULL;
        struct stat st;
        size_t n = 0;
        BIO *b;

        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0)
                return tls_error(ret_error, -errno, "%s: cannot open %s: %m", path, what);
        if (fstat(fd, &st) < 0)
                return tls_error(ret_error, -errno, "%s: cannot stat %s: %m", path, what);
        if (!S_ISREG(st.st_mode))
                return tls_error(ret_error, -EBADFD, "%s: %s is not a regular file", path, what);
        /* Group access is allowed for a key (the ssl-cert group convention), world access is not. */
        if (secret && (st.st_mode & 007))
                return tls_error(ret_error, -EPERM,
                                 "%s: %s has mode %04o, must not be accessible by others (chmod o-rwx)",
                                 path, what, (unsigned) (st.st_mode & 07777));
        if (st.st_size > (off_t) TLS_FILE_MAX)
                return tls_error(ret_error, -EFBIG, "%s: %s is larger than %u bytes", path, what,
                                 TLS_FILE_MAX);

        buf = malloc(TLS_FILE_MAX + 1);
        if (!buf)
                return tls_error(ret_error, -ENOMEM, "%s: out of memory", path);
        {
                ssize_t k = loop_read_upto(fd, buf, TLS_FILE_MAX + 1);
                if (k < 0)
                        return tls_error(ret_error, (int) k, "%s: cannot read %s: %s", path, what,
                                         strerror((int) -k));
                n = (size_t) k;
        }
        if (n > TLS_FILE_MAX)
                return tls_error(ret_error, -EFBIG, "%s: %s is larger than %u bytes", path, what,
                                 TLS_FILE_MAX);
        if (n == 0)
                return tls_error(ret_error, -ENODATA, "%s: %s is empty", path, what);

        /* A memory BIO that owns a copy: the key's buffer is wiped below. */
        b = BIO_new(BIO_s_mem());
        if (!b || BIO_write(b, buf, (int) n) != (int) n) {
                BIO_free(b);
                explicit_bzero(buf, n);
                return tls_error(ret_error, -ENOMEM, "%s: out of memory", path);
        }
        explicit_bzero(buf, n);
        *ret = b;
        return 0;
}

int tls_context_new(const TlsFiles *f, SSL_CTX **ret, char **ret_error)
{
        _cleanup_(ssl_ctx_freep) SSL_CTX *ctx = NULL;
        _cleanup_(bio_freep) BIO *cert_bio = NULL, *key_bio = NULL, *ca_bio = NULL;
        _cleanup_(x509_freep) X509 *cert = NULL;
        _cleanup_(evp_pkey_freep) EVP_PKEY *key = NULL;
        STACK_OF(X509_INFO) *cas = NULL;
        X509_STORE *store;
        unsigned n_ca = 0;
        int r;

        if (!f || !f->cert_file || !f->key_file || !f->ca_file || !ret)
                return -EINVAL;
        ERR_clear_error();

        r = read_pem(f->cert_file, "TLS certificate file", false, &cert_bio, ret_error);
        if (r < 0)
                return r;
        r = read_pem(f->key_file, "TLS key file", true, &key_bio, ret_error);
        if (r < 0)
                return r;
        r = read_pem(f->ca_file, "TLS CA file", false, &ca_bio, ret_error);
        if (r < 0)
                return r;

        ctx = SSL_CTX_new(TLS_method());
        if (!ctx)
                return tls_error(ret_error, -ENOMEM, "cannot create a TLS context: %s",
                                 tls_last_error("out of memory"));
        if (SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) != 1)
                return tls_error(ret_error, -EIO, "cannot require TLS 1.3: %s",
                                 tls_last_error("unknown error"));
        /* No tickets: nothing to resume, and a server would otherwise write them after the handshake. */
        SSL_CTX_set_num_tickets(ctx, 0);
        SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET | SSL_OP_NO_COMPRESSION);
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
        /* Partial writes: the writer thread hands SSL_write() what fits and keeps the rest,
         * as it does with sendmsg(). The chain sent is the certificate file's, not one built from the CA
         * file (which is what this side trusts, not what it is). */
        SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                                      SSL_MODE_NO_AUTO_CHAIN);
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);

        cert = PEM_read_bio_X509_AUX(cert_bio, NULL, NULL, NULL);
        if (!cert)
                return tls_error(ret_error, -EINVAL,
                                 "%s: no PEM certificate in the TLS certificate file (%s)", f->cert_file,
                                 tls_last_error("no certificate"));
        if (SSL_CTX_use_certificate(ctx, cert) != 1)
                return tls_error(ret_error, -EINVAL, "%s: certificate refused: %s", f->cert_file,
                                 tls_last_error("unknown error"));
        for (;;) {
                X509 *extra = PEM_read_bio_X509(cert_bio, NULL, NULL, NULL);
                if (!extra)
                        break;
                if (SSL_CTX_add0_chain_cert(ctx, extra) != 1) {
                        X509_free(extra);
                        return tls_error(ret_error, -EINVAL, "%s: chain certificate refused: %s",
                                         f->cert_file, tls_last_error("unknown error"));
                }
        }
        ERR_clear_error(); /* the end of the chain is a "no start line" error */

        key = PEM_read_bio_PrivateKey(key_bio, NULL, NULL, NULL);
        if (!key)
                return tls_error(ret_error, -EINVAL,
                                 "%s: no unencrypted PEM private key in the TLS key file (%s)", f->key_file,
                                 tls_last_error("no key"));
        if (SSL_CTX_use_PrivateKey(ctx, key) != 1 || SSL_CTX_check_private_key(ctx) != 1)
                return tls_error(ret_error, -EINVAL, "%s: the key does not match the certificate in %s (%s)",
                                 f->key_file, f->cert_file, tls_last_error("mismatch"));

        cas = PEM_X509_INFO_read_bio(ca_bio, NULL, NULL, NULL);
        store = SSL_CTX_get_cert_store(ctx);
        for (int i = 0; cas && i < sk_X509_INFO_num(cas); i++) {
                X509_INFO *xi = sk_X509_INFO_value(cas, i);
                if (!xi->x509)
                        continue;
                if (X509_STORE_add_cert(store, xi->x509) != 1) {
                        sk_X509_INFO_pop_free(cas, X509_INFO_free);
                        return tls_error(ret_error, -EINVAL, "%s: CA certificate refused: %s", f->ca_file,
                                         tls_last_error("unknown error"));
                }
                n_ca++;
        }
        sk_X509_INFO_pop_free(cas, X509_INFO_free);
        if (n_ca == 0)
                return tls_error(ret_error, -EINVAL, "%s: no PEM certificate in the TLS CA file",
                                 f->ca_file);
        ERR_clear_error();

        if (f->peer_name) {
                X509_VERIFY_PARAM *param = SSL_CTX_get0_param(ctx);
                X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
                if (X509_VERIFY_PARAM_set1_host(param, f->peer_name, 0) != 1)
                        return tls_error(ret_error, -EINVAL, "TLSPeerName=%s: refused by OpenSSL: %s",
                                         f->peer_name, tls_last_error("unknown error"));
        }

        *ret = TAKE_PTR(ctx);
        return 0;
}
