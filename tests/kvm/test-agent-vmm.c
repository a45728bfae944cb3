/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The agent embedded in dirtyrep-vmm ($DR_VMM) running the dirtier guest
 * ($DR_GUEST_DIRTIER), attacked through its control socket:
 *  - a peer of another uid is refused;
 *  - malformed, truncated and oversized packets get error replies, and the
 *    session and the guest (its COM1 progress lines) keep going;
 *  - a peer that sends Pause and disconnects at once leaves the VM running;
 *  - a suspended VM (Pause{suspend}) stays paused across StopTracking{hold_output}
 *    and a disconnect, refuses a plain Resume, is reported to the next client
 *    (HelloReply.suspended, StatusReply.suspended) and runs again only after
 *    Resume{unsuspend}.
 * Exit 77 only when /dev/kvm is missing.
 */
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "agent-client.h"
#include "util.h"

static char console_path[128], sock_path[128];

/* Highest "writes=N" on the console so far (0 if none). */
static unsigned long long console_writes(void)
{
        static char buf[1 << 20];
        unsigned long long best = 0;
        int fd = open(console_path, O_RDONLY | O_CLOEXEC);
        ssize_t n;

        if (fd < 0)
                return 0;
        n = read(fd, buf, sizeof(buf) - 1);
        close(fd);
        if (n <= 0)
                return 0;
        buf[n] = 0;
        for (char *p = buf; (p = strstr(p, "writes=")); p++) {
                unsigned long long v = strtoull(p + 7, NULL, 10);
                best = MAX(best, v);
        }
        return best;
}

/* True when the guest reports new progress on COM1 within 10 s. */
static bool guest_progresses(void)
{
        unsigned long long w0 = console_writes();
        for (int i = 0; i < 200; i++) {
                usleep(50000);
                if (console_writes() > w0)
                        return true;
        }
        return false;
}

/* True when the guest reports no progress for 1.5 s (it reports every 100 ms when running). */
static bool guest_stalled(void)
{
        unsigned long long w0;

        usleep(300000); /* a report under way lands first */
        w0 = console_writes();
        usleep(1500000);
        return console_writes() == w0;
}

/* Hello; returns HelloReply.suspended (-1 when absent). */
static int hello_suspended(int fd)
{
        Dr__Control__Hello h = DR__CONTROL__HELLO__INIT;
        Dr__Control__Request r = DR__CONTROL__REQUEST__INIT;
        Dr__Control__Reply *rep;
        int v;

        h.version = DR__CONTROL__CONTROL_VERSION__CONTROL_VERSION_CURRENT;
        h.client = (char *) "agent test";
        r.body_case = DR__CONTROL__REQUEST__BODY_HELLO;
        r.hello = &h;
        CHECK_EQ(peer_simple(fd, &r, &rep), 0);
        CHECK(rep->body_case == DR__CONTROL__REPLY__BODY_HELLO);
        v = rep->hello->has_suspended ? (int) rep->hello->suspended : -1;
        dr__control__reply__free_unpacked(rep, NULL);
        return v;
}

static int resume_flags(int fd, bool unsuspend)
{
        Dr__Control__Resume m = DR__CONTROL__RESUME__INIT;
        Dr__Control__Request r = DR__CONTROL__REQUEST__INIT;

        m.has_unsuspend = m.unsuspend = unsuspend;
        r.body_case = DR__CONTROL__REQUEST__BODY_RESUME;
        r.resume = &m;
        return peer_simple(fd, &r, NULL);
}

static void status_paused_suspended(int fd, bool *ret_paused, bool *ret_suspended)
{
        Dr__Control__Request r = peer_empty_request(DR__CONTROL__REQUEST__BODY_GET_STATUS);
        Dr__Control__Reply *rep;

        CHECK_EQ(peer_simple(fd, &r, &rep), 0);
        *ret_paused = rep->status->paused;
        *ret_suspended = rep->status->has_suspended && rep->status->suspended;
        dr__control__reply__free_unpacked(rep, NULL);
}

static int send_raw(int fd, const void *buf, size_t len)
{
        Dr__Control__Reply *rep;
        int e;

        CHECK(fdpass_send(fd, buf, len, NULL, 0) == 0);
        rep = peer_recv(fd, NULL, 0, NULL);
        CHECK(rep);
        CHECK_EQ(rep->id, 0);
        e = rep->error;
        dr__control__reply__free_unpacked(rep, NULL);
        return e;
}

int main(void)
{
        const char *vmm = getenv("DR_VMM"), *guest = getenv("DR_GUEST_DIRTIER");
        static uint8_t big[100000];
        uint8_t junk[100];
        pid_t pid, child;
        int fd, status;

        if (access("/dev/kvm", F_OK) < 0) {
                printf("no /dev/kvm: skipping\n");
                return 77;
        }
        CHECK(vmm && guest);
        signal(SIGPIPE, SIG_IGN);

        snprintf(console_path, sizeof(console_path), "/tmp/dr-agent-vmm-%d.console", (int) getpid());
        snprintf(sock_path, sizeof(sock_path), "/tmp/dr-agent-vmm-%d.sock", (int) getpid());
        pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
                execl(vmm, vmm, "--kernel", guest, "--append", "report_ms=100", "--memory", "64M",
                      "--control", sock_path, "--console", console_path, (char *) NULL);
                _exit(127);
        }

        fd = peer_connect_wait(sock_path, 10000);
        CHECK(fd >= 0);
        CHECK(guest_progresses());

        /* Another uid: refused by the socket's mode, and by SO_PEERCRED once the mode allows it. */
        for (int round = 0; round < 2; round++) {
                if (round == 1)
                        CHECK(chmod(sock_path, 0666) == 0);
                child = fork();
                CHECK(child >= 0);
                if (child == 0) {
                        Dr__Control__Reply *rep;
                        int c;

                        if (setresgid(65534, 65534, 65534) < 0 || setresuid(65534, 65534, 65534) < 0)
                                _exit(2);
                        c = peer_connect(sock_path);
                        if (round == 0)
                                _exit(c == -EACCES ? 0 : 3);
                        if (c < 0)
                                _exit(4);
                        rep = peer_recv(c, NULL, 0, NULL);
                        _exit(rep && rep->error == -EPERM && !peer_recv(c, NULL, 0, NULL) ? 0 : 5);
                }
                CHECK(waitpid(child, &status, 0) == child);
                CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        }
        CHECK(chmod(sock_path, 0600) == 0);

        /* Bad input on a live session. */
        CHECK_EQ(peer_hello(fd), 0);
        memset(junk, 0xff, sizeof(junk));
        CHECK_EQ(send_raw(fd, junk, sizeof(junk)), -EBADMSG);
        {
                Dr__Control__Request r = peer_empty_request(DR__CONTROL__REQUEST__BODY_GET_STATUS);
                uint8_t buf[64];
                size_t len;

                r.id = 5;
                len = dr__control__request__get_packed_size(&r);
                dr__control__request__pack(&r, buf);
                CHECK_EQ(send_raw(fd, buf, len - 1), -EBADMSG); /* truncated */
        }
        CHECK_EQ(send_raw(fd, big, sizeof(big)), -EMSGSIZE);
        {
                Dr__Control__Request r = peer_empty_request(DR__CONTROL__REQUEST__BODY_GET_STATUS);
                Dr__Control__Reply *rep;

                CHECK_EQ(peer_simple(fd, &r, &rep), 0); /* the session goes on */
                CHECK(!rep->status->paused);
                dr__control__reply__free_unpacked(rep, NULL);
        }
        CHECK(guest_progresses());

        /* Pause, then vanish: the VM must run on. */
        {
                Dr__Control__Pause p = DR__CONTROL__PAUSE__INIT;
                Dr__Control__Request r = DR__CONTROL__REQUEST__INIT;
                r.id = 1;
                r.body_case = DR__CONTROL__REQUEST__BODY_PAUSE;
                r.pause = &p;
                CHECK(peer_send(fd, &r) == 0);
                close(fd);
        }
        usleep(200000);
        CHECK(guest_progresses());
        CHECK(waitpid(pid, &status, WNOHANG) == 0); /* the VMM is alive */

        /* And a new client finds it running. */
        fd = peer_connect(sock_path);
        CHECK(fd >= 0);
        CHECK_EQ(peer_hello(fd), 0);
        {
                Dr__Control__Request r = peer_empty_request(DR__CONTROL__REQUEST__BODY_GET_STATUS);
                Dr__Control__Reply *rep;

                CHECK_EQ(peer_simple(fd, &r, &rep), 0);
                CHECK(!rep->status->paused && !rep->status->tracking);
                dr__control__reply__free_unpacked(rep, NULL);
        }
        close(fd);

        /* Suspension: what dirtyrepd's split-brain guard leaves behind when it stops or dies. */
        usleep(200000); /* the agent sees the last client go first */
        fd = peer_connect(sock_path);
        CHECK(fd >= 0);
        CHECK_EQ(hello_suspended(fd), 0);
        {
                Dr__Control__Pause p = DR__CONTROL__PAUSE__INIT;
                Dr__Control__StopTracking st = DR__CONTROL__STOP_TRACKING__INIT;
                Dr__Control__Request r = DR__CONTROL__REQUEST__INIT;

                p.has_suspend = p.suspend = true;
                r.body_case = DR__CONTROL__REQUEST__BODY_PAUSE;
                r.pause = &p;
                CHECK_EQ(peer_simple(fd, &r, NULL), 0);
                st.has_hold_output = st.hold_output = true;
                r = (Dr__Control__Request) DR__CONTROL__REQUEST__INIT;
                r.body_case = DR__CONTROL__REQUEST__BODY_STOP_TRACKING;
                r.stop_tracking = &st;
                CHECK_EQ(peer_simple(fd, &r, NULL), 0);
        }
        CHECK_EQ(peer_resume(fd, true, 1), -EPERM); /* a plain Resume: refused */
        close(fd);
        CHECK(guest_stalled()); /* the client left: still suspended */
        CHECK(waitpid(pid, &status, WNOHANG) == 0);
        fd = peer_connect(sock_path);
        CHECK(fd >= 0);
        CHECK_EQ(hello_suspended(fd), 1);
        {
                bool paused, suspended;

                status_paused_suspended(fd, &paused, &suspended);
                CHECK(paused && suspended);
                CHECK_EQ(resume_flags(fd, false), -EPERM);
                CHECK(guest_stalled());
                CHECK_EQ(resume_flags(fd, true), 0);
                CHECK(guest_progresses());
                status_paused_suspended(fd, &paused, &suspended);
                CHECK(!paused && !suspended);
        }
        close(fd);
        usleep(200000);
        fd = peer_connect(sock_path);
        CHECK(fd >= 0);
        CHECK_EQ(hello_suspended(fd), 0);
        close(fd);

        kill(pid, SIGTERM);
        for (int i = 0; i < 100 && waitpid(pid, &status, WNOHANG) == 0; i++)
                usleep(50000);
        if (waitpid(pid, &status, WNOHANG) == 0) {
                kill(pid, SIGKILL);
                waitpid(pid, &status, 0);
        }
        unlink(console_path);
        unlink(sock_path);
        printf("ok\n");
        return 0;
}
