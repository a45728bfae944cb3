/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "crc32c.h"
#include "fdpass.h"
#include "frame.h"
#include "macros.h"
#include "util.h"
#include "tests.h"

TEST(crc32c_vectors)
{
        static const uint8_t zeros[32] = { 0 };
        uint8_t ones[32], inc[32];

        memset(ones, 0xff, sizeof(ones));
        for (int i = 0; i < 32; i++)
                inc[i] = (uint8_t) i;
        /* RFC 3720 appendix B.4 test vectors and the classic check value. */
        ASSERT_EQ(crc32c(0, "123456789", 9), 0xE3069283u);
        ASSERT_EQ(crc32c(0, zeros, 32), 0x8A9136AAu);
        ASSERT_EQ(crc32c(0, ones, 32), 0x62A8AB43u);
        ASSERT_EQ(crc32c(0, inc, 32), 0x46DD794Eu);
        /* Incremental == one shot, at every split and alignment. */
        for (size_t split = 0; split <= 32; split++)
                ASSERT_EQ(crc32c(crc32c(0, inc, split), inc + split, 32 - split), 0x46DD794Eu);
}

TEST(crc32c_portable_matches_hardware)
{
        uint8_t buf[4096 + 7];
        uint32_t x = 12345;

        for (size_t i = 0; i < sizeof(buf); i++) {
                x = x * 1103515245u + 12345u;
                buf[i] = (uint8_t) (x >> 16);
        }
        ASSERT_EQ(crc32c_portable(0, "123456789", 9), 0xE3069283u);
        for (size_t off = 0; off < 8; off++)
                for (size_t len = 0; len < sizeof(buf) - off; len += 511)
                        ASSERT_EQ(crc32c_portable(0, buf + off, len), crc32c(0, buf + off, len));
}

TEST(frame_roundtrip_and_rejects)
{
        uint8_t hdr[FRAME_HEADER_SIZE], payload[100];
        FrameHeader h;

        for (size_t i = 0; i < sizeof(payload); i++)
                payload[i] = (uint8_t) (i * 7);
        frame_header_build(hdr, 42, payload, sizeof(payload));
        ASSERT_OK(frame_header_parse(hdr, 1 << 20, &h));
        ASSERT_EQ(h.type, 42);
        ASSERT_EQ(h.length, sizeof(payload));
        ASSERT_OK(frame_verify_payload(hdr, &h, payload));

        /* Length cap is enforced before anything is allocated. */
        ASSERT_EQ(frame_header_parse(hdr, 99, &h), -EMSGSIZE);

        /* Every single-bit flip in the payload or the CRC-covered header is caught. */
        for (size_t bit = 0; bit < sizeof(payload) * 8; bit++) {
                payload[bit / 8] ^= (uint8_t) (1u << (bit % 8));
                ASSERT_EQ(frame_verify_payload(hdr, &h, payload), -EBADMSG);
                payload[bit / 8] ^= (uint8_t) (1u << (bit % 8));
        }
        hdr[6] ^= 1; /* type */
        ASSERT_OK(frame_header_parse(hdr, 1 << 20, &h));
        ASSERT_EQ(frame_verify_payload(hdr, &h, payload), -EBADMSG);
        hdr[6] ^= 1;
        hdr[0] ^= 1; /* magic */
        ASSERT_EQ(frame_header_parse(hdr, 1 << 20, &h), -EBADMSG);
        hdr[0] ^= 1;
        hdr[4] = 9; /* version */
        ASSERT_EQ(frame_header_parse(hdr, 1 << 20, &h), -EBADMSG);
        hdr[4] = FRAME_VERSION;
        hdr[17] = 1; /* reserved */
        ASSERT_EQ(frame_header_parse(hdr, 1 << 20, &h), -EBADMSG);
}

TEST(fdpass_seqpacket)
{
        int sv[2], fds[4], got[4], pipefd[2];
        char buf[64];
        size_t n_fds;
        ssize_t n;

        ASSERT_OK(RET_NERRNO(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv)));
        ASSERT_OK(RET_NERRNO(pipe2(pipefd, O_CLOEXEC)));

        /* Two fds with a message; they arrive close-on-exec and usable. */
        fds[0] = pipefd[0];
        fds[1] = pipefd[1];
        ASSERT_OK(fdpass_send(sv[0], "hello", 5, fds, 2));
        n = fdpass_recv(sv[1], buf, sizeof(buf), got, 4, &n_fds);
        ASSERT_EQ(n, 5);
        ASSERT_EQ(n_fds, 2);
        ASSERT_TRUE(memcmp(buf, "hello", 5) == 0);
        ASSERT_TRUE(fcntl(got[0], F_GETFD) & FD_CLOEXEC);
        ASSERT_EQ(write(got[1], "x", 1), 1);
        ASSERT_EQ(read(pipefd[0], buf, 1), 1);
        fdpass_close_all(got, 2);

        /* A packet larger than the buffer is an error, not a truncated message. */
        ASSERT_OK(fdpass_send(sv[0], "0123456789", 10, NULL, 0));
        ASSERT_EQ(fdpass_recv(sv[1], buf, 4, got, 4, &n_fds), -EMSGSIZE);

        /* More fds than the receiver accepts: all closed, error returned. */
        ASSERT_OK(fdpass_send(sv[0], "m", 1, fds, 2));
        ASSERT_EQ(fdpass_recv(sv[1], buf, sizeof(buf), got, 1, &n_fds), -ETOOMANYREFS);
        ASSERT_EQ(n_fds, 0);

        /* Orderly shutdown reads as 0. */
        safe_close(sv[0]);
        ASSERT_EQ(fdpass_recv(sv[1], buf, sizeof(buf), got, 4, &n_fds), 0);
        safe_close(sv[1]);
        safe_close(pipefd[0]);
        safe_close(pipefd[1]);
}

TEST(parse_sizes)
{
        uint64_t v;
        uint32_t u;

        ASSERT_OK(parse_size("4096", &v));
        ASSERT_EQ(v, 4096);
        ASSERT_OK(parse_size("16M", &v));
        ASSERT_EQ(v, 16ULL << 20);
        ASSERT_OK(parse_size("1GiB", &v));
        ASSERT_EQ(v, 1ULL << 30);
        ASSERT_OK(parse_size("2g", &v));
        ASSERT_EQ(v, 2ULL << 30);
        ASSERT_EQ(parse_size("", &v), -EINVAL);
        ASSERT_EQ(parse_size("-1", &v), -EINVAL);
        ASSERT_EQ(parse_size("12Q", &v), -EINVAL);
        ASSERT_EQ(parse_size("99999999999T", &v), -ERANGE);
        ASSERT_OK(parse_u32("0x10", &u));
        ASSERT_EQ(u, 16);
        ASSERT_EQ(parse_u32("4294967296", &u), -ERANGE);
        ASSERT_EQ(parse_u32("12 ", &u), -EINVAL);
}

DEFINE_TEST_MAIN
