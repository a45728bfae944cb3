/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dirtyrepctl image show|verify DIR: CRIU's crit for dirtyrep images.
 * show decodes the inventory, the parent chain, the page map (summary, or
 * every run with --runs) and a summary of the VM state; --json prints the
 * same as one JSON object. verify opens the image and its whole chain and
 * reads every run of page data, checking every checksum on the way.
 */
#include <assert.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <json-c/json.h>

#include "image.h"
#include "imagefile.h"
#include "log.h"
#include "macros.h"
#include "util.h"
#include "vmstate.pb-c.h"

static void hex(const uint8_t *b, size_t n, char *out)
{
        for (size_t i = 0; i < n; i++)
                sprintf(out + 2 * i, "%02x", b[i]);
        out[2 * n] = 0;
}

/* Length of the valid UTF-8 sequence at s (1..4), or 0 when the byte at s does not start one. */
static size_t utf8_seq_len(const unsigned char *s)
{
        size_t n;
        uint32_t cp;

        if (s[0] < 0x80)
                return 1;
        if (s[0] >= 0xc2 && s[0] <= 0xdf)
                n = 2, cp = s[0] & 0x1f;
        else if (s[0] >= 0xe0 && s[0] <= 0xef)
                n = 3, cp = s[0] & 0x0f;
        else if (s[0] >= 0xf0 && s[0] <= 0xf4)
                n = 4, cp = s[0] & 0x07;
        else
                return 0;
        for (size_t i = 1; i < n; i++) {
                if ((s[i] & 0xc0) != 0x80)
                        return 0;
                cp = cp << 6 | (s[i] & 0x3f);
        }
        /* Overlong forms, UTF-16 surrogates, beyond U+10FFFF. */
        if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
            (cp >= 0xd800 && cp <= 0xdfff))
                return 0;
        return n;
}

/*
 * A JSON string of s: UTF-8 as it is (json-c escapes quotes, backslashes and
 * control characters); a byte that is not part of valid UTF-8 (a path is any
 * bytes) becomes U+FFFD, so the output is always valid JSON.
 */
static json_object *json_str(const char *s)
{
        _cleanup_free_ char *fixed = NULL;
        const unsigned char *p = (const unsigned char *) s;
        size_t len = strlen(s), o = 0;

        for (size_t i = 0; i < len;) {
                size_t n = utf8_seq_len(p + i);
                if (n == 0)
                        break;
                i += n;
                o = i;
        }
        if (o == len)
                return json_object_new_string(s);
        fixed = malloc(len * 3 + 1); /* every byte at most U+FFFD's three */
        if (!fixed)
                return NULL;
        o = 0;
        for (size_t i = 0; i < len;) {
                size_t n = utf8_seq_len(p + i);
                if (n == 0) {
                        memcpy(fixed + o, "\xef\xbf\xbd", 3);
                        o += 3;
                        i++;
                } else {
                        memcpy(fixed + o, s + i, n);
                        o += n;
                        i += n;
                }
        }
        return json_object_new_string_len(fixed, (int) o);
}

static json_object *json_hex(const uint8_t *b, size_t n)
{
        char buf[65];

        assert(n <= 32);
        hex(b, n, buf);
        return json_object_new_string(buf);
}

/* Prints obj as one line and drops it; false when it could not be built (out of memory). */
/* Set when a value or container could not be allocated: json_print() then prints nothing. */
static bool json_oom;

static void json_add(json_object *obj, const char *key, json_object *val)
{
        if (!obj || !val || json_object_object_add(obj, key, val) < 0) {
                json_object_put(val);
                json_oom = true;
        }
}

static void json_add_null(json_object *obj, const char *key)
{
        if (!obj || json_object_object_add(obj, key, NULL) < 0)
                json_oom = true;
}

static void json_push(json_object *arr, json_object *val)
{
        if (!arr || !val || json_object_array_add(arr, val) < 0) {
                json_object_put(val);
                json_oom = true;
        }
}

static bool json_print(json_object *obj)
{
        const char *s = NULL;

        if (obj && !json_oom)
                s = json_object_to_json_string_ext(obj,
                                                   JSON_C_TO_STRING_SPACED | JSON_C_TO_STRING_NOSLASHESCAPE);
        if (s)
                printf("%s\n", s);
        json_object_put(obj);
        return s != NULL;
}

#define JSON_ADD(obj, key, val) json_add((obj), (key), (val))

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
                char u[UUID_STRING_MAX];
                printf(" (uuid %s)", uuid_to_string(inv->vm_uuid.data, u));
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

static json_object *json_regions(const Dr__Image__Inventory *inv)
{
        json_object *a = json_object_new_array();

        for (size_t i = 0; a && i < inv->n_regions; i++) {
                json_object *r = json_object_new_object();
                JSON_ADD(r, "slot", json_object_new_uint64(inv->regions[i]->slot));
                JSON_ADD(r, "guest_phys", json_object_new_uint64(inv->regions[i]->guest_phys));
                JSON_ADD(r, "size", json_object_new_uint64(inv->regions[i]->size));
                JSON_ADD(r, "fd_offset", json_object_new_uint64(inv->regions[i]->fd_offset));
                json_push(a, r);
        }
        return a;
}

static json_object *json_pagemap(const Image *img, bool runs)
{
        MapSummary s = map_summary(img);
        json_object *m = json_object_new_object(), *list;

        JSON_ADD(m, "runs", json_object_new_uint64(img->map->n_runs));
        JSON_ADD(m, "present_pages", json_object_new_uint64(s.pages[1]));
        JSON_ADD(m, "present_runs", json_object_new_uint64(s.runs[1]));
        JSON_ADD(m, "stored_bytes", json_object_new_uint64(s.stored));
        JSON_ADD(m, "lz4_runs", json_object_new_uint64(s.lz4_runs));
        JSON_ADD(m, "zero_pages", json_object_new_uint64(s.pages[2]));
        JSON_ADD(m, "parent_pages", json_object_new_uint64(s.pages[3]));
        if (!runs)
                return m;
        list = json_object_new_array();
        for (size_t i = 0; i < img->map->n_runs; i++) {
                const Dr__Image__PageRun *r = img->map->runs[i];
                json_object *o = json_object_new_object();

                JSON_ADD(o, "first_page", json_object_new_uint64(r->first_page));
                JSON_ADD(o, "pages", json_object_new_uint64(r->n_pages));
                JSON_ADD(o, "kind", json_object_new_string(image_run_kind_name(r->kind)));
                if (r->kind == DR__IMAGE__RUN_KIND__RUN_PRESENT) {
                        bool lz4 = r->has_compression &&
                                   r->compression == DR__IMAGE__COMPRESSION__COMPRESSION_LZ4;

                        JSON_ADD(o, "data_offset", json_object_new_uint64(r->data_offset));
                        JSON_ADD(o, "stored_len", json_object_new_uint64(r->stored_len));
                        JSON_ADD(o, "lz4", json_object_new_boolean(lz4));
                        JSON_ADD(o, "crc32c", json_object_new_uint64(r->data_crc));
                }
                json_push(list, o);
        }
        JSON_ADD(m, "list", list);
        return m;
}

static json_object *json_state(const Image *img)
{
        json_object *st = json_object_new_object(), *vcpus;
        Dr__Vmstate__VmState *vs;

        JSON_ADD(st, "bytes", json_object_new_uint64(img->state_len));
        vs = dr__vmstate__vm_state__unpack(NULL, img->state_len, img->state);
        if (!vs)
                return st;
        vcpus = json_object_new_array();
        for (size_t i = 0; i < vs->n_vcpus; i++) {
                json_object *v = json_object_new_object();
                JSON_ADD(v, "index", json_object_new_uint64(vs->vcpus[i]->index));
                JSON_ADD(v, "mp_state", json_object_new_uint64(vs->vcpus[i]->mp_state));
                JSON_ADD(v, "rip", json_object_new_uint64(vs->vcpus[i]->regs->rip));
                JSON_ADD(v, "rsp", json_object_new_uint64(vs->vcpus[i]->regs->rsp));
                JSON_ADD(v, "cr3", json_object_new_uint64(vs->vcpus[i]->sregs->cr3));
                json_push(vcpus, v);
        }
        JSON_ADD(st, "vcpus", vcpus);
        JSON_ADD(st, "devices_bytes", json_object_new_uint64(vs->has_devices ? vs->devices.len : 0));
        dr__vmstate__vm_state__free_unpacked(vs, NULL);
        return st;
}

static bool show_json(const Image *img, const Image *chain, const char *chain_err, bool runs)
{
        const Dr__Image__Inventory *inv = img->inv;
        json_object *o = json_object_new_object(), *files, *list;
        char u[UUID_STRING_MAX];

        JSON_ADD(o, "path", json_str(img->path));
        JSON_ADD(o, "id", json_hex(inv->image_id.data, 16));
        JSON_ADD(o, "format", json_object_new_uint64(inv->format_version));
        JSON_ADD(o, "kind", json_object_new_string(inv->parent ? "incremental" : "full"));
        JSON_ADD(o, "depth", json_object_new_uint64(inv->depth));
        JSON_ADD(o, "vm_name", json_str(inv->vm_name));
        if (inv->has_vm_uuid)
                JSON_ADD(o, "vm_uuid", json_object_new_string(uuid_to_string(inv->vm_uuid.data, u)));
        JSON_ADD(o, "created_usec", json_object_new_uint64(inv->created_usec));
        JSON_ADD(o, "epoch", json_object_new_uint64(inv->epoch));
        JSON_ADD(o, "vcpus", json_object_new_uint64(inv->n_vcpus));
        JSON_ADD(o, "page_size", json_object_new_uint64(inv->page_size));
        JSON_ADD(o, "total_pages", json_object_new_uint64(inv->total_pages));
        JSON_ADD(o, "regions", json_regions(inv));
        if (inv->parent) {
                json_object *p = json_object_new_object();
                JSON_ADD(p, "path", json_str(inv->parent->path));
                JSON_ADD(p, "id", json_hex(inv->parent->image_id.data, 16));
                JSON_ADD(p, "inventory_sha256", json_hex(inv->parent->inventory_sha256.data, 32));
                JSON_ADD(o, "parent", p);
        } else
                json_add_null(o, "parent");
        files = json_object_new_object();
        for (size_t i = 0; i < inv->n_files; i++)
                JSON_ADD(files, inv->files[i]->name, json_object_new_uint64(inv->files[i]->size));
        JSON_ADD(o, "files", files);
        JSON_ADD(o, "pagemap", json_pagemap(img, runs));
        JSON_ADD(o, "state", json_state(img));
        list = json_object_new_array();
        for (const Image *p = chain; p; p = p->parent) {
                json_object *c = json_object_new_object();
                JSON_ADD(c, "depth", json_object_new_uint64(p->inv->depth));
                JSON_ADD(c, "id", json_hex(p->inv->image_id.data, 16));
                JSON_ADD(c, "path", json_str(p->path));
                JSON_ADD(c, "present_pages", json_object_new_uint64(p->inv->present_pages));
                json_push(list, c);
        }
        JSON_ADD(o, "chain", list);
        if (chain_err)
                JSON_ADD(o, "chain_error", json_str(chain_err));
        else
                json_add_null(o, "chain_error");
        return json_print(o);
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
        if (json) {
                if (!show_json(img, r < 0 ? img : chain, r < 0 ? cerr : NULL, runs))
                        return log_oom(), 1;
        } else
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
                        json_object *o = json_object_new_object();
                        JSON_ADD(o, "path", json_str(dir));
                        JSON_ADD(o, "ok", json_object_new_boolean(false));
                        JSON_ADD(o, "error", json_str(err));
                        (void) json_print(o);
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
                json_object *o = json_object_new_object();
                JSON_ADD(o, "path", json_str(dir));
                JSON_ADD(o, "ok", json_object_new_boolean(true));
                JSON_ADD(o, "chain", json_object_new_uint64(n));
                JSON_ADD(o, "present_pages", json_object_new_uint64(pages));
                JSON_ADD(o, "data_bytes", json_object_new_uint64(bytes));
                if (!json_print(o))
                        return log_oom(), 1;
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
