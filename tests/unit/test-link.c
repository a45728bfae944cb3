/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The replication link over real TCP sockets on 127.0.0.1, one sd-event loop
 * driving both ends. Where a misbehaving peer is needed, a plain socket plays
 * it, computing its proofs with link_proof() like an honest peer would.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <systemd/sd-event.h>

#include "crc32c.h"
#include "frame.h"
#include "link-mac.h"
#include "link.h"
#include "macros.h"
#include "tests.h"
#include "util.h"

#define MAX_FRAME    ((uint32_t) DR__REPL__REPL_LIMIT__REPL_MAX_FRAME)
#define REPL_VERSION ((uint32_t) DR__REPL__REPL_VERSION__REPL_VERSION_CURRENT)

/* Runs the loop until cond holds or ms pass; evaluates to cond. */
#define RUN_UNTIL(e, cond, ms)                                                                              \
        ({                                                                                                  \
                uint64_t _end = now_usec() + (uint64_t) (ms) *1000u;                                        \
                while (!(cond) && now_usec() < _end)                                                        \
                        ASSERT_TRUE(sd_event_run((e), 5000) >= 0);                                          \
                (cond);                                                                                     \
        })

typedef struct Seen {
        uint16_t type;
        uint32_t len, crc;
} Seen;

/* What one end observed through its callbacks. */
typedef struct Side {
        unsigned ups, downs, frames, hellos, heartbeats;
        int down_error;
        char down_reason[512];
        bool have_welcome;
        uint64_t welcome_last_committed;
        uint64_t hb_last_committed;
        Seen seen[16];
        int refuse_hello;    /* on_hello returns this */
        Link **free_on_down; /* on_down frees the Link it is called for */
} Side;

typedef struct Fixture {
        sd_event *e;
        LinkListener *ll;
        struct sockaddr_storage addr;
        socklen_t addr_len;
        LinkParams sp; /* standby params for on_accept */
        Link *standby, *primary;
        Side s, p;
        uint8_t session[16];
} Fixture;

static const uint8_t SECRET[] = "correct horse battery staple";
static const uint8_t WRONG[] = "correct horse battery stapler";
static const uint8_t UUID[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

static int s_on_hello(Link *l, const Dr__Repl__Hello *h, const char **ret_reason, void *userdata)
{
        Side *s = userdata;
        s->hellos++;
        if (s->refuse_hello < 0) {
                *ret_reason = "wrong VM";
                return s->refuse_hello;
        }
        ASSERT_TRUE(streq(h->vm_name, "vm0"));
        ASSERT_EQ(h->page_size, 4096);
        return 0;
}

static void s_fill_welcome(Link *l, Dr__Repl__Welcome *w, void *userdata)
{
        w->has_last_committed = true;
        w->last_committed = 41;
}

static int on_up(Link *l, const Dr__Repl__Welcome *w, void *userdata)
{
        Side *s = userdata;
        s->ups++;
        if (w) {
                s->have_welcome = true;
                s->welcome_last_committed = w->has_last_committed ? w->last_committed : 0;
        }
        return 0;
}

/* Time on_frame() spends per frame (a standby applying pages), for the tests that need a busy loop. */
static unsigned frame_work_us;

static int on_frame(Link *l, uint16_t type, const uint8_t *payload, size_t len, void *userdata)
{
        Side *s = userdata;
        if (frame_work_us)
                usleep(frame_work_us);
        if (s->frames < ELEMENTSOF(s->seen))
                s->seen[s->frames] = (Seen){type, (uint32_t) len, crc32c(0, payload, len)};
        s->frames++;
        return 0;
}

static void fill_heartbeat(Link *l, Dr__Repl__Heartbeat *hb, void *userdata)
{
        hb->has_last_committed = true;
        hb->last_committed = 41;
}

static void on_heartbeat(Link *l, const Dr__Repl__Heartbeat *hb, void *userdata)
{
        Side *s = userdata;
        s->heartbeats++;
        s->hb_last_committed = hb->has_last_committed ? hb->last_committed : 0;
}

static void on_down(Link *l, int error, const char *reason, void *userdata)
{
        Side *s = userdata;
        s->downs++;
        s->down_error = error;
        snprintf(s->down_reason, sizeof(s->down_reason), "%s", reason);
        fprintf(stderr, "  down (%d): %s\n", error, reason);
        if (s->free_on_down) {
                ASSERT_TRUE(*s->free_on_down == l);
                *s->free_on_down = link_free(l);
        }
}

static const LinkCallbacks standby_cb = {
        .on_hello = s_on_hello,
        .fill_welcome = s_fill_welcome,
        .on_up = on_up,
        .on_frame = on_frame,
        .fill_heartbeat = fill_heartbeat,
        .on_heartbeat = on_heartbeat,
        .on_down = on_down,
};

static const LinkCallbacks primary_cb = {
        .on_up = on_up,
        .on_frame = on_frame,
        .on_heartbeat = on_heartbeat,
        .on_down = on_down,
};

static int on_accept(LinkListener *ll, int fd, const char *peer, void *userdata)
{
        Fixture *f = userdata;
        LinkParams p = f->sp;

        ASSERT_TRUE(!f->standby); /* one connection per test */
        p.peer_name = peer;
        p.listener = ll;
        ASSERT_OK(link_accept(f->e, fd, &p, &standby_cb, &f->s, &f->standby));
        return 0;
}

static void fixture_init(Fixture *f, const uint8_t *standby_secret, size_t len)
{
        struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};

        memset(f, 0, sizeof(*f));
        ASSERT_OK(sd_event_new(&f->e));
        f->sp = (LinkParams){
                .side = LINK_STANDBY,
                .secret = standby_secret,
                .secret_len = len,
                .heartbeat_ms = 20,
                .heartbeat_misses = 10,
                .handshake_timeout_ms = 2000,
        };
        ASSERT_OK(link_listener_new(f->e, (struct sockaddr *) &sin, sizeof(sin), 4, on_accept, f, &f->ll));
        ASSERT_OK(link_listener_address(f->ll, &f->addr, &f->addr_len));
        ASSERT_TRUE(ntohs(((struct sockaddr_in *) &f->addr)->sin_port) != 0);
        ASSERT_EQ(getrandom(f->session, sizeof(f->session), 0), sizeof(f->session));
}

static void fixture_done(Fixture *f)
{
        f->primary = link_free(f->primary);
        f->standby = link_free(f->standby);
        f->ll = link_listener_free(f->ll);
        f->e = sd_event_unref(f->e);
}

static void hello_init(Fixture *f, Dr__Repl__Hello *h)
{
        *h = (Dr__Repl__Hello) DR__REPL__HELLO__INIT;
        h->vm_name = (char *) "vm0";
        h->vm_uuid = (ProtobufCBinaryData){16, (uint8_t *) UUID};
        h->session = (ProtobufCBinaryData){16, f->session};
        h->page_size = 4096;
}

static void primary_connect(Fixture *f, const uint8_t *secret, size_t len, LinkParams *override)
{
        Dr__Repl__Hello h;
        LinkParams p = {
                .side = LINK_PRIMARY,
                .secret = secret,
                .secret_len = len,
                .heartbeat_ms = 20,
                .heartbeat_misses = 10,
                .handshake_timeout_ms = 2000,
        };

        hello_init(f, &h);
        if (override)
                p = *override;
        p.hello = &h;
        ASSERT_OK(link_connect(f->e, (struct sockaddr *) &f->addr, f->addr_len, &p, &primary_cb, &f->p,
                               &f->primary));
        ASSERT_EQ(link_state(f->primary), LINK_CONNECTING);
}

static void fill_random(uint8_t *buf, size_t len, uint32_t seed)
{
        for (size_t i = 0; i < len; i++) {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                buf[i] = (uint8_t) seed;
        }
}

TEST(handshake_and_frames)
{
        static const size_t sizes[] = {0, 1, 4096, 100000, MAX_FRAME - 1, MAX_FRAME};
        _cleanup_free_ uint8_t *buf = malloc(MAX_FRAME + 1);
        Fixture f;
        LinkStats ps, ss;

        ASSERT_TRUE(buf);
        fixture_init(&f, SECRET, sizeof(SECRET));
        /* Both ends share this thread, which also fills 8 MiB below (slow under
         * sanitizers): a generous liveness window, heartbeats still every 20 ms. */
        f.sp.heartbeat_misses = 100;
        primary_connect(&f, SECRET, sizeof(SECRET),
                        &(LinkParams){.side = LINK_PRIMARY,
                                      .secret = SECRET,
                                      .secret_len = sizeof(SECRET),
                                      .heartbeat_ms = 20,
                                      .heartbeat_misses = 100});
        ASSERT_TRUE(RUN_UNTIL(f.e, f.p.ups == 1 && f.s.ups == 1, 3000));
        ASSERT_EQ(link_state(f.primary), LINK_UP);
        ASSERT_EQ(link_state(f.standby), LINK_UP);
        ASSERT_EQ(f.s.hellos, 1);
        ASSERT_TRUE(f.p.have_welcome);
        ASSERT_EQ(f.p.welcome_last_committed, 41);
        ASSERT_TRUE(link_peer_session(f.standby));
        ASSERT_TRUE(memcmp(link_peer_session(f.standby), f.session, 16) == 0);
        ASSERT_TRUE(strstr(link_peer_name(f.primary), "127.0.0.1:"));

        /* Primary -> standby: data frames of every interesting size, intact. */
        for (size_t i = 0; i < ELEMENTSOF(sizes); i++) {
                fill_random(buf, sizes[i], (uint32_t) (i + 1) * 7919u);
                ASSERT_OK(link_send(f.primary, DR__REPL__FRAME_TYPE__FRAME_PAGES, buf, sizes[i], false));
        }
        ASSERT_EQ(link_send(f.primary, DR__REPL__FRAME_TYPE__FRAME_PAGES, buf, MAX_FRAME + 1, false),
                  -EMSGSIZE);
        {
                Dr__Repl__EpochEnd end = DR__REPL__EPOCH_END__INIT;
                end.epoch = 42;
                end.page_records = 7;
                ASSERT_OK(link_send_message(f.primary, DR__REPL__FRAME_TYPE__FRAME_EPOCH_END, &end.base,
                                            true));
        }
        ASSERT_TRUE(RUN_UNTIL(f.e, f.s.frames == ELEMENTSOF(sizes) + 1, 5000));
        for (size_t i = 0; i < ELEMENTSOF(sizes); i++) {
                fill_random(buf, sizes[i], (uint32_t) (i + 1) * 7919u);
                ASSERT_EQ(f.s.seen[i].type, DR__REPL__FRAME_TYPE__FRAME_PAGES);
                ASSERT_EQ(f.s.seen[i].len, sizes[i]);
                ASSERT_EQ(f.s.seen[i].crc, crc32c(0, buf, sizes[i]));
        }
        ASSERT_EQ(f.s.seen[ELEMENTSOF(sizes)].type, DR__REPL__FRAME_TYPE__FRAME_EPOCH_END);

        /* Standby -> primary. */
        {
                Dr__Repl__Ack ack = DR__REPL__ACK__INIT;
                ack.epoch = 42;
                ASSERT_OK(link_send_message(f.standby, DR__REPL__FRAME_TYPE__FRAME_ACK, &ack.base, false));
        }
        ASSERT_TRUE(RUN_UNTIL(f.e, f.p.frames == 1, 2000));
        ASSERT_EQ(f.p.seen[0].type, DR__REPL__FRAME_TYPE__FRAME_ACK);

        /* Heartbeats flow both ways and carry what fill_heartbeat put in. */
        ASSERT_TRUE(RUN_UNTIL(f.e, f.p.heartbeats >= 3 && f.s.heartbeats >= 3, 2000));
        ASSERT_EQ(f.p.hb_last_committed, 41);

        link_get_stats(f.primary, &ps);
        link_get_stats(f.standby, &ss);
        ASSERT_TRUE(ps.frames_sent >= ELEMENTSOF(sizes) + 2);
        ASSERT_TRUE(ss.frames_received >= ELEMENTSOF(sizes) + 2);
        ASSERT_TRUE(ss.bytes_received >= 2ull * MAX_FRAME);
        ASSERT_TRUE(ps.queue_high_water >= MAX_FRAME);
        ASSERT_TRUE(ps.heartbeats_sent >= 1 && ss.heartbeats_received >= 3);
        ASSERT_EQ(f.p.downs + f.s.downs, 0);

        /* link_fail: the peer hears why. */
        link_fail(f.standby, -ESTALE, "epoch %u out of order", 9);
        ASSERT_EQ(f.s.down_error, -ESTALE);
        ASSERT_EQ(link_send(f.standby, DR__REPL__FRAME_TYPE__FRAME_ACK, NULL, 0, false), -ENOTCONN);
        ASSERT_TRUE(RUN_UNTIL(f.e, f.p.downs == 1, 2000));
        ASSERT_EQ(f.p.down_error, -ESTALE);
        ASSERT_TRUE(strstr(f.p.down_reason, "epoch 9 out of order"));
        ASSERT_EQ(link_state(f.primary), LINK_DOWN);
        ASSERT_EQ(f.s.downs, 1);
        fixture_done(&f);
}

static void wrong_secret(const uint8_t *ps, size_t pl, const uint8_t *ss, size_t sl)
{
        Fixture f;

        fixture_init(&f, ss, sl);
        primary_connect(&f, ps, pl, NULL);
        ASSERT_TRUE(RUN_UNTIL(f.e, f.p.downs == 1 && f.s.downs == 1, 3000));
        ASSERT_EQ(f.p.down_error, -EACCES);
        ASSERT_EQ(f.s.down_error, -EACCES);
        ASSERT_TRUE(strstr(f.p.down_reason, "shared secret"));
        ASSERT_TRUE(strstr(f.s.down_reason, "shared secret"));
        ASSERT_EQ(f.p.ups + f.s.ups, 0);
        ASSERT_EQ(f.s.frames, 0);
        ASSERT_EQ(link_send(f.primary, DR__REPL__FRAME_TYPE__FRAME_PAGES, "x", 1, false), -ENOTCONN);
        /* Stays down: nothing more is reported. */
        RUN_UNTIL(f.e, false, 100);
        ASSERT_EQ(f.p.downs + f.s.downs, 2);
        fixture_done(&f);
}

TEST(wrong_secret_primary)
{
        wrong_secret(WRONG, sizeof(WRONG), SECRET, sizeof(SECRET));
}

TEST(wrong_secret_standby)
{
        wrong_secret(SECRET, sizeof(SECRET), WRONG, sizeof(WRONG) - 3);
}

/* ---- a raw socket playing the primary ---------------------------------------------- */

/* The raw peer's session: its frames are sealed once tx is set, the Link's are checked once rx is
 * set, as an honest peer would (link-mac.h). */
static struct {
        LinkMac *tx, *rx;
        uint64_t tx_seq, rx_seq;
} raw;

static void raw_reset(void)
{
        raw.tx = link_mac_free(raw.tx);
        raw.rx = link_mac_free(raw.rx);
        raw.tx_seq = raw.rx_seq = 0;
}

/* The session keys from both nonces; installs the MACs of a raw peer playing `side`. */
static void raw_keys(const uint8_t pnonce[32], const uint8_t snonce[32], LinkSide side)
{
        uint8_t p2s[LINK_KEY_BYTES], s2p[LINK_KEY_BYTES];

        ASSERT_OK(link_session_keys(SECRET, sizeof(SECRET), pnonce, snonce, 32, "vm0", UUID, 16, NULL, 0,
                                    p2s, s2p));
        raw_reset();
        ASSERT_OK(link_mac_new(side == LINK_PRIMARY ? p2s : s2p, &raw.tx));
        ASSERT_OK(link_mac_new(side == LINK_PRIMARY ? s2p : p2s, &raw.rx));
}

static int raw_connect(Fixture *f)
{
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        ASSERT_TRUE(fd >= 0);
        raw_reset();
        ASSERT_OK(RET_NERRNO(connect(fd, (struct sockaddr *) &f->addr, f->addr_len)));
        ASSERT_TRUE(RUN_UNTIL(f->e, f->standby != NULL, 2000));
        return fd;
}

/* Sends a frame; sealed (with the next sequence number) when the raw session is keyed. */
static void raw_send(int fd, uint16_t type, const void *payload, size_t len)
{
        uint8_t h[FRAME_HEADER_SIZE], t[LINK_MAC_TRAILER_BYTES];
        frame_header_build(h, type, payload, (uint32_t) len);
        ASSERT_OK(loop_write(fd, h, sizeof(h)));
        if (len)
                ASSERT_OK(loop_write(fd, payload, len));
        if (raw.tx) {
                ASSERT_OK(link_mac_seal(raw.tx, raw.tx_seq++, h, payload, len, t));
                ASSERT_OK(loop_write(fd, t, sizeof(t)));
        }
}

static void raw_send_message(int fd, uint16_t type, const ProtobufCMessage *m)
{
        uint8_t buf[4096];
        size_t len = protobuf_c_message_get_packed_size(m);
        ASSERT_TRUE(len <= sizeof(buf));
        protobuf_c_message_pack(m, buf);
        raw_send(fd, type, buf, len);
}

/* Reads one frame while running the loop (the other end lives on it). Returns payload length. */
static size_t raw_recv(sd_event *e, int fd, uint16_t *ret_type, uint8_t *buf, size_t cap)
{
        uint8_t h[FRAME_HEADER_SIZE];
        size_t got = 0, need = FRAME_HEADER_SIZE;
        FrameHeader fh = {};
        uint64_t end = now_usec() + 3 * USEC_PER_SEC;

        while (got < need) {
                ssize_t n;
                ASSERT_TRUE(now_usec() < end);
                ASSERT_TRUE(sd_event_run(e, 1000) >= 0);
                n = recv(fd, got < FRAME_HEADER_SIZE ? h + got : buf + (got - FRAME_HEADER_SIZE), need - got,
                         MSG_DONTWAIT);
                if (n < 0 && errno == EAGAIN)
                        continue;
                ASSERT_TRUE(n > 0);
                got += (size_t) n;
                if (got == FRAME_HEADER_SIZE) {
                        ASSERT_OK(frame_header_parse(h, (uint32_t) cap, &fh));
                        need += fh.length;
                }
        }
        ASSERT_OK(frame_verify_payload(h, &fh, buf));
        if (raw.rx) {
                uint8_t t[LINK_MAC_TRAILER_BYTES];
                got = 0;
                while (got < sizeof(t)) {
                        ssize_t n;
                        ASSERT_TRUE(now_usec() < end);
                        ASSERT_TRUE(sd_event_run(e, 1000) >= 0);
                        n = recv(fd, t + got, sizeof(t) - got, MSG_DONTWAIT);
                        if (n < 0 && errno == EAGAIN)
                                continue;
                        ASSERT_TRUE(n > 0);
                        got += (size_t) n;
                }
                ASSERT_OK(link_mac_check(raw.rx, raw.rx_seq++, h, buf, fh.length, t, NULL));
        }
        *ret_type = fh.type;
        return fh.length;
}

static void raw_hello(Fixture *f, int fd, uint32_t version, uint8_t nonce[32])
{
        Dr__Repl__Hello h;

        hello_init(f, &h);
        h.version = version;
        ASSERT_EQ(getrandom(nonce, 32, 0), 32);
        h.nonce = (ProtobufCBinaryData){32, nonce};
        raw_send_message(fd, DR__REPL__FRAME_TYPE__FRAME_HELLO, &h.base);
}

/* The whole primary handshake by hand. bad_proof: send a proof made with the wrong secret. */
static void raw_handshake(Fixture *f, int fd, bool bad_proof)
{
        uint8_t pnonce[32], buf[4096], expect[32], proof[32];
        Dr__Repl__Auth a = DR__REPL__AUTH__INIT;
        Dr__Repl__Challenge *c;
        uint16_t type;
        size_t len;

        raw_hello(f, fd, REPL_VERSION, pnonce);
        len = raw_recv(f->e, fd, &type, buf, sizeof(buf));
        ASSERT_EQ(type, DR__REPL__FRAME_TYPE__FRAME_CHALLENGE);
        c = dr__repl__challenge__unpack(NULL, len, buf);
        ASSERT_TRUE(c && c->nonce.len == 32 && c->proof.len == 32);
        ASSERT_OK(link_proof(SECRET, sizeof(SECRET), "dirtyrep-standby", pnonce, c->nonce.data, "vm0", UUID,
                             NULL, 0, expect));
        ASSERT_TRUE(memcmp(expect, c->proof.data, 32) == 0);
        ASSERT_OK(link_proof(bad_proof ? WRONG : SECRET, sizeof(SECRET), "dirtyrep-primary", c->nonce.data,
                             pnonce, "vm0", UUID, NULL, 0, proof));
        /* From here on the standby's frames are keyed; this side's after AUTH. */
        raw_keys(pnonce, c->nonce.data, LINK_PRIMARY);
        dr__repl__challenge__free_unpacked(c, NULL);
        a.proof = (ProtobufCBinaryData){32, proof};
        {
                LinkMac *tx = TAKE_PTR(raw.tx);
                raw_send_message(fd, DR__REPL__FRAME_TYPE__FRAME_AUTH, &a.base);
                raw.tx = tx;
        }
        if (bad_proof)
                return;
        len = raw_recv(f->e, fd, &type, buf, sizeof(buf));
        ASSERT_EQ(type, DR__REPL__FRAME_TYPE__FRAME_WELCOME);
        ASSERT_TRUE(RUN_UNTIL(f->e, f->s.ups == 1, 2000));
}

TEST(proof_layout)
{
        uint8_t a[32] = {1}, b[32] = {2}, p1[32], p2[32], p3[32];

        ASSERT_OK(link_proof(SECRET, sizeof(SECRET), "dirtyrep-primary", a, b, "vm0", UUID, NULL, 0, p1));
        ASSERT_OK(link_proof(SECRET, sizeof(SECRET), "dirtyrep-primary", a, b, "vm0", UUID, NULL, 0, p2));
        ASSERT_TRUE(memcmp(p1, p2, 32) == 0);
        ASSERT_OK(link_proof(SECRET, sizeof(SECRET), "dirtyrep-primary", b, a, "vm0", UUID, NULL, 0, p2));
        ASSERT_TRUE(memcmp(p1, p2, 32) != 0);
        ASSERT_OK(link_proof(SECRET, sizeof(SECRET), "dirtyrep-standby", a, b, "vm0", UUID, NULL, 0, p3));
        ASSERT_TRUE(memcmp(p1, p3, 32) != 0);
        ASSERT_OK(link_proof(SECRET, sizeof(SECRET), "dirtyrep-primary", a, b, "vm1", UUID, NULL, 0, p3));
        ASSERT_TRUE(memcmp(p1, p3, 32) != 0);
        /* The TLS channel binding changes the proof: a relayed handshake does not verify. */
        ASSERT_OK(link_proof(SECRET, sizeof(SECRET), "dirtyrep-primary", a, b, "vm0", UUID, a, 32, p3));
        ASSERT_TRUE(memcmp(p1, p3, 32) != 0);
        ASSERT_EQ(link_proof(SECRET, 0, "dirtyrep-primary", a, b, "vm0", UUID, NULL, 0, p3), -EINVAL);
}

TEST(session_keys_field_limits)
{
        /* link_session_keys() takes every field up to 255 bytes (and a 32-byte binding): all of
         * them at once must fit its info buffer, and one byte more is refused. */
        uint8_t n1[255], n2[255], uuid[255], binding[32], a[32], b[32], a2[32], b2[32];
        char name[256];

        memset(n1, 1, sizeof(n1));
        memset(n2, 2, sizeof(n2));
        memset(uuid, 3, sizeof(uuid));
        memset(binding, 4, sizeof(binding));
        memset(name, 'v', 255);
        name[255] = 0;
        ASSERT_OK(link_session_keys(SECRET, sizeof(SECRET), n1, n2, sizeof(n1), name, uuid, sizeof(uuid),
                                    binding, sizeof(binding), a, b));
        ASSERT_OK(link_session_keys(SECRET, sizeof(SECRET), n1, n2, sizeof(n1), name, uuid, sizeof(uuid),
                                    binding, sizeof(binding), a2, b2));
        ASSERT_TRUE(memcmp(a, a2, 32) == 0 && memcmp(b, b2, 32) == 0 && memcmp(a, b, 32) != 0);
        /* The last field counts: another binding, other keys. */
        binding[31] ^= 1;
        ASSERT_OK(link_session_keys(SECRET, sizeof(SECRET), n1, n2, sizeof(n1), name, uuid, sizeof(uuid),
                                    binding, sizeof(binding), a2, b2));
        ASSERT_TRUE(memcmp(a, a2, 32) != 0);
        ASSERT_EQ(link_session_keys(SECRET, sizeof(SECRET), n1, n2, sizeof(n1), name, uuid, 256, binding,
                                    sizeof(binding), a2, b2),
                  -EINVAL);
}

TEST(bad_crc)
{
        uint8_t payload[4096], h[FRAME_HEADER_SIZE], t[LINK_MAC_TRAILER_BYTES];
        Fixture f;
        int fd;

        fixture_init(&f, SECRET, sizeof(SECRET));
        fd = raw_connect(&f);
        raw_handshake(&f, fd, false);

        fill_random(payload, sizeof(payload), 5);
        frame_header_build(h, DR__REPL__FRAME_TYPE__FRAME_PAGES, payload, sizeof(payload));
        ASSERT_OK(link_mac_seal(raw.tx, raw.tx_seq++, h, payload, sizeof(payload), t));
        payload[1234] ^= 0x10; /* on the wire, after the CRC and the MAC were computed */
        ASSERT_OK(loop_write(fd, h, sizeof(h)));
        ASSERT_OK(loop_write(fd, payload, sizeof(payload)));
        ASSERT_OK(loop_write(fd, t, sizeof(t)));
        ASSERT_TRUE(RUN_UNTIL(f.e, f.s.downs == 1, 2000));
        ASSERT_EQ(f.s.down_error, -EBADMSG);
        ASSERT_TRUE(strstr(f.s.down_reason, "CRC"));
        ASSERT_EQ(f.s.frames, 0);
        safe_close(fd);
        fixture_done(&f);
}

/* After the handshake: a frame whose CRC is right but whose MAC is not (rewritten on the way with
 * the CRC recomputed), a replayed frame, one sealed with the other direction's key (reflected),
 * and one without a trailer. Each ends the link before on_frame sees anything. */
TEST(frame_mac)
{
        static const char *const needles[] = {"MAC does not match", "out of sequence", "MAC does not match",
                                              "out of sequence"};
        for (int variant = 0; variant < 4; variant++) {
                uint8_t payload[4096], h[FRAME_HEADER_SIZE], t[LINK_MAC_TRAILER_BYTES];
                Fixture f;
                int fd;

                fixture_init(&f, SECRET, sizeof(SECRET));
                fd = raw_connect(&f);
                raw_handshake(&f, fd, false);
                fill_random(payload, sizeof(payload), 7);
                if (variant == 1) {
                        /* A good frame, accepted; then the same bytes again. */
                        frame_header_build(h, DR__REPL__FRAME_TYPE__FRAME_PAGES, payload, sizeof(payload));
                        ASSERT_OK(link_mac_seal(raw.tx, raw.tx_seq++, h, payload, sizeof(payload), t));
                        for (int i = 0; i < 2; i++) {
                                ASSERT_OK(loop_write(fd, h, sizeof(h)));
                                ASSERT_OK(loop_write(fd, payload, sizeof(payload)));
                                ASSERT_OK(loop_write(fd, t, sizeof(t)));
                        }
                } else if (variant == 2) {
                        /* Sealed with the key of the standby's own direction, as a reflection is. */
                        frame_header_build(h, DR__REPL__FRAME_TYPE__FRAME_PAGES, payload, sizeof(payload));
                        ASSERT_OK(link_mac_seal(raw.rx, raw.tx_seq, h, payload, sizeof(payload), t));
                        ASSERT_OK(loop_write(fd, h, sizeof(h)));
                        ASSERT_OK(loop_write(fd, payload, sizeof(payload)));
                        ASSERT_OK(loop_write(fd, t, sizeof(t)));
                } else {
                        frame_header_build(h, DR__REPL__FRAME_TYPE__FRAME_PAGES, payload, sizeof(payload));
                        ASSERT_OK(link_mac_seal(raw.tx, raw.tx_seq++, h, payload, sizeof(payload), t));
                        /* Rewritten after sealing, CRC recomputed: only the MAC can tell. */
                        payload[100] ^= 0x01;
                        frame_header_build(h, DR__REPL__FRAME_TYPE__FRAME_PAGES, payload, sizeof(payload));
                        ASSERT_OK(loop_write(fd, h, sizeof(h)));
                        ASSERT_OK(loop_write(fd, payload, sizeof(payload)));
                        if (variant == 0)
                                ASSERT_OK(loop_write(fd, t, sizeof(t)));
                        else /* no trailer: the next frame's bytes are taken for it */
                                raw_send(fd, DR__REPL__FRAME_TYPE__FRAME_PAGES, payload, 64);
                }
                ASSERT_TRUE(RUN_UNTIL(f.e, f.s.downs == 1, 2000));
                ASSERT_EQ(f.s.down_error, -EBADMSG);
                fprintf(stderr, "  variant %d: %s\n", variant, f.s.down_reason);
                ASSERT_TRUE(strstr(f.s.down_reason, needles[variant]));
                ASSERT_EQ(f.s.frames, variant == 1 ? 1u : 0u);
                safe_close(fd);
                fixture_done(&f);
        }
}

/* Forwards whole frames of the standby's stream (src) to the primary (dst) and counts the keyed
 * ones, as a relay on the path that knows the format can. */
typedef struct RelayDir {
        uint8_t buf[65536];
        size_t have;
        bool keyed;
        uint64_t keyed_frames;
} RelayDir;

static void relay_down(RelayDir *d, int src, int dst)
{
        ssize_t n = recv(src, d->buf + d->have, sizeof(d->buf) - d->have, MSG_DONTWAIT);
        if (n > 0)
                d->have += (size_t) n;
        while (d->have >= FRAME_HEADER_SIZE) {
                FrameHeader h;
                size_t whole;
                ASSERT_OK(frame_header_parse(d->buf, sizeof(d->buf), &h));
                whole = FRAME_HEADER_SIZE + h.length + (d->keyed ? LINK_MAC_TRAILER_BYTES : 0);
                if (d->have < whole)
                        break;
                ASSERT_OK(loop_write(dst, d->buf, whole));
                d->keyed_frames += d->keyed;
                if (h.type == DR__REPL__FRAME_TYPE__FRAME_CHALLENGE)
                        d->keyed = true;
                memmove(d->buf, d->buf + whole, d->have - whole);
                d->have -= whole;
        }
}

/* A relay on the path passes the whole handshake between the real primary and the real standby
 * (the standby answers anyone's HELLO), then drops the standby and acknowledges epochs itself. It
 * learned no session key: its ACK fails the MAC, the primary's link goes down, on_frame never sees
 * it. */
TEST(relayed_handshake_then_forged_ack)
{
        struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        Dr__Repl__Ack ack = DR__REPL__ACK__INIT;
        uint8_t up[65536], frame[FRAME_HEADER_SIZE + 64 + LINK_MAC_TRAILER_BYTES];
        struct sockaddr_storage standby_addr;
        socklen_t sl = sizeof(sin), standby_len;
        RelayDir down = {};
        Fixture f;
        int rl, pfd = -1, sfd;
        size_t len;

        fixture_init(&f, SECRET, sizeof(SECRET));
        standby_addr = f.addr;
        standby_len = f.addr_len;
        rl = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        ASSERT_TRUE(rl >= 0);
        ASSERT_OK(RET_NERRNO(bind(rl, (struct sockaddr *) &sin, sizeof(sin))));
        ASSERT_OK(RET_NERRNO(listen(rl, 1)));
        ASSERT_OK(RET_NERRNO(getsockname(rl, (struct sockaddr *) &f.addr, &sl)));
        f.addr_len = sl;
        primary_connect(&f, SECRET, sizeof(SECRET), NULL);
        for (uint64_t end = now_usec() + 2 * USEC_PER_SEC; pfd < 0;
             pfd = accept4(rl, NULL, NULL, SOCK_CLOEXEC)) {
                ASSERT_TRUE(now_usec() < end);
                ASSERT_TRUE(sd_event_run(f.e, 1000) >= 0);
        }
        sfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        ASSERT_TRUE(sfd >= 0);
        ASSERT_OK(RET_NERRNO(connect(sfd, (struct sockaddr *) &standby_addr, standby_len)));

        for (uint64_t end = now_usec() + 3 * USEC_PER_SEC; !(f.p.ups == 1 && f.s.ups == 1);) {
                ssize_t n;
                ASSERT_TRUE(now_usec() < end);
                ASSERT_TRUE(sd_event_run(f.e, 1000) >= 0);
                n = recv(pfd, up, sizeof(up), MSG_DONTWAIT);
                if (n > 0)
                        ASSERT_OK(loop_write(sfd, up, (size_t) n));
                relay_down(&down, sfd, pfd);
        }
        ASSERT_TRUE(down.keyed_frames >= 1); /* the WELCOME went through the relay */
        safe_close(sfd);                     /* the real standby is dropped */

        /* An ACK with a valid CRC and the sequence number the primary expects. */
        ack.epoch = 1;
        len = dr__repl__ack__pack(&ack, frame + FRAME_HEADER_SIZE);
        frame_header_build(frame, DR__REPL__FRAME_TYPE__FRAME_ACK, frame + FRAME_HEADER_SIZE,
                           (uint32_t) len);
        put_le64(frame + FRAME_HEADER_SIZE + len, down.keyed_frames);
        fill_random(frame + FRAME_HEADER_SIZE + len + 8, LINK_MAC_TAG_BYTES, 11);
        ASSERT_OK(loop_write(pfd, frame, FRAME_HEADER_SIZE + len + LINK_MAC_TRAILER_BYTES));
        ASSERT_TRUE(RUN_UNTIL(f.e, f.p.downs == 1, 2000));
        ASSERT_EQ(f.p.down_error, -EBADMSG);
        ASSERT_TRUE(strstr(f.p.down_reason, "authentication failed for ACK frame"));
        ASSERT_EQ(f.p.frames, 0u);
        safe_close(pfd);
        safe_close(rl);
        fixture_done(&f);
}

/* Sends raw bytes as the first thing a stranger says; expects the standby down with err. */
static void stranger_says(const void *bytes, size_t len, int err, const char *needle)
{
        Fixture f;
        int fd;

        fixture_init(&f, SECRET, sizeof(SECRET));
        fd = raw_connect(&f);
        ASSERT_OK(loop_write(fd, bytes, len));
        ASSERT_TRUE(RUN_UNTIL(f.e, f.s.downs == 1, 2000));
        ASSERT_EQ(f.s.down_error, err);
        if (needle)
                ASSERT_TRUE(strstr(f.s.down_reason, needle));
        ASSERT_EQ(f.s.hellos + f.s.frames + f.s.ups, 0);
        safe_close(fd);
        fixture_done(&f);
}

TEST(oversize_and_garbage)
{
        uint8_t h[FRAME_HEADER_SIZE];

        /* Only a header claiming a huge payload: rejected before any payload is read. */
        frame_header_build(h, DR__REPL__FRAME_TYPE__FRAME_PAGES, NULL, 0);
        put_le32(h + 8, MAX_FRAME + 1);
        stranger_says(h, sizeof(h), -EMSGSIZE, "limit");
        /* During the handshake even a max_frame Hello is too big. */
        put_le32(h + 8, MAX_FRAME);
        stranger_says(h, sizeof(h), -EMSGSIZE, "limit");
        /* Not a frame at all. */
        stranger_says("GET / HTTP/1.1\r\nHost: x\r\n\r\n", 27, -EBADMSG, "header");
        /* A frame version from the future. */
        frame_header_build(h, DR__REPL__FRAME_TYPE__FRAME_HELLO, NULL, 0);
        put_le16(h + 4, 2);
        stranger_says(h, sizeof(h), -EPROTONOSUPPORT, "version");
}

TEST(oversize_after_handshake)
{
        uint8_t h[FRAME_HEADER_SIZE];
        Fixture f;
        int fd;

        fixture_init(&f, SECRET, sizeof(SECRET));
        f.sp.max_frame = 65536;
        fd = raw_connect(&f);
        raw_handshake(&f, fd, false);
        frame_header_build(h, DR__REPL__FRAME_TYPE__FRAME_PAGES, NULL, 0);
        put_le32(h + 8, 65537);
        ASSERT_OK(loop_write(fd, h, sizeof(h)));
        ASSERT_TRUE(RUN_UNTIL(f.e, f.s.downs == 1, 2000));
        ASSERT_EQ(f.s.down_error, -EMSGSIZE);
        ASSERT_EQ(f.s.frames, 0);
        safe_close(fd);
        fixture_done(&f);
}

TEST(out_of_state)
{
        uint8_t h[FRAME_HEADER_SIZE + 8] = {}, nonce[32];
        Fixture f;
        int fd;

        /* PAGES as the first frame. */
        frame_header_build(h, DR__REPL__FRAME_TYPE__FRAME_PAGES, h + FRAME_HEADER_SIZE, 8);
        stranger_says(h, sizeof(h), -EPROTO, "unexpected PAGES");

        /* Hello, then PAGES before AUTH; then a second Hello. */
        for (int second_hello = 0; second_hello <= 1; second_hello++) {
                fixture_init(&f, SECRET, sizeof(SECRET));
                fd = raw_connect(&f);
                raw_hello(&f, fd, REPL_VERSION, nonce);
                if (second_hello)
                        raw_hello(&f, fd, REPL_VERSION, nonce);
                else
                        ASSERT_OK(loop_write(fd, h, sizeof(h)));
                ASSERT_TRUE(RUN_UNTIL(f.e, f.s.downs == 1, 2000));
                ASSERT_EQ(f.s.down_error, -EPROTO);
                ASSERT_TRUE(strstr(f.s.down_reason, second_hello ? "unexpected HELLO" : "unexpected PAGES"));
                ASSERT_EQ(f.s.frames + f.s.ups, 0);
                safe_close(fd);
                fixture_done(&f);
        }

        /* Up: a Hello again, or a frame only a standby sends. */
        for (int ack = 0; ack <= 1; ack++) {
                Dr__Repl__Ack a = DR__REPL__ACK__INIT;
                fixture_init(&f, SECRET, sizeof(SECRET));
                fd = raw_connect(&f);
                raw_handshake(&f, fd, false);
                if (ack)
                        raw_send_message(fd, DR__REPL__FRAME_TYPE__FRAME_ACK, &a.base);
                else
                        raw_hello(&f, fd, REPL_VERSION, nonce);
                ASSERT_TRUE(RUN_UNTIL(f.e, f.s.downs == 1, 2000));
                ASSERT_EQ(f.s.down_error, -EPROTO);
                ASSERT_EQ(f.s.frames, 0);
                safe_close(fd);
                fixture_done(&f);
        }
}

TEST(bad_auth_proof)
{
        Fixture f;
        int fd;

        fixture_init(&f, SECRET, sizeof(SECRET));
        fd = raw_connect(&f);
        raw_handshake(&f, fd, true);
        ASSERT_TRUE(RUN_UNTIL(f.e, f.s.downs == 1, 2000));
        ASSERT_EQ(f.s.down_error, -EACCES);
        ASSERT_TRUE(strstr(f.s.down_reason, "authentication failed"));
        ASSERT_EQ(f.s.ups + f.s.frames, 0);
        safe_close(fd);
        fixture_done(&f);
}

TEST(version_mismatch)
{
        uint8_t nonce[32], buf[4096];
        Dr__Repl__Error *e;
        uint16_t type;
        size_t len;
        Fixture f;
        int fd;

        fixture_init(&f, SECRET, sizeof(SECRET));
        fd = raw_connect(&f);
        raw_hello(&f, fd, REPL_VERSION + 1, nonce);
        /* The refusal reaches the peer as an ERROR frame. */
        len = raw_recv(f.e, fd, &type, buf, sizeof(buf));
        ASSERT_EQ(type, DR__REPL__FRAME_TYPE__FRAME_ERROR);
        e = dr__repl__error__unpack(NULL, len, buf);
        ASSERT_TRUE(e);
        ASSERT_EQ(e->code, -EPROTONOSUPPORT);
        {
                char want[32];
                snprintf(want, sizeof(want), "version %u", REPL_VERSION + 1);
                ASSERT_TRUE(strstr(e->message, want));
        }
        dr__repl__error__free_unpacked(e, NULL);
        ASSERT_EQ(f.s.down_error, -EPROTONOSUPPORT);
        ASSERT_EQ(f.s.hellos, 0);
        safe_close(fd);
        fixture_done(&f);
}

TEST(hello_refused)
{
        Fixture f;

        fixture_init(&f, SECRET, sizeof(SECRET));
        f.s.refuse_hello = -ENOENT;
        primary_connect(&f, SECRET, sizeof(SECRET), NULL);
        ASSERT_TRUE(RUN_UNTIL(f.e, f.p.downs == 1 && f.s.downs == 1, 2000));
        ASSERT_EQ(f.s.down_error, -ENOENT);
        ASSERT_EQ(f.p.down_error, -ENOENT);
        ASSERT_TRUE(strstr(f.p.down_reason, "wrong VM"));
        fixture_done(&f);
}

/* A raw peer that completes the handshake and then says nothing: the
 * standby's time to declare it lost (heartbeats of 50 ms x 3, the given
 * patience) must lie in [min_ms, max_ms). */
static void silent_peer_lost_within(uint64_t patience_ms, uint64_t min_ms, uint64_t max_ms)
{
        uint64_t up, elapsed;
        Fixture f;
        int fd;

        fixture_init(&f, SECRET, sizeof(SECRET));
        f.sp.heartbeat_ms = 50;
        f.sp.heartbeat_misses = 3;
        fd = raw_connect(&f);
        raw_handshake(&f, fd, false);
        link_set_patience(f.standby, patience_ms * 1000);
        up = now_usec();
        ASSERT_TRUE(RUN_UNTIL(f.e, f.s.downs == 1, max_ms + 1000));
        elapsed = now_usec() - up;
        ASSERT_EQ(f.s.down_error, -ETIMEDOUT);
        fprintf(stderr, "  declared lost after %" PRIu64 " ms (window 150 ms, patience %" PRIu64 " ms)\n",
                elapsed / 1000, patience_ms);
        ASSERT_TRUE(elapsed >= min_ms * 1000 && elapsed < max_ms * 1000);
        safe_close(fd);
        fixture_done(&f);
}

TEST(silent_peer)
{
        silent_peer_lost_within(0, 120, 1000);
}

/* Counts heartbeats arriving on a raw socket from another thread, while the
 * test's own thread (the link's loop) is busy. */
typedef struct HbCounter {
        int fd;
        unsigned heartbeats;
        uint64_t until;
} HbCounter;

static void *count_heartbeats(void *userdata)
{
        HbCounter *c = userdata;
        uint8_t buf[65536];
        size_t have = 0;

        while (now_usec() < c->until) {
                struct pollfd p = {.fd = c->fd, .events = POLLIN};
                ssize_t n;

                if (poll(&p, 1, 10) <= 0)
                        continue;
                n = recv(c->fd, buf + have, sizeof(buf) - have, MSG_DONTWAIT);
                if (n <= 0)
                        continue;
                have += (size_t) n;
                while (have >= FRAME_HEADER_SIZE) {
                        FrameHeader h;
                        ASSERT_OK(frame_header_parse(buf, MAX_FRAME, &h));
                        /* After WELCOME every frame carries its MAC trailer. */
                        size_t whole = FRAME_HEADER_SIZE + h.length + LINK_MAC_TRAILER_BYTES;
                        if (have < whole)
                                break;
                        if (h.type == DR__REPL__FRAME_TYPE__FRAME_HEARTBEAT)
                                c->heartbeats++;
                        memmove(buf, buf + whole, have - whole);
                        have -= whole;
                }
        }
        return NULL;
}

TEST(heartbeats_while_loop_busy)
{
        HbCounter c = {0};
        pthread_t t;
        Fixture f;
        int fd;

        /* The writer thread sends the heartbeats: a loop busy for 400 ms
         * (here: this thread, sleeping) does not stop them. */
        fixture_init(&f, SECRET, sizeof(SECRET));
        f.sp.heartbeat_ms = 20;
        f.sp.heartbeat_misses = 100;
        fd = raw_connect(&f);
        raw_handshake(&f, fd, false);
        c.fd = fd;
        c.until = now_usec() + 400 * 1000;
        ASSERT_EQ(pthread_create(&t, NULL, count_heartbeats, &c), 0);
        usleep(400 * 1000);
        ASSERT_EQ(pthread_join(t, NULL), 0);
        fprintf(stderr, "  %u heartbeats in 400 ms of a busy loop (every 20 ms)\n", c.heartbeats);
        ASSERT_TRUE(c.heartbeats >= 8);
        safe_close(fd);
        fixture_done(&f);
}

/* A raw primary whose heartbeats keep coming but whose loop_beats never
 * change: its loop hung behind a live writer. */
TEST(peer_loop_stalled)
{
        Dr__Repl__Heartbeat hb = DR__REPL__HEARTBEAT__INIT;
        uint64_t up, elapsed, beats = 0;
        Fixture f;
        int fd;

        fixture_init(&f, SECRET, sizeof(SECRET));
        f.sp.heartbeat_ms = 20;
        f.sp.heartbeat_misses = 5;
        fd = raw_connect(&f);
        raw_handshake(&f, fd, false);
        up = now_usec();
        hb.has_loop_beats = true;
        /* Beats advance for 0.5 s: the link stays up. Then they stop advancing. */
        while (f.s.downs == 0 && now_usec() - up < 5 * 1000 * 1000) {
                hb.seq++;
                if (now_usec() - up < 500 * 1000)
                        hb.loop_beats = ++beats;
                raw_send_message(fd, DR__REPL__FRAME_TYPE__FRAME_HEARTBEAT, &hb.base);
                RUN_UNTIL(f.e, f.s.downs > 0, 20);
        }
        elapsed = now_usec() - up;
        ASSERT_EQ(f.s.downs, 1);
        ASSERT_EQ(f.s.down_error, -ETIMEDOUT);
        ASSERT_TRUE(strstr(f.s.down_reason, "event loop made no progress"));
        fprintf(stderr,
                "  stalled peer loop declared lost %" PRIu64
                " ms after up (beats stopped at 500 ms; window 2000 ms)\n",
                elapsed / 1000);
        ASSERT_TRUE(elapsed >= 2400 * 1000 && elapsed < 4500 * 1000);
        safe_close(fd);
        fixture_done(&f);
}

TEST(patience)
{
        /* Lost after about 600 ms, not after the 150 ms heartbeat window. */
        silent_peer_lost_within(600, 400, 2000);
}

TEST(handshake_timeout)
{
        uint64_t start;
        Fixture f;
        int fd;

        fixture_init(&f, SECRET, sizeof(SECRET));
        f.sp.handshake_timeout_ms = 100;
        start = now_usec();
        fd = raw_connect(&f);
        ASSERT_TRUE(RUN_UNTIL(f.e, f.s.downs == 1, 2000));
        ASSERT_EQ(f.s.down_error, -ETIMEDOUT);
        ASSERT_TRUE(now_usec() - start >= 90 * 1000);
        ASSERT_TRUE(strstr(f.s.down_reason, "handshake"));
        safe_close(fd);
        fixture_done(&f);
}

TEST(free_from_callback)
{
        Fixture f;

        fixture_init(&f, SECRET, sizeof(SECRET));
        f.p.free_on_down = &f.primary;
        f.s.free_on_down = &f.standby;
        primary_connect(&f, WRONG, sizeof(WRONG), NULL);
        ASSERT_TRUE(RUN_UNTIL(f.e, f.p.downs == 1 && f.s.downs == 1, 3000));
        ASSERT_TRUE(!f.primary && !f.standby);
        RUN_UNTIL(f.e, false, 50);
        fixture_done(&f);
}

TEST(connect_refused)
{
        Fixture f;

        fixture_init(&f, SECRET, sizeof(SECRET));
        f.ll = link_listener_free(f.ll); /* the port is closed now */
        primary_connect(&f, SECRET, sizeof(SECRET), NULL);
        ASSERT_TRUE(RUN_UNTIL(f.e, f.p.downs == 1, 2000));
        ASSERT_EQ(f.p.down_error, -ECONNREFUSED);
        fixture_done(&f);
}

/* ---- pre-authentication limits: several standby Links on one listener ---------------- */

typedef struct Many {
        Fixture *f;
        Link *links[8];
        Side sides[8];
        unsigned n;
} Many;

static int many_on_accept(LinkListener *ll, int fd, const char *peer, void *userdata)
{
        Many *m = userdata;
        LinkParams p = m->f->sp;

        ASSERT_TRUE(m->n < ELEMENTSOF(m->links));
        p.peer_name = peer;
        p.listener = ll;
        ASSERT_OK(link_accept(m->f->e, fd, &p, &standby_cb, &m->sides[m->n], &m->links[m->n]));
        m->n++;
        return 0;
}

static void many_init(Fixture *f, Many *m, unsigned max_pending)
{
        struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};

        fixture_init(f, SECRET, sizeof(SECRET));
        raw_reset();
        memset(m, 0, sizeof(*m));
        m->f = f;
        f->ll = link_listener_free(f->ll);
        ASSERT_OK(link_listener_new(f->e, (struct sockaddr *) &sin, sizeof(sin), max_pending, many_on_accept,
                                    m, &f->ll));
        ASSERT_OK(link_listener_address(f->ll, &f->addr, &f->addr_len));
}

static void many_done(Fixture *f, Many *m)
{
        for (unsigned i = 0; i < m->n; i++)
                m->links[i] = link_free(m->links[i]);
        fixture_done(f);
}

/* Connects from 127.0.0.<host> and waits until the listener took it. */
static int connect_from(Fixture *f, Many *m, unsigned host)
{
        struct sockaddr_in src = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000000u | host)};
        unsigned before = m->n;
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

        ASSERT_TRUE(fd >= 0);
        ASSERT_OK(RET_NERRNO(bind(fd, (struct sockaddr *) &src, sizeof(src))));
        ASSERT_OK(RET_NERRNO(connect(fd, (struct sockaddr *) &f->addr, f->addr_len)));
        ASSERT_TRUE(RUN_UNTIL(f->e, m->n == before + 1, 2000));
        return fd;
}

/* Connects from 127.0.0.<host> without waiting for the listener to take it. */
static int connect_raw_from(Fixture *f, unsigned host)
{
        struct sockaddr_in src = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000000u | host)};
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

        ASSERT_TRUE(fd >= 0);
        ASSERT_OK(RET_NERRNO(bind(fd, (struct sockaddr *) &src, sizeof(src))));
        ASSERT_OK(RET_NERRNO(connect(fd, (struct sockaddr *) &f->addr, f->addr_len)));
        return fd;
}

static bool closed_by_peer(int fd)
{
        char c;
        ssize_t n = recv(fd, &c, 1, MSG_DONTWAIT);
        return n == 0 || (n < 0 && errno == ECONNRESET);
}

TEST(listener_evicts_oldest_silent)
{
        uint8_t nonce[32];
        Fixture f;
        Many m;
        int fd[5];

        /* Two silent strangers fill max_pending = 2; the partner still gets in, and keeps its slot
         * when the next stranger comes: it has spoken, they have not. */
        many_init(&f, &m, 2);
        fd[0] = connect_from(&f, &m, 2);
        fd[1] = connect_from(&f, &m, 3);
        fd[2] = connect_from(&f, &m, 1);
        ASSERT_TRUE(RUN_UNTIL(f.e, closed_by_peer(fd[0]), 2000));
        ASSERT_EQ(link_state(m.links[0]), LINK_DOWN);
        ASSERT_TRUE(link_preauth_dropped(m.links[0]));
        ASSERT_TRUE(strstr(m.sides[0].down_reason, "dropped before authentication"));
        f.standby = NULL;
        raw_hello(&f, fd[2], REPL_VERSION, nonce);
        ASSERT_TRUE(RUN_UNTIL(f.e, m.sides[2].hellos == 1, 2000));
        fd[3] = connect_from(&f, &m, 4);
        ASSERT_TRUE(RUN_UNTIL(f.e, closed_by_peer(fd[1]), 2000));
        ASSERT_EQ(link_state(m.links[1]), LINK_DOWN);
        ASSERT_EQ(link_state(m.links[2]), LINK_HANDSHAKE); /* the one that spoke */
        ASSERT_EQ(link_state(m.links[3]), LINK_HANDSHAKE);
        ASSERT_EQ(m.sides[2].downs, 0u);
        /* All taken, and 127.0.0.4 holds one: its next connection waits its turn (closed at once,
         * no Link), instead of evicting one more. */
        fd[4] = connect_raw_from(&f, 4);
        ASSERT_TRUE(RUN_UNTIL(f.e, closed_by_peer(fd[4]), 2000));
        ASSERT_EQ(m.n, 4u);
        ASSERT_EQ(link_state(m.links[2]), LINK_HANDSHAKE);
        ASSERT_EQ(link_state(m.links[3]), LINK_HANDSHAKE);
        for (unsigned i = 0; i < 5; i++)
                safe_close(fd[i]);
        many_done(&f, &m);
}

TEST(listener_per_source_cap)
{
        Fixture f;
        Many m;
        int fd[4];

        /* Room for 8, but one address gets 2: its third connection is closed at once, before a
         * Link exists; the two it has stay, and another address is not affected. */
        many_init(&f, &m, 8);
        fd[0] = connect_from(&f, &m, 2);
        fd[1] = connect_from(&f, &m, 5);
        fd[2] = connect_from(&f, &m, 2);
        fd[3] = connect_raw_from(&f, 2);
        ASSERT_TRUE(RUN_UNTIL(f.e, closed_by_peer(fd[3]), 2000));
        ASSERT_EQ(m.n, 3u);
        ASSERT_EQ(link_state(m.links[0]), LINK_HANDSHAKE);
        ASSERT_EQ(link_state(m.links[1]), LINK_HANDSHAKE);
        ASSERT_EQ(link_state(m.links[2]), LINK_HANDSHAKE);
        for (unsigned i = 0; i < 4; i++)
                safe_close(fd[i]);
        many_done(&f, &m);
}

TEST(listener_first_bytes_deadline)
{
        uint64_t start, elapsed;
        Fixture f;
        Many m;
        int fd;

        /* A connection that says nothing is closed after 1 s, long before the 2 s handshake
         * timeout of this fixture. */
        many_init(&f, &m, 4);
        start = now_usec();
        fd = connect_from(&f, &m, 7);
        ASSERT_TRUE(RUN_UNTIL(f.e, m.sides[0].downs == 1, 3000));
        elapsed = now_usec() - start;
        fprintf(stderr, "  silent connection closed after %" PRIu64 " ms: %s\n", elapsed / 1000,
                m.sides[0].down_reason);
        ASSERT_EQ(m.sides[0].down_error, -ETIMEDOUT);
        ASSERT_TRUE(strstr(m.sides[0].down_reason, "sent nothing"));
        ASSERT_TRUE(link_preauth_dropped(m.links[0]));
        ASSERT_TRUE(elapsed >= 900 * 1000 && elapsed < 1900 * 1000);
        ASSERT_TRUE(RUN_UNTIL(f.e, closed_by_peer(fd), 1000));
        safe_close(fd);
        many_done(&f, &m);
}

/* ---- a busy link and another VM's listener on the same loop ---------------------------- */

typedef struct Streamer {
        Link *l;
        bool stop;
        bool done; /* set (release) when the thread no longer touches l */
        unsigned sent;
} Streamer;

static void *streamer_main(void *userdata)
{
        Streamer *st = userdata;
        static uint8_t payload[1 << 20];

        while (!__atomic_load_n(&st->stop, __ATOMIC_ACQUIRE) &&
               link_send(st->l, DR__REPL__FRAME_TYPE__FRAME_PAGES, payload, sizeof(payload), true) >= 0)
                st->sent++;
        __atomic_store_n(&st->done, true, __ATOMIC_RELEASE);
        return NULL;
}

static int count_accept(LinkListener *ll, int fd, const char *peer, void *userdata)
{
        (*(unsigned *) userdata)++;
        safe_close(fd);
        return 0;
}

TEST(listener_served_while_a_link_streams)
{
        struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        struct sockaddr_storage addr2;
        socklen_t addr2_len;
        LinkListener *ll2 = NULL;
        unsigned accepted = 0;
        Streamer st = {};
        pthread_t th;
        uint64_t start;
        Fixture f;
        bool ok;
        int fd;

        /* One daemon loop serves every VM: while one VM's standby applies a full sync (its socket
         * never runs dry), another VM's listener must still take its primary's connection, or
         * that primary times out its handshake and its VM stays unprotected (or suspended) for
         * as long as the sync lasts. */
        fixture_init(&f, SECRET, sizeof(SECRET));
        primary_connect(&f, SECRET, sizeof(SECRET), NULL);
        ASSERT_TRUE(RUN_UNTIL(f.e, f.p.ups && f.s.ups, 2000));
        ASSERT_OK(link_listener_new(f.e, (struct sockaddr *) &sin, sizeof(sin), 4, count_accept, &accepted,
                                    &ll2));
        ASSERT_OK(link_listener_address(ll2, &addr2, &addr2_len));

        frame_work_us = 5000;
        st.l = f.primary;
        ASSERT_EQ(pthread_create(&th, NULL, streamer_main, &st), 0);
        (void) RUN_UNTIL(f.e, false, 300);
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        ASSERT_TRUE(fd >= 0);
        ASSERT_OK(RET_NERRNO(connect(fd, (struct sockaddr *) &addr2, addr2_len)));
        start = now_usec();
        ok = RUN_UNTIL(f.e, accepted > 0, 2000);
        fprintf(stderr, "  other listener %s after %" PRIu64 " ms (%u frames of 1 MiB streamed)\n",
                ok ? "took the connection" : "did not take the connection", (now_usec() - start) / 1000,
                st.sent);
        __atomic_store_n(&st.stop, true, __ATOMIC_RELEASE);
        frame_work_us = 0;
        /* A sending thread must be gone before link_free() (the daemon stops its epoch thread
         * first): the loop drains the queue until a blocked send returns and the thread sees stop.
         * (Freeing first let a send that had not reached the queue yet touch the freed Link:
         * ASan in CI.) */
        ASSERT_TRUE(RUN_UNTIL(f.e, __atomic_load_n(&st.done, __ATOMIC_ACQUIRE), 10000));
        ASSERT_EQ(pthread_join(th, NULL), 0);
        f.primary = link_free(f.primary);
        safe_close(fd);
        ll2 = link_listener_free(ll2);
        fixture_done(&f);
        ASSERT_TRUE(ok);
        ASSERT_TRUE(f.s.downs + f.p.downs <= 1);
}

/* ---- back-pressure: a raw standby that stops reading -------------------------------- */

typedef struct Sender {
        Link *l;
        int r;
        bool done;
} Sender;

static void *sender_main(void *userdata)
{
        Sender *s = userdata;
        static uint8_t payload[65536];
        s->r = link_send(s->l, DR__REPL__FRAME_TYPE__FRAME_PAGES, payload, sizeof(payload), true);
        __atomic_store_n(&s->done, true, __ATOMIC_RELEASE);
        return NULL;
}

/* A primary up against a raw standby that then never reads again. */
static int stalled_setup(Fixture *f, int *ret_listen_fd)
{
        struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        Dr__Repl__Challenge c = DR__REPL__CHALLENGE__INIT;
        Dr__Repl__Welcome w = DR__REPL__WELCOME__INIT;
        uint8_t buf[4096], snonce[32], proof[32];
        socklen_t sl = sizeof(sin);
        Dr__Repl__Hello *h;
        Dr__Repl__Auth *a;
        LinkParams p = {
                .side = LINK_PRIMARY,
                .secret = SECRET,
                .secret_len = sizeof(SECRET),
                .heartbeat_ms = 1000,
                .heartbeat_misses = 30,
                .send_queue_limit = 1 << 20,
        };
        uint16_t type;
        size_t len;
        int lfd, fd;

        fixture_init(f, SECRET, sizeof(SECRET));
        raw_reset();
        lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        ASSERT_TRUE(lfd >= 0);
        ASSERT_OK(RET_NERRNO(bind(lfd, (struct sockaddr *) &sin, sizeof(sin))));
        ASSERT_OK(RET_NERRNO(listen(lfd, 1)));
        ASSERT_OK(RET_NERRNO(getsockname(lfd, (struct sockaddr *) &f->addr, &sl)));
        f->addr_len = sl;
        primary_connect(f, SECRET, sizeof(SECRET), &p);
        fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        ASSERT_TRUE(fd >= 0);

        len = raw_recv(f->e, fd, &type, buf, sizeof(buf));
        ASSERT_EQ(type, DR__REPL__FRAME_TYPE__FRAME_HELLO);
        h = dr__repl__hello__unpack(NULL, len, buf);
        ASSERT_TRUE(h && h->nonce.len == 32 && h->version == REPL_VERSION);
        ASSERT_EQ(getrandom(snonce, 32, 0), 32);
        ASSERT_OK(link_proof(SECRET, sizeof(SECRET), "dirtyrep-standby", h->nonce.data, snonce, "vm0", UUID,
                             NULL, 0, proof));
        c.nonce = (ProtobufCBinaryData){32, snonce};
        c.proof = (ProtobufCBinaryData){32, proof};
        raw_send_message(fd, DR__REPL__FRAME_TYPE__FRAME_CHALLENGE, &c.base);
        len = raw_recv(f->e, fd, &type, buf, sizeof(buf));
        ASSERT_EQ(type, DR__REPL__FRAME_TYPE__FRAME_AUTH);
        a = dr__repl__auth__unpack(NULL, len, buf);
        ASSERT_TRUE(a && a->proof.len == 32);
        ASSERT_OK(link_proof(SECRET, sizeof(SECRET), "dirtyrep-primary", snonce, h->nonce.data, "vm0", UUID,
                             NULL, 0, proof));
        /* The raw standby's frames from WELCOME on are keyed, as the primary's after AUTH. */
        raw_keys(h->nonce.data, snonce, LINK_STANDBY);
        ASSERT_TRUE(memcmp(proof, a->proof.data, 32) == 0);
        dr__repl__auth__free_unpacked(a, NULL);
        dr__repl__hello__free_unpacked(h, NULL);
        raw_send_message(fd, DR__REPL__FRAME_TYPE__FRAME_WELCOME, &w.base);
        ASSERT_TRUE(RUN_UNTIL(f->e, f->p.ups == 1, 2000));
        *ret_listen_fd = lfd;
        return fd;
}

/* Fills the kernel buffers and the queue until non-blocking sends keep failing. */
static void fill_until_full(Link *l)
{
        static uint8_t payload[65536];
        unsigned again = 0;
        uint64_t total = 0;
        LinkStats st;

        while (again < 40) {
                int r = link_send(l, DR__REPL__FRAME_TYPE__FRAME_PAGES, payload, sizeof(payload), false);
                if (r == -EAGAIN) {
                        again++;
                        usleep(5000);
                        continue;
                }
                ASSERT_OK(r);
                again = 0;
                total += sizeof(payload);
                ASSERT_TRUE(total < (512ull << 20)); /* the peer does not read: this must end */
        }
        link_get_stats(l, &st);
        fprintf(stderr,
                "  queue full after %" PRIu64 " MiB: %" PRIu64 " bytes queued, high water %" PRIu64 "\n",
                total >> 20, st.queued_bytes, st.queue_high_water);
        /* Memory bounded: the limit plus at most one frame. */
        ASSERT_TRUE(st.queue_high_water <= (1u << 20) + sizeof(payload) + FRAME_HEADER_SIZE + 1024);
        ASSERT_TRUE(st.queued_bytes >= (1u << 20) - sizeof(payload) - 2 * FRAME_HEADER_SIZE);
}

TEST(backpressure_then_down)
{
        Sender s = {};
        pthread_t t;
        Fixture f;
        int lfd, fd;

        fd = stalled_setup(&f, &lfd);
        fill_until_full(f.primary);

        s.l = f.primary;
        ASSERT_EQ(pthread_create(&t, NULL, sender_main, &s), 0);
        usleep(100 * 1000);
        ASSERT_TRUE(!__atomic_load_n(&s.done, __ATOMIC_ACQUIRE)); /* blocked at the limit */

        link_fail(f.primary, -ECANCELED, "test stops the link");
        ASSERT_EQ(pthread_join(t, NULL), 0);
        ASSERT_EQ(s.r, -ENOTCONN);
        ASSERT_EQ(f.p.down_error, -ECANCELED);
        ASSERT_EQ(link_send(f.primary, DR__REPL__FRAME_TYPE__FRAME_PAGES, "x", 1, true), -ENOTCONN);
        safe_close(fd);
        safe_close(lfd);
        fixture_done(&f);
}

TEST(free_with_blocked_sender)
{
        Sender s = {};
        pthread_t t;
        Fixture f;
        int lfd, fd;
        uint64_t start;

        fd = stalled_setup(&f, &lfd);
        fill_until_full(f.primary);

        s.l = f.primary;
        ASSERT_EQ(pthread_create(&t, NULL, sender_main, &s), 0);
        usleep(100 * 1000);
        ASSERT_TRUE(!__atomic_load_n(&s.done, __ATOMIC_ACQUIRE));

        start = now_usec();
        f.primary = link_free(f.primary); /* the writer is stuck on a full socket too */
        ASSERT_EQ(pthread_join(t, NULL), 0);
        ASSERT_EQ(s.r, -ENOTCONN);
        ASSERT_TRUE(now_usec() - start < USEC_PER_SEC);
        ASSERT_EQ(f.p.downs, 0); /* link_free() does not call back */
        safe_close(fd);
        safe_close(lfd);
        fixture_done(&f);
}

DEFINE_TEST_MAIN
