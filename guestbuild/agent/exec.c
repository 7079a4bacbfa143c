/* pclite-agent: EXEC, STDIN, SIGNAL and RESIZE — child processes, their pipes, timeouts and EXIT reports.
 *
 * A child runs in its own session (so its pid is its process group id) with stdout and stderr on pipes read here,
 * stdin on a pipe fed by STDIN frames or /dev/null; or, with EXEC_TTY, all three on a new terminal whose master
 * is read and written here. How the child itself is set up (chroot, user, rlimits) is process.c. EXIT goes out once the child has been reaped AND both output
 * pipes reached end of file; on a timeout (or when the host goes away) the whole group is killed and the pipes are
 * drained and closed as soon as the child has been reaped.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agent.h"

enum { OUT = 0, ERR = 1 };

struct exec {
    int used;
    uint32_t id;
    pid_t pid;             /* also the process group id: the child called setsid() */
    int fd_in, fd_out[2];  /* our pipe ends, -1 once closed; fd_out[OUT] is stdout, fd_out[ERR] stderr */
    int tty;               /* fd_out[OUT] is a terminal's master (fd_in a dup of it), fd_out[ERR] is unused */
    uint8_t *in_buf;       /* stdin bytes the child's pipe has not taken yet */
    size_t in_head, in_len, in_cap;
    int in_close;          /* the host sent an empty STDIN: close once the buffer drains */
    uint32_t in_unacked;   /* stdin bytes that left the buffer (or were dropped) and the host was not told yet */
    uint32_t cap;          /* output cap per stream, 0 = unlimited */
    uint64_t sent[2];
    int truncated[2];
    uint64_t start_us, deadline_us; /* deadline 0 = no timeout */
    int timed_out, killed, reaped, status;
    uint64_t end_us;
};

static struct exec execs[MAX_EXECS];
static int poll_base = -1;              /* index of our first entry in the last pollfd array */
static int poll_slot[3 * MAX_EXECS];    /* which exec ... */
static int poll_what[3 * MAX_EXECS];    /* ... and which pipe: 0 stdout, 1 stderr, 2 stdin */
static int poll_count;

static struct exec *find_exec(uint32_t id) {
    for (int i = 0; i < MAX_EXECS; i++)
        if (execs[i].used && execs[i].id == id)
            return &execs[i];
    return NULL;
}

int exec_count(void) {
    int n = 0;
    for (int i = 0; i < MAX_EXECS; i++)
        n += execs[i].used;
    return n;
}

struct child_failure {
    int32_t stage, err, detail;
};

/* ---- EXEC ---- */

static void close_fd(int *fd) {
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static void report_child_failure(uint32_t id, const struct child_failure *f, const struct proc_opts *o) {
    char what[512];
    send_error(id, f->err, "%s: %s", child_stage_text(f->stage, f->detail, o, what, sizeof what), strerror(f->err));
}

/* Fork and exec; on success fill e and return 0, on failure send the ERROR frame and return -1. */
static int spawn(struct exec *e, const struct proc_opts *o, int with_stdin) {
    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1}, st[2] = {-1, -1}, master = -1;
    const char *argv0 = o->argv[0];
    if (o->tty) { /* one terminal for stdin, stdout and stderr: in[0] is its slave, in[1] its master */
        if ((master = open_terminal(o->root, o->rows, o->cols, &in[0])) < 0 || (in[1] = dup(master)) < 0) {
            send_error(e->id, errno, "open a terminal for exec %s: %s", argv0, strerror(errno));
            goto fail;
        }
        fcntl(in[1], F_SETFD, FD_CLOEXEC);
    } else if ((with_stdin && pipe2(in, O_CLOEXEC) < 0) || pipe2(out, O_CLOEXEC) < 0 ||
               pipe2(err, O_CLOEXEC) < 0) {
        send_error(e->id, errno, "pipe2 for exec %s: %s", argv0, strerror(errno));
        goto fail;
    }
    if (pipe2(st, O_CLOEXEC) < 0) {
        send_error(e->id, errno, "pipe2 for exec %s: %s", argv0, strerror(errno));
        goto fail;
    }
    e->start_us = now_us();
    pid_t pid = fork();
    if (pid < 0) {
        send_error(e->id, errno, "fork for exec %s: %s", argv0, strerror(errno));
        goto fail;
    }
    if (pid == 0)
        child_exec(o, in[0], o->tty ? in[0] : out[1], o->tty ? in[0] : err[1], st[1]);
    close_fd(&in[0]);
    close_fd(&out[1]);
    close_fd(&err[1]);
    close_fd(&st[1]);
    struct child_failure f;
    ssize_t n;
    do /* EOF here means execve succeeded (the write end is close-on-exec) */
        n = read(st[0], &f, sizeof f);
    while (n < 0 && errno == EINTR);
    close_fd(&st[0]);
    if (n == (ssize_t)sizeof f) {
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
        report_child_failure(e->id, &f, o);
        goto fail;
    }
    e->pid = pid;
    e->tty = o->tty;
    e->fd_in = in[1];
    e->fd_out[OUT] = o->tty ? master : out[0];
    e->fd_out[ERR] = o->tty ? -1 : err[0];
    for (int i = 0; i < 2; i++)
        if (e->fd_out[i] >= 0)
            fcntl(e->fd_out[i], F_SETFL, O_NONBLOCK);
    if (e->fd_in >= 0)
        fcntl(e->fd_in, F_SETFL, O_NONBLOCK);
    return 0;
fail:
    close_fd(&master);
    for (int i = 0; i < 2; i++) {
        close_fd(&in[i]);
        close_fd(&out[i]);
        close_fd(&err[i]);
        close_fd(&st[i]);
    }
    return -1;
}

void exec_start(uint32_t id, const uint8_t *p, size_t len) {
    static char *default_env[] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "TERM=dumb", NULL};
    if (find_exec(id)) {
        send_error(id, EEXIST, "exec id %u is already running", id);
        return;
    }
    struct exec *e = NULL;
    for (int i = 0; i < MAX_EXECS && !e; i++)
        if (!execs[i].used)
            e = &execs[i];
    if (!e) {
        send_error(id, EAGAIN, "too many concurrent execs (at most %d)", MAX_EXECS);
        return;
    }
    if (len < 16) {
        send_error(id, EINVAL, "EXEC: payload of %zu bytes is shorter than its 16-byte <IIIHH> header", len);
        return;
    }
    uint32_t timeout_ms = get_u32(p), cap = get_u32(p + 4), flags = get_u32(p + 8);
    unsigned argc = get_u16(p + 12), envc = get_u16(p + 14);
    if (argc == 0) {
        send_error(id, EINVAL, "EXEC: argc is 0 (argv[0], the program, is required)");
        return;
    }
    char **argv = calloc(argc + 1, sizeof *argv), **env = calloc(envc + 1, sizeof *env);
    static struct proc_opts o;
    memset(&o, 0, sizeof o);
    struct cursor c = {p, len, 16};
    const char *cwd = take_str(&c);
    int ok = argv && env && cwd;
    for (unsigned i = 0; ok && i < argc; i++)
        ok = (argv[i] = (char *)take_str(&c)) != NULL;
    for (unsigned i = 0; ok && i < envc; i++)
        ok = (env[i] = (char *)take_str(&c)) != NULL;
    char why[256];
    if (!ok) {
        send_error(id, argv && env ? EINVAL : ENOMEM,
                   "EXEC: payload ends before cwd, %u argv and %u env NUL-terminated strings", argc, envc);
    } else if ((flags & EXEC_PROCESS) && proc_parse(&c, &o, why, sizeof why) < 0) {
        send_error(id, EINVAL, "%s", why);
    } else {
        memset(e, 0, sizeof *e);
        e->id = id;
        e->cap = cap;
        o.cwd = cwd;
        o.argv = argv;
        o.envp = envc ? env : default_env;
        o.tty = (flags & EXEC_TTY) != 0;
        if (spawn(e, &o, (flags & EXEC_STDIN_FOLLOWS) != 0) == 0) {
            e->used = 1;
            e->deadline_us = timeout_ms ? e->start_us + (uint64_t)timeout_ms * 1000u : 0;
            uint8_t started[4];
            put_u32(started, (uint32_t)e->pid);
            send_frame(id, T_STARTED, started, sizeof started);
        }
    }
    free(argv);
    free(env);
}

/* ---- STDIN ---- */

/* STDIN_ACK: give the host's window back, in batches (or at once when the buffer is empty). */
static void stdin_ack(struct exec *e, size_t n, int force) {
    e->in_unacked += (uint32_t)n;
    if (e->in_unacked && (force || !e->in_len || e->in_unacked >= STDIN_ACK_BATCH)) {
        uint8_t payload[4];
        put_u32(payload, e->in_unacked);
        send_frame(e->id, T_STDIN_ACK, payload, sizeof payload);
        e->in_unacked = 0;
    }
}

static void stdin_close(struct exec *e) {
    close_fd(&e->fd_in);
    size_t dropped = e->in_len;
    free(e->in_buf);
    e->in_buf = NULL;
    e->in_head = e->in_len = e->in_cap = 0;
    stdin_ack(e, dropped, 0);
}

/* Write buffered stdin as far as the pipe takes it; close when asked to and drained, or when the child is gone. */
static void stdin_pump(struct exec *e) {
    while (e->fd_in >= 0 && e->in_len) {
        ssize_t n = write(e->fd_in, e->in_buf + e->in_head, e->in_len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                stdin_close(e); /* EPIPE: the child closed its stdin; what is left is dropped */
            return;
        }
        e->in_head += (size_t)n;
        e->in_len -= (size_t)n;
        stdin_ack(e, (size_t)n, 0);
    }
    if (e->fd_in >= 0 && e->in_close && !e->in_len)
        stdin_close(e);
}

void exec_stdin(uint32_t id, const uint8_t *p, size_t len) {
    struct exec *e = find_exec(id);
    if (!e)
        return; /* the child has exited: the data is dropped, as a pipe would */
    if (e->fd_in < 0 || e->in_close) {
        stdin_ack(e, len, 1); /* closed stdin, or none: dropped, but the host gets its window back */
        return;
    }
    if (len == 0) {
        e->in_close = 1;
    } else if (e->in_len + len > STDIN_WINDOW + MAX_PAYLOAD) {
        fprintf(stderr, "pclite-agent: the host overran the stdin window of exec %u: closing its stdin\n", id);
        stdin_ack(e, len, 0);
        stdin_close(e);
        return;
    } else {
        if (e->in_head + e->in_len + len > e->in_cap) {
            if (e->in_head)
                memmove(e->in_buf, e->in_buf + e->in_head, e->in_len);
            e->in_head = 0;
            if (e->in_len + len > e->in_cap) {
                size_t cap = e->in_cap ? e->in_cap : 64 * 1024;
                while (cap < e->in_len + len)
                    cap *= 2;
                uint8_t *buf = realloc(e->in_buf, cap);
                if (!buf) {
                    fprintf(stderr, "pclite-agent: out of memory for stdin of exec %u: closing it\n", id);
                    stdin_close(e);
                    return;
                }
                e->in_buf = buf;
                e->in_cap = cap;
            }
        }
        memcpy(e->in_buf + e->in_head + e->in_len, p, len);
        e->in_len += len;
    }
    stdin_pump(e);
}

/* ---- SIGNAL ---- */

void exec_signal(uint32_t id, const uint8_t *p, size_t len) {
    if (len < 4) {
        send_error(id, EINVAL, "SIGNAL: payload needs <I signo>");
        return;
    }
    uint32_t signo = get_u32(p);
    struct exec *e = find_exec(id);
    if (!e) {
        send_error(id, ESRCH, "signal %u to exec %u: no such exec is running", signo, id);
        return;
    }
    if (signo > INT_MAX || kill(-e->pid, (int)signo) < 0) {
        int err = signo > INT_MAX ? EINVAL : errno;
        send_error(id, err, "kill process group %d of exec %u with signal %u: %s", e->pid, id, signo, strerror(err));
        return;
    }
    send_ok(id);
}

/* ---- RESIZE ---- */

void exec_resize(uint32_t id, const uint8_t *p, size_t len) {
    if (len < 4) {
        send_error(id, EINVAL, "RESIZE: payload needs <HH rows, cols>");
        return;
    }
    struct exec *e = find_exec(id);
    if (!e || e->fd_out[OUT] < 0) {
        send_error(id, ESRCH, "resize the terminal of exec %u: no such exec is running", id);
        return;
    }
    struct winsize ws = {.ws_row = get_u16(p), .ws_col = get_u16(p + 2)};
    if (!e->tty || ioctl(e->fd_out[OUT], TIOCSWINSZ, &ws) < 0) {
        int err = e->tty ? errno : ENOTTY;
        send_error(id, err, "resize the terminal of exec %u: %s", id, e->tty ? strerror(err) : "it has no terminal");
        return;
    }
    send_ok(id);
}

/* ---- output, reaping, timeouts, EXIT ---- */

/* Forward one read of a child's stdout/stderr; returns 0 at end of file (the pipe is then closed). */
static int read_output(struct exec *e, int which) {
    static uint8_t buf[OUTPUT_CHUNK];
    ssize_t n = read(e->fd_out[which], buf, sizeof buf);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return 1;
    if (n <= 0) {
        close_fd(&e->fd_out[which]);
        return 0;
    }
    size_t forward = (size_t)n;
    if (e->cap) {
        uint64_t room = e->sent[which] < e->cap ? e->cap - e->sent[which] : 0;
        if (forward > room) {
            forward = (size_t)room;
            e->truncated[which] = 1;
        }
    }
    if (forward)
        send_frame(e->id, which == OUT ? T_STDOUT : T_STDERR, buf, forward);
    e->sent[which] += forward;
    return 1;
}

int exec_fill_poll(struct pollfd *pfd, int n, int read_output_now) {
    poll_base = n;
    poll_count = 0;
    for (int i = 0; i < MAX_EXECS; i++) {
        struct exec *e = &execs[i];
        if (!e->used)
            continue;
        for (int which = 0; which < 3; which++) {
            int fd = which < 2 ? (read_output_now ? e->fd_out[which] : -1) : (e->in_len ? e->fd_in : -1);
            if (fd < 0)
                continue;
            pfd[n] = (struct pollfd){.fd = fd, .events = which < 2 ? POLLIN : POLLOUT};
            poll_slot[poll_count] = i;
            poll_what[poll_count++] = which;
            n++;
        }
    }
    return n;
}

void exec_handle_poll(const struct pollfd *pfd) {
    for (int k = 0; k < poll_count; k++) {
        if (!pfd[poll_base + k].revents)
            continue;
        struct exec *e = &execs[poll_slot[k]];
        int which = poll_what[k];
        if (which < 2 && e->fd_out[which] >= 0)
            read_output(e, which);
        else if (which == 2 && e->fd_in >= 0) {
            if (pfd[poll_base + k].revents & POLLERR)
                stdin_close(e); /* the reader end is gone */
            else
                stdin_pump(e);
        }
    }
    poll_count = 0;
}

void exec_reap(void) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int i = 0; i < MAX_EXECS; i++) {
            struct exec *e = &execs[i];
            if (e->used && !e->reaped && e->pid == pid) {
                e->reaped = 1;
                e->status = status;
                e->end_us = now_us();
            }
        }
        /* any other pid was an orphaned grandchild re-parented to us (we are a child subreaper) */
    }
}

static void kill_group(struct exec *e) {
    kill(-e->pid, SIGKILL);
    e->killed = 1;
}

void exec_kill_all(void) {
    for (int i = 0; i < MAX_EXECS; i++)
        if (execs[i].used && !execs[i].killed)
            kill_group(&execs[i]);
}

void exec_check_timeouts(void) {
    uint64_t now = now_us();
    for (int i = 0; i < MAX_EXECS; i++) {
        struct exec *e = &execs[i];
        if (e->used && !e->killed && e->deadline_us && now >= e->deadline_us) {
            kill_group(e);
            e->timed_out = 1;
        }
    }
}

int exec_next_timeout_ms(void) {
    uint64_t now = now_us(), next = 0;
    for (int i = 0; i < MAX_EXECS; i++) {
        struct exec *e = &execs[i];
        if (e->used && !e->killed && e->deadline_us && (!next || e->deadline_us < next))
            next = e->deadline_us;
    }
    if (!next)
        return -1;
    if (next <= now)
        return 0;
    uint64_t ms = (next - now + 999) / 1000;
    return ms > INT_MAX ? INT_MAX : (int)ms;
}

/* Send EXIT for every exec that has been reaped and whose output pipes are closed, and free its slot. */
void exec_finish(void) {
    for (int i = 0; i < MAX_EXECS; i++) {
        struct exec *e = &execs[i];
        if (!e->used || !e->reaped)
            continue;
        if (e->killed) /* the group was SIGKILLed: take what is in the pipes now, wait for no one else */
            for (int which = 0; which < 2; which++) {
                while (e->fd_out[which] >= 0 && read_output(e, which)) {
                    struct pollfd probe = {.fd = e->fd_out[which], .events = POLLIN};
                    if (poll(&probe, 1, 0) == 0)
                        close_fd(&e->fd_out[which]);
                }
            }
        if (e->fd_out[OUT] >= 0 || e->fd_out[ERR] >= 0)
            continue;
        uint8_t payload[16];
        int signaled = WIFSIGNALED(e->status);
        payload[0] = (uint8_t)signaled;
        payload[1] = (uint8_t)e->timed_out;
        payload[2] = (uint8_t)e->truncated[OUT];
        payload[3] = (uint8_t)e->truncated[ERR];
        put_u32(payload + 4, (uint32_t)(signaled ? WTERMSIG(e->status) : WEXITSTATUS(e->status)));
        put_u64(payload + 8, e->end_us - e->start_us);
        stdin_close(e); /* its last STDIN_ACK goes before the EXIT: nothing follows EXIT */
        send_frame(e->id, T_EXIT, payload, sizeof payload);
        e->used = 0;
    }
}
