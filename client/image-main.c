/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * dirtyrepctl-image: the `image` verb of dirtyrepctl as an executable of its
 * own, until it is folded into dirtyrepctl. Usage: dirtyrepctl-image image ...
 */
#include <stdio.h>
#include <string.h>

#include "image.h"
#include "log.h"

int main(int argc, char *argv[])
{
        log_set_ident("dirtyrepctl");
        if (argc < 2 || strcmp(argv[1], "image") != 0) {
                fprintf(stderr, "usage: dirtyrepctl-image image show|verify DIR [--json] [--runs]\n");
                return 2;
        }
        return verb_image(argc - 1, argv + 1);
}
