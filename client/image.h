/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * `dirtyrepctl image show|verify DIR`: decodes a checkpoint image like CRIU's
 * crit, or checks every checksum of it and its parent chain. argv[0] is
 * "image". Returns the process exit status: 0 ok, 1 the image is bad or
 * unreadable (a message names the file), 2 usage error.
 */
int verb_image(int argc, char *argv[]);
