/* pclite-agent: shared definitions. The wire protocol is described in PROTOCOL.md next to this file. */
#ifndef PCLITE_AGENT_H
#define PCLITE_AGENT_H

#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define PROTO_VERSION "pclite-agent/2"
#define HDR_SIZE 12
#define MAX_PAYLOAD (1u << 20)
#define MAX_READ_LEN (MAX_PAYLOAD - 64)
#define OUTPUT_CHUNK (64 * 1024)  /* largest STDOUT/STDERR frame payload */
#define MAX_EXECS 64
#define OUT_HIGH_WATER (256 * 1024)    /* queued channel output above this: stop reading input and child output */
#define STDIN_WINDOW (1024 * 1024)     /* stdin bytes of one exec the host may have in flight (STDIN_ACK) */
#define STDIN_ACK_BATCH (64 * 1024)    /* acknowledge consumed stdin in pieces of at least this much ... */

/* Frame types, host -> agent. */
enum {
    T_PING = 1,
    T_EXEC = 2,
    T_STDIN = 3,
    T_SIGNAL = 4,
    T_WRITE_FILE = 5,
    T_READ_FILE = 6,
    T_SET_CLOCK = 7,
    T_RESEED = 8,
    T_SET_HOSTNAME = 9,
    T_SHUTDOWN = 10,
    T_MOUNT = 11,
    T_RESIZE = 12,
};

/* Frame types, agent -> host. */
enum {
    T_READY = 0x80,
    T_OK = 0x81,
    T_ERROR = 0x82,
    T_STARTED = 0x83,
    T_STDOUT = 0x84,
    T_STDERR = 0x85,
    T_EXIT = 0x86,
    T_DATA = 0x87,
    T_STDIN_ACK = 0x88,
};

/* Little-endian field access, independent of the host byte order. */
static inline uint16_t get_u16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline uint32_t get_u32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 |
                                                          (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static inline uint64_t get_u64(const uint8_t *p) { return get_u32(p) | (uint64_t)get_u32(p + 4) << 32; }
static inline void put_u16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void put_u32(uint8_t *p, uint32_t v) { put_u16(p, (uint16_t)v); put_u16(p + 2, (uint16_t)(v >> 16)); }
static inline void put_u64(uint8_t *p, uint64_t v) { put_u32(p, (uint32_t)v); put_u32(p + 4, (uint32_t)(v >> 32)); }

/* A read cursor over a request payload; strings are NUL-terminated inside the payload. */
struct cursor {
    const uint8_t *p;
    size_t len, off;
};

/* The next NUL-terminated string, or NULL when the payload ends before its NUL. */
static inline const char *take_str(struct cursor *c) {
    const uint8_t *start = c->p + c->off;
    const uint8_t *nul = memchr(start, 0, c->len - c->off);
    if (!nul)
        return NULL;
    c->off = (size_t)(nul - c->p) + 1;
    return (const char *)start;
}

/* agent.c: the channel. Frames are queued whole, so two frames never interleave. */
void send_frame(uint32_t id, uint16_t type, const void *payload, size_t len);
void send_frame2(uint32_t id, uint16_t type, const void *a, size_t alen, const void *b, size_t blen);
void send_ok(uint32_t id);
void send_error(uint32_t id, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
size_t outq_pending(void);
uint64_t now_us(void);
extern int stdio_mode;

/* EXEC flags (PROTOCOL.md). */
#define EXEC_STDIN_FOLLOWS 1u
#define EXEC_TTY 2u     /* the child's stdio is a new terminal; its output arrives as STDOUT */
#define EXEC_PROCESS 4u /* process fields follow the env strings: root, user, groups, rlimits, terminal size */
#define MAX_GROUPS 64
#define MAX_RLIMITS 16

/* How the child of an EXEC is set up (process.c), parsed from the request by exec.c. */
struct proc_opts {
    const char *cwd;
    char *const *argv;
    char *const *envp;
    int tty;
    const char *root; /* chroot here before cwd ("" = stay in the agent's root) */
    int set_user;     /* uid 0xFFFFFFFF on the wire = keep the agent's user, groups and gid */
    uint32_t uid, gid;
    unsigned ngroups, nrlimits;
    uint32_t groups[MAX_GROUPS];
    struct {
        uint32_t resource;
        uint64_t soft, hard;
    } rlimits[MAX_RLIMITS];
    uint16_t rows, cols; /* initial terminal size, 0 = leave */
};

/* process.c: the child side of fork(): never returns; failures go to status_fd as (stage, errno, detail). */
void child_exec(const struct proc_opts *o, int in_r, int out_w, int err_w, int status_fd) __attribute__((noreturn));
int proc_parse(struct cursor *c, struct proc_opts *o, char *why, size_t why_len);
const char *child_stage_text(int stage, int detail, const struct proc_opts *o, char *buf, size_t len);
int open_terminal(const char *root, uint16_t rows, uint16_t cols, int *slave);

/* requests.c: the requests that are answered at once. */
void req_write_file(uint32_t id, const uint8_t *p, size_t len);
void req_read_file(uint32_t id, const uint8_t *p, size_t len);
void req_set_clock(uint32_t id, const uint8_t *p, size_t len);
void req_reseed(uint32_t id, const uint8_t *p, size_t len);
void req_set_hostname(uint32_t id, const uint8_t *p, size_t len);
void req_shutdown(uint32_t id, const uint8_t *p, size_t len);
void req_mount(uint32_t id, const uint8_t *p, size_t len);
void flush_output_blocking(int timeout_ms);

/* exec.c: child processes, their pipes, timeouts and exit reports. */
void exec_start(uint32_t id, const uint8_t *p, size_t len);
void exec_stdin(uint32_t id, const uint8_t *p, size_t len);
void exec_signal(uint32_t id, const uint8_t *p, size_t len);
void exec_resize(uint32_t id, const uint8_t *p, size_t len);
int exec_fill_poll(struct pollfd *pfd, int n, int read_output);
void exec_handle_poll(const struct pollfd *pfd);
void exec_reap(void);
void exec_check_timeouts(void);
void exec_finish(void);
int exec_next_timeout_ms(void);
int exec_count(void);
void exec_kill_all(void);

#endif
