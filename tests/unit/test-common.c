/* SPDX-License-Identifier: GPL-2.0-or-later */
#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "crc32c.h"
#include "fdpass.h"
#include "frame.h"
#include "layout.h"
#include "macros.h"
#include "util.h"
#include "tests.h"

/* Two regions as the reference VMM lays out 4 GiB + 1 GiB: below the hole and above 4 GiB, one memfd. */
static RamLayout two_regions(void)
{
        return (RamLayout){
                .page_size = RAM_PAGE_SIZE,
                .regions =
                        {{.slot = 0, .guest_phys = 0, .size = 3ULL << 30, .fd_offset = 0},
                         {.slot = 1, .guest_phys = 4ULL << 30, .size = 2ULL << 30, .fd_offset = 3ULL << 30}},
                .n_regions = 2,
        };
}

TEST(ram_layout_validate)
{
        char why[256];
        RamLayout l;

        l = two_regions();
        ASSERT_OK(ram_layout_validate(&l, why, sizeof(why)));
        ASSERT_EQ(l.total_pages, (5ULL << 30) / RAM_PAGE_SIZE);
        ASSERT_EQ(l.memfd_size, 5ULL << 30);
        ASSERT_EQ(l.regions[0].first_page, 0u);
        ASSERT_EQ(l.regions[1].first_page, (3ULL << 30) / RAM_PAGE_SIZE);
        ASSERT_EQ(ram_layout_region_of(&l, 0), 0u);
        ASSERT_EQ(ram_layout_region_of(&l, l.regions[1].first_page - 1), 0u);
        ASSERT_EQ(ram_layout_region_of(&l, l.regions[1].first_page), 1u);
        ASSERT_EQ(ram_layout_region_of(&l, l.total_pages), SIZE_MAX);
        ASSERT_EQ(ram_layout_page_offset(&l, l.regions[1].first_page + 2), (3ULL << 30) + 2 * RAM_PAGE_SIZE);
        ASSERT_EQ(ram_layout_page_offset(&l, l.total_pages), UINT64_MAX);

        /* Overlap in the memfd (what the VMM link did not check before). */
        l = two_regions();
        l.regions[1].fd_offset = (3ULL << 30) - RAM_PAGE_SIZE;
        ASSERT_EQ(ram_layout_validate(&l, why, sizeof(why)), -EINVAL);
        ASSERT_TRUE(strstr(why, "overlap"));
        /* Overlap in guest memory. */
        l = two_regions();
        l.regions[1].guest_phys = (3ULL << 30) - RAM_PAGE_SIZE;
        ASSERT_EQ(ram_layout_validate(&l, why, sizeof(why)), -EINVAL);
        ASSERT_TRUE(strstr(why, "overlap"));
        /* A shared slot. */
        l = two_regions();
        l.regions[1].slot = 0;
        ASSERT_EQ(ram_layout_validate(&l, why, sizeof(why)), -EINVAL);
        ASSERT_TRUE(strstr(why, "share a slot"));
        /* Alignment, emptiness, page size, region count. */
        l = two_regions();
        l.regions[1].size = 4097;
        ASSERT_EQ(ram_layout_validate(&l, why, sizeof(why)), -EINVAL);
        ASSERT_TRUE(strstr(why, "not page aligned"));
        l = two_regions();
        l.regions[0].size = 0;
        ASSERT_EQ(ram_layout_validate(&l, NULL, 0), -EINVAL);
        l = two_regions();
        l.page_size = 2u << 20;
        ASSERT_EQ(ram_layout_validate(&l, why, sizeof(why)), -EINVAL);
        l = two_regions();
        l.n_regions = 0;
        ASSERT_EQ(ram_layout_validate(&l, why, sizeof(why)), -EINVAL);
        l.n_regions = RAM_MAX_REGIONS + 1;
        ASSERT_EQ(ram_layout_validate(&l, why, sizeof(why)), -EINVAL);
        /* Sizes: beyond 1 TiB, a memfd extent beyond 1 TiB, an address that wraps. */
        l = two_regions();
        l.regions[1].size = RAM_MAX_BYTES;
        ASSERT_EQ(ram_layout_validate(&l, why, sizeof(why)), -EFBIG);
        ASSERT_TRUE(strstr(why, "limit"));
        l = two_regions();
        l.regions[1].fd_offset = RAM_MAX_BYTES - RAM_PAGE_SIZE;
        ASSERT_EQ(ram_layout_validate(&l, why, sizeof(why)), -EFBIG);
        l = two_regions();
        l.regions[1].guest_phys = UINT64_MAX - RAM_PAGE_SIZE + 1;
        ASSERT_EQ(ram_layout_validate(&l, why, sizeof(why)), -EFBIG);

        /* Equality is over the regions, not the derived fields. */
        {
                RamLayout a = two_regions(), b = two_regions();
                ASSERT_OK(ram_layout_validate(&a, NULL, 0));
                ASSERT_TRUE(ram_layout_equal(&a, &b));
                b.regions[1].fd_offset += RAM_PAGE_SIZE;
                ASSERT_TRUE(!ram_layout_equal(&a, &b));
        }
}

TEST(uuid_text_forms)
{
        static const uint8_t want[16] = {0x12, 0x3e, 0x45, 0x67, 0xe8, 0x9b, 0x12, 0xd3,
                                         0xa4, 0x56, 0x42, 0x66, 0x14, 0x17, 0x40, 0x00};
        static const char *const bad[] = {
                "",
                "not-a-uuid",
                "123e4567e89b12d3a456426614174000",      /* no hyphens */
                "123e4567--e89b-12d3-a456-426614174000", /* repeated hyphen (the old parser took it) */
                "123e4567-e89b--12d3-a456-42661417400",  /* repeated hyphen, same length */
                "123e4567-e89b-12d3-a456-42661417400-",  /* hyphen at the end */
                "123e-4567-e89b-12d3-a456426614174000",  /* hyphens in the wrong places */
                "123e4567-e89b-12d3-a456-4266141740000", /* one digit too many */
                "123e4567-e89b-12d3-a456-42661417400",   /* one digit short */
                " 123e4567-e89b-12d3-a456-426614174000", /* surrounding text */
                "123e4567-e89b-12d3-a456-426614174000\n",
                "123e4567-e89b-12d3-a456-42661417400g", /* not hex */
                "{123e4567-e89b-12d3-a456-426614174000}",
        };
        uint8_t u[16];
        char buf[UUID_STRING_MAX];

        ASSERT_OK(uuid_from_string("123e4567-e89b-12d3-a456-426614174000", u));
        ASSERT_TRUE(memcmp(u, want, 16) == 0);
        ASSERT_OK(uuid_from_string("123E4567-E89B-12D3-A456-426614174000", u));
        ASSERT_TRUE(memcmp(u, want, 16) == 0);
        ASSERT_TRUE(streq(uuid_to_string(u, buf), "123e4567-e89b-12d3-a456-426614174000"));
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                memset(u, 0xaa, sizeof(u));
                if (uuid_from_string(bad[i], u) != -EINVAL) {
                        fprintf(stderr, "accepted bad UUID '%s'\n", bad[i]);
                        exit(1);
                }
                /* Nothing is written on failure. */
                for (size_t k = 0; k < 16; k++)
                        ASSERT_EQ(u[k], 0xaa);
        }
        ASSERT_EQ(uuid_from_string(NULL, u), -EINVAL);
}

TEST(crc32c_vectors)
{
        static const uint8_t zeros[32] = {0};
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
