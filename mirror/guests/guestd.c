/* guestd: the demo guest's TCP service (runs as PID 1's child in the busybox initramfs).
 *
 * Listens on a TCP port.  Each connection gets its own counter, kept in this
 * process's memory (guest RAM): every interval it sends "n=<count>\n" with
 * count = 1, 2, 3, ...  A line the client sends comes back as "echo <line>\n"
 * in the same stream.  The counter and the echo show, from outside, that the
 * guest went on from where it was (no reboot, no lost or repeated line).
 * Every second it also writes "guestd: tick <t>" to the console, where t counts
 * those ticks since it started, so a resumed guest is seen continuing on the serial log.
 *
 * With a disk (DISK, e.g. /dev/vda): "write K" appends the line "K" to a journal
 * at the start of the disk, fdatasync, and answers "ok K"; "journal" answers
 * "journal K1 K2 ...", every line of the journal in order.  The journal's length
 * is kept in memory (guest RAM), so memory and disk must come from the same
 * checkpoint for the next append to land right after the last one.
 *
 * "poweroff" answers "bye", syncs and powers the guest off (reboot(RB_POWER_OFF)): a
 * guest that shuts itself down, which a mirrored pair must not bring back to life.
 *
 * usage: guestd PORT INTERVAL_MS [DISK]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CLIENTS 16
#define LINE_MAX_LEN 512

struct client {
    int fd;
    unsigned long long count;
    char in[LINE_MAX_LEN];
    size_t in_len;
};

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int send_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) { /* the peer reads slowly: wait for room */
                struct pollfd p = {fd, POLLOUT, 0};
                poll(&p, 1, 1000);
                continue;
            }
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

#define JOURNAL_MAX (1 << 20)
static const char *disk_path;
static int disk_fd = -1;
static long long journal_len = -1; /* bytes of the journal; -1: not read yet */

static int disk_open(void) {
    if (disk_fd >= 0) return 0;
    if (!disk_path || (disk_fd = open(disk_path, O_RDWR | O_CLOEXEC)) < 0) return -1;
    static char buf[JOURNAL_MAX];
    ssize_t n = pread(disk_fd, buf, sizeof buf, 0);
    if (n < 0) return -1;
    char *end = memchr(buf, 0, (size_t)n);
    journal_len = end ? end - buf : n;
    return 0;
}

/* the answer to one line of a client (0: not a disk command) */
static int disk_command(const char *line, size_t len, char *out, size_t outlen, int *outn) {
    if (len > 6 && !memcmp(line, "write ", 6)) {
        char k[64];
        size_t kl = len - 6;
        while (kl && (line[6 + kl - 1] == '\n' || line[6 + kl - 1] == '\r')) kl--;
        if (kl == 0 || kl >= sizeof k - 1) { *outn = snprintf(out, outlen, "err bad key\n"); return 1; }
        memcpy(k, line + 6, kl);
        k[kl++] = '\n';
        if (disk_open() < 0 || journal_len + (long long)kl > JOURNAL_MAX) {
            *outn = snprintf(out, outlen, "err no disk or journal full\n");
            return 1;
        }
        if (pwrite(disk_fd, k, kl, journal_len) != (ssize_t)kl || fdatasync(disk_fd) < 0) {
            *outn = snprintf(out, outlen, "err %s\n", strerror(errno));
            return 1;
        }
        journal_len += (long long)kl;
        *outn = snprintf(out, outlen, "ok %.*s\n", (int)kl - 1, k);
        return 1;
    }
    if (len >= 7 && !memcmp(line, "journal", 7)) {
        if (disk_open() < 0) { *outn = snprintf(out, outlen, "err no disk\n"); return 1; }
        int n = snprintf(out, outlen, "journal");
        static char buf[JOURNAL_MAX];
        ssize_t got = pread(disk_fd, buf, (size_t)journal_len, 0);
        if (got > 0) out[n++] = ' ';
        for (ssize_t i = 0; i + 1 < got && (size_t)n + 2 < outlen; i++) /* the last is \n */
            out[n++] = buf[i] == '\n' ? ' ' : buf[i];
        out[n++] = '\n';
        *outn = n;
        return 1;
    }
    return 0;
}

static void drop(struct client *c) {
    close(c->fd);
    c->fd = -1;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 7000;
    int interval = argc > 2 ? atoi(argv[2]) : 100;
    disk_path = argc > 3 ? argv[3] : NULL;
    struct client clients[MAX_CLIENTS];
    for (int i = 0; i < MAX_CLIENTS; i++) clients[i].fd = -1;
    signal(SIGPIPE, SIG_IGN);

    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 8) < 0) {
        perror("guestd: bind/listen");
        return 1;
    }
    FILE *con = fopen("/dev/console", "w");
    if (con) {
        fprintf(con, "guestd: listening on port %d, a line every %d ms\n", port, interval);
        fflush(con);
    }
    long long next = now_ms() + interval, next_tick = now_ms() + 1000;
    unsigned long long ticks = 0;
    for (;;) {
        struct pollfd fds[MAX_CLIENTS + 1];
        int map[MAX_CLIENTS + 1], n = 0;
        fds[n].fd = ls; fds[n].events = POLLIN; map[n++] = -1;
        for (int i = 0; i < MAX_CLIENTS; i++)
            if (clients[i].fd >= 0) { fds[n].fd = clients[i].fd; fds[n].events = POLLIN; map[n++] = i; }
        long long wait = next - now_ms();
        if (poll(fds, (nfds_t)n, wait > 0 ? (int)wait : 0) < 0 && errno != EINTR) return 1;
        for (int k = 0; k < n; k++) {
            if (!(fds[k].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            if (map[k] < 0) {
                int fd = accept(ls, NULL, NULL);
                if (fd < 0) continue;
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                int slot = -1;
                for (int i = 0; i < MAX_CLIENTS; i++) if (clients[i].fd < 0) { slot = i; break; }
                if (slot < 0) { close(fd); continue; }
                clients[slot].fd = fd; clients[slot].count = 0; clients[slot].in_len = 0;
                continue;
            }
            struct client *c = &clients[map[k]];
            ssize_t got = recv(c->fd, c->in + c->in_len, sizeof c->in - c->in_len, 0);
            if (got <= 0) { drop(c); continue; }
            c->in_len += (size_t)got;
            char *nl;
            while ((nl = memchr(c->in, '\n', c->in_len)) != NULL) {
                size_t line = (size_t)(nl - c->in) + 1;
                static char out[JOURNAL_MAX + 64];
                int outn = 0;
                if (line >= 8 && !memcmp(c->in, "poweroff", 8)) {
                    send_all(c->fd, "bye\n", 4);
                    sync();
                    reboot(RB_POWER_OFF);
                }
                if (!disk_command(c->in, line, out, sizeof out, &outn)) {
                    memcpy(out, "echo ", 5);
                    memcpy(out + 5, c->in, line);
                    outn = (int)line + 5;
                }
                if (send_all(c->fd, out, (size_t)outn) < 0) { drop(c); break; }
                memmove(c->in, c->in + line, c->in_len - line);
                c->in_len -= line;
            }
            if (c->fd >= 0 && c->in_len == sizeof c->in) drop(c); /* a line too long */
        }
        long long t = now_ms();
        if (t >= next) {
            next += interval;
            if (next < t) next = t + interval;
            for (int i = 0; i < MAX_CLIENTS; i++) {
                if (clients[i].fd < 0) continue;
                char out[64];
                int len = snprintf(out, sizeof out, "n=%llu\n", ++clients[i].count);
                if (send_all(clients[i].fd, out, (size_t)len) < 0) drop(&clients[i]);
            }
        }
        if (t >= next_tick && con) {
            next_tick += 1000;
            fprintf(con, "guestd: tick %llu\n", ++ticks);
            fflush(con);
        }
    }
}
