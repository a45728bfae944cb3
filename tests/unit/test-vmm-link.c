/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Who may serve ControlSocket=: vmm_link_open_checked() against real unix
 * sockets served by a child process as root or as uid 65534 (nobody), in
 * directories of different owners and modes. The child never answers the
 * Hello: a socket that passes the checks fails later, with another error than
 * -EPERM. Needs root (to play another uid); without it the cases are skipped.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "macros.h"
#include "tests.h"
#include "util.h"
#include "vmm-link.h"

#define NOBODY 65534

typedef struct Server {
        pid_t pid;
} Server;

/* A child binds path as root, gives the file to file_uid, then listens as listen_uid and
 * accepts (and closes) connections until killed. */
static Server serve(const char *path, uid_t file_uid, uid_t listen_uid)
{
        int ready[2];
        Server s;
        char c;

        ASSERT_OK(RET_NERRNO(pipe2(ready, O_CLOEXEC)));
        s.pid = fork();
        ASSERT_TRUE(s.pid >= 0);
        if (s.pid == 0) {
                struct sockaddr_un sa = {.sun_family = AF_UNIX};
                int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);

                snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
                if (fd < 0 || bind(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0 ||
                    chown(path, file_uid, file_uid) < 0)
                        _exit(2);
                if (listen_uid != 0 && (setresgid(listen_uid, listen_uid, listen_uid) < 0 ||
                                        setresuid(listen_uid, listen_uid, listen_uid) < 0))
                        _exit(3);
                /* SO_PEERCRED of a connection to a listening socket: whoever called listen(). */
                if (listen(fd, 4) < 0 || write(ready[1], "x", 1) != 1)
                        _exit(4);
                for (;;) {
                        int cfd = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
                        if (cfd >= 0)
                                close(cfd);
                }
        }
        close(ready[1]);
        ASSERT_EQ(read(ready[0], &c, 1), 1);
        close(ready[0]);
        return s;
}

static void server_stop(Server *s, const char *path)
{
        ASSERT_OK(RET_NERRNO(kill(s->pid, SIGKILL)));
        ASSERT_EQ(waitpid(s->pid, NULL, 0), s->pid);
        (void) unlink(path);
}

/* Opens path; returns the error, with the refusal's reason in why. */
static int try_open(const char *path, char *why, size_t size)
{
        VmmLink *l = NULL;
        int r = vmm_link_open_checked(path, "test", why, size, &l);
        ASSERT_TRUE(r < 0); /* nobody answers the Hello */
        ASSERT_TRUE(!l);
        fprintf(stderr, "  %s: %s%s%s\n", path, strerror(-r), why[0] ? ": " : "", why);
        return r;
}

static bool need_root(void)
{
        if (geteuid() == 0)
                return true;
        fprintf(stderr, "  skipped: not root\n");
        return false;
}

static char tmpdir[64];

static void make_dir(const char *path, uid_t uid, mode_t mode)
{
        ASSERT_OK(RET_NERRNO(mkdir(path, mode)));
        ASSERT_OK(RET_NERRNO(chown(path, uid, uid)));
        ASSERT_OK(RET_NERRNO(chmod(path, mode)));
}

TEST(control_socket_root_served_by_root)
{
        char path[128], why[512];
        Server s;

        if (!need_root())
                return;
        snprintf(path, sizeof(path), "%s/root.sock", tmpdir);
        s = serve(path, 0, 0);
        ASSERT_TRUE(try_open(path, why, sizeof(why)) != -EPERM);
        server_stop(&s, path);
}

TEST(control_socket_owned_by_another_user)
{
        char dir[128], path[160], why[512];
        Server s;

        if (!need_root())
                return;
        /* In a directory of root's that others may write (as /tmp): anyone could have made it. */
        snprintf(dir, sizeof(dir), "%s/shared", tmpdir);
        make_dir(dir, 0, 01777);
        snprintf(path, sizeof(path), "%s/vm.sock", dir);
        s = serve(path, NOBODY, NOBODY);
        ASSERT_EQ(try_open(path, why, sizeof(why)), -EPERM);
        ASSERT_TRUE(strstr(why, "owned by uid 65534"));
        server_stop(&s, path);
}

TEST(control_socket_of_a_vmm_user_in_its_own_directory)
{
        char dir[128], path[160], why[512];
        Server s;

        if (!need_root())
                return;
        /* A VMM running as its own user, its socket in a directory only that user writes. */
        snprintf(dir, sizeof(dir), "%s/vmmuser", tmpdir);
        make_dir(dir, NOBODY, 0700);
        snprintf(path, sizeof(path), "%s/vm.sock", dir);
        s = serve(path, NOBODY, NOBODY);
        ASSERT_TRUE(try_open(path, why, sizeof(why)) != -EPERM);
        server_stop(&s, path);
}

TEST(control_socket_in_a_directory_below_a_shared_one)
{
        char shared[128], dir[160], path[192], why[512];
        Server s;

        if (!need_root())
                return;
        /* Its own directory, but in one everybody may write (as /tmp/vms/vm.sock): anyone could
         * have made the directory, and the socket in it. */
        snprintf(shared, sizeof(shared), "%s/shared2", tmpdir);
        make_dir(shared, 0, 01777);
        snprintf(dir, sizeof(dir), "%s/vms", shared);
        make_dir(dir, NOBODY, 0700);
        snprintf(path, sizeof(path), "%s/vm.sock", dir);
        s = serve(path, NOBODY, NOBODY);
        ASSERT_EQ(try_open(path, why, sizeof(why)), -EPERM);
        ASSERT_TRUE(strstr(why, "others can write"));
        server_stop(&s, path);
        ASSERT_OK(RET_NERRNO(rmdir(dir)));
}

TEST(control_socket_served_by_another_uid)
{
        char path[128], why[512];
        Server s;

        if (!need_root())
                return;
        /* The file is root's, but the process behind it is not root (nor the file's owner). */
        snprintf(path, sizeof(path), "%s/peer.sock", tmpdir);
        s = serve(path, 0, NOBODY);
        ASSERT_EQ(try_open(path, why, sizeof(why)), -EPERM);
        ASSERT_TRUE(strstr(why, "uid 65534") && strstr(why, "neither root nor the socket's owner"));
        server_stop(&s, path);
}

TEST(control_socket_not_a_socket)
{
        char path[128], why[512];
        int fd;

        snprintf(path, sizeof(path), "%s/file", tmpdir);
        fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
        ASSERT_TRUE(fd >= 0);
        close(fd);
        ASSERT_EQ(try_open(path, why, sizeof(why)), -EPERM);
        ASSERT_TRUE(strstr(why, "not a socket"));
        unlink(path);
}

int main(void)
{
        /* Below /run when root: a directory under /tmp (writable by all) is never "a VMM user's
         * own", whatever its own owner and mode. */
        snprintf(tmpdir, sizeof(tmpdir), "/run/dr-vmm-link-XXXXXX");
        if (geteuid() != 0 || !mkdtemp(tmpdir)) {
                snprintf(tmpdir, sizeof(tmpdir), "/tmp/dr-vmm-link-XXXXXX");
                ASSERT_TRUE(mkdtemp(tmpdir));
        }
        /* nobody must reach its directories below. */
        ASSERT_OK(RET_NERRNO(chmod(tmpdir, 0755)));
        tests_run();
        for (const char *sub = "shared\0vmmuser\0shared2\0"; *sub; sub += strlen(sub) + 1) {
                char d[128];
                snprintf(d, sizeof(d), "%s/%s", tmpdir, sub);
                (void) rmdir(d);
        }
        (void) rmdir(tmpdir);
        return 0;
}
