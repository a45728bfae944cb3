/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "fdpass.h"
#include "log.h"
#include "macros.h"
#include "util.h"
#include "vmm-link.h"

#define VMM_DIRTY_MAGIC       "DRVMDIRT"
#define VMM_DIRTY_HEADER_SIZE 64u
#define STATE_MAX_SIZE        (64u << 20)

struct VmmLink {
        int sock;
        uint64_t next_id;
        VmmLayout layout;
        uint64_t vmm_dirty_seen_seq;
        uint32_t features;         /* HelloReply.features (Dr__Control__Feature bits) */
        uint64_t last_paused_ns;   /* the last ResumeReply.paused_ns, 0 when the agent sent none */
        bool hello_suspended;      /* HelloReply.suspended */
        uint64_t hello_held_bytes; /* HelloReply.held_output_bytes */
        char last_error[256];
};

bool vmm_link_hello_suspended(const VmmLink *l)
{
        return l->hello_suspended;
}

uint64_t vmm_link_hello_held_bytes(const VmmLink *l)
{
        return l->hello_held_bytes;
}

uint64_t vmm_link_last_paused_ns(const VmmLink *l)
{
        return l->last_paused_ns;
}

bool vmm_link_has_feature(const VmmLink *l, uint32_t feature)
{
        return (l->features & feature) == feature;
}

const VmmLayout *vmm_link_layout(const VmmLink *l)
{
        return &l->layout;
}

const char *vmm_link_last_error(const VmmLink *l)
{
        return l->last_error;
}

int vmm_link_fd(const VmmLink *l)
{
        return l->sock;
}

static void layout_release(VmmLayout *lay)
{
        for (size_t i = 0; i < lay->n_regions; i++) {
                VmmRegion *r = &lay->regions[i];
                if (r->ram)
                        munmap((void *) r->ram, r->size);
                r->fd = safe_close(r->fd);
        }
        for (size_t i = 0; i < lay->n_vcpus; i++) {
                VmmVcpu *v = &lay->vcpus[i];
                if (v->ring)
                        munmap(v->ring, (size_t) lay->ring_entries * sizeof(struct kvm_dirty_gfn));
                v->fd = safe_close(v->fd);
        }
        if (lay->bitmap)
                munmap(lay->bitmap, lay->bitmap_size);
        if (lay->vmm_dirty)
                munmap(lay->vmm_dirty, lay->vmm_dirty_size);
        lay->ring_full_fd = safe_close(lay->ring_full_fd);
        lay->bitmap_fd = safe_close(lay->bitmap_fd);
        lay->vmm_dirty_fd = safe_close(lay->vmm_dirty_fd);
        lay->state_fd = safe_close(lay->state_fd);
        lay->n_regions = lay->n_vcpus = 0;
}

VmmLink *vmm_link_free(VmmLink *l)
{
        if (!l)
                return NULL;
        layout_release(&l->layout);
        safe_close(l->sock);
        free(l);
        return NULL;
}

/* SO_RCVTIMEO of usec (0: none). */
static int sock_set_rcvtimeo(int fd, uint64_t usec)
{
        struct timeval tv = {
                .tv_sec = (time_t) (usec / USEC_PER_SEC),
                .tv_usec = (suseconds_t) (usec % USEC_PER_SEC),
        };

        if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0)
                return -errno;
        return 0;
}

/*
 * Sends req and waits for its reply. Fds that arrive with the reply are
 * returned through fds/ret_n_fds (owned by the caller) or closed.
 */
static int link_call(VmmLink *l, Dr__Control__Request *req, Dr__Control__Reply **ret, int *fds,
                     size_t max_fds, size_t *ret_n_fds)
{
        uint8_t buf[DR__CONTROL__CONTROL_LIMIT__CONTROL_MAX_MESSAGE];
        Dr__Control__Reply *reply;
        size_t len, n_fds = 0;
        ssize_t n;
        int r;

        req->id = ++l->next_id;
        len = dr__control__request__get_packed_size(req);
        if (len > sizeof(buf)) {
                snprintf(l->last_error, sizeof(l->last_error), "request of %zu bytes is too large", len);
                return -EMSGSIZE;
        }
        dr__control__request__pack(req, buf);
        r = fdpass_send(l->sock, buf, len, NULL, 0);
        if (r < 0) {
                snprintf(l->last_error, sizeof(l->last_error), "sending to the VMM's agent failed: %s",
                         strerror(-r));
                return r;
        }

        n = fdpass_recv(l->sock, buf, sizeof(buf), fds, max_fds, &n_fds);
        if (n == -EAGAIN || n == -EWOULDBLOCK) {
                /* Only while opening: SO_RCVTIMEO bounds the Hello and the layout. */
                snprintf(l->last_error, sizeof(l->last_error),
                         "the VMM's agent did not answer within %llu s",
                         (unsigned long long) (VMM_LINK_HELLO_TIMEOUT_USEC / USEC_PER_SEC));
                return -ETIMEDOUT;
        }
        if (n < 0) {
                snprintf(l->last_error, sizeof(l->last_error), "receiving from the VMM's agent failed: %s",
                         strerror((int) -n));
                return (int) n;
        }
        if (n == 0) {
                snprintf(l->last_error, sizeof(l->last_error),
                         "the VMM's agent closed the control connection");
                return -ECONNRESET;
        }
        reply = dr__control__reply__unpack(NULL, (size_t) n, buf);
        if (!reply) {
                fdpass_close_all(fds, n_fds);
                snprintf(l->last_error, sizeof(l->last_error), "agent sent an undecodable reply");
                return -EBADMSG;
        }
        if (reply->id != req->id) {
                snprintf(l->last_error, sizeof(l->last_error), "reply id %llu does not match request %llu",
                         (unsigned long long) reply->id, (unsigned long long) req->id);
                dr__control__reply__free_unpacked(reply, NULL);
                fdpass_close_all(fds, n_fds);
                return -EPROTO;
        }
        if (reply->error != 0) {
                /* An errno from the agent; anything else (INT_MIN could not even be negated) is -EPROTO. */
                r = reply->error < 0 && reply->error > -4096 ? reply->error : -EPROTO;
                snprintf(l->last_error, sizeof(l->last_error), "%s",
                         reply->error_message ? reply->error_message : strerror(-r));
                dr__control__reply__free_unpacked(reply, NULL);
                fdpass_close_all(fds, n_fds);
                return r;
        }
        l->last_error[0] = 0;
        if (ret_n_fds)
                *ret_n_fds = n_fds;
        else
                fdpass_close_all(fds, n_fds);
        *ret = reply;
        return 0;
}

/* Calls and expects a reply body of `want` (NOT_SET for none). */
static int link_simple(VmmLink *l, Dr__Control__Request *req, Dr__Control__Reply__BodyCase want,
                       Dr__Control__Reply **ret)
{
        Dr__Control__Reply *reply = NULL;
        int r;

        r = link_call(l, req, &reply, NULL, 0, NULL);
        if (r < 0)
                return r;
        if (want != DR__CONTROL__REPLY__BODY__NOT_SET && reply->body_case != want) {
                dr__control__reply__free_unpacked(reply, NULL);
                snprintf(l->last_error, sizeof(l->last_error), "agent replied with the wrong body");
                return -EPROTO;
        }
        if (ret)
                *ret = reply;
        else
                dr__control__reply__free_unpacked(reply, NULL);
        return 0;
}

static int fd_at(int *fds, size_t n_fds, uint32_t index)
{
        int fd;

        if (index >= n_fds || fds[index] < 0)
                return -EBADMSG;
        fd = fds[index];
        fds[index] = -EBADF; /* taken */
        return fd;
}

/* Whether [offset, offset + len) is 8-byte aligned, starts at min or later and ends by size (no overflow).
 */
static bool shared_range_ok(uint64_t offset, uint64_t len, uint64_t min, uint64_t size)
{
        return offset % 8 == 0 && offset >= min && offset <= size && len <= size - offset;
}

/* A shared memfd must hold the size the VMM announces: a mapping past its end faults (SIGBUS). */
static int shared_size_check(int fd, uint64_t size)
{
        struct stat st;

        if (fstat(fd, &st) < 0)
                return -errno;
        if (size == 0 || size > (uint64_t) st.st_size)
                return -EBADMSG;
        return 0;
}

/* The regions' geometry, validated as the standby and images validate it. */
static int layout_geometry(const Dr__Control__Layout *m, RamLayout *ret, char *reason, size_t size)
{
        RamLayout L = {.page_size = m->page_size, .n_regions = m->n_regions};
        char why[200];

        _Static_assert(VMM_LINK_MAX_REGIONS <= RAM_MAX_REGIONS, "regions bounded by the caller");
        for (size_t i = 0; i < m->n_regions; i++)
                L.regions[i] = (RamRegion){
                        .slot = m->regions[i]->slot,
                        .guest_phys = m->regions[i]->guest_phys,
                        .size = m->regions[i]->size,
                        .fd_offset = m->regions[i]->fd_offset,
                };
        if (ram_layout_validate(&L, why, sizeof(why)) < 0) {
                snprintf(reason, size, "agent sent an invalid layout: %s", why);
                return -EBADMSG;
        }
        *ret = L;
        return 0;
}

/* Validates the layout (the VMM is not trusted) and maps what it describes. */
static int layout_adopt(VmmLink *l, const Dr__Control__Layout *m, int *fds, size_t n_fds)
{
        VmmLayout *lay = &l->layout;
        uint64_t page;
        int ret;

        if (m->page_size != 4096)
                return -EBADMSG;
        if (m->n_regions == 0 || m->n_regions > VMM_LINK_MAX_REGIONS || m->n_vcpus == 0 ||
            m->n_vcpus > VMM_LINK_MAX_VCPUS)
                return -EBADMSG;
        if (m->mode != DR__CONTROL__TRACKING_MODE__TRACKING_MODE_RING &&
            m->mode != DR__CONTROL__TRACKING_MODE__TRACKING_MODE_BITMAP)
                return -EBADMSG;
        ret = layout_geometry(m, &lay->ram, l->last_error, sizeof(l->last_error));
        if (ret < 0)
                return ret;
        lay->mode = m->mode;
        lay->page_size = m->page_size;
        lay->tsc_khz = m->has_tsc_khz ? m->tsc_khz : 0;
        page = m->page_size;

        for (size_t i = 0; i < m->n_regions; i++) {
                const Dr__Control__Region *mr = m->regions[i];
                VmmRegion *r = &lay->regions[i];
                struct stat st;
                void *p;
                int fd;

                fd = fd_at(fds, n_fds, mr->fd_index);
                if (fd < 0)
                        return fd;
                r->fd = fd;
                lay->n_regions = i + 1;
                if (fstat(fd, &st) < 0)
                        return -errno;
                /* Overflow-safe: fd_offset + size may wrap around 2^64. */
                if (mr->fd_offset > (uint64_t) st.st_size ||
                    mr->size > (uint64_t) st.st_size - mr->fd_offset)
                        return -EBADMSG;
                r->slot = mr->slot;
                r->guest_phys = mr->guest_phys;
                r->size = mr->size;
                r->n_pages = mr->size / page;
                r->first_page = lay->total_pages;
                r->fd_offset = mr->fd_offset;
                r->bitmap_offset = mr->has_bitmap_offset ? mr->bitmap_offset : 0;
                r->vmm_dirty_offset = mr->has_vmm_dirty_offset ? mr->vmm_dirty_offset : UINT64_MAX;
                lay->total_pages += r->n_pages;
                p = mmap(NULL, r->size, PROT_READ, MAP_SHARED, fd, (off_t) r->fd_offset);
                if (p == MAP_FAILED)
                        return -errno;
                r->ram = p;
        }

        if (lay->mode == DR__CONTROL__TRACKING_MODE__TRACKING_MODE_RING) {
                if (!m->has_ring_entries || !IS_POWER_OF_2(m->ring_entries) || m->ring_entries > 65536 ||
                    !m->has_ring_full_fd_index)
                        return -EBADMSG;
                lay->ring_entries = m->ring_entries;
        }

        for (size_t i = 0; i < m->n_vcpus; i++) {
                VmmVcpu *v = &lay->vcpus[i];
                int fd = fd_at(fds, n_fds, m->vcpus[i]->fd_index);
                if (fd < 0)
                        return fd;
                v->fd = fd;
                v->index = m->vcpus[i]->index;
                lay->n_vcpus = i + 1;
                if (lay->ring_entries) {
                        void *p = mmap(NULL, (size_t) lay->ring_entries * sizeof(struct kvm_dirty_gfn),
                                       PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                                       (off_t) KVM_DIRTY_LOG_PAGE_OFFSET * page);
                        if (p == MAP_FAILED)
                                return -errno;
                        v->ring = p;
                }
        }

        if (lay->ring_entries) {
                int fd = fd_at(fds, n_fds, m->ring_full_fd_index);
                if (fd < 0)
                        return fd;
                lay->ring_full_fd = fd;
        }

        if (lay->mode == DR__CONTROL__TRACKING_MODE__TRACKING_MODE_BITMAP) {
                void *p;
                int fd;

                if (!m->has_bitmap_fd_index || !m->has_bitmap_size)
                        return -EBADMSG;
                fd = fd_at(fds, n_fds, m->bitmap_fd_index);
                if (fd < 0)
                        return fd;
                lay->bitmap_fd = fd;
                lay->bitmap_size = m->bitmap_size;
                ret = shared_size_check(fd, lay->bitmap_size);
                if (ret < 0)
                        return ret;
                for (size_t i = 0; i < lay->n_regions; i++) {
                        const VmmRegion *reg = &lay->regions[i];
                        if (!shared_range_ok(reg->bitmap_offset, DIV_ROUND_UP(reg->n_pages, 64) * 8, 0,
                                             lay->bitmap_size))
                                return -EBADMSG;
                }
                p = mmap(NULL, lay->bitmap_size, PROT_READ, MAP_SHARED, fd, 0);
                if (p == MAP_FAILED)
                        return -errno;
                lay->bitmap = p;
        }

        {
                void *p;
                int fd = fd_at(fds, n_fds, m->vmm_dirty_fd_index);
                if (fd < 0)
                        return fd;
                lay->vmm_dirty_fd = fd;
                lay->vmm_dirty_size = m->vmm_dirty_size;
                if (lay->vmm_dirty_size < VMM_DIRTY_HEADER_SIZE)
                        return -EBADMSG;
                ret = shared_size_check(fd, lay->vmm_dirty_size);
                if (ret < 0)
                        return ret;
                for (size_t i = 0; i < lay->n_regions; i++) {
                        const VmmRegion *reg = &lay->regions[i];
                        if (!shared_range_ok(reg->vmm_dirty_offset, DIV_ROUND_UP(reg->n_pages, 64) * 8,
                                             VMM_DIRTY_HEADER_SIZE, lay->vmm_dirty_size))
                                return -EBADMSG;
                }
                p = mmap(NULL, lay->vmm_dirty_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
                if (p == MAP_FAILED)
                        return -errno;
                lay->vmm_dirty = p;
                if (memcmp(lay->vmm_dirty, VMM_DIRTY_MAGIC, 8) != 0)
                        return -EBADMSG;
        }

        lay->state_fd = fd_at(fds, n_fds, m->state_fd_index);
        if (lay->state_fd < 0)
                return lay->state_fd;
        return 0;
}

/*
 * Who may serve the control socket: the VMM it connects to receives nothing secret, but what it
 * says (the layout, the RAM, the state) becomes the replica, and its output commit decides what
 * the guest's clients see. So the path alone is not trusted:
 *
 *  - the file must be a socket owned by root, by this process's euid, or by the owner of the
 *    directory it is in when that directory is writable by its owner only (a VMM running as its
 *    own user in its own directory); a socket another user could plant (a world-writable
 *    directory such as /tmp) is refused;
 *  - the peer (SO_PEERCRED, after connect) must be root or the socket file's owner, so swapping
 *    the file between the check and connect() gains nothing.
 *
 * Returns 0 or -EPERM with the reason in why.
 */
/*
 * The directories above a VMM user's own directory: each owned by root, this daemon's euid or that
 * user, and writable by nobody else. Otherwise another user could have made the whole directory
 * (mkdir /tmp/vms, then the socket inside), and it would pass as "a directory of its own".
 */
static int check_ancestors(const char *dir, uid_t owner, char *why, size_t why_size)
{
        _cleanup_free_ char *real = realpath(dir, NULL);
        struct stat ast;
        char *slash;

        if (!real)
                return -errno;
        while ((slash = strrchr(real, '/'))) {
                if (slash == real) {
                        if (!real[1])
                                break; /* "/" was the last one checked */
                        slash[1] = 0;
                } else
                        *slash = 0;
                if (stat(real, &ast) < 0)
                        return -errno;
                if ((ast.st_uid != 0 && ast.st_uid != geteuid() && ast.st_uid != owner) ||
                    (ast.st_mode & 0022) != 0) {
                        snprintf(why, why_size,
                                 "the socket's directory %s (uid %u) is below %s (uid %u, mode %03o), which "
                                 "others can write: another user could have made that directory and the "
                                 "socket in it. Put the socket in a directory of the VMM's user below "
                                 "directories only root writes (/run, /home, ...)",
                                 dir, (unsigned) owner, real, (unsigned) ast.st_uid,
                                 (unsigned) (ast.st_mode & 07777));
                        return -EPERM;
                }
        }
        return 0;
}

static int check_socket_file(const char *path, struct stat *ret_st, char *why, size_t why_size)
{
        _cleanup_free_ char *dir = strdup(path);
        struct stat st, dst;
        char *slash;

        if (!dir)
                return -ENOMEM;
        if (lstat(path, &st) < 0)
                return -errno;
        if (!S_ISSOCK(st.st_mode)) {
                snprintf(why, why_size, "%s is not a socket", path);
                return -EPERM;
        }
        *ret_st = st;
        if (st.st_uid == 0 || st.st_uid == geteuid())
                return 0;
        slash = strrchr(dir, '/');
        if (slash == dir)
                slash[1] = 0;
        else if (slash)
                *slash = 0;
        else
                strcpy(dir, ".");
        if (stat(dir, &dst) < 0)
                return -errno;
        if (dst.st_uid == st.st_uid && (dst.st_mode & 0022) == 0)
                return check_ancestors(dir, st.st_uid, why, why_size);
        snprintf(
                why, why_size,
                "%s is owned by uid %u, which is neither root, nor this daemon's uid, nor the owner of a "
                "directory only it can write (%s: uid %u, mode %03o): another user could have put it there. "
                "Run the VMM as root or as the daemon's user, or put its socket in a directory of its own",
                path, (unsigned) st.st_uid, dir, (unsigned) dst.st_uid, (unsigned) (dst.st_mode & 07777));
        return -EPERM;
}

bool vmm_link_listening(const char *path)
{
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        _cleanup_close_ int fd = -EBADF;

        if (strlen(path) >= sizeof(sa.sun_path))
                return true; /* cannot tell: assume the worst (it runs) */
        strcpy(sa.sun_path, path);
        fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return true;
        if (connect(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0 &&
            (errno == ECONNREFUSED || errno == ENOENT))
                return false;
        return true;
}

static int open_fd(int fd, const char *client, char *why, size_t why_size, VmmLink **ret);

int vmm_link_open_checked(const char *path, const char *client, char *why, size_t why_size, VmmLink **ret)
{
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        _cleanup_close_ int fd = -EBADF;
        struct ucred cred;
        socklen_t cl = sizeof(cred);
        char buf[512];
        struct stat st = {};
        int r;

        if (!why || why_size == 0) {
                why = buf;
                why_size = sizeof(buf);
        }
        why[0] = 0;
        if (strlen(path) >= sizeof(sa.sun_path))
                return -ENAMETOOLONG;
        strcpy(sa.sun_path, path);
        r = check_socket_file(path, &st, why, why_size);
        if (r < 0)
                return r;
        fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        if (connect(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0)
                return -errno;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) < 0)
                return -errno;
        if (cred.uid != 0 && cred.uid != st.st_uid) {
                snprintf(why, why_size,
                         "the process serving %s (pid %d, uid %u) is neither root nor the socket's owner "
                         "(uid %u)",
                         path, (int) cred.pid, (unsigned) cred.uid, (unsigned) st.st_uid);
                return -EPERM;
        }
        return open_fd(TAKE_FD(fd), client, why, why_size, ret);
}

int vmm_link_open(const char *path, const char *client, VmmLink **ret)
{
        return vmm_link_open_checked(path, client, NULL, 0, ret);
}

int vmm_link_open_fd(int fd, const char *client, VmmLink **ret)
{
        return open_fd(fd, client, NULL, 0, ret);
}

static int open_fd_exchange(VmmLink *l, const char *client);

/* The same; on failure, what the exchange said goes to why (if any). */
static int open_fd(int fd, const char *client, char *why, size_t why_size, VmmLink **ret)
{
        _cleanup_close_ int owned = fd;
        VmmLink *l;
        int r;

        l = calloc(1, sizeof(*l));
        if (!l)
                return -ENOMEM;
        l->layout.ring_full_fd = l->layout.bitmap_fd = l->layout.vmm_dirty_fd = l->layout.state_fd = -EBADF;
        for (size_t i = 0; i < VMM_LINK_MAX_REGIONS; i++)
                l->layout.regions[i].fd = -EBADF;
        for (size_t i = 0; i < VMM_LINK_MAX_VCPUS; i++)
                l->layout.vcpus[i].fd = -EBADF;
        l->sock = TAKE_FD(owned);
        r = open_fd_exchange(l, client);
        if (r < 0) {
                if (why && why_size > 0)
                        snprintf(why, why_size, "%s", l->last_error);
                vmm_link_free(l);
                return r;
        }
        *ret = l;
        return 0;
}

/* Hello and layout over l->sock. */
static int open_fd_exchange(VmmLink *l, const char *client)
{
        Dr__Control__Request req = DR__CONTROL__REQUEST__INIT;
        Dr__Control__Hello hello = DR__CONTROL__HELLO__INIT;
        Dr__Control__GetLayout gl = DR__CONTROL__GET_LAYOUT__INIT;
        Dr__Control__Reply *reply = NULL;
        int fds[FDPASS_MAX_FDS];
        size_t n_fds = 0;
        int r;

        /* A VMM that accepts but never answers must not hold its caller (an attach worker that
         * primary_free() waits for) for ever: the Hello and the layout are bounded, later
         * requests are not (a pause may legitimately take its own timeout). */
        r = sock_set_rcvtimeo(l->sock, VMM_LINK_HELLO_TIMEOUT_USEC);
        if (r < 0)
                return r;

        hello.version = DR__CONTROL__CONTROL_VERSION__CONTROL_VERSION_CURRENT;
        hello.client = (char *) client;
        req.body_case = DR__CONTROL__REQUEST__BODY_HELLO;
        req.hello = &hello;
        r = link_simple(l, &req, DR__CONTROL__REPLY__BODY_HELLO, &reply);
        if (r < 0)
                return r;
        if (reply->hello->version != DR__CONTROL__CONTROL_VERSION__CONTROL_VERSION_CURRENT) {
                dr__control__reply__free_unpacked(reply, NULL);
                return -EPROTONOSUPPORT;
        }
        l->features = reply->hello->has_features ? reply->hello->features : 0;
        l->hello_suspended = reply->hello->has_suspended && reply->hello->suspended;
        l->hello_held_bytes = reply->hello->has_held_output_bytes ? reply->hello->held_output_bytes : 0;
        dr__control__reply__free_unpacked(reply, NULL);

        req = (Dr__Control__Request) DR__CONTROL__REQUEST__INIT;
        req.body_case = DR__CONTROL__REQUEST__BODY_GET_LAYOUT;
        req.get_layout = &gl;
        r = link_call(l, &req, &reply, fds, ELEMENTSOF(fds), &n_fds);
        if (r < 0)
                return r;
        if (reply->body_case != DR__CONTROL__REPLY__BODY_LAYOUT)
                r = -EPROTO;
        else
                r = layout_adopt(l, reply->layout, fds, n_fds);
        dr__control__reply__free_unpacked(reply, NULL);
        fdpass_close_all(fds, n_fds);
        if (r < 0) {
                if (!l->last_error[0])
                        snprintf(l->last_error, sizeof(l->last_error), "agent sent an invalid layout");
                return r;
        }
        return sock_set_rcvtimeo(l->sock, 0);
}

#define SIMPLE_REQUEST(l, field, CASE, msgtype, INIT)                                                       \
        ({                                                                                                  \
                Dr__Control__Request _req = DR__CONTROL__REQUEST__INIT;                                     \
                msgtype _m = INIT;                                                                          \
                _req.body_case = DR__CONTROL__REQUEST__BODY_##CASE;                                         \
                _req.field = &_m;                                                                           \
                link_simple((l), &_req, DR__CONTROL__REPLY__BODY__NOT_SET, NULL);                           \
        })

int vmm_link_start_tracking(VmmLink *l)
{
        return SIMPLE_REQUEST(l, start_tracking, START_TRACKING, Dr__Control__StartTracking,
                              DR__CONTROL__START_TRACKING__INIT);
}

int vmm_link_stop_tracking(VmmLink *l)
{
        return SIMPLE_REQUEST(l, stop_tracking, STOP_TRACKING, Dr__Control__StopTracking,
                              DR__CONTROL__STOP_TRACKING__INIT);
}

int vmm_link_stop_tracking_hold(VmmLink *l)
{
        Dr__Control__Request req = DR__CONTROL__REQUEST__INIT;
        Dr__Control__StopTracking m = DR__CONTROL__STOP_TRACKING__INIT;

        m.has_hold_output = m.hold_output = true;
        req.body_case = DR__CONTROL__REQUEST__BODY_STOP_TRACKING;
        req.stop_tracking = &m;
        return link_simple(l, &req, DR__CONTROL__REPLY__BODY__NOT_SET, NULL);
}

int vmm_link_reset_rings(VmmLink *l, uint64_t *ret_count)
{
        Dr__Control__Request req = DR__CONTROL__REQUEST__INIT;
        Dr__Control__ResetRings m = DR__CONTROL__RESET_RINGS__INIT;
        Dr__Control__Reply *reply;
        int r;

        req.body_case = DR__CONTROL__REQUEST__BODY_RESET_RINGS;
        req.reset_rings = &m;
        r = link_simple(l, &req, DR__CONTROL__REPLY__BODY_RESET_RINGS, &reply);
        if (r < 0)
                return r;
        if (ret_count)
                *ret_count = reply->reset_rings->count;
        dr__control__reply__free_unpacked(reply, NULL);
        return 0;
}

/* PAUSE (and SAVE_STATE with it when save); the reply is the caller's to free. */
static int pause_call(VmmLink *l, uint32_t timeout_ms, bool save, bool suspend, uint64_t *ret_pause_ns,
                      Dr__Control__Reply **ret)
{
        Dr__Control__Request req = DR__CONTROL__REQUEST__INIT;
        Dr__Control__Pause m = DR__CONTROL__PAUSE__INIT;
        int r;

        if (timeout_ms) {
                m.has_timeout_ms = true;
                m.timeout_ms = timeout_ms;
        }
        m.has_save_state = m.save_state = save;
        m.has_suspend = m.suspend = suspend;
        req.body_case = DR__CONTROL__REQUEST__BODY_PAUSE;
        req.pause = &m;
        r = link_simple(l, &req, DR__CONTROL__REPLY__BODY_PAUSE, ret);
        if (r >= 0 && ret_pause_ns)
                *ret_pause_ns = (*ret)->pause->pause_ns;
        return r;
}

int vmm_link_pause(VmmLink *l, uint32_t timeout_ms, uint64_t *ret_pause_ns)
{
        Dr__Control__Reply *reply;
        int r;

        r = pause_call(l, timeout_ms, false, false, ret_pause_ns, &reply);
        if (r < 0)
                return r;
        dr__control__reply__free_unpacked(reply, NULL);
        return 0;
}

int vmm_link_suspend(VmmLink *l, uint32_t timeout_ms)
{
        Dr__Control__Reply *reply;
        int r;

        r = pause_call(l, timeout_ms, false, true, NULL, &reply);
        if (r < 0)
                return r;
        dr__control__reply__free_unpacked(reply, NULL);
        return 0;
}

static int read_state(VmmLink *l, uint64_t len, uint8_t **ret_buf, size_t *ret_len);

int vmm_link_pause_save(VmmLink *l, uint32_t timeout_ms, uint64_t *ret_pause_ns, uint8_t **ret_buf,
                        size_t *ret_len)
{
        Dr__Control__Reply *reply;
        uint64_t len;
        bool has;
        int r;

        if (!vmm_link_has_feature(l, DR__CONTROL__FEATURE__FEATURE_PAUSE_SAVES_STATE))
                return -EOPNOTSUPP;
        r = pause_call(l, timeout_ms, true, false, ret_pause_ns, &reply);
        if (r < 0)
                return r;
        has = reply->pause->has_state_length;
        len = reply->pause->state_length;
        dr__control__reply__free_unpacked(reply, NULL);
        if (!has) {
                snprintf(l->last_error, sizeof(l->last_error), "agent paused but sent no state");
                return -EPROTO;
        }
        return read_state(l, len, ret_buf, ret_len);
}

/* RESUME at epoch (KVM_RESET_DIRTY_RINGS first when reset); a reply body only with reset. */
static int resume_call(VmmLink *l, uint64_t epoch, bool reset, bool unsuspend, Dr__Control__Reply **ret)
{
        Dr__Control__Request req = DR__CONTROL__REQUEST__INIT;
        Dr__Control__Resume m = DR__CONTROL__RESUME__INIT;

        m.has_epoch = true;
        m.epoch = epoch;
        m.has_reset_rings = m.reset_rings = reset;
        m.has_unsuspend = m.unsuspend = unsuspend;
        Dr__Control__Reply *reply = NULL;
        int r;

        req.body_case = DR__CONTROL__REQUEST__BODY_RESUME;
        req.resume = &m;
        l->last_paused_ns = 0;
        /* Agents before ResumeReply.paused_ns answer a plain Resume with no body. */
        r = link_simple(l, &req, reset ? DR__CONTROL__REPLY__BODY_RESUME : DR__CONTROL__REPLY__BODY__NOT_SET,
                        &reply);
        if (r < 0)
                return r;
        if (reply->body_case == DR__CONTROL__REPLY__BODY_RESUME && reply->resume->has_paused_ns)
                l->last_paused_ns = reply->resume->paused_ns;
        if (ret)
                *ret = reply;
        else
                dr__control__reply__free_unpacked(reply, NULL);
        return 0;
}

int vmm_link_resume_reset(VmmLink *l, uint64_t epoch, uint64_t *ret_count)
{
        Dr__Control__Reply *reply;
        bool has;
        int r;

        if (!vmm_link_has_feature(l, DR__CONTROL__FEATURE__FEATURE_RESUME_RESETS_RINGS))
                return -EOPNOTSUPP;
        r = resume_call(l, epoch, true, false, &reply);
        if (r < 0)
                return r;
        has = reply->resume->has_reset_count;
        *ret_count = reply->resume->reset_count;
        dr__control__reply__free_unpacked(reply, NULL);
        if (!has) {
                snprintf(l->last_error, sizeof(l->last_error), "agent resumed but sent no reset count");
                return -EPROTO;
        }
        return 0;
}

int vmm_link_resume(VmmLink *l, uint64_t epoch)
{
        return resume_call(l, epoch, false, false, NULL);
}

int vmm_link_unsuspend(VmmLink *l, uint64_t epoch)
{
        return resume_call(l, epoch, false, true, NULL);
}

int vmm_link_save_state(VmmLink *l, uint8_t **ret_buf, size_t *ret_len)
{
        Dr__Control__Request req = DR__CONTROL__REQUEST__INIT;
        Dr__Control__SaveState m = DR__CONTROL__SAVE_STATE__INIT;
        Dr__Control__Reply *reply;
        uint64_t len;
        int r;

        req.body_case = DR__CONTROL__REQUEST__BODY_SAVE_STATE;
        req.save_state = &m;
        r = link_simple(l, &req, DR__CONTROL__REPLY__BODY_SAVE_STATE, &reply);
        if (r < 0)
                return r;
        len = reply->save_state->length;
        dr__control__reply__free_unpacked(reply, NULL);
        return read_state(l, len, ret_buf, ret_len);
}

/* Reads the len bytes of VmState the agent wrote at offset 0 of the state memfd. */
static int read_state(VmmLink *l, uint64_t len, uint8_t **ret_buf, size_t *ret_len)
{
        _cleanup_free_ uint8_t *buf = NULL;
        ssize_t n;

        if (len == 0 || len > STATE_MAX_SIZE)
                return -EBADMSG;
        buf = malloc(len);
        if (!buf)
                return -ENOMEM;
        n = pread(l->layout.state_fd, buf, len, 0);
        if (n < 0)
                return -errno;
        if ((uint64_t) n != len)
                return -EBADMSG;
        *ret_buf = TAKE_PTR(buf);
        *ret_len = len;
        return 0;
}

int vmm_link_get_dirty_log(VmmLink *l, uint32_t slot, bool clear, uint64_t *ret_pages)
{
        Dr__Control__Request req = DR__CONTROL__REQUEST__INIT;
        Dr__Control__GetDirtyLog m = DR__CONTROL__GET_DIRTY_LOG__INIT;
        Dr__Control__Reply *reply;
        int r;

        m.slot = slot;
        m.has_clear = true;
        m.clear = clear;
        req.body_case = DR__CONTROL__REQUEST__BODY_GET_DIRTY_LOG;
        req.get_dirty_log = &m;
        r = link_simple(l, &req, DR__CONTROL__REPLY__BODY_GET_DIRTY_LOG, &reply);
        if (r < 0)
                return r;
        if (ret_pages)
                *ret_pages = reply->get_dirty_log->dirty_pages;
        dr__control__reply__free_unpacked(reply, NULL);
        return 0;
}

int vmm_link_release_output(VmmLink *l, uint64_t epoch, uint64_t *ret_bytes)
{
        Dr__Control__Request req = DR__CONTROL__REQUEST__INIT;
        Dr__Control__ReleaseOutput m = DR__CONTROL__RELEASE_OUTPUT__INIT;
        Dr__Control__Reply *reply;
        int r;

        m.epoch = epoch;
        req.body_case = DR__CONTROL__REQUEST__BODY_RELEASE_OUTPUT;
        req.release_output = &m;
        r = link_simple(l, &req, DR__CONTROL__REPLY__BODY_RELEASE_OUTPUT, &reply);
        if (r < 0)
                return r;
        if (ret_bytes)
                *ret_bytes = reply->release_output->bytes;
        dr__control__reply__free_unpacked(reply, NULL);
        return 0;
}

int vmm_link_get_status(VmmLink *l, Dr__Control__StatusReply **ret)
{
        Dr__Control__Request req = DR__CONTROL__REQUEST__INIT;
        Dr__Control__GetStatus m = DR__CONTROL__GET_STATUS__INIT;
        Dr__Control__Reply *reply;
        int r;

        req.body_case = DR__CONTROL__REQUEST__BODY_GET_STATUS;
        req.get_status = &m;
        r = link_simple(l, &req, DR__CONTROL__REPLY__BODY_STATUS, &reply);
        if (r < 0)
                return r;
        /* Detach the body so the caller frees only the status. */
        *ret = TAKE_PTR(reply->status);
        reply->body_case = DR__CONTROL__REPLY__BODY__NOT_SET;
        dr__control__reply__free_unpacked(reply, NULL);
        return 0;
}

uint64_t vmm_link_take_vmm_dirty(VmmLink *l, DirtySet *set)
{
        VmmLayout *lay = &l->layout;
        uint64_t seq, taken = 0;

        /* Acquire pairs with the agent's release increment after it set bits:
         * every bit set before that increment is visible to the scan below. */
        seq = __atomic_load_n((uint64_t *) (lay->vmm_dirty + 8), __ATOMIC_ACQUIRE);
        if (seq == l->vmm_dirty_seen_seq)
                return 0;
        l->vmm_dirty_seen_seq = seq;

        for (size_t i = 0; i < lay->n_regions; i++) {
                VmmRegion *r = &lay->regions[i];
                uint64_t *w = (uint64_t *) (lay->vmm_dirty + r->vmm_dirty_offset);
                uint64_t n_words = DIV_ROUND_UP(r->n_pages, 64);

                for (uint64_t k = 0; k < n_words; k++) {
                        uint64_t v;

                        if (!__atomic_load_n(&w[k], __ATOMIC_RELAXED))
                                continue;
                        v = __atomic_exchange_n(&w[k], 0, __ATOMIC_ACQ_REL);
                        if (k == n_words - 1 && r->n_pages % 64)
                                v &= (1ULL << (r->n_pages % 64)) - 1;
                        for (uint64_t b = v; b; b &= b - 1) {
                                uint64_t page = r->first_page + k * 64 + (uint64_t) __builtin_ctzll(b);
                                if (dirtyset_add(set, page))
                                        taken++;
                        }
                }
        }
        return taken;
}

int vmm_layout_page_index(const VmmLayout *lay, uint32_t slot, uint64_t offset, uint64_t *ret)
{
        /* x86 ring entries carry (address space << 16) | slot id; we use address space 0 only. */
        for (size_t i = 0; i < lay->n_regions; i++) {
                const VmmRegion *r = &lay->regions[i];
                if (r->slot != slot)
                        continue;
                if (offset >= r->n_pages)
                        return -ERANGE;
                *ret = r->first_page + offset;
                return 0;
        }
        return -ERANGE;
}

static const VmmRegion *region_of_page(const VmmLayout *lay, uint64_t page)
{
        for (size_t i = 0; i < lay->n_regions; i++) {
                const VmmRegion *r = &lay->regions[i];
                if (page >= r->first_page && page < r->first_page + r->n_pages)
                        return r;
        }
        return NULL;
}

const uint8_t *vmm_layout_page_ptr(const VmmLayout *lay, uint64_t page)
{
        const VmmRegion *r = region_of_page(lay, page);
        return r ? r->ram + (page - r->first_page) * lay->page_size : NULL;
}

uint64_t vmm_layout_page_gpa(const VmmLayout *lay, uint64_t page)
{
        const VmmRegion *r = region_of_page(lay, page);
        return r ? r->guest_phys + (page - r->first_page) * lay->page_size : UINT64_MAX;
}
