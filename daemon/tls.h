/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * TLS for the replication link (OpenSSL libssl): the per-VM context. The
 * per-connection part (handshake, records) is in daemon/link-transport.c.
 *
 * Policy, the same on both sides: TLS 1.3 only; the peer must present a
 * certificate that chains to the configured CA (mutual TLS: the standby
 * verifies the primary as the primary verifies the standby); with a peer
 * name, the certificate must carry that DNS name (SAN, or CN when there is
 * no SAN). No session tickets, no resumption, no renegotiation (TLS 1.3 has
 * none), no compression. The shared-secret challenge of the replication
 * handshake still runs inside the TLS channel.
 */

#include <openssl/types.h>

#define TLS_FILE_MAX (1024U * 1024U) /* bytes per PEM file read */

typedef struct TlsFiles {
        const char *cert_file; /* PEM: the certificate, then its chain */
        const char *key_file;  /* PEM: the private key; must not be world-accessible */
        const char *ca_file;   /* PEM: the CA certificate(s) a peer must chain to */
        const char *peer_name; /* optional: DNS name the peer's certificate must carry */
} TlsFiles;

/*
 * Builds an SSL_CTX from files. Each file is read once (regular file, at
 * most TLS_FILE_MAX bytes); the key must match the certificate. Returns 0
 * and a context the caller frees with SSL_CTX_free(), or a negative errno
 * and, when ret_error is non-NULL, a malloc()ed one-line message naming the
 * file and the problem ("PATH: cannot open TLS key file: No such file or
 * directory").
 */
int tls_context_new(const TlsFiles *f, SSL_CTX **ret, char **ret_error);

/* The reason of the most recent OpenSSL error of this thread as text
 * ("certificate verify failed"), or `fallback` when the queue is empty. */
const char *tls_last_error(const char *fallback);
