/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "fdpass.h"
#include "macros.h"

int fdpass_send(int sock, const void *buf, size_t len, const int *fds, size_t n_fds)
{
        struct iovec iov = {.iov_base = (void *) buf, .iov_len = len};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
        _cleanup_free_ void *control = NULL;
        ssize_t n;

        if (n_fds > FDPASS_MAX_FDS)
                return -EINVAL;
        if (n_fds > 0) {
                size_t clen = CMSG_SPACE(sizeof(int) * n_fds);
                struct cmsghdr *cmsg;

                control = calloc(1, clen);
                if (!control)
                        return -ENOMEM;
                mh.msg_control = control;
                mh.msg_controllen = clen;
                cmsg = CMSG_FIRSTHDR(&mh);
                cmsg->cmsg_level = SOL_SOCKET;
                cmsg->cmsg_type = SCM_RIGHTS;
                cmsg->cmsg_len = CMSG_LEN(sizeof(int) * n_fds);
                memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * n_fds);
        }

        do
                n = sendmsg(sock, &mh, MSG_NOSIGNAL);
        while (n < 0 && errno == EINTR);
        if (n < 0)
                return -errno;
        if ((size_t) n != len)
                return -EIO; /* SEQPACKET is all-or-nothing; anything else is a bug. */
        return 0;
}

void fdpass_close_all(int *fds, size_t n)
{
        for (size_t i = 0; i < n; i++)
                fds[i] = safe_close(fds[i]);
}

ssize_t fdpass_recv(int sock, void *buf, size_t cap, int *fds, size_t max_fds, size_t *ret_n_fds)
{
        union {
                struct cmsghdr align;
                char buf[CMSG_SPACE(sizeof(int) * FDPASS_MAX_FDS)];
        } control;
        struct iovec iov = {.iov_base = buf, .iov_len = cap};
        struct msghdr mh = {
                .msg_iov = &iov,
                .msg_iovlen = 1,
                .msg_control = &control,
                .msg_controllen = sizeof(control),
        };
        size_t got = 0;
        int overflow = 0;
        ssize_t n;

        do
                n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
        while (n < 0 && errno == EINTR);
        if (n < 0)
                return -errno;

        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
                size_t k;
                int *in;

                if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                        continue;
                k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                in = (int *) CMSG_DATA(c);
                for (size_t i = 0; i < k; i++) {
                        if (got < max_fds && fds)
                                fds[got++] = in[i];
                        else {
                                safe_close(in[i]);
                                overflow = 1;
                        }
                }
        }

        if ((mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || overflow) {
                fdpass_close_all(fds, got);
                if (ret_n_fds)
                        *ret_n_fds = 0;
                return (mh.msg_flags & MSG_TRUNC) ? -EMSGSIZE : -ETOOMANYREFS;
        }
        if (ret_n_fds)
                *ret_n_fds = got;
        else
                fdpass_close_all(fds, got);
        return n;
}
