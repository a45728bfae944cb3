/* SPDX-License-Identifier: GPL-2.0-or-later */
#pragma once

/*
 * Service address takeover (ServiceAddress= on ServiceInterface=): the
 * address clients use follows the VM to whichever host runs it as primary.
 * Adding goes through rtnetlink (libnl-route-3); for IPv4 a gratuitous ARP
 * (an ARP request for the address from the address, broadcast, sent twice)
 * then moves the neighbours' caches to this host's MAC at once instead of
 * when their entries expire. Synchronous: each call is one or two netlink
 * round trips on a fresh socket.
 */

#include "config.h"

/*
 * Adds addr/prefixlen to the interface ifname. Present already: 0 (not an
 * error; the garp still goes out). Then, for IPv4, sends the gratuitous ARP.
 * Returns 0 or a negative errno (-ENODEV: no such interface).
 */
int takeover_add(const char *ifname, const ConfigCidr *addr);

/* Removes the address. Not present: 0. Returns 0 or a negative errno. */
int takeover_remove(const char *ifname, const ConfigCidr *addr);

/* Sends `count` gratuitous ARPs for an IPv4 address from ifname's MAC. */
int takeover_garp(const char *ifname, const struct in_addr *addr, unsigned count);

/* "10.1.2.3/24" into buf. */
void takeover_format(const ConfigCidr *addr, char *buf, size_t size);
