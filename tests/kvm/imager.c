/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dr-imager: takes checkpoint images of a running dirtyrep-vmm from a second
 * process, through the real control socket, with the daemon's tracking code
 * (daemon/track*) and the image library (image/imagefile.h): the same steps
 * the primary takes at an epoch's seal.
 *
 *   run          attach, start tracking; a full image DIR/img0, then every
 *                --interval-ms an incremental image DIR/imgN on imgN-1, while
 *                harvesting continuously in between ("dirty since the last
 *                image"). One line per image with its sizes and its pause.
 *   materialize  writes the RAM an image chain describes (memfd layout) to a
 *                file, for dirtyrep-memcheck.
 *   restore-bench  copy vs. map restore of an image chain (bench/ only).
 *
 * Exit codes: 0 ok, 1 failed, 2 usage or setup error.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "image-take.h"
#include "imagefile.h"
#include "log.h"
#include "macros.h"
#include "track.h"
#include "util.h"
#include "vmm-link.h"

static const char *arg_control;
static const char *arg_name = "vm";
static const char *arg_dir;
static unsigned arg_images = 4;
static unsigned arg_interval_ms = 1000;
static bool arg_compress;

/* Drains rings (or bitmaps) while the guest runs for `ms`, OR-ing into `since`. */
static int harvest_for(Tracker *t, DirtySet *since, unsigned ms)
{
        const VmmLayout *lay = t->lay;
        uint64_t end = now_usec() + (uint64_t) ms * USEC_PER_MSEC;
        int64_t n;

        while (now_usec() < end) {
                struct pollfd p = {.fd = lay->ring_full_fd, .events = POLLIN};

                if (lay->ring_full_fd >= 0 && poll(&p, 1, 1) > 0 && (p.revents & POLLIN)) {
                        n = tracker_ring_full(t, since);
                        if (n < 0)
                                return log_error_errno((int) n, "Harvest on ring-full failed: %s", t->error);
                        continue;
                }
                if (lay->ring_full_fd < 0)
                        usleep(5000);
                n = t->ops->collect(t, since);
                if (n < 0)
                        return log_error_errno((int) n, "Collect failed: %s", t->error);
                if (t->pending_reset >= (uint64_t) lay->ring_entries / 4 * lay->n_vcpus) {
                        int r = t->ops->reset(t);
                        if (r < 0)
                                return log_error_errno(r, "Reset failed: %s", t->error);
                }
        }
        return 0;
}

static void on_resumed(const char *dir, void *userdata)
{
        printf("imager: writing %s\n", dir);
        fflush(stdout);
}

/* One image through image_take(): what the primary's seal does, with the pause of its own. */
static int take_image(VmmLink *link, Tracker *t, DirtySet *since, DirtySet *scratch, const char *dir,
                      const char *parent, uint64_t seq)
{
        static uint8_t last_id[16]; /* the image `since` counts from */
        char err[IMAGE_ERR_MAX] = "";
        ImageTakeResult res;
        int r;

        r = image_take(link, t, since, scratch,
                       &(ImageTakeOptions){.dir = dir,
                                           .parent = parent,
                                           .vm_name = arg_name,
                                           .parent_id = parent ? last_id : NULL,
                                           .compress = arg_compress,
                                           .epoch = seq,
                                           .resumed = on_resumed},
                       &res, err, sizeof(err));
        if (r < 0)
                return log_error_errno(r, "Failed to take image %s: %s", dir, err);
        memcpy(last_id, res.write.image_id, 16);
        printf("imager: image=%s kind=%s present=%" PRIu64 " zero=%" PRIu64 " parent=%" PRIu64
               " runs=%" PRIu64 " stored_bytes=%" PRIu64 " total_bytes=%" PRIu64 " precopy_pages=%" PRId64
               " pause_pages=%" PRId64 " pause_us=%" PRIu64 " agent_pause_us=%" PRIu64 " write_ms=%" PRIu64
               "\n",
               dir, parent ? "incremental" : "full", res.write.present_pages, res.write.zero_pages,
               res.write.parent_pages, res.write.runs, res.write.stored_bytes, res.write.total_bytes,
               res.precopy_pages, res.pause_pages, res.pause_ns / 1000, res.agent_pause_ns / 1000,
               res.write.write_ns / 1000000);
        fflush(stdout);
        return 0;
}

static int cmd_run(void)
{
        _cleanup_(vmm_link_freep) VmmLink *link = NULL;
        _cleanup_(dirtyset_freep) DirtySet *since = NULL, *fresh = NULL;
        Tracker t;
        int r;

        if (!arg_dir)
                return log_error_errno(-EINVAL, "run needs --dir");
        r = vmm_link_open(arg_control, "dr-imager", &link);
        if (r < 0)
                return log_error_errno(r, "Failed to attach to %s: %m", arg_control);
        r = tracker_init(&t, link);
        if (r < 0)
                return log_error_errno(r, "Unknown tracking mode");
        since = dirtyset_new(t.lay->total_pages);
        fresh = dirtyset_new(t.lay->total_pages);
        if (!since || !fresh)
                return log_oom();
        r = vmm_link_start_tracking(link);
        if (r < 0)
                return log_error_errno(r, "StartTracking failed: %s", vmm_link_last_error(link));

        for (unsigned i = 0; i < arg_images; i++) {
                _cleanup_free_ char *dir = NULL, *parent = NULL;

                if (asprintf(&dir, "%s/img%u", arg_dir, i) < 0 ||
                    (i > 0 && asprintf(&parent, "%s/img%u", arg_dir, i - 1) < 0))
                        return log_oom();
                if (i > 0) {
                        r = harvest_for(&t, since, arg_interval_ms);
                        if (r < 0)
                                return r;
                }
                r = take_image(link, &t, since, fresh, dir, parent, i + 1);
                if (r < 0)
                        return r;
        }
        if (t.ops == &tracker_ring_ops && t.stats.marked != t.stats.resets)
                return log_error_errno(-EUCLEAN, "harvested %" PRIu64 " ring entries but KVM reset %" PRIu64,
                                       t.stats.marked, t.stats.resets);
        printf("imager: done images=%u mode=%s\n", arg_images, t.ops->name);
        return 0;
}

static int cmd_materialize(const char *dir, const char *out)
{
        _cleanup_(image_freep) Image *img = NULL;
        _cleanup_close_ int fd = -EBADF;
        char err[IMAGE_ERR_MAX] = "";
        uint64_t size;
        uint8_t *ram;
        int r;

        r = image_open(dir, IMAGE_OPEN_CHAIN, &img, err, sizeof(err));
        if (r < 0)
                return log_error_errno(r, "%s", err);
        size = image_layout_ram_size(&img->layout);
        fd = open(out, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0 || ftruncate(fd, (off_t) size) < 0)
                return log_error_errno(-errno, "%s: %m", out);
        ram = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (ram == MAP_FAILED)
                return log_error_errno(-errno, "mmap %s: %m", out);
        r = image_restore(img, ram, size, true, err, sizeof(err));
        munmap(ram, size);
        if (r < 0)
                return log_error_errno(r, "%s", err);
        printf("imager: materialized %s (depth %" PRIu32 ") into %s\n", dir, img->inv->depth, out);
        return 0;
}

/*
 * Restore cost, two ways, for the record (bench/image-bench.py): copying the
 * chain into a fresh memfd (what dirtyrep-vmm does, every run CRC-checked),
 * and Firecracker-style mapping: each raw run of pages.img mapped MAP_PRIVATE
 * at its place, oldest image first (no checksum can be checked without
 * reading the data, which is what mapping avoids). Then the cost of the
 * guest's first touch of every present page of the mapping.
 */
static int cmd_restore_bench(const char *dir)
{
        _cleanup_(image_freep) Image *img = NULL;
        const Image *chain[IMAGE_MAX_DEPTH + 1];
        char err[IMAGE_ERR_MAX] = "";
        uint64_t size, t0, t_copy, t_map, t_touch, sum = 0, maps = 0;
        size_t n = 0;
        uint8_t *ram;
        int fd, r;

        t0 = now_nsec();
        r = image_open(dir, IMAGE_OPEN_CHAIN, &img, err, sizeof(err));
        if (r < 0)
                return log_error_errno(r, "%s", err);
        size = image_layout_ram_size(&img->layout);
        fd = memfd_new_sized("restore-bench", size);
        if (fd < 0)
                return log_error_errno(fd, "memfd: %m");
        ram = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
        close(fd);
        if (ram == MAP_FAILED)
                return log_error_errno(-errno, "mmap: %m");
        r = image_restore(img, ram, size, true, err, sizeof(err));
        munmap(ram, size);
        if (r < 0)
                return log_error_errno(r, "%s", err);
        t_copy = now_nsec() - t0;
        img = image_free(img);

        t0 = now_nsec();
        r = image_open(dir, IMAGE_OPEN_CHAIN, &img, err, sizeof(err));
        if (r < 0)
                return log_error_errno(r, "%s", err);
        ram = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (ram == MAP_FAILED)
                return log_error_errno(-errno, "mmap: %m");
        for (const Image *p = img; p; p = p->parent)
                chain[n++] = p;
        for (size_t k = n; k-- > 0;) {
                /* Pending mapping: adjacent raw runs, contiguous in RAM and in the file, become one mmap. */
                uint64_t m_off = 0, m_len = 0, m_file = 0;

                for (size_t i = 0; i <= chain[k]->map->n_runs; i++) {
                        const Dr__Image__PageRun *run =
                                i < chain[k]->map->n_runs ? chain[k]->map->runs[i] : NULL;
                        uint64_t first = 0, off = 0;

                        if (run)
                                for (size_t g = 0; g < chain[k]->layout.n_regions; g++) {
                                        uint64_t np = chain[k]->layout.regions[g].size / IMAGE_PAGE_SIZE;
                                        if (run->first_page < first + np) {
                                                off = chain[k]->layout.regions[g].fd_offset +
                                                      (run->first_page - first) * IMAGE_PAGE_SIZE;
                                                break;
                                        }
                                        first += np;
                                }
                        if (run && run->kind == DR__IMAGE__RUN_KIND__RUN_PRESENT && m_len &&
                            off == m_off + m_len &&
                            IMAGE_PAGES_DATA_OFF + run->data_offset == m_file + m_len) {
                                m_len += run->n_pages * IMAGE_PAGE_SIZE;
                                continue;
                        }
                        if (m_len) {
                                if (mmap(ram + m_off, m_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED,
                                         chain[k]->pages_fd, (off_t) m_file) == MAP_FAILED)
                                        goto map_failed;
                                maps++;
                                m_len = 0;
                        }
                        if (!run)
                                break;
                        if (run->kind == DR__IMAGE__RUN_KIND__RUN_PRESENT) {
                                if (run->has_compression &&
                                    run->compression == DR__IMAGE__COMPRESSION__COMPRESSION_LZ4)
                                        return log_error_errno(-EOPNOTSUPP, "mapping needs a raw image");
                                m_off = off;
                                m_len = run->n_pages * IMAGE_PAGE_SIZE;
                                m_file = IMAGE_PAGES_DATA_OFF + run->data_offset;
                        } else if (run->kind == DR__IMAGE__RUN_KIND__RUN_ZERO && k != n - 1) {
                                if (mmap(ram + off, run->n_pages * IMAGE_PAGE_SIZE, PROT_READ | PROT_WRITE,
                                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
                                        goto map_failed;
                                maps++;
                        }
                }
        }
        t_map = now_nsec() - t0;
        if (false) {
        map_failed:
                /* Scattered runs need one mapping each: past vm.max_map_count mapping is not an option. */
                r = -errno;
                munmap(ram, size);
                printf("{\"copy_ms\": %.1f, \"map_error\": \"%s after %" PRIu64
                       " mappings (vm.max_map_count)\", \"ram_mb\": %" PRIu64 ", \"chain\": %zu}\n",
                       t_copy / 1e6, strerror(-r), maps, size >> 20, n);
                return 0;
        }
        t0 = now_nsec();
        for (uint64_t o = 0; o < size; o += IMAGE_PAGE_SIZE)
                sum += ram[o];
        t_touch = now_nsec() - t0;
        munmap(ram, size);
        printf("{\"copy_ms\": %.1f, \"map_ms\": %.2f, \"maps\": %" PRIu64
               ", \"map_first_touch_all_ms\": %.1f, "
               "\"ram_mb\": %" PRIu64 ", \"chain\": %zu, \"checksum_byte\": %" PRIu64 "}\n",
               t_copy / 1e6, t_map / 1e6, maps, t_touch / 1e6, size >> 20, n, sum & 0xff);
        return 0;
}

int main(int argc, char **argv)
{
        static const struct option opts[] = {{"control", required_argument, NULL, 'c'},
                                             {"name", required_argument, NULL, 'n'},
                                             {"dir", required_argument, NULL, 'd'},
                                             {"images", required_argument, NULL, 'N'},
                                             {"interval-ms", required_argument, NULL, 'i'},
                                             {"compress", no_argument, NULL, 'z'},
                                             {}};
        const char *cmd;
        int c, r;

        log_set_ident("dr-imager");
        if (argc < 2) {
                fprintf(stderr, "usage: dr-imager run --control PATH --dir DIR [--name VM] [--images N] "
                                "[--interval-ms MS] [--compress]\n"
                                "       dr-imager materialize IMAGE RAMFILE\n"
                                "       dr-imager restore-bench IMAGE\n");
                return 2;
        }
        cmd = argv[1];
        if (streq(cmd, "restore-bench")) {
                if (argc != 3)
                        return 2;
                return cmd_restore_bench(argv[2]) < 0 ? 1 : 0;
        }
        if (streq(cmd, "materialize")) {
                if (argc != 4)
                        return 2;
                return cmd_materialize(argv[2], argv[3]) < 0 ? 1 : 0;
        }
        optind = 2;
        while ((c = getopt_long(argc, argv, "", opts, NULL)) >= 0) {
                switch (c) {
                case 'c':
                        arg_control = optarg;
                        break;
                case 'n':
                        arg_name = optarg;
                        break;
                case 'd':
                        arg_dir = optarg;
                        break;
                case 'N':
                        if (parse_u32(optarg, &arg_images) < 0 || arg_images < 1)
                                return 2;
                        break;
                case 'i':
                        if (parse_u32(optarg, &arg_interval_ms) < 0)
                                return 2;
                        break;
                case 'z':
                        arg_compress = true;
                        break;
                default:
                        return 2;
                }
        }
        if (!streq(cmd, "run") || !arg_control)
                return 2;
        r = cmd_run();
        return r < 0 ? 1 : 0;
}
