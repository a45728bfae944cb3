/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Service address takeover: see takeover.h. libnl-route-3 for the address,
 * an AF_PACKET socket for the gratuitous ARP (the kernel sends none when an
 * address is added).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <netinet/if_ether.h>
#include <linux/if_packet.h>
#include <netlink/errno.h>
#include <netlink/netlink.h>
#include <netlink/route/addr.h>
#include <netlink/route/link.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "macros.h"
#include "takeover.h"

DEFINE_TRIVIAL_CLEANUP_FUNC_VOID(struct nl_sock *, nl_socket_free);
DEFINE_TRIVIAL_CLEANUP_FUNC_VOID(struct rtnl_addr *, rtnl_addr_put);
DEFINE_TRIVIAL_CLEANUP_FUNC_VOID(struct nl_addr *, nl_addr_put);

void takeover_format(const ConfigCidr *addr, char *buf, size_t size)
{
        char a[INET6_ADDRSTRLEN] = "?";

        (void) inet_ntop(addr->family, &addr->addr, a, sizeof(a));
        snprintf(buf, size, "%s/%u", a, addr->prefixlen);
}

/* libnl's error codes are positive and its own; map the ones that matter. */
static int nl_to_errno(int nlerr)
{
        switch (nlerr < 0 ? -nlerr : nlerr) {
        case NLE_EXIST:
                return -EEXIST;
        case NLE_NOADDR:
        case NLE_OBJ_NOTFOUND:
                return -EADDRNOTAVAIL;
        case NLE_NODEV:
                return -ENODEV;
        case NLE_PERM:
                return -EPERM;
        case NLE_NOMEM:
                return -ENOMEM;
        case NLE_INVAL:
                return -EINVAL;
        default:
                return -EIO;
        }
}

static int address_request(const char *ifname, const ConfigCidr *addr, bool add)
{
        _cleanup_(nl_socket_freep) struct nl_sock *sk = NULL;
        _cleanup_(rtnl_addr_putp) struct rtnl_addr *ra = NULL;
        _cleanup_(nl_addr_putp) struct nl_addr *local = NULL;
        unsigned ifindex;
        int r;

        ifindex = if_nametoindex(ifname);
        if (ifindex == 0)
                return -errno;
        sk = nl_socket_alloc();
        ra = rtnl_addr_alloc();
        if (!sk || !ra)
                return -ENOMEM;
        r = nl_connect(sk, NETLINK_ROUTE);
        if (r < 0)
                return nl_to_errno(r);
        local = nl_addr_build(addr->family, &addr->addr,
                              addr->family == AF_INET ? sizeof(struct in_addr) : sizeof(struct in6_addr));
        if (!local)
                return -ENOMEM;
        nl_addr_set_prefixlen(local, (int) addr->prefixlen);
        rtnl_addr_set_ifindex(ra, (int) ifindex);
        rtnl_addr_set_family(ra, addr->family);
        r = rtnl_addr_set_local(ra, local);
        if (r < 0)
                return nl_to_errno(r);
        rtnl_addr_set_prefixlen(ra, (int) addr->prefixlen);
        if (add) {
                /* No duplicate address detection: the address moves here on purpose. */
                if (addr->family == AF_INET6)
                        rtnl_addr_set_flags(ra, IFA_F_NODAD);
                r = rtnl_addr_add(sk, ra, NLM_F_EXCL);
        } else
                r = rtnl_addr_delete(sk, ra, 0);
        return r < 0 ? nl_to_errno(r) : 0;
}

int takeover_garp(const char *ifname, const struct in_addr *addr, unsigned count)
{
        _cleanup_close_ int fd = -EBADF;
        struct sockaddr_ll ll = {
                .sll_family = AF_PACKET,
                .sll_protocol = htons(ETH_P_ARP),
                .sll_halen = ETH_ALEN,
        };
        struct ifreq ifr = {};
        struct {
                struct ether_header eth;
                struct ether_arp arp;
        } __attribute__((packed)) pkt = {};

        if (strlen(ifname) >= sizeof(ifr.ifr_name))
                return -ENAMETOOLONG;
        fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_ARP));
        if (fd < 0)
                return -errno;
        strcpy(ifr.ifr_name, ifname);
        if (ioctl(fd, SIOCGIFINDEX, &ifr) < 0)
                return -errno;
        ll.sll_ifindex = ifr.ifr_ifindex;
        if (ioctl(fd, SIOCGIFHWADDR, &ifr) < 0)
                return -errno;
        if (ifr.ifr_hwaddr.sa_family != ARPHRD_ETHER)
                return -EAFNOSUPPORT; /* no ARP on this link type: nothing to announce */

        memset(pkt.eth.ether_dhost, 0xff, ETH_ALEN);
        memcpy(pkt.eth.ether_shost, ifr.ifr_hwaddr.sa_data, ETH_ALEN);
        pkt.eth.ether_type = htons(ETH_P_ARP);
        pkt.arp.arp_hrd = htons(ARPHRD_ETHER);
        pkt.arp.arp_pro = htons(ETH_P_IP);
        pkt.arp.arp_hln = ETH_ALEN;
        pkt.arp.arp_pln = 4;
        /* A request for our own address from our own address (RFC 5227 announcement):
         * every host updates an entry it has, and nobody answers. */
        pkt.arp.arp_op = htons(ARPOP_REQUEST);
        memcpy(pkt.arp.arp_sha, ifr.ifr_hwaddr.sa_data, ETH_ALEN);
        memcpy(pkt.arp.arp_spa, addr, 4);
        memcpy(pkt.arp.arp_tpa, addr, 4);
        memset(ll.sll_addr, 0xff, ETH_ALEN);

        for (unsigned i = 0; i < count; i++)
                if (sendto(fd, &pkt, sizeof(pkt), 0, (struct sockaddr *) &ll, sizeof(ll)) < 0)
                        return -errno;
        return 0;
}

int takeover_add(const char *ifname, const ConfigCidr *addr)
{
        int r;

        if (!ifname || !addr || addr->family == AF_UNSPEC)
                return -EINVAL;
        r = address_request(ifname, addr, true);
        if (r < 0 && r != -EEXIST)
                return r;
        if (addr->family == AF_INET) {
                r = takeover_garp(ifname, &addr->addr.in, 2);
                if (r < 0 && r != -EAFNOSUPPORT)
                        return r;
        }
        return 0;
}

int takeover_remove(const char *ifname, const ConfigCidr *addr)
{
        int r;

        if (!ifname || !addr || addr->family == AF_UNSPEC)
                return -EINVAL;
        r = address_request(ifname, addr, false);
        if (r == -EADDRNOTAVAIL || r == -ENODEV)
                return 0;
        return r;
}
