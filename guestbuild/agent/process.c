/* pclite-agent: the child side of an EXEC — session, terminal, container root, rlimits, user, stdio, execve —
 * and the parsing of EXEC's optional process fields (PROTOCOL.md, EXEC flag PROCESS).
 *
 * Order matters: /dev/null is opened and rlimits are set before chroot (the new root may have no /dev yet),
 * the user is changed last, after everything that needs root.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#include "agent.h"

#define DEFAULT_PATH "/usr/sbin:/usr/bin:/sbin:/bin"
#define KEEP_USER 0xFFFFFFFFu

enum { STAGE_CHDIR = 1, STAGE_STDIN, STAGE_DUP, STAGE_EXECVE, STAGE_TTY, STAGE_RLIMIT, STAGE_CHROOT, STAGE_USER };

struct child_failure {
    int32_t stage, err, detail;
};

static void __attribute__((noreturn)) child_fail(int status_fd, int stage, int detail) {
    struct child_failure f = {stage, errno, detail};
    ssize_t ignored = write(status_fd, &f, sizeof f);
    (void)ignored;
    _exit(127);
}

/* execve argv[0], searched in the PATH of envp (not the agent's) when it has no slash, like execvp. */
static void exec_searching(char *const argv[], char *const envp[]) {
    const char *file = argv[0];
    if (!*file) {
        errno = ENOENT;
        return;
    }
    if (strchr(file, '/')) {
        execve(file, argv, envp);
        return;
    }
    const char *path = DEFAULT_PATH;
    for (char *const *e = envp; *e; e++)
        if (!strncmp(*e, "PATH=", 5))
            path = *e + 5;
    int saw_eacces = 0;
    for (const char *dir = path;; dir++) {
        const char *end = strchrnul(dir, ':');
        char full[PATH_MAX];
        int n = snprintf(full, sizeof full, "%.*s%s%s", (int)(end - dir), dir, end == dir ? "" : "/", file);
        if (n > 0 && (size_t)n < sizeof full) {
            execve(full, argv, envp);
            if (errno == EACCES)
                saw_eacces = 1;
            else if (errno != ENOENT && errno != ENOTDIR && errno != ESTALE && errno != ELOOP && errno != ENAMETOOLONG)
                return;
        }
        if (!*end)
            break;
        dir = end;
    }
    errno = saw_eacces ? EACCES : ENOENT;
}

/* mkdir -p (mode 0755) of an absolute path; 0 or -1 with errno. */
static int make_dirs(const char *path) {
    char buf[PATH_MAX];
    if (strlen(path) >= sizeof buf) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(buf, path);
    for (char *slash = strchr(buf + 1, '/');; slash = strchr(slash + 1, '/')) {
        if (slash)
            *slash = '\0';
        if (mkdir(buf, 0755) < 0 && errno != EEXIST)
            return -1;
        if (!slash)
            return 0;
        *slash = '/';
    }
}

void child_exec(const struct proc_opts *o, int in_r, int out_w, int err_w, int status_w) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL); /* the agent blocks SIGCHLD; the mask survives execve */
    signal(SIGPIPE, SIG_DFL);              /* and so does SIG_IGN */
    setsid();
    if (o->tty && ioctl(in_r, TIOCSCTTY, 0) < 0) /* the terminal becomes the new session's controlling tty */
        child_fail(status_w, STAGE_TTY, 0);
    if (in_r < 0 && (in_r = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0)
        child_fail(status_w, STAGE_STDIN, 0);
    for (unsigned i = 0; i < o->nrlimits; i++) {
        struct rlimit rl = {(rlim_t)o->rlimits[i].soft, (rlim_t)o->rlimits[i].hard};
        if (setrlimit((int)o->rlimits[i].resource, &rl) < 0)
            child_fail(status_w, STAGE_RLIMIT, (int)o->rlimits[i].resource);
    }
    if (o->root && *o->root && (chroot(o->root) < 0 || chdir("/") < 0))
        child_fail(status_w, STAGE_CHROOT, 0);
    /* In a container root a missing working directory is made, as runc does (we are chrooted: it stays inside). */
    if (*o->cwd && chdir(o->cwd) < 0 &&
        !(o->root && *o->root && errno == ENOENT && make_dirs(o->cwd) == 0 && chdir(o->cwd) == 0))
        child_fail(status_w, STAGE_CHDIR, 0);
    if (o->set_user) {
        gid_t groups[MAX_GROUPS];
        for (unsigned i = 0; i < o->ngroups; i++)
            groups[i] = (gid_t)o->groups[i];
        if (setgroups(o->ngroups, groups) < 0 || setgid((gid_t)o->gid) < 0 || setuid((uid_t)o->uid) < 0)
            child_fail(status_w, STAGE_USER, 0);
    }
    if (dup2(in_r, 0) < 0 || dup2(out_w, 1) < 0 || dup2(err_w, 2) < 0)
        child_fail(status_w, STAGE_DUP, 0);
    exec_searching(o->argv, o->envp);
    child_fail(status_w, STAGE_EXECVE, 0);
}

/* The sentence for a child's failure report; "" when buf holds nothing useful. */
const char *child_stage_text(int stage, int detail, const struct proc_opts *o, char *buf, size_t len) {
    switch (stage) {
    case STAGE_CHDIR: snprintf(buf, len, "chdir %s", o->cwd); break;
    case STAGE_STDIN: snprintf(buf, len, "open /dev/null for stdin"); break;
    case STAGE_DUP: snprintf(buf, len, "dup2 of the stdio pipes"); break;
    case STAGE_TTY: snprintf(buf, len, "make the terminal the controlling tty (TIOCSCTTY)"); break;
    case STAGE_RLIMIT: snprintf(buf, len, "setrlimit resource %d", detail); break;
    case STAGE_CHROOT: snprintf(buf, len, "chroot %s", o->root); break;
    case STAGE_USER: snprintf(buf, len, "switch to uid %u gid %u (%u groups)", o->uid, o->gid, o->ngroups); break;
    default: snprintf(buf, len, "execve %s", o->argv[0]); break;
    }
    return buf;
}

/* Parse the process fields after the env strings: root\0 <IIHHHH> uid gid ngroups nrlimits rows cols,
 * ngroups x <I>, nrlimits x <IQQ>. Returns 0, or -1 with the reason in why. */
int proc_parse(struct cursor *c, struct proc_opts *o, char *why, size_t why_len) {
    o->root = take_str(c);
    if (!o->root || c->len - c->off < 16) {
        snprintf(why, why_len, "EXEC: PROCESS fields need root\\0 then <IIHHHH uid, gid, ngroups, nrlimits, rows, "
                               "cols>");
        return -1;
    }
    const uint8_t *h = c->p + c->off;
    o->uid = get_u32(h);
    o->gid = get_u32(h + 4);
    o->ngroups = get_u16(h + 8);
    o->nrlimits = get_u16(h + 10);
    o->rows = get_u16(h + 12);
    o->cols = get_u16(h + 14);
    o->set_user = o->uid != KEEP_USER;
    c->off += 16;
    if (o->ngroups > MAX_GROUPS || o->nrlimits > MAX_RLIMITS) {
        snprintf(why, why_len, "EXEC: %u groups and %u rlimits; at most %d and %d", o->ngroups, o->nrlimits,
                 MAX_GROUPS, MAX_RLIMITS);
        return -1;
    }
    if (c->len - c->off < (size_t)o->ngroups * 4 + (size_t)o->nrlimits * 20) {
        snprintf(why, why_len, "EXEC: payload ends before its %u groups (<I>) and %u rlimits (<IQQ>)", o->ngroups,
                 o->nrlimits);
        return -1;
    }
    for (unsigned i = 0; i < o->ngroups; i++, c->off += 4)
        o->groups[i] = get_u32(c->p + c->off);
    for (unsigned i = 0; i < o->nrlimits; i++, c->off += 20) {
        o->rlimits[i].resource = get_u32(c->p + c->off);
        o->rlimits[i].soft = get_u64(c->p + c->off + 4);
        o->rlimits[i].hard = get_u64(c->p + c->off + 12);
    }
    return 0;
}

/* A new terminal for a child: the master (returned, close-on-exec) and its slave in *slave. The pty comes from
 * the devpts next to <root>/dev/ptmx when the child gets a root, so it is one of the container's own. */
int open_terminal(const char *root, uint16_t rows, uint16_t cols, int *slave) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/dev/ptmx", root && *root ? root : "");
    int master = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0 && root && *root)
        master = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0)
        return -1;
    int unlock = 0;
    if (ioctl(master, TIOCSPTLCK, &unlock) < 0)
        goto fail;
    *slave = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (*slave < 0)
        goto fail;
    if (rows && cols) {
        struct winsize ws = {.ws_row = rows, .ws_col = cols};
        ioctl(master, TIOCSWINSZ, &ws);
    }
    return master;
fail:;
    int err = errno;
    close(master);
    errno = err;
    return -1;
}
