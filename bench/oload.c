/* oload: an open-loop HTTP/1.1 load generator at a fixed request rate.
 *
 * Request i is due at start + i/rate whatever happened before it (open loop), and its
 * latency is measured from that due time, not from when a connection was free to send
 * it, so a stall shows up in the percentiles instead of hiding (no coordinated
 * omission). Keep-alive connections; a due request waits for an idle connection.
 *
 *   oload -u http://127.0.0.1:8080/path -r 1000 -d 10 [-c 64] [-w 1] [-H "Host: x"]
 *
 * Prints one line: sent, ok, errors, achieved rate, p50 p90 p99 p99.9 max in ms.
 * Built by bench/run with the system C compiler; single thread, epoll + timerfd.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAXC 4096
#define RBUF 262144

typedef struct {
    int fd;
    int busy;          /* a request is in flight */
    int connected;
    uint64_t due;      /* due time of the request in flight (ns) */
    char *buf;
    size_t len;
} conn_t;

static conn_t conns[MAXC];
static int nconns = 64;
static struct sockaddr_in addr;
static char req[4096];
static size_t reqlen;
static int ep;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void open_conn(int i) {
    conn_t *c = &conns[i];
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    connect(c->fd, (struct sockaddr *)&addr, sizeof addr);
    c->busy = 0; c->connected = 0; c->len = 0;
    struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP, .data.u32 = (uint32_t)i };
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
}

static void close_conn(int i) {
    epoll_ctl(ep, EPOLL_CTL_DEL, conns[i].fd, NULL);
    close(conns[i].fd);
    open_conn(i);
}

/* Length of a complete response at the start of buf, 0 if incomplete, -1 if bad.
 * Sets *status. Only Content-Length framing (the bench backends use it). */
static long response_len(const char *buf, size_t len, int *status) {
    const char *end = memmem(buf, len, "\r\n\r\n", 4);
    if (!end) return len > 65536 ? -1 : 0;
    size_t head = (size_t)(end - buf) + 4;
    if (len < 12 || strncmp(buf, "HTTP/1.", 7) != 0) return -1;
    *status = atoi(buf + 9);
    long cl = 0;
    for (const char *p = buf; p < end; ) {
        const char *eol = memmem(p, (size_t)(end - p) + 2, "\r\n", 2);
        if (!eol) break;
        if ((size_t)(eol - p) > 15 && strncasecmp(p, "content-length:", 15) == 0) cl = atol(p + 15);
        p = eol + 2;
    }
    return head + cl <= len ? (long)(head + cl) : 0;
}

int main(int argc, char **argv) {
    const char *url = NULL, *hosthdr = NULL;
    double rate = 1000, dur = 10, warm = 1;
    int opt;
    while ((opt = getopt(argc, argv, "u:r:d:c:w:H:")) != -1) {
        switch (opt) {
        case 'u': url = optarg; break;
        case 'r': rate = atof(optarg); break;
        case 'd': dur = atof(optarg); break;
        case 'c': nconns = atoi(optarg); break;
        case 'w': warm = atof(optarg); break;
        case 'H': hosthdr = optarg; break;
        default: fprintf(stderr, "usage: oload -u URL -r RATE -d SECONDS [-c CONNS] [-w WARMUP] [-H 'Host: h']\n"); return 2;
        }
    }
    if (!url || strncmp(url, "http://", 7) != 0 || rate <= 0 || dur <= 0 || nconns < 1 || nconns > MAXC) {
        fprintf(stderr, "oload: need -u http://IP:PORT/path, a positive -r and -d, 1..%d connections\n", MAXC);
        return 2;
    }
    char host[256] = {0}, path[1024] = "/";
    int port = 80;
    const char *h = url + 7, *slash = strchr(h, '/'), *colon = strchr(h, ':');
    size_t hl = slash ? (size_t)(slash - h) : strlen(h);
    if (colon && (!slash || colon < slash)) { port = atoi(colon + 1); hl = (size_t)(colon - h); }
    if (hl >= sizeof host) return 2;
    memcpy(host, h, hl);
    if (slash) snprintf(path, sizeof path, "%s", slash);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) { fprintf(stderr, "oload: %s is not an IPv4 address\n", host); return 2; }
    reqlen = (size_t)snprintf(req, sizeof req, "GET %s HTTP/1.1\r\n%s%s\r\nUser-Agent: oload\r\n\r\n", path,
                              hosthdr ? hosthdr : "Host: ", hosthdr ? "" : host);

    ep = epoll_create1(0);
    for (int i = 0; i < nconns; i++) { conns[i].buf = malloc(RBUF); open_conn(i); }
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct epoll_event tev = { .events = EPOLLIN, .data.u32 = UINT32_MAX };
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);

    uint64_t interval = (uint64_t)(1e9 / rate);
    uint64_t total = (uint64_t)((warm + dur) * rate);
    uint64_t warm_n = (uint64_t)(warm * rate);
    double *lat = malloc(sizeof(double) * (total + 1));
    size_t nlat = 0;
    uint64_t *queue = malloc(sizeof(uint64_t) * (total + 1)); /* due times waiting for a connection */
    size_t qhead = 0, qtail = 0;
    uint64_t sent = 0, errors = 0, ok = 0, scheduled = 0, done = 0;
    uint64_t start = now_ns() + 50000000ull; /* connections settle for 50 ms */
    uint64_t deadline = start + (uint64_t)((warm + dur) * 1e9) + 5000000000ull; /* 5 s to drain */
    int idle[MAXC], nidle = 0;
    struct epoll_event evs[256];

    while (done < total) {
        uint64_t t = now_ns();
        if (t > deadline) break;
        while (scheduled < total && start + scheduled * interval <= t) queue[qtail++] = start + (scheduled++) * interval;
        /* Dispatch due requests to idle connections. */
        nidle = 0;
        for (int i = 0; i < nconns; i++) if (conns[i].connected && !conns[i].busy) idle[nidle++] = i;
        while (qhead < qtail && nidle > 0) {
            conn_t *c = &conns[idle[--nidle]];
            ssize_t w = send(c->fd, req, reqlen, MSG_NOSIGNAL);
            if (w != (ssize_t)reqlen) { errors++; done++; qhead++; continue; }
            c->busy = 1; c->due = queue[qhead++]; sent++;
        }
        if (scheduled < total) {
            struct itimerspec its = {0};
            uint64_t next = start + scheduled * interval;
            its.it_value.tv_sec = (time_t)(next / 1000000000ull);
            its.it_value.tv_nsec = (long)(next % 1000000000ull);
            timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
        }
        int n = epoll_wait(ep, evs, 256, 100);
        for (int k = 0; k < n; k++) {
            uint32_t i = evs[k].data.u32;
            if (i == UINT32_MAX) { uint64_t x; while (read(tfd, &x, sizeof x) > 0) {} continue; }
            conn_t *c = &conns[i];
            if (!c->connected && (evs[k].events & EPOLLOUT)) {
                int err = 0; socklen_t el = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err) { close_conn((int)i); usleep(1000); continue; }
                c->connected = 1;
                struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP, .data.u32 = i };
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
            }
            if (evs[k].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
                for (;;) {
                    ssize_t r = recv(c->fd, c->buf + c->len, RBUF - c->len, 0);
                    if (r > 0) { c->len += (size_t)r; if (c->len < RBUF) continue; }
                    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK) || c->len == RBUF) {
                        if (c->busy) { errors++; done++; }
                        close_conn((int)i);
                        c = NULL;
                    }
                    break;
                }
                if (!c) continue;
                while (c->busy) {
                    int status = 0;
                    long rl = response_len(c->buf, c->len, &status);
                    if (rl < 0) { errors++; done++; close_conn((int)i); break; }
                    if (rl == 0) break;
                    uint64_t t2 = now_ns();
                    uint64_t idx = (c->due - start) / interval;
                    if (status >= 200 && status < 400) ok++; else errors++;
                    if (idx >= warm_n) lat[nlat++] = (double)(t2 - c->due) / 1e6;
                    done++;
                    c->busy = 0;
                    memmove(c->buf, c->buf + rl, c->len - (size_t)rl);
                    c->len -= (size_t)rl;
                }
            }
        }
    }
    double elapsed = (double)(now_ns() - start) / 1e9;
    qsort(lat, nlat, sizeof(double), cmp);
#define PCT(p) (nlat ? lat[(size_t)((double)(nlat - 1) * (p))] : 0.0)
    printf("sent %llu ok %llu errors %llu unfinished %llu rate %.0f p50 %.3f p90 %.3f p99 %.3f p99.9 %.3f max %.3f\n",
           (unsigned long long)sent, (unsigned long long)ok, (unsigned long long)errors, (unsigned long long)(total - done),
           (double)done / (elapsed > 0 ? elapsed : 1), PCT(0.50), PCT(0.90), PCT(0.99), PCT(0.999), nlat ? lat[nlat - 1] : 0.0);
    return 0;
}
