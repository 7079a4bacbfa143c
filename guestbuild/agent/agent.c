/* pclite-agent: runs inside the guest, serves the host over /dev/hvc0 with the framed protocol of PROTOCOL.md.
 *
 * Single-threaded and poll()-driven: one loop watches the channel, every child's pipes and a signalfd for SIGCHLD.
 * Output to the host goes through one queue of whole frames, written without blocking as the channel takes it.
 *
 *   pclite-agent                 serve /dev/hvc0 (raw mode, no echo)
 *   pclite-agent --device PATH   serve another character device
 *   pclite-agent --stdio         serve stdin/stdout (host tests): no tty changes, SHUTDOWN and SET_CLOCK refused
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/utsname.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

#define DEFAULT_DEVICE "/dev/hvc0"
#define IN_READ_SIZE (256 * 1024)
#define IN_CAP (HDR_SIZE + MAX_PAYLOAD + IN_READ_SIZE)
#define MAX_POLL (4 + 3 * MAX_EXECS)

int stdio_mode;
static int in_fd = -1, out_fd = -1;
static int stdio_flags[2] = {-1, -1}; /* fcntl flags of fds 0 and 1 before --stdio made them non-blocking */
static int input_eof;

static struct {
    uint8_t *buf;
    size_t head, tail, cap;
} outq;

static uint8_t *inbuf;
static size_t in_len;

uint64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void restore_stdio_flags(void) {
    for (int fd = 0; fd < 2; fd++)
        if (stdio_flags[fd] >= 0)
            fcntl(fd, F_SETFL, stdio_flags[fd]);
}

/* Leave for good: no child outlives the agent's control of it. */
static void __attribute__((noreturn)) quit(int status) {
    exec_kill_all();
    exit(status);
}

static void __attribute__((noreturn)) die(const char *what) {
    fprintf(stderr, "pclite-agent: %s: %s\n", what, strerror(errno));
    quit(1);
}

/* ---- output queue ---- */

size_t outq_pending(void) { return outq.tail - outq.head; }

static void outq_reserve(size_t n) {
    if (outq.tail + n <= outq.cap)
        return;
    if (outq.head) {
        memmove(outq.buf, outq.buf + outq.head, outq.tail - outq.head);
        outq.tail -= outq.head;
        outq.head = 0;
    }
    if (outq.tail + n <= outq.cap)
        return;
    size_t cap = outq.cap ? outq.cap : 64 * 1024;
    while (cap < outq.tail + n)
        cap *= 2;
    uint8_t *buf = realloc(outq.buf, cap);
    if (!buf)
        die("growing the output queue");
    outq.buf = buf;
    outq.cap = cap;
}

void send_frame2(uint32_t id, uint16_t type, const void *a, size_t alen, const void *b, size_t blen) {
    size_t len = alen + blen;
    outq_reserve(HDR_SIZE + len);
    uint8_t *h = outq.buf + outq.tail;
    put_u32(h, (uint32_t)len);
    put_u32(h + 4, id);
    put_u16(h + 8, type);
    put_u16(h + 10, 0);
    if (alen)
        memcpy(h + HDR_SIZE, a, alen);
    if (blen)
        memcpy(h + HDR_SIZE + alen, b, blen);
    outq.tail += HDR_SIZE + len;
}

void send_frame(uint32_t id, uint16_t type, const void *payload, size_t len) {
    send_frame2(id, type, payload, len, NULL, 0);
}

void send_ok(uint32_t id) { send_frame(id, T_OK, NULL, 0); }

void send_error(uint32_t id, int err, const char *fmt, ...) {
    uint8_t payload[4 + 512];
    put_u32(payload, (uint32_t)err);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf((char *)payload + 4, sizeof payload - 4, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n > sizeof payload - 5)
        n = sizeof payload - 5;
    send_frame(id, T_ERROR, payload, 4 + (size_t)n + 1);
}

/* Write as much of the queue as the channel takes now. */
static void outq_flush(void) {
    while (outq.head < outq.tail) {
        ssize_t n = write(out_fd, outq.buf + outq.head, outq.tail - outq.head);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return;
            die("writing the channel");
        }
        if (n == 0)
            return; /* a tty with no room: wait for POLLOUT */
        outq.head += (size_t)n;
    }
    outq.head = outq.tail = 0;
}

void flush_output_blocking(int timeout_ms) {
    uint64_t deadline = now_us() + (uint64_t)timeout_ms * 1000u;
    for (;;) {
        outq_flush();
        uint64_t now = now_us();
        if (!outq_pending() || now >= deadline)
            return;
        struct pollfd pfd = {.fd = out_fd, .events = POLLOUT};
        poll(&pfd, 1, (int)((deadline - now) / 1000u) + 1);
    }
}

/* ---- input ---- */

static void dispatch(uint32_t id, uint16_t type, const uint8_t *p, size_t len) {
    switch (type) {
    case T_PING: send_frame(id, T_OK, p, len); break;
    case T_EXEC: exec_start(id, p, len); break;
    case T_STDIN: exec_stdin(id, p, len); break;
    case T_SIGNAL: exec_signal(id, p, len); break;
    case T_WRITE_FILE: req_write_file(id, p, len); break;
    case T_READ_FILE: req_read_file(id, p, len); break;
    case T_SET_CLOCK: req_set_clock(id, p, len); break;
    case T_RESEED: req_reseed(id, p, len); break;
    case T_SET_HOSTNAME: req_set_hostname(id, p, len); break;
    case T_SHUTDOWN: req_shutdown(id, p, len); break;
    case T_MOUNT: req_mount(id, p, len); break;
    case T_RESIZE: exec_resize(id, p, len); break;
    default: send_error(id, ENOSYS, "unknown request type %u", type); break;
    }
}

/* Backpressure: while the host is not taking our output, read no requests. A child that does not take its stdin
 * never stalls the channel: the host holds its stdin back (STDIN_ACK window, PROTOCOL.md). */
static int input_stalled(void) { return outq_pending() > OUT_HIGH_WATER; }

static void __attribute__((noreturn)) protocol_error(uint32_t len) {
    send_error(0, EPROTO, "frame payload length %u exceeds the maximum of %u bytes", len, MAX_PAYLOAD);
    flush_output_blocking(2000);
    fprintf(stderr, "pclite-agent: protocol error: frame payload length %u > %u\n", len, MAX_PAYLOAD);
    quit(2);
}

/* Handle every complete frame in the input buffer (unless stalled); keep the incomplete rest. */
static void process_input(void) {
    size_t off = 0;
    while (in_len - off >= HDR_SIZE) {
        const uint8_t *h = inbuf + off;
        uint32_t len = get_u32(h);
        if (len > MAX_PAYLOAD)
            protocol_error(len);
        if (in_len - off < HDR_SIZE + len || input_stalled())
            break;
        dispatch(get_u32(h + 4), get_u16(h + 8), h + HDR_SIZE, len);
        off += HDR_SIZE + len;
    }
    if (off) {
        memmove(inbuf, inbuf + off, in_len - off);
        in_len -= off;
    }
}

static void read_input(void) {
    size_t room = IN_CAP - in_len;
    ssize_t n = read(in_fd, inbuf + in_len, room < IN_READ_SIZE ? room : IN_READ_SIZE);
    if (n < 0) {
        if (errno == EINTR || errno == EAGAIN)
            return;
        if (errno != EIO) /* EIO: the tty was hung up, the same as end of input */
            die("reading the channel");
        n = 0;
    }
    if (n == 0) {
        /* The host went away: kill what runs, report it if anyone still listens, then exit 0. */
        input_eof = 1;
        exec_kill_all();
        return;
    }
    in_len += (size_t)n;
}

/* ---- set-up ---- */

static void set_nonblocking(int fd, int *saved) {
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0)
        die("fcntl F_GETFL");
    if (saved)
        *saved = flags;
    if (fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        die("fcntl F_SETFL");
}

/* Children inherit 0, 1 and 2 only through dup2, but a closed one would let a pipe land there. */
static void ensure_std_fds(void) {
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) < 0)
            die("opening /dev/null");
}

static void open_device(const char *path) {
    int fd = -1;
    for (int attempt = 0; attempt < 100; attempt++) { /* the console driver may still be probing: wait up to 5 s */
        fd = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
        if (fd >= 0 || (errno != ENOENT && errno != ENXIO && errno != ENODEV))
            break;
        usleep(50 * 1000);
    }
    if (fd < 0) {
        fprintf(stderr, "pclite-agent: open %s: %s\n", path, strerror(errno));
        exit(1);
    }
    struct termios tio;
    if (tcgetattr(fd, &tio) == 0) {
        cfmakeraw(&tio);
        tio.c_cc[VMIN] = 1;
        tio.c_cc[VTIME] = 0;
        if (tcsetattr(fd, TCSANOW, &tio) < 0)
            die("tcsetattr on the channel");
    }
    in_fd = out_fd = fd;
}

static int setup_signals(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    if (sigprocmask(SIG_BLOCK, &set, NULL) < 0)
        die("sigprocmask");
    int fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (fd < 0)
        die("signalfd");
    signal(SIGPIPE, SIG_IGN); /* a child that closed its stdin gives EPIPE, not a dead agent */
    /* Orphaned grandchildren are re-parented to us and reaped by the SIGCHLD handling, not left as zombies. */
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    return fd;
}

static void send_ready(void) {
    struct utsname uts;
    if (uname(&uts) < 0)
        die("uname");
    char payload[sizeof PROTO_VERSION + sizeof uts.release + 1];
    int n = snprintf(payload, sizeof payload, "%s %s", PROTO_VERSION, uts.release);
    send_frame(0, T_READY, payload, (size_t)n);
}

static void usage(FILE *to) {
    fputs("usage: pclite-agent [--stdio | --device PATH]\n"
          "  serve the pclite host protocol (PROTOCOL.md) on " DEFAULT_DEVICE " (default), another character\n"
          "  device, or stdin/stdout (--stdio: for host tests; SHUTDOWN and SET_CLOCK are refused)\n",
          to);
}

int main(int argc, char **argv) {
    const char *device = DEFAULT_DEVICE;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--stdio")) {
            stdio_mode = 1;
        } else if (!strcmp(argv[i], "--device") && i + 1 < argc) {
            device = argv[++i];
        } else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else {
            usage(stderr);
            return 64;
        }
    }
    ensure_std_fds();
    int sig_fd = setup_signals();
    inbuf = malloc(IN_CAP);
    if (!inbuf)
        die("allocating the input buffer");
    if (stdio_mode) {
        in_fd = 0;
        out_fd = 1;
        atexit(restore_stdio_flags);
        set_nonblocking(0, &stdio_flags[0]);
        set_nonblocking(1, &stdio_flags[1]);
    } else {
        open_device(device);
    }
    send_ready();

    struct pollfd pfd[MAX_POLL];
    for (;;) {
        process_input();
        exec_finish();
        outq_flush();
        if (input_eof && !exec_count()) {
            flush_output_blocking(1000);
            quit(0);
        }
        int n = 0, in_idx = -1, out_idx = -1;
        pfd[n++] = (struct pollfd){.fd = sig_fd, .events = POLLIN};
        if (!input_eof && !input_stalled())
            pfd[in_idx = n++] = (struct pollfd){.fd = in_fd, .events = POLLIN};
        if (outq_pending())
            pfd[out_idx = n++] = (struct pollfd){.fd = out_fd, .events = POLLOUT};
        n = exec_fill_poll(pfd, n, outq_pending() <= OUT_HIGH_WATER);
        if (poll(pfd, (nfds_t)n, exec_next_timeout_ms()) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (pfd[0].revents) {
            struct signalfd_siginfo si;
            while (read(sig_fd, &si, sizeof si) == sizeof si)
                ;
            exec_reap();
        }
        if (out_idx >= 0 && pfd[out_idx].revents)
            outq_flush();
        if (in_idx >= 0 && pfd[in_idx].revents)
            read_input();
        exec_handle_poll(pfd);
        exec_check_timeouts();
    }
}
