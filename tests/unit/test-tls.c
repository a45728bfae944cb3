/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * TLS on the replication link: the context built from files (daemon/tls.c,
 * every error names the file) and Links in TLS over real TCP sockets on
 * 127.0.0.1, one sd-event loop driving both ends: frames intact, a
 * certificate from another CA or with another name refused on both sides,
 * plaintext against TLS refused both ways with a message that says so.
 * Certificates are made with the openssl command in a temporary directory
 * (exit 77 without it).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <signal.h>
#include <stdio.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <systemd/sd-event.h>
#include <unistd.h>

#include "config.h"
#include "crc32c.h"
#include "link.h"
#include "macros.h"
#include "tests.h"
#include "tls.h"
#include "util.h"

#define RUN_UNTIL(e, cond, ms)                                                                              \
        ({                                                                                                  \
                uint64_t _end = now_usec() + (uint64_t) (ms) *1000u;                                        \
                while (!(cond) && now_usec() < _end)                                                        \
                        ASSERT_TRUE(sd_event_run((e), 5000) >= 0);                                          \
                (cond);                                                                                     \
        })

static const uint8_t SECRET[] = "correct horse battery staple";
static const uint8_t UUID[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
static char dir[] = "/tmp/dr-test-tls-XXXXXX";

static const char *path(const char *name)
{
        static char buf[4][256];
        static unsigned k;
        char *p = buf[k++ % 4];
        snprintf(p, 256, "%s/%s", dir, name);
        return p;
}

static void sh(const char *fmt, ...) _printf_(1, 2);
static void sh(const char *fmt, ...)
{
        char cmd[2048];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(cmd, sizeof(cmd), fmt, ap);
        va_end(ap);
        if (system(cmd) != 0) {
                fprintf(stderr, "failed: %s\n", cmd);
                exit(1);
        }
}

/* A CA, and a leaf certificate (SAN DNS:name) signed by it. */
static void make_ca(const char *ca)
{
        sh("cd %s && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "
           "%s.key "
           "-out %s.crt -days 2 -subj '/CN=%s' -addext basicConstraints=critical,CA:TRUE "
           "-addext keyUsage=critical,keyCertSign 2>/dev/null",
           dir, ca, ca, ca);
}

static void make_leaf(const char *name, const char *ca)
{
        sh("cd %s && printf 'subjectAltName=DNS:%s\\nextendedKeyUsage=serverAuth,clientAuth\\n' > %s.ext && "
           "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout %s.key -out %s.csr "
           "-subj '/CN=%s' 2>/dev/null && openssl x509 -req -in %s.csr -CA %s.crt -CAkey %s.key "
           "-CAcreateserial "
           "-out %s.crt -days 2 -extfile %s.ext 2>/dev/null && chmod 600 %s.key",
           dir, name, name, name, name, name, name, ca, ca, name, name, name);
}

static void cleanup(void)
{
        char cmd[300];
        snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
        (void) !system(cmd);
}

static void setup(void)
{
        static bool done;
        if (done)
                return;
        done = true;
        if (system("openssl version >/dev/null 2>&1") != 0) {
                printf("SKIP: no openssl command\n");
                exit(77);
        }
        ASSERT_TRUE(mkdtemp(dir));
        atexit(cleanup);
        make_ca("ca1");
        make_ca("ca2");
        make_leaf("primary.test", "ca1");
        make_leaf("standby.test", "ca1");
}

static SSL_CTX *ctx_new(const char *name, const char *ca, const char *peer)
{
        char cert[256], key[256], cafile[256], *err = NULL;
        SSL_CTX *c = NULL;
        int r;

        snprintf(cert, sizeof(cert), "%s/%s.crt", dir, name);
        snprintf(key, sizeof(key), "%s/%s.key", dir, name);
        snprintf(cafile, sizeof(cafile), "%s/%s.crt", dir, ca);
        r = tls_context_new(&(TlsFiles){cert, key, cafile, peer}, &c, &err);
        if (r < 0)
                fprintf(stderr, "tls_context_new: %s\n", err);
        ASSERT_OK(r);
        ASSERT_TRUE(c && !err);
        return c;
}

/* Expects tls_context_new() to fail with r and a message containing `want`. */
static void ctx_fails(const TlsFiles *f, int r, const char *want)
{
        _cleanup_free_ char *err = NULL;
        SSL_CTX *c = NULL;

        ASSERT_EQ(tls_context_new(f, &c, &err), r);
        ASSERT_TRUE(c == NULL && err);
        fprintf(stderr, "  refused: %s\n", err);
        if (!strstr(err, want)) {
                fprintf(stderr, "\"%s\" not in \"%s\"\n", want, err);
                exit(1);
        }
}

TEST(context_errors_name_the_file)
{
        char big[256];
        int fd;

        setup();
        SSL_CTX_free(ctx_new("primary.test", "ca1", NULL));
        SSL_CTX_free(ctx_new("standby.test", "ca1", "primary.test"));

        ctx_fails(&(TlsFiles){path("absent.crt"), path("primary.test.key"), path("ca1.crt"), NULL}, -ENOENT,
                  "absent.crt: cannot open TLS certificate file: No such file or directory");
        ctx_fails(&(TlsFiles){path("primary.test.crt"), path("absent.key"), path("ca1.crt"), NULL}, -ENOENT,
                  "absent.key: cannot open TLS key file");
        ctx_fails(&(TlsFiles){path("primary.test.crt"), path("primary.test.key"), dir, NULL}, -EBADFD,
                  "TLS CA file is not a regular file");

        sh("cp %s/primary.test.key %s/open.key && chmod 644 %s/open.key", dir, dir, dir);
        ctx_fails(&(TlsFiles){path("primary.test.crt"), path("open.key"), path("ca1.crt"), NULL}, -EPERM,
                  "open.key: TLS key file has mode 0644, must not be accessible by others");
        ctx_fails(&(TlsFiles){path("primary.test.crt"), path("standby.test.key"), path("ca1.crt"), NULL},
                  -EINVAL, "standby.test.key: the key does not match the certificate in");
        ctx_fails(&(TlsFiles){path("primary.test.key"), path("primary.test.key"), path("ca1.crt"), NULL},
                  -EINVAL, "primary.test.key: no PEM certificate in the TLS certificate file");
        ctx_fails(&(TlsFiles){path("primary.test.crt"), path("primary.test.crt"), path("ca1.crt"), NULL},
                  -EPERM, "must not be accessible by others"); /* a certificate is 0644 */
        sh("cp %s/primary.test.crt %s/cert-as-key && chmod 600 %s/cert-as-key", dir, dir, dir);
        ctx_fails(&(TlsFiles){path("primary.test.crt"), path("cert-as-key"), path("ca1.crt"), NULL}, -EINVAL,
                  "cert-as-key: no unencrypted PEM private key");
        ctx_fails(&(TlsFiles){path("primary.test.crt"), path("primary.test.key"), path("primary.test.ext"),
                              NULL},
                  -EINVAL, "primary.test.ext: no PEM certificate in the TLS CA file");
        sh(": > %s/empty.crt", dir);
        ctx_fails(&(TlsFiles){path("primary.test.crt"), path("primary.test.key"), path("empty.crt"), NULL},
                  -ENODATA, "empty.crt: TLS CA file is empty");

        /* The size cap holds before anything is read into memory. */
        snprintf(big, sizeof(big), "%s/big.crt", dir);
        fd = open(big, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        ASSERT_TRUE(fd >= 0);
        ASSERT_OK(ftruncate(fd, TLS_FILE_MAX + 1));
        close(fd);
        ctx_fails(&(TlsFiles){big, path("primary.test.key"), path("ca1.crt"), NULL}, -EFBIG,
                  "TLS certificate file is larger than 1048576 bytes");
}

/* ---- configuration: TLS keys, errors with file:line ------------------------------------------ */

#define VM_PATH     "/etc/dirtyrep/vm.d/web.conf"
#define PRIMARY_MIN "[VM]\nRole=primary\nPeer=192.0.2.1:7000\nSecretFile=/etc/dirtyrep/web.key\n"

static void assert_vm_error(const char *text, const char *expected)
{
        _cleanup_free_ char *errors = NULL;
        VmConfig *v = NULL;

        ASSERT_EQ(config_parse_vm_file(VM_PATH, "web", text, strlen(text), &v, &errors), -EINVAL);
        ASSERT_TRUE(!v && errors);
        if (strcmp(errors, expected) != 0) {
                fprintf(stderr, "got:      %s\nexpected: %s\n", errors, expected);
                exit(1);
        }
}

TEST(config_tls_keys)
{
        static const char text[] =
                PRIMARY_MIN "TLS=yes\nTLSCertificateFile=/etc/dirtyrep/tls/web.crt\n"
                            "TLSKeyFile=/etc/dirtyrep/tls/web.key\nTLSCAFile=/etc/dirtyrep/tls/ca.crt\n"
                            "TLSPeerName=standby-1.example.org\n";
        _cleanup_(vm_config_freep) VmConfig *v = NULL, *w = NULL, *d = NULL;
        _cleanup_free_ char *errors = NULL;

        ASSERT_OK(config_parse_vm_file(VM_PATH, "web", PRIMARY_MIN, strlen(PRIMARY_MIN), &d, &errors));
        ASSERT_TRUE(!d->tls && !d->tls_cert_file && !d->tls_key_file && !d->tls_ca_file &&
                    !d->tls_peer_name);

        ASSERT_OK(config_parse_vm_file(VM_PATH, "web", text, strlen(text), &v, &errors));
        ASSERT_TRUE(v->tls);
        ASSERT_TRUE(streq(v->tls_cert_file, "/etc/dirtyrep/tls/web.crt"));
        ASSERT_TRUE(streq(v->tls_key_file, "/etc/dirtyrep/tls/web.key"));
        ASSERT_TRUE(streq(v->tls_ca_file, "/etc/dirtyrep/tls/ca.crt"));
        ASSERT_TRUE(streq(v->tls_peer_name, "standby-1.example.org"));
        ASSERT_TRUE(!vm_config_equal(v, d)); /* a reload restarts a VM whose TLS changed */
        ASSERT_OK(config_parse_vm_file(VM_PATH, "web", text, strlen(text), &w, &errors));
        ASSERT_TRUE(vm_config_equal(v, w));
        free(w->tls_ca_file);
        w->tls_ca_file = strdup("/etc/dirtyrep/tls/other-ca.crt");
        ASSERT_TRUE(!vm_config_equal(v, w));

        /* TLS=yes needs all three files; the error is on the TLS= line. */
        assert_vm_error(PRIMARY_MIN "TLS=yes\n", VM_PATH ":5: TLS=yes requires TLSCertificateFile=");
        assert_vm_error(PRIMARY_MIN "TLSCertificateFile=/a.crt\nTLS=yes\nTLSCAFile=/ca.crt\n",
                        VM_PATH ":6: TLS=yes requires TLSKeyFile=");
        assert_vm_error(PRIMARY_MIN "TLS=yes\nTLSCertificateFile=/a.crt\nTLSKeyFile=/a.key\nTLSCAFile=\n",
                        VM_PATH ":5: TLS=yes requires TLSCAFile=");
        /* A bad value is reported once, where it is, not again as missing. */
        assert_vm_error(PRIMARY_MIN
                        "TLS=yes\nTLSCertificateFile=a.crt\nTLSKeyFile=/a.key\nTLSCAFile=/ca.crt\n",
                        VM_PATH ":6: TLSCertificateFile=a.crt: must be an absolute path");
        assert_vm_error(PRIMARY_MIN "TLS=maybe\n", VM_PATH ":5: TLS=maybe: must be yes or no");
        assert_vm_error(PRIMARY_MIN "TLSKeyFile=/etc/../key\n", VM_PATH
                        ":5: TLSKeyFile=/etc/../key: path must not contain \".\" or \"..\" components");
        assert_vm_error(PRIMARY_MIN "TLSPeerName=bad_name\n", VM_PATH
                        ":5: TLSPeerName=bad_name: not a DNS name (labels of A-Z a-z 0-9 -, at most 63 "
                        "bytes each, 253 in all)");
        assert_vm_error(PRIMARY_MIN "TLSPeerName=a..b\n",
                        VM_PATH ":5: TLSPeerName=a..b: not a DNS name (labels of A-Z a-z 0-9 -, at most 63 "
                                "bytes each, 253 in all)");
        assert_vm_error(PRIMARY_MIN "tlskeyfile=/k\n",
                        VM_PATH ":5: unknown key tlskeyfile= in section [VM], did you mean TLSKeyFile=?");
}

TEST(config_tls_command_line)
{
        _cleanup_(config_freep) Config *c = NULL;
        _cleanup_free_ char *errors = NULL;
        char *half[] = {"Role=standby", "Listen=127.0.0.1:7000", "SecretFile=/s", "TLS=yes",
                        "TLSCertificateFile=/a.crt"};
        char *full[] = {"Role=standby",     "Listen=127.0.0.1:7000",     "SecretFile=/s",
                        "TLS=yes",          "TLSCertificateFile=/a.crt", "TLSKeyFile=/a.key",
                        "TLSCAFile=/ca.crt"};
        const VmConfig *v;

        ASSERT_OK(config_load(NULL, NULL, &c, &errors));
        ASSERT_EQ(config_apply_vm_settings(c, "web", half, ELEMENTSOF(half), "command line (--vm web)",
                                           &errors),
                  -EINVAL);
        ASSERT_TRUE(errors && streq(errors, "command line (--vm web): TLS=yes requires TLSKeyFile="));
        ASSERT_OK(
                config_apply_vm_settings(c, "web", full, ELEMENTSOF(full), "command line (--vm web)", NULL));
        v = config_find_vm(c, "web");
        ASSERT_TRUE(v && v->tls && streq(v->tls_key_file, "/a.key") && streq(v->tls_ca_file, "/ca.crt"));
}

/* ---- Links in TLS ------------------------------------------------------------------------ */

typedef struct Side {
        unsigned ups, downs, frames;
        int down_error;
        char down_reason[512];
        uint32_t last_crc, last_len;
} Side;

typedef struct Fixture {
        sd_event *e;
        LinkListener *ll;
        struct sockaddr_storage addr;
        socklen_t addr_len;
        SSL_CTX *standby_tls;
        Link *standby, *primary;
        Side s, p;
        uint8_t session[16];
} Fixture;

static int on_up(Link *l, const Dr__Repl__Welcome *w, void *userdata)
{
        ((Side *) userdata)->ups++;
        return 0;
}

static int on_frame(Link *l, uint16_t type, const uint8_t *payload, size_t len, void *userdata)
{
        Side *s = userdata;
        s->frames++;
        s->last_len = (uint32_t) len;
        s->last_crc = crc32c(0, payload, len);
        return 0;
}

static void on_down(Link *l, int error, const char *reason, void *userdata)
{
        Side *s = userdata;
        s->downs++;
        s->down_error = error;
        snprintf(s->down_reason, sizeof(s->down_reason), "%s", reason);
        fprintf(stderr, "  down (%d): %s\n", error, reason);
}

static const LinkCallbacks cb = {.on_up = on_up, .on_frame = on_frame, .on_down = on_down};

static int on_accept(LinkListener *ll, int fd, const char *peer, void *userdata)
{
        Fixture *f = userdata;
        LinkParams p = {
                .side = LINK_STANDBY,
                .secret = SECRET,
                .secret_len = sizeof(SECRET),
                .heartbeat_ms = 20,
                .heartbeat_misses = 50,
                .handshake_timeout_ms = 3000,
                .peer_name = peer,
                .listener = ll,
                .tls = f->standby_tls,
        };
        ASSERT_TRUE(!f->standby);
        ASSERT_OK(link_accept(f->e, fd, &p, &cb, &f->s, &f->standby));
        return 0;
}

/* A standby (TLS when standby_tls) and a primary (TLS when primary_tls) on loopback; runs the loop
 * until both are up or both went down. Takes the contexts. */
static void run_pair(Fixture *f, SSL_CTX *standby_tls, SSL_CTX *primary_tls)
{
        struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        Dr__Repl__Hello h = DR__REPL__HELLO__INIT;

        memset(f, 0, sizeof(*f));
        f->standby_tls = standby_tls;
        ASSERT_OK(sd_event_new(&f->e));
        ASSERT_OK(link_listener_new(f->e, (struct sockaddr *) &sin, sizeof(sin), 4, on_accept, f, &f->ll));
        ASSERT_OK(link_listener_address(f->ll, &f->addr, &f->addr_len));
        ASSERT_EQ(getrandom(f->session, sizeof(f->session), 0), sizeof(f->session));
        h.vm_name = (char *) "vm0";
        h.vm_uuid = (ProtobufCBinaryData){16, (uint8_t *) UUID};
        h.session = (ProtobufCBinaryData){16, f->session};
        h.page_size = 4096;
        ASSERT_OK(link_connect(f->e, (struct sockaddr *) &f->addr, f->addr_len,
                               &(LinkParams){.side = LINK_PRIMARY,
                                             .secret = SECRET,
                                             .secret_len = sizeof(SECRET),
                                             .heartbeat_ms = 20,
                                             .heartbeat_misses = 50,
                                             .handshake_timeout_ms = 3000,
                                             .hello = &h,
                                             .tls = primary_tls},
                               &cb, &f->p, &f->primary));
        SSL_CTX_free(primary_tls); /* the Link holds its own reference */
        (void) RUN_UNTIL(f->e, (f->p.ups && f->s.ups) || (f->p.downs && f->s.downs), 5000);
}

static void fixture_done(Fixture *f)
{
        f->primary = link_free(f->primary);
        f->standby = link_free(f->standby);
        f->ll = link_listener_free(f->ll);
        SSL_CTX_free(f->standby_tls);
        f->e = sd_event_unref(f->e);
}

static void assert_reason(const Side *s, const char *want)
{
        if (!strstr(s->down_reason, want)) {
                fprintf(stderr, "\"%s\" not in \"%s\"\n", want, s->down_reason);
                exit(1);
        }
}

TEST(link_over_tls)
{
        size_t sizes[] = {0, 1, 16383, 16384, 16385, 100000, 4u << 20};
        _cleanup_free_ uint8_t *buf = malloc(4u << 20);
        Fixture f;

        setup();
        ASSERT_TRUE(buf);
        for (size_t i = 0; i < (4u << 20); i++)
                buf[i] = (uint8_t) (i * 2654435761u >> 13);
        run_pair(&f, ctx_new("standby.test", "ca1", "primary.test"),
                 ctx_new("primary.test", "ca1", "standby.test"));
        ASSERT_EQ(f.p.ups, 1);
        ASSERT_EQ(f.s.ups, 1);
        /* Frames of sizes around the TLS record size, and a large one, arrive intact and in order;
         * many small ones share records. */
        for (size_t i = 0; i < ELEMENTSOF(sizes); i++) {
                unsigned before = f.s.frames;
                ASSERT_OK(link_send(f.primary, DR__REPL__FRAME_TYPE__FRAME_PAGES, buf, sizes[i], true));
                ASSERT_TRUE(RUN_UNTIL(f.e, f.s.frames == before + 1, 5000));
                ASSERT_EQ(f.s.last_len, sizes[i]);
                ASSERT_EQ(f.s.last_crc, crc32c(0, buf, sizes[i]));
        }
        for (unsigned i = 0; i < 1000; i++)
                ASSERT_OK(link_send(f.primary, DR__REPL__FRAME_TYPE__FRAME_PAGES, buf + i, 40, true));
        ASSERT_TRUE(RUN_UNTIL(f.e, f.s.frames == ELEMENTSOF(sizes) + 1000, 5000));
        ASSERT_EQ(f.s.last_crc, crc32c(0, buf + 999, 40));
        /* And acks the other way. */
        ASSERT_OK(link_send(f.standby, DR__REPL__FRAME_TYPE__FRAME_ACK, buf, 10, true));
        ASSERT_TRUE(RUN_UNTIL(f.e, f.p.frames == 1, 5000));
        ASSERT_EQ(f.p.downs + f.s.downs, 0);
        /* A clean close (close_notify) reads as a closed connection. */
        f.primary = link_free(f.primary);
        ASSERT_TRUE(RUN_UNTIL(f.e, f.s.downs == 1, 5000));
        ASSERT_EQ(f.s.down_error, -ECONNRESET);
        fixture_done(&f);
}

TEST(link_tls_peer_gone_no_sigpipe)
{
        _cleanup_free_ uint8_t *buf = calloc(1, 1u << 20);
        Fixture f;

        setup();
        ASSERT_TRUE(buf);
        /* SIGPIPE keeps its default action here: a write() to the dead peer would kill the test. */
        ASSERT_TRUE(signal(SIGPIPE, SIG_DFL) != SIG_ERR);
        run_pair(&f, ctx_new("standby.test", "ca1", NULL), ctx_new("primary.test", "ca1", NULL));
        ASSERT_EQ(f.p.ups, 1);
        f.standby = link_free(f.standby); /* closes the socket with unread data: the primary gets RST */
        usleep(50 * 1000);
        /* The loop does not run: only the writer thread touches the socket, and writes into the reset. */
        for (unsigned i = 0; i < 8; i++)
                (void) link_send(f.primary, DR__REPL__FRAME_TYPE__FRAME_PAGES, buf, 1u << 20, false);
        usleep(300 * 1000);
        ASSERT_TRUE(RUN_UNTIL(f.e, f.p.downs > 0, 5000));
        ASSERT_TRUE(f.p.down_error == -EPIPE || f.p.down_error == -ECONNRESET);
        fixture_done(&f);
}

TEST(link_tls_refusals)
{
        Fixture f;

        setup();
        /* The standby trusts another CA: it refuses the primary, which hears why. */
        run_pair(&f, ctx_new("standby.test", "ca2", NULL), ctx_new("primary.test", "ca1", NULL));
        ASSERT_TRUE(RUN_UNTIL(f.e, f.s.downs && f.p.downs, 5000));
        ASSERT_EQ(f.s.ups + f.p.ups, 0);
        ASSERT_EQ(f.s.down_error, -EKEYREJECTED);
        assert_reason(&f.s, "was refused: unable to get local issuer certificate");
        ASSERT_EQ(f.p.down_error, -EKEYREJECTED);
        assert_reason(&f.p, "refused this side's TLS certificate");
        fixture_done(&f);

        /* The primary trusts another CA: it refuses the standby. */
        run_pair(&f, ctx_new("standby.test", "ca1", NULL), ctx_new("primary.test", "ca2", NULL));
        ASSERT_TRUE(RUN_UNTIL(f.e, f.s.downs && f.p.downs, 5000));
        ASSERT_EQ(f.p.down_error, -EKEYREJECTED);
        assert_reason(&f.p, "was refused: unable to get local issuer certificate");
        assert_reason(&f.s, "refused this side's TLS certificate");
        fixture_done(&f);

        /* Right CA, wrong name. */
        run_pair(&f, ctx_new("standby.test", "ca1", NULL), ctx_new("primary.test", "ca1", "other.test"));
        ASSERT_TRUE(RUN_UNTIL(f.e, f.s.downs && f.p.downs, 5000));
        ASSERT_EQ(f.p.down_error, -EKEYREJECTED);
        assert_reason(&f.p, "was refused: hostname mismatch");
        fixture_done(&f);

        /* Plaintext primary at a TLS standby: both say so, the primary in the standby's words. */
        run_pair(&f, ctx_new("standby.test", "ca1", NULL), NULL);
        ASSERT_TRUE(RUN_UNTIL(f.e, f.s.downs && f.p.downs, 5000));
        ASSERT_EQ(f.s.down_error, -EPROTO);
        assert_reason(&f.s, "speaks plaintext replication, but TLS=yes here");
        assert_reason(&f.p, "this standby requires TLS");
        fixture_done(&f);

        /* TLS primary at a plaintext standby. */
        run_pair(&f, NULL, ctx_new("primary.test", "ca1", NULL));
        ASSERT_TRUE(RUN_UNTIL(f.e, f.s.downs && f.p.downs, 5000));
        assert_reason(&f.s, "started a TLS handshake, but TLS is off for this link here");
        assert_reason(&f.p, "answered in plaintext replication frames: TLS is off there");
        fixture_done(&f);
}

/* ---- a TLS terminator in the middle ------------------------------------------------------ */

/* Holds certificates of the CA for both names (a middlebox that was issued them, or stole
 * them): TLS server to the primary, TLS client to the standby, passing the plaintext on. */
typedef struct Terminator {
        int lfd;
        struct sockaddr_storage target;
        socklen_t target_len;
        SSL_CTX *as_standby, *as_primary;
        bool both_tls_up;
        uint64_t forwarded;
} Terminator;

static bool pump(SSL *from, SSL *to, uint64_t *count)
{
        char buf[16384];
        int n = SSL_read(from, buf, sizeof(buf));
        if (n <= 0 || SSL_write(to, buf, n) != n)
                return false;
        *count += (uint64_t) n;
        return true;
}

static void *terminator_main(void *userdata)
{
        Terminator *t = userdata;
        SSL *a = NULL, *b = NULL;
        int c, u = -1;

        c = accept4(t->lfd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0)
                return NULL;
        a = SSL_new(t->as_standby);
        b = SSL_new(t->as_primary);
        u = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (!a || !b || u < 0 || SSL_set_fd(a, c) != 1 || SSL_accept(a) != 1 ||
            connect(u, (struct sockaddr *) &t->target, t->target_len) < 0 || SSL_set_fd(b, u) != 1 ||
            SSL_connect(b) != 1)
                goto out;
        __atomic_store_n(&t->both_tls_up, true, __ATOMIC_RELEASE);
        for (;;) {
                struct pollfd p[2] = {{.fd = c, .events = POLLIN}, {.fd = u, .events = POLLIN}};
                if (!SSL_pending(a) && !SSL_pending(b) && poll(p, 2, 5000) <= 0)
                        break;
                if ((SSL_pending(a) || p[0].revents) && !pump(a, b, &t->forwarded))
                        break;
                if ((SSL_pending(b) || p[1].revents) && !pump(b, a, &t->forwarded))
                        break;
        }
out:
        SSL_free(a);
        SSL_free(b);
        close(c);
        if (u >= 0)
                close(u);
        return NULL;
}

/* The channel binding: both TLS connections verify, the replication handshake passes through the
 * terminator unchanged, and still the primary refuses the standby's proof (made over the other
 * connection's exporter); nothing goes up on either side. */
TEST(link_tls_terminator_relay_refused)
{
        struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        Dr__Repl__Hello h = DR__REPL__HELLO__INIT;
        struct sockaddr_storage raddr;
        socklen_t rl = sizeof(raddr);
        Terminator t = {};
        pthread_t th;
        Fixture f;

        setup();
        memset(&f, 0, sizeof(f));
        f.standby_tls = ctx_new("standby.test", "ca1", "primary.test");
        ASSERT_OK(sd_event_new(&f.e));
        ASSERT_OK(link_listener_new(f.e, (struct sockaddr *) &sin, sizeof(sin), 4, on_accept, &f, &f.ll));
        ASSERT_OK(link_listener_address(f.ll, &t.target, &t.target_len));
        t.as_standby = ctx_new("standby.test", "ca1", "primary.test");
        t.as_primary = ctx_new("primary.test", "ca1", "standby.test");
        t.lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        ASSERT_TRUE(t.lfd >= 0);
        ASSERT_OK(RET_NERRNO(bind(t.lfd, (struct sockaddr *) &sin, sizeof(sin))));
        ASSERT_OK(RET_NERRNO(listen(t.lfd, 1)));
        ASSERT_OK(RET_NERRNO(getsockname(t.lfd, (struct sockaddr *) &raddr, &rl)));
        ASSERT_EQ(pthread_create(&th, NULL, terminator_main, &t), 0);

        ASSERT_EQ(getrandom(f.session, sizeof(f.session), 0), sizeof(f.session));
        h.vm_name = (char *) "vm0";
        h.vm_uuid = (ProtobufCBinaryData){16, (uint8_t *) UUID};
        h.session = (ProtobufCBinaryData){16, f.session};
        h.page_size = 4096;
        SSL_CTX *ptls = ctx_new("primary.test", "ca1", "standby.test");
        ASSERT_OK(link_connect(f.e, (struct sockaddr *) &raddr, rl,
                               &(LinkParams){.side = LINK_PRIMARY,
                                             .secret = SECRET,
                                             .secret_len = sizeof(SECRET),
                                             .heartbeat_ms = 20,
                                             .heartbeat_misses = 50,
                                             .handshake_timeout_ms = 3000,
                                             .hello = &h,
                                             .tls = ptls},
                               &cb, &f.p, &f.primary));
        SSL_CTX_free(ptls);
        ASSERT_TRUE(RUN_UNTIL(f.e, f.p.downs && f.s.downs, 5000));
        ASSERT_TRUE(__atomic_load_n(&t.both_tls_up, __ATOMIC_ACQUIRE)); /* its certificates were good */
        ASSERT_TRUE(t.forwarded > 0); /* HELLO and CHALLENGE went through */
        ASSERT_EQ(f.p.ups + f.s.ups + f.s.frames, 0);
        ASSERT_EQ(f.p.down_error, -EACCES);
        assert_reason(&f.p, "relayed through another TLS connection");
        fixture_done(&f);
        ASSERT_EQ(pthread_join(th, NULL), 0);
        close(t.lfd);
        SSL_CTX_free(t.as_standby);
        SSL_CTX_free(t.as_primary);
}

/* A TLS client that completes the TLS handshake, then says nothing until told to go. */
typedef struct SlowPrimary {
        struct sockaddr_storage addr;
        socklen_t addr_len;
        SSL_CTX *ctx;
        bool tls_up, go;
} SlowPrimary;

static void *slow_primary_main(void *userdata)
{
        SlowPrimary *sp = userdata;
        SSL *ssl = SSL_new(sp->ctx);
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

        if (ssl && fd >= 0 && connect(fd, (struct sockaddr *) &sp->addr, sp->addr_len) == 0 &&
            SSL_set_fd(ssl, fd) == 1 && SSL_connect(ssl) == 1)
                __atomic_store_n(&sp->tls_up, true, __ATOMIC_RELEASE);
        while (!__atomic_load_n(&sp->go, __ATOMIC_ACQUIRE))
                usleep(10 * 1000);
        SSL_free(ssl);
        if (fd >= 0)
                close(fd);
        return NULL;
}

/* The listener's 1 s "first bytes" limit is for strangers that send nothing: a primary whose
 * TLS handshake went through has sent plenty, and keeps its slot until the handshake timeout
 * (a loaded host may be slow to follow with HELLO). */
TEST(link_tls_first_bytes_count)
{
        struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        SlowPrimary sp = {.addr_len = sizeof(sp.addr)};
        uint64_t start, elapsed;
        pthread_t th;
        Fixture f;

        setup();
        memset(&f, 0, sizeof(f));
        f.standby_tls = ctx_new("standby.test", "ca1", "primary.test");
        sp.ctx = ctx_new("primary.test", "ca1", "standby.test");
        ASSERT_OK(sd_event_new(&f.e));
        ASSERT_OK(link_listener_new(f.e, (struct sockaddr *) &sin, sizeof(sin), 4, on_accept, &f, &f.ll));
        ASSERT_OK(link_listener_address(f.ll, &sp.addr, &sp.addr_len));
        start = now_usec();
        ASSERT_EQ(pthread_create(&th, NULL, slow_primary_main, &sp), 0);
        ASSERT_TRUE(RUN_UNTIL(f.e, f.s.downs > 0, 6000));
        elapsed = now_usec() - start;
        fprintf(stderr, "  TLS peer without HELLO dropped after %" PRIu64 " ms\n", elapsed / 1000);
        ASSERT_TRUE(__atomic_load_n(&sp.tls_up, __ATOMIC_ACQUIRE));
        ASSERT_EQ(f.s.down_error, -ETIMEDOUT);
        assert_reason(&f.s, "handshake with");
        ASSERT_TRUE(elapsed >= 2500 * 1000); /* the fixture's 3 s handshake timeout, not 1 s */
        __atomic_store_n(&sp.go, true, __ATOMIC_RELEASE);
        ASSERT_EQ(pthread_join(th, NULL), 0);
        SSL_CTX_free(sp.ctx);
        fixture_done(&f);
}

DEFINE_TEST_MAIN
