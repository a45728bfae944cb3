/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The replication handshake (proto/replication.proto, link-internal.h): the
 * HMAC proofs, the session keys, and the handlers of HELLO, CHALLENGE, AUTH
 * and WELCOME, which link_dispatch() calls according to the Link's step (the
 * diagram is at the top of link.c). Loop thread only; the keys for this
 * side's frames are handed to the writer under `mutex` (link_tx_keyed()).
 */
#include <errno.h>
#include <limits.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <string.h>
#include <sys/random.h>

#include "link-internal.h"
#include "link-mac.h"
#include "util.h"

#define PROOF_BYTES 32u

static const char LABEL_STANDBY[] = "dirtyrep-standby";
static const char LABEL_PRIMARY[] = "dirtyrep-primary";

int link_proof(const uint8_t *secret, size_t secret_len, const char *label, const uint8_t *nonce_a,
               const uint8_t *nonce_b, const char *vm_name, const uint8_t *vm_uuid, const uint8_t *binding,
               size_t binding_len, uint8_t out[32])
{
        _cleanup_free_ uint8_t *buf = NULL;
        size_t label_len, name_len, n = 0;
        unsigned out_len = 0;

        if (!secret || secret_len == 0 || secret_len > INT_MAX || !label || !nonce_a || !nonce_b ||
            !vm_name || !vm_uuid || binding_len > LINK_BINDING_MAX || (binding_len > 0 && !binding))
                return -EINVAL;
        label_len = strlen(label);
        name_len = strlen(vm_name);
        if (label_len > 64 || name_len > VM_NAME_MAX)
                return -EINVAL;

        buf = malloc(6 * 4 + label_len + 2 * NONCE_BYTES + name_len + UUID_BYTES + binding_len);
        if (!buf)
                return -ENOMEM;
#define APPEND(p, len)                                                                                      \
        do {                                                                                                \
                put_le32(buf + n, (uint32_t) (len));                                                        \
                if ((len) > 0)                                                                              \
                        memcpy(buf + n + 4, (p), (len));                                                    \
                n += 4 + (len);                                                                             \
        } while (0)
        APPEND(label, label_len);
        APPEND(nonce_a, NONCE_BYTES);
        APPEND(nonce_b, NONCE_BYTES);
        APPEND(vm_name, name_len);
        APPEND(vm_uuid, UUID_BYTES);
        APPEND(binding, binding_len);
#undef APPEND

        if (!HMAC(EVP_sha256(), secret, (int) secret_len, buf, n, out, &out_len) || out_len != PROOF_BYTES)
                return -EIO;
        return 0;
}

/*
 * Both nonces are known: derives the session keys (link-mac.h) into a MAC for each
 * direction. The caller installs each at the frame where that direction becomes keyed.
 */
static int link_keys_derive(Link *l, LinkMac **ret_rx, LinkMac **ret_tx)
{
        _cleanup_(link_mac_freep) LinkMac *rx = NULL, *tx = NULL;
        uint8_t p2s[LINK_KEY_BYTES], s2p[LINK_KEY_BYTES];
        const uint8_t *np = l->side == LINK_PRIMARY ? l->nonce_local : l->nonce_peer;
        const uint8_t *ns = l->side == LINK_PRIMARY ? l->nonce_peer : l->nonce_local;
        int r;

        r = link_session_keys(l->secret, l->secret_len, np, ns, NONCE_BYTES, l->vm_name, l->vm_uuid,
                              UUID_BYTES, l->binding, l->binding_len, p2s, s2p);
        if (r >= 0)
                r = link_mac_new(l->side == LINK_PRIMARY ? s2p : p2s, &rx);
        if (r >= 0)
                r = link_mac_new(l->side == LINK_PRIMARY ? p2s : s2p, &tx);
        OPENSSL_cleanse(p2s, sizeof(p2s));
        OPENSSL_cleanse(s2p, sizeof(s2p));
        if (r < 0)
                return r;
        *ret_rx = TAKE_PTR(rx);
        *ret_tx = TAKE_PTR(tx);
        return 0;
}

/* Frames this side queues from now on carry a MAC (the writer seals them in queue order). */
static void link_tx_keyed(Link *l, LinkMac *tx)
{
        pthread_mutex_lock(&l->mutex);
        assert(!l->tx_mac);
        l->tx_mac = tx;
        pthread_mutex_unlock(&l->mutex);
}

int link_handle_hello(Link *l, const uint8_t *payload, size_t len)
{
        _cleanup_(protobuf_c_message_freep) ProtobufCMessage *m = NULL;
        _cleanup_(link_mac_freep) LinkMac *tx = NULL;
        Dr__Repl__Challenge c = DR__REPL__CHALLENGE__INIT;
        uint8_t proof[PROOF_BYTES];
        const char *reason = NULL;
        Dr__Repl__Hello *h;
        int r;

        m = (ProtobufCMessage *) dr__repl__hello__unpack(NULL, len, payload);
        if (!m)
                return PROTO_FAIL(l, -EBADMSG, "undecodable HELLO from %s", l->peer_name);
        h = (Dr__Repl__Hello *) m;
        if (h->version != DR__REPL__REPL_VERSION__REPL_VERSION_CURRENT)
                return PROTO_FAIL(l, -EPROTONOSUPPORT,
                                  "peer %s speaks replication protocol version %u, this side only %u",
                                  l->peer_name, h->version,
                                  (unsigned) DR__REPL__REPL_VERSION__REPL_VERSION_CURRENT);
        if (h->nonce.len != NONCE_BYTES || h->vm_uuid.len != UUID_BYTES || h->session.len != SESSION_BYTES)
                return PROTO_FAIL(l, -EBADMSG,
                                  "malformed HELLO from %s: nonce %zu, vm_uuid %zu, session %zu bytes "
                                  "(want %u, %u, %u)",
                                  l->peer_name, h->nonce.len, h->vm_uuid.len, h->session.len, NONCE_BYTES,
                                  UUID_BYTES, SESSION_BYTES);
        if (!h->vm_name || strlen(h->vm_name) == 0 || strlen(h->vm_name) > VM_NAME_MAX)
                return PROTO_FAIL(l, -EBADMSG, "malformed HELLO from %s: vm_name empty or over %u bytes",
                                  l->peer_name, VM_NAME_MAX);

        memcpy(l->nonce_peer, h->nonce.data, NONCE_BYTES);
        memcpy(l->vm_uuid, h->vm_uuid.data, UUID_BYTES);
        memcpy(l->session, h->session.data, SESSION_BYTES);
        l->have_session = true;
        l->vm_name = strdup(h->vm_name);
        if (!l->vm_name)
                return PROTO_FAIL(l, -ENOMEM, "out of memory");

        if (l->cb.on_hello) {
                r = l->cb.on_hello(l, h, &reason, l->userdata);
                if (l->freed || l->state == LINK_DOWN)
                        return -ENOTCONN;
                if (r < 0)
                        return PROTO_FAIL(l, r, "standby refused HELLO from %s for VM '%s': %s",
                                          l->peer_name, l->vm_name, reason ?: strerror(-r));
        }

        if (getrandom(l->nonce_local, NONCE_BYTES, 0) != NONCE_BYTES)
                return PROTO_FAIL(l, -EIO, "getrandom() failed");
        r = link_proof(l->secret, l->secret_len, LABEL_STANDBY, l->nonce_peer, l->nonce_local, l->vm_name,
                       l->vm_uuid, l->binding, l->binding_len, proof);
        if (r < 0)
                return PROTO_FAIL(l, r, "failed to compute the standby proof: %s", strerror(-r));
        r = link_keys_derive(l, &l->rx_pending_mac, &tx);
        if (r < 0)
                return PROTO_FAIL(l, r, "failed to derive the session keys: %s", strerror(-r));

        c.nonce = (ProtobufCBinaryData){NONCE_BYTES, l->nonce_local};
        c.proof = (ProtobufCBinaryData){PROOF_BYTES, proof};
        r = link_send_internal(l, DR__REPL__FRAME_TYPE__FRAME_CHALLENGE, &c.base);
        if (r < 0)
                return PROTO_FAIL(l, r, "failed to queue CHALLENGE: %s", strerror(-r));
        /* Everything after CHALLENGE (WELCOME, or an ERROR) is keyed: a primary that checked the
         * proof holds the same keys, and nobody else can forge a WELCOME. The primary's frames
         * are keyed only after its AUTH (rx_pending_mac until then). */
        link_tx_keyed(l, TAKE_PTR(tx));
        l->step = STEP_WAIT_AUTH;
        return 0;
}

int link_handle_challenge(Link *l, const uint8_t *payload, size_t len)
{
        _cleanup_(protobuf_c_message_freep) ProtobufCMessage *m = NULL;
        _cleanup_(link_mac_freep) LinkMac *tx = NULL;
        Dr__Repl__Auth a = DR__REPL__AUTH__INIT;
        uint8_t expected[PROOF_BYTES], proof[PROOF_BYTES];
        Dr__Repl__Challenge *c;
        int r;

        m = (ProtobufCMessage *) dr__repl__challenge__unpack(NULL, len, payload);
        if (!m)
                return PROTO_FAIL(l, -EBADMSG, "undecodable CHALLENGE from %s", l->peer_name);
        c = (Dr__Repl__Challenge *) m;
        if (c->nonce.len != NONCE_BYTES || c->proof.len != PROOF_BYTES)
                return PROTO_FAIL(l, -EBADMSG, "malformed CHALLENGE from %s: nonce %zu, proof %zu bytes",
                                  l->peer_name, c->nonce.len, c->proof.len);
        memcpy(l->nonce_peer, c->nonce.data, NONCE_BYTES);

        r = link_proof(l->secret, l->secret_len, LABEL_STANDBY, l->nonce_local, l->nonce_peer, l->vm_name,
                       l->vm_uuid, l->binding, l->binding_len, expected);
        if (r < 0)
                return PROTO_FAIL(l, r, "failed to compute the standby proof: %s", strerror(-r));
        if (CRYPTO_memcmp(expected, c->proof.data, PROOF_BYTES) != 0) {
                if (l->ssl)
                        return PROTO_FAIL(l, -EACCES,
                                          "authentication failed: the standby %s does not know the shared "
                                          "secret, or the handshake was relayed through another TLS "
                                          "connection (check SecretFile= on both hosts, and that nothing "
                                          "terminates TLS on the way)",
                                          l->peer_name);
                return PROTO_FAIL(l, -EACCES,
                                  "authentication failed: the standby %s does not know the shared secret "
                                  "(check SecretFile= on both hosts)",
                                  l->peer_name);
        }

        r = link_proof(l->secret, l->secret_len, LABEL_PRIMARY, l->nonce_peer, l->nonce_local, l->vm_name,
                       l->vm_uuid, l->binding, l->binding_len, proof);
        if (r < 0)
                return PROTO_FAIL(l, r, "failed to compute the primary proof: %s", strerror(-r));
        r = link_keys_derive(l, &l->rx_mac, &tx);
        if (r < 0)
                return PROTO_FAIL(l, r, "failed to derive the session keys: %s", strerror(-r));
        a.proof = (ProtobufCBinaryData){PROOF_BYTES, proof};
        r = link_send_internal(l, DR__REPL__FRAME_TYPE__FRAME_AUTH, &a.base);
        if (r < 0)
                return PROTO_FAIL(l, r, "failed to queue AUTH: %s", strerror(-r));
        /* The standby's frames are keyed from its WELCOME on (rx_mac, installed above), ours from
         * the one after AUTH. */
        link_tx_keyed(l, TAKE_PTR(tx));
        l->step = STEP_WAIT_WELCOME;
        return 0;
}

int link_handle_auth(Link *l, const uint8_t *payload, size_t len)
{
        _cleanup_(protobuf_c_message_freep) ProtobufCMessage *m = NULL;
        Dr__Repl__Welcome w = DR__REPL__WELCOME__INIT;
        uint8_t expected[PROOF_BYTES];
        Dr__Repl__Auth *a;
        int r;

        m = (ProtobufCMessage *) dr__repl__auth__unpack(NULL, len, payload);
        if (!m)
                return PROTO_FAIL(l, -EBADMSG, "undecodable AUTH from %s", l->peer_name);
        a = (Dr__Repl__Auth *) m;
        r = link_proof(l->secret, l->secret_len, LABEL_PRIMARY, l->nonce_local, l->nonce_peer, l->vm_name,
                       l->vm_uuid, l->binding, l->binding_len, expected);
        if (r < 0)
                return PROTO_FAIL(l, r, "failed to compute the primary proof: %s", strerror(-r));
        if (a->proof.len != PROOF_BYTES || CRYPTO_memcmp(expected, a->proof.data, PROOF_BYTES) != 0)
                return PROTO_FAIL(l, -EACCES,
                                  "authentication failed: the peer %s does not know the shared secret "
                                  "(check SecretFile=)%s",
                                  l->peer_name,
                                  l->ssl ? ", or the handshake was relayed through another TLS connection"
                                         : "");
        /* From the frame after AUTH on, the primary's frames are keyed. */
        l->rx_mac = TAKE_PTR(l->rx_pending_mac);

        if (l->cb.fill_welcome)
                l->cb.fill_welcome(l, &w, l->userdata);
        if (l->freed || l->state == LINK_DOWN)
                return -ENOTCONN;
        r = link_send_internal(l, DR__REPL__FRAME_TYPE__FRAME_WELCOME, &w.base);
        if (r < 0)
                return PROTO_FAIL(l, r, "failed to queue WELCOME: %s", strerror(-r));
        return link_go_up(l, NULL);
}

int link_handle_welcome(Link *l, const uint8_t *payload, size_t len)
{
        _cleanup_(protobuf_c_message_freep) ProtobufCMessage *m = NULL;
        Dr__Repl__Welcome *w;

        m = (ProtobufCMessage *) dr__repl__welcome__unpack(NULL, len, payload);
        if (!m)
                return PROTO_FAIL(l, -EBADMSG, "undecodable WELCOME from %s", l->peer_name);
        w = (Dr__Repl__Welcome *) m;
        if (w->has_session && w->session.len != 0 && w->session.len != SESSION_BYTES)
                return PROTO_FAIL(l, -EBADMSG, "malformed WELCOME from %s: session is %zu bytes",
                                  l->peer_name, w->session.len);
        return link_go_up(l, w);
}

/* Queues the primary's Hello: the first frame, once the connection (and TLS) is up. */
int link_queue_hello(Link *l)
{
        TxFrame *f;
        int r;

        l->step = STEP_WAIT_CHALLENGE;
        f = txframe_new(l->hello_len);
        if (!f) {
                link_down(l, -ENOMEM, false, "out of memory");
                return -ENOMEM;
        }
        memcpy(f->data + FRAME_HEADER_SIZE, l->hello_payload, l->hello_len);
        r = link_queue(l, DR__REPL__FRAME_TYPE__FRAME_HELLO, f, false, true);
        if (r < 0) {
                link_down(l, r, false, "failed to queue HELLO: %s", strerror(-r));
                return r;
        }
        return 0;
}
