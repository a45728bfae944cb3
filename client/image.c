/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dirtyrepctl image show|verify DIR: CRIU's crit for dirtyrep images.
 * show decodes the inventory, the parent chain, the page map (summary, or
 * every run with --runs) and a summary of the VM state; --json prints the
 * same as one JSON object. verify opens the image and its whole chain and
 * reads every run of page data, checking every checksum on the way.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "image.h"
#include "imagefile.h"
#include "log.h"
#include "macros.h"
#include "vmstate.pb-c.h"

static void hex(const uint8_t *b, size_t n, char *out)
{
        for (size_t i = 0; i < n; i++)
                sprintf(out + 2 * i, "%02x", b[i]);
        out[2 * n] = 0;
}

static void json_str(const char *s)
{
        putchar('"');
        for (const unsigned char *p = (const unsigned char *) s; *p; p++) {
                if (*p == '"' || *p == '\\')
                        printf("\\%c", *p);
                else if (*p < 0x20 || *p >= 0x7f)
                        printf("\\u%04x", *p);
                else
                        putchar(*p);
        }
        putchar('"');
}

static void format_time(uint64_t usec, char *buf, size_t len)
{
        time_t t = (time_t) (usec / 1000000);
        struct tm tm;

        if (!gmtime_r(&t, &tm) || strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
                snprintf(buf, len, "%" PRIu64, usec);
}

typedef struct MapSummary {
        uint64_t runs[4], pages[4], stored, lz4_runs;
} MapSummary;

static MapSummary map_summary(const Image *img)
{
        MapSummary s = {};

        for (size_t i = 0; i < img->map->n_runs; i++) {
                const Dr__Image__PageRun *r = img->map->runs[i];
                unsigned k = (unsigned) r->kind < 4 ? (unsigned) r->kind : 0;
                s.runs[k]++;
                s.pages[k] += r->n_pages;
                if (r->kind == DR__IMAGE__RUN_KIND__RUN_PRESENT) {
                        s.stored += r->stored_len;
                        s.lz4_runs += r->has_compression &&
                                      r->compression == DR__IMAGE__COMPRESSION__COMPRESSION_LZ4;
                }
        }
        return s;
}

static void show_text(const Image *img, const Image *chain, const char *chain_err, bool runs)
{
        const Dr__Image__Inventory *inv = img->inv;
        MapSummary s = map_summary(img);
        Dr__Vmstate__VmState *vs;
        char idh[33], buf[64];

        hex(inv->image_id.data, 16, idh);
        format_time(inv->created_usec, buf, sizeof(buf));
        printf("Image %s\n", img->path);
        printf("  id:        %s\n", idh);
        printf("  format:    %" PRIu32 "\n", inv->format_version);
        printf("  kind:      %s (depth %" PRIu32 ")\n", inv->parent ? "incremental" : "full", inv->depth);
        printf("  VM:        %s", inv->vm_name);
        if (inv->has_vm_uuid) {
                char u[33];
                hex(inv->vm_uuid.data, 16, u);
                printf(" (uuid %s)", u);
        }
        printf("\n  created:   %s\n", buf);
        if (inv->has_epoch)
                printf("  epoch:     %" PRIu64 "\n", inv->epoch);
        printf("  vCPUs:     %" PRIu32 "\n", inv->n_vcpus);
        printf("  RAM:       %" PRIu64 " MiB in %zu region(s), %" PRIu64 " pages of %" PRIu32 " bytes\n",
               inv->total_pages * inv->page_size >> 20, inv->n_regions, inv->total_pages, inv->page_size);
        for (size_t i = 0; i < inv->n_regions; i++)
                printf("    slot %" PRIu32 ": guest 0x%" PRIx64 "..0x%" PRIx64 " (memfd offset 0x%" PRIx64
                       ")\n",
                       inv->regions[i]->slot, inv->regions[i]->guest_phys,
                       inv->regions[i]->guest_phys + inv->regions[i]->size - 1, inv->regions[i]->fd_offset);
        if (inv->parent) {
                char pid[33], sha[65];
                hex(inv->parent->image_id.data, 16, pid);
                hex(inv->parent->inventory_sha256.data, 32, sha);
                printf("  parent:    %s (id %s, inventory sha256 %s)\n", inv->parent->path, pid, sha);
        }
        printf("  files:\n");
        for (size_t i = 0; i < inv->n_files; i++)
                printf("    %-12s %" PRIu64 " bytes\n", inv->files[i]->name, inv->files[i]->size);

        printf("Page map: %zu runs\n", img->map->n_runs);
        printf("  present: %" PRIu64 " pages in %" PRIu64 " runs, %" PRIu64 " bytes stored (%" PRIu64
               " runs LZ4)\n",
               s.pages[DR__IMAGE__RUN_KIND__RUN_PRESENT], s.runs[DR__IMAGE__RUN_KIND__RUN_PRESENT], s.stored,
               s.lz4_runs);
        printf("  zero:    %" PRIu64 " pages in %" PRIu64 " runs\n", s.pages[DR__IMAGE__RUN_KIND__RUN_ZERO],
               s.runs[DR__IMAGE__RUN_KIND__RUN_ZERO]);
        printf("  parent:  %" PRIu64 " pages in %" PRIu64 " runs\n",
               s.pages[DR__IMAGE__RUN_KIND__RUN_PARENT], s.runs[DR__IMAGE__RUN_KIND__RUN_PARENT]);
        if (runs)
                for (size_t i = 0; i < img->map->n_runs; i++) {
                        const Dr__Image__PageRun *r = img->map->runs[i];
                        printf("    %10" PRIu64 " +%-8" PRIu64 " %-7s", r->first_page, r->n_pages,
                               image_run_kind_name(r->kind));
                        if (r->kind == DR__IMAGE__RUN_KIND__RUN_PRESENT)
                                printf(" data @%" PRIu64 " len %" PRIu64 " %s crc %08" PRIx32,
                                       r->data_offset, r->stored_len,
                                       r->has_compression && r->compression ==
                                                                     DR__IMAGE__COMPRESSION__COMPRESSION_LZ4
                                               ? "lz4"
                                               : "raw",
                                       r->data_crc);
                        putchar('\n');
                }

        printf("State: %zu bytes\n", img->state_len);
        vs = dr__vmstate__vm_state__unpack(NULL, img->state_len, img->state);
        if (vs) {
                for (size_t i = 0; i < vs->n_vcpus; i++) {
                        const Dr__Vmstate__VcpuState *v = vs->vcpus[i];
                        printf("  vCPU %" PRIu32 ": mp_state %" PRIu32 " rip 0x%" PRIx64 " rsp 0x%" PRIx64
                               " cr3 0x%" PRIx64 " %zu MSRs\n",
                               v->index, v->mp_state, v->regs->rip, v->regs->rsp, v->sregs->cr3, v->n_msrs);
                }
                printf("  PIT %s, irqchip %s, clock %s, device state %zu bytes\n", vs->pit ? "yes" : "no",
                       vs->ioapic ? "yes" : "no", vs->clock ? "yes" : "no",
                       vs->has_devices ? vs->devices.len : 0);
                dr__vmstate__vm_state__free_unpacked(vs, NULL);
        }

        printf("Chain:\n");
        for (const Image *p = chain; p; p = p->parent) {
                hex(p->inv->image_id.data, 16, idh);
                printf("  depth %2" PRIu32 "  %s  %s  %" PRIu64 " present pages\n", p->inv->depth, idh,
                       p->path, p->inv->present_pages);
        }
        if (chain_err)
                printf("  broken: %s\n", chain_err);
}

static void show_json(const Image *img, const Image *chain, const char *chain_err, bool runs)
{
        const Dr__Image__Inventory *inv = img->inv;
        MapSummary s = map_summary(img);
        Dr__Vmstate__VmState *vs;
        char idh[65];

        hex(inv->image_id.data, 16, idh);
        printf("{\"path\": ");
        json_str(img->path);
        printf(", \"id\": \"%s\", \"format\": %" PRIu32 ", \"kind\": \"%s\", \"depth\": %" PRIu32
               ", \"vm_name\": ",
               idh, inv->format_version, inv->parent ? "incremental" : "full", inv->depth);
        json_str(inv->vm_name);
        if (inv->has_vm_uuid) {
                hex(inv->vm_uuid.data, 16, idh);
                printf(", \"vm_uuid\": \"%s\"", idh);
        }
        printf(", \"created_usec\": %" PRIu64 ", \"epoch\": %" PRIu64 ", \"vcpus\": %" PRIu32
               ", \"page_size\": %" PRIu32 ", \"total_pages\": %" PRIu64 ", \"regions\": [",
               inv->created_usec, inv->epoch, inv->n_vcpus, inv->page_size, inv->total_pages);
        for (size_t i = 0; i < inv->n_regions; i++)
                printf("%s{\"slot\": %" PRIu32 ", \"guest_phys\": %" PRIu64 ", \"size\": %" PRIu64
                       ", \"fd_offset\": %" PRIu64 "}",
                       i ? ", " : "", inv->regions[i]->slot, inv->regions[i]->guest_phys,
                       inv->regions[i]->size, inv->regions[i]->fd_offset);
        printf("], \"parent\": ");
        if (inv->parent) {
                char pid[33];
                hex(inv->parent->image_id.data, 16, pid);
                hex(inv->parent->inventory_sha256.data, 32, idh);
                printf("{\"path\": ");
                json_str(inv->parent->path);
                printf(", \"id\": \"%s\", \"inventory_sha256\": \"%s\"}", pid, idh);
        } else
                printf("null");
        printf(", \"files\": {");
        for (size_t i = 0; i < inv->n_files; i++) {
                printf("%s", i ? ", " : "");
                json_str(inv->files[i]->name);
                printf(": %" PRIu64, inv->files[i]->size);
        }
        printf("}, \"pagemap\": {\"runs\": %zu, \"present_pages\": %" PRIu64 ", \"present_runs\": %" PRIu64
               ", \"stored_bytes\": %" PRIu64 ", \"lz4_runs\": %" PRIu64 ", \"zero_pages\": %" PRIu64
               ", \"parent_pages\": %" PRIu64,
               img->map->n_runs, s.pages[1], s.runs[1], s.stored, s.lz4_runs, s.pages[2], s.pages[3]);
        if (runs) {
                printf(", \"list\": [");
                for (size_t i = 0; i < img->map->n_runs; i++) {
                        const Dr__Image__PageRun *r = img->map->runs[i];
                        printf("%s{\"first_page\": %" PRIu64 ", \"pages\": %" PRIu64 ", \"kind\": \"%s\"",
                               i ? ", " : "", r->first_page, r->n_pages, image_run_kind_name(r->kind));
                        if (r->kind == DR__IMAGE__RUN_KIND__RUN_PRESENT)
                                printf(", \"data_offset\": %" PRIu64 ", \"stored_len\": %" PRIu64
                                       ", \"lz4\": %s, \"crc32c\": %" PRIu32,
                                       r->data_offset, r->stored_len,
                                       r->has_compression && r->compression ==
                                                                     DR__IMAGE__COMPRESSION__COMPRESSION_LZ4
                                               ? "true"
                                               : "false",
                                       r->data_crc);
                        printf("}");
                }
                printf("]");
        }
        printf("}, \"state\": {\"bytes\": %zu", img->state_len);
        vs = dr__vmstate__vm_state__unpack(NULL, img->state_len, img->state);
        if (vs) {
                printf(", \"vcpus\": [");
                for (size_t i = 0; i < vs->n_vcpus; i++)
                        printf("%s{\"index\": %" PRIu32 ", \"mp_state\": %" PRIu32 ", \"rip\": %" PRIu64
                               ", \"rsp\": %" PRIu64 ", \"cr3\": %" PRIu64 "}",
                               i ? ", " : "", vs->vcpus[i]->index, vs->vcpus[i]->mp_state,
                               vs->vcpus[i]->regs->rip, vs->vcpus[i]->regs->rsp, vs->vcpus[i]->sregs->cr3);
                printf("], \"devices_bytes\": %zu", vs->has_devices ? vs->devices.len : 0);
                dr__vmstate__vm_state__free_unpacked(vs, NULL);
        }
        printf("}, \"chain\": [");
        for (const Image *p = chain; p; p = p->parent) {
                hex(p->inv->image_id.data, 16, idh);
                printf("%s{\"depth\": %" PRIu32 ", \"id\": \"%s\", \"path\": ", p == chain ? "" : ", ",
                       p->inv->depth, idh);
                json_str(p->path);
                printf(", \"present_pages\": %" PRIu64 "}", p->inv->present_pages);
        }
        printf("], \"chain_error\": ");
        if (chain_err)
                json_str(chain_err);
        else
                printf("null");
        printf("}\n");
}

static int image_show(const char *dir, bool json, bool runs)
{
        _cleanup_(image_freep) Image *img = NULL, *chain = NULL;
        char err[IMAGE_ERR_MAX] = "", cerr[IMAGE_ERR_MAX] = "";
        int r;

        r = image_open(dir, 0, &img, err, sizeof(err));
        if (r < 0) {
                log_error_errno(r, "Cannot decode image: %s", err);
                return 1;
        }
        r = image_open(dir, IMAGE_OPEN_CHAIN, &chain, cerr, sizeof(cerr));
        if (json)
                show_json(img, r < 0 ? img : chain, r < 0 ? cerr : NULL, runs);
        else
                show_text(img, r < 0 ? img : chain, r < 0 ? cerr : NULL, runs);
        if (r < 0) {
                log_error_errno(r, "Image chain is broken: %s", cerr);
                return 1;
        }
        return 0;
}

static int image_verify(const char *dir, bool json)
{
        _cleanup_(image_freep) Image *img = NULL;
        char err[IMAGE_ERR_MAX] = "";
        uint64_t pages = 0, bytes = 0;
        unsigned n = 0;
        int r;

        r = image_open(dir, IMAGE_OPEN_CHAIN | IMAGE_OPEN_VERIFY_DATA, &img, err, sizeof(err));
        if (r < 0) {
                if (json) {
                        printf("{\"path\": ");
                        json_str(dir);
                        printf(", \"ok\": false, \"error\": ");
                        json_str(err);
                        printf("}\n");
                }
                log_error_errno(r, "Image verification failed: %s", err);
                return 1;
        }
        for (const Image *p = img; p; p = p->parent) {
                n++;
                pages += p->inv->present_pages;
                bytes += p->pages_len;
        }
        if (json) {
                printf("{\"path\": ");
                json_str(dir);
                printf(", \"ok\": true, \"chain\": %u, \"present_pages\": %" PRIu64
                       ", \"data_bytes\": %" PRIu64 "}\n",
                       n, pages, bytes);
        } else
                printf("%s: ok: %u image(s) in the chain, every checksum matches (%" PRIu64
                       " present pages, %" PRIu64 " bytes of page data read)\n",
                       dir, n, pages, bytes);
        return 0;
}

static void help(void)
{
        printf("Usage: dirtyrepctl image show DIR [--json] [--runs]\n"
               "       dirtyrepctl image verify DIR [--json]\n"
               "\n"
               "show    decode a checkpoint image: inventory, parent chain, page map, state summary\n"
               "verify  check every file's checksum, every run of page data and the parent chain\n"
               "\n"
               "Exit status: 0 ok, 1 the image is bad or unreadable, 2 usage error.\n");
}

int verb_image(int argc, char *argv[])
{
        static const struct option opts[] = {{"json", no_argument, NULL, 'j'},
                                             {"runs", no_argument, NULL, 'r'},
                                             {"help", no_argument, NULL, 'h'},
                                             {}};
        bool json = false, runs = false;
        const char *cmd, *dir;
        int c;

        if (argc < 2) {
                help();
                return 2;
        }
        if (streq(argv[1], "--help") || streq(argv[1], "-h")) {
                help();
                return 0;
        }
        cmd = argv[1];
        optind = 2;
        while ((c = getopt_long(argc, argv, "h", opts, NULL)) >= 0) {
                switch (c) {
                case 'j':
                        json = true;
                        break;
                case 'r':
                        runs = true;
                        break;
                case 'h':
                        help();
                        return 0;
                default:
                        return 2;
                }
        }
        if (optind + 1 != argc) {
                log_error("image %s needs exactly one image directory (see --help)", cmd);
                return 2;
        }
        dir = argv[optind];
        if (streq(cmd, "show"))
                return image_show(dir, json, runs);
        if (streq(cmd, "verify")) {
                if (runs) {
                        log_error("--runs only makes sense with show");
                        return 2;
                }
                return image_verify(dir, json);
        }
        log_error("Unknown image command '%s' (show, verify)", cmd);
        return 2;
}
