/* pclite-runtime's quick path. containerd's shim runs the runtime four times per `ctr run --rm`, and in Python each
 * run first starts an interpreter (~0.2 s in the lab). This front end answers the calls that only touch a few files
 * itself: `start`, `delete` once the stand-in has released the VM, `delete --force` of a container already gone.
 * Every other call, and every case it is unsure of, goes unchanged (execv, same argv) to the Python runtime, path
 * compiled in as PYTHON_RUNTIME. Nothing is changed before `start` writes its byte to exec.fifo, so handing over
 * is always safe up to there. start_rule and delete_rule mirror the functions of those names in
 * service/runtime/quick_commands.py (tests/unit/test_runtime_rules.py runs both over the same state directories);
 * the files are described in service/runtime/state.py. Keep all three in step. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef PYTHON_RUNTIME
#error "build with -DPYTHON_RUNTIME=\"/path/to/the/python/pclite-runtime\""
#endif

#define START_TIMEOUT_S 60.0 /* as START_TIMEOUT_S in quick_commands.py */

static char **original_argv;
static const char *log_path, *log_copy;
static int log_json;
static double entered_s;

static void hand_over(void) {
    original_argv[0] = PYTHON_RUNTIME;
    execv(PYTHON_RUNTIME, original_argv);
    fprintf(stderr, "pclite-runtime: cannot run the Python runtime %s (%s): run `make venv` again\n", PYTHON_RUNTIME,
            strerror(errno));
    exit(1);
}

static double now_s(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void append_line(const char *path, const char *line, int fallback_fd) {
    int fd = path ? open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644) : -1;
    if (fd < 0) fd = fallback_fd;
    if (fd < 0) return;
    dprintf(fd, "%s\n", line);
    if (fd != fallback_fd) close(fd);
}

/* One line as state.Log writes it: {"level", "msg", "time"} for --log-format json, else logfmt. */
static void log_write(const char *level, const char *msg) {
    char stamp[64], escaped[8192], line[8400];
    struct timespec ts;
    struct tm tm;
    size_t n = 0;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t len = strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(stamp + len, sizeof stamp - len, ".%09ldZ", ts.tv_nsec);
    escaped[n++] = '"';
    for (const unsigned char *c = (const unsigned char *)msg; *c && n < sizeof escaped - 8; c++) {
        if (*c == '"' || *c == '\\') n += snprintf(escaped + n, 3, "\\%c", *c);
        else if (*c < 0x20 || *c == 0x7f) n += snprintf(escaped + n, 7, "\\u%04x", *c);
        else escaped[n++] = *c;
    }
    escaped[n++] = '"';
    escaped[n] = 0;
    if (log_json) snprintf(line, sizeof line, "{\"level\": \"%s\", \"msg\": %s, \"time\": \"%s\"}", level, escaped, stamp);
    else snprintf(line, sizeof line, "time=\"%s\" level=%s msg=%s", stamp, level, escaped);
    if (log_copy) append_line(log_copy, line, -1);
    append_line(log_path, line, 2);
}

/* PCLITE_RUNTIME_LOG's timing line, as main._log_duration writes it. */
static void log_duration(const char *command, const char *id) {
    char stat[1024], msg[512];
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    ssize_t got = fd < 0 ? -1 : read(fd, stat, sizeof stat - 1);
    if (fd >= 0) close(fd);
    if (!log_copy || got <= 0) return;
    stat[got] = 0;
    char *field = strrchr(stat, ')');
    unsigned long long ticks = 0;
    for (int i = 0; field && i < 20; i++) field = strchr(field + 1, ' ');
    if (!field || sscanf(field, " %llu", &ticks) != 1) return;
    double started = (double)ticks / sysconf(_SC_CLK_TCK), now = now_s(CLOCK_BOOTTIME);
    snprintf(msg, sizeof msg, "%s %s: %.0f ms from exec to exit, %.0f ms of it before main()", command, id,
             (now - started) * 1000, (entered_s - started) * 1000);
    log_write("info", msg);
}

static void die(const char *msg) {
    log_write("error", msg);
    if (log_path) dprintf(2, "pclite-runtime: %s\n", msg);
    exit(1);
}

static int exists(const char *dir, const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return access(path, F_OK) == 0;
}

/* Up to size-1 bytes of dir/name, NUL-terminated; -1 when it cannot be read. */
static ssize_t read_file(const char *dir, const char *name, char *buf, size_t size) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t got = read(fd, buf, size - 1);
    close(fd);
    if (got >= 0) buf[got] = 0;
    return got;
}

struct lean_state { long long pid, start_time; char vm_id[256], log[1024]; };

/* state.lines: `key value` lines (state.LEAN_KEYS). 0 when pid and start_time are there. */
static int load_lean(const char *dir, struct lean_state *state) {
    char buf[16384];
    memset(state, 0, sizeof *state);
    state->pid = state->start_time = -1;
    if (read_file(dir, "state.lines", buf, sizeof buf) < 0) return -1;
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        char *value = strchr(line, ' ');
        if (!value) continue;
        *value++ = 0;
        if (!strcmp(line, "pid")) state->pid = atoll(value);
        else if (!strcmp(line, "start_time")) state->start_time = atoll(value);
        else if (!strcmp(line, "vm_id")) snprintf(state->vm_id, sizeof state->vm_id, "%s", value);
        else if (!strcmp(line, "log")) snprintf(state->log, sizeof state->log, "%s", value);
    }
    return state->pid > 0 && state->start_time >= 0 ? 0 : -1;
}

/* The process runs and is the one recorded (its start time survives pid reuse), as state.alive. */
static int alive(long long pid, long long start_time) {
    char path[64], stat[1024];
    snprintf(path, sizeof path, "/proc/%lld", pid);
    if (read_file(path, "stat", stat, sizeof stat) <= 0) return 0;
    char *field = strrchr(stat, ')');
    if (!field || field[1] != ' ' || field[2] == 'Z' || field[2] == 'X') return 0;
    unsigned long long started = 0;
    for (int i = 0; field && i < 20; i++) field = strchr(field + 1, ' ');
    return field && sscanf(field, " %llu", &started) == 1 && (long long)started == start_time;
}

static int remove_tree(const char *path) {
    DIR *dir = opendir(path);
    if (!dir) return errno == ENOENT ? 0 : -1;
    for (struct dirent *entry; (entry = readdir(dir));) {
        char child[4096];
        if (!strcmp(entry->d_name, ".") || !strcmp(entry->d_name, "..")) continue;
        snprintf(child, sizeof child, "%s/%s", path, entry->d_name);
        if (entry->d_type == DT_DIR) remove_tree(child);
        else unlink(child);
    }
    closedir(dir);
    return rmdir(path);
}

/* quick_commands.start_rule: only a created container (stand-in alive, not paused, no guest process yet); for the
 * others Python says why. */
static void start_rule(const char *dir, struct lean_state *state) {
    if (load_lean(dir, state) || !alive(state->pid, state->start_time) || exists(dir, "paused") ||
        exists(dir, "init.json"))
        hand_over();
}

static void start(const char *dir, const char *id) {
    struct lean_state state;
    char msg[8192], reason[4096];
    start_rule(dir, &state);
    char fifo[4096];
    snprintf(fifo, sizeof fifo, "%s/exec.fifo", dir);
    int fd = open(fifo, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) hand_over(); /* the stand-in is not waiting */
    ssize_t wrote = write(fd, "0", 1);
    close(fd);
    if (wrote != 1) hand_over();
    double started = now_s(CLOCK_MONOTONIC);
    for (;;) {
        if (exists(dir, "init.json")) break;
        int gone = !alive(state.pid, state.start_time); /* before init.error: the stand-in writes it, then exits */
        if (read_file(dir, "init.error", reason, sizeof reason) >= 0) {
            reason[strcspn(reason, "\n")] = 0;
            snprintf(msg, sizeof msg, "start %s: %s", id, reason);
            die(msg);
        }
        if (gone || now_s(CLOCK_MONOTONIC) - started > START_TIMEOUT_S) {
            snprintf(msg, sizeof msg, "start %s: the stand-in process ended before the guest process started "
                     "(see the log%s%s)", id, state.log[0] ? ": " : "", state.log);
            die(msg);
        }
        usleep(3000);
    }
    snprintf(msg, sizeof msg, "start %s: the guest process runs after %.0f ms", id,
             (now_s(CLOCK_MONOTONIC) - started) * 1000);
    log_write("info", msg);
    log_duration("start", id);
    exit(0);
}

enum delete_action { NOTHING, CLEAR, FILES };

/* quick_commands.delete_rule, for the answers that need no VM API and no kill; RELEASE and every refusal go to
 * Python. FILES is narrower here: any file under execs/ hands over (Python checks whether its stand-in lives). */
static enum delete_action delete_rule(const char *dir, int force, struct lean_state *state) {
    if (!exists(dir, "state.json")) {
        struct stat st;
        if (!force) hand_over(); /* Python says it does not exist */
        return lstat(dir, &st) ? NOTHING : CLEAR;
    }
    if (load_lean(dir, state) || alive(state->pid, state->start_time) || !exists(dir, "released")) hand_over();
    char execs[4096];
    snprintf(execs, sizeof execs, "%s/execs", dir);
    DIR *open_execs = opendir(execs);
    if (open_execs) {
        for (struct dirent *entry; (entry = readdir(open_execs));)
            if (entry->d_name[0] != '.') hand_over();
        closedir(open_execs);
    }
    return FILES;
}

static void delete(const char *dir, const char *id, int force) {
    struct lean_state state;
    char msg[1024];
    enum delete_action action = delete_rule(dir, force, &state);
    if (remove_tree(dir) && errno != ENOENT) hand_over();
    if (action == FILES) {
        snprintf(msg, sizeof msg, "delete %s: VM %s was released when its process ended", id, state.vm_id);
        log_write("info", msg);
    }
    log_duration(force ? "delete --force" : "delete", id);
    exit(0);
}

/* Go-style flags as main.parse_flags: -x, --x, --x=v, --x v. Returns the value of a valued flag, "" for a
 * switch, NULL for a flag this path does not know (then Python answers). *i moves past what was used. */
static const char *flag(int argc, char **argv, int *i, const char **name_out) {
    static const char *valued[] = {"root", "log", "log-format", "criu", "rootless", NULL};
    static const char *switches[] = {"debug", "systemd-cgroup", NULL};
    char *arg = argv[*i];
    while (*arg == '-') arg++;
    char *eq = strchr(arg, '=');
    size_t len = eq ? (size_t)(eq - arg) : strlen(arg);
    for (const char **v = valued; *v; v++)
        if (strlen(*v) == len && !strncmp(arg, *v, len)) {
            *name_out = *v;
            if (eq) return eq + 1;
            if (*i + 1 >= argc) return NULL;
            return argv[++*i];
        }
    for (const char **s = switches; *s; s++)
        if (strlen(*s) == len && !strncmp(arg, *s, len)) {
            *name_out = *s;
            return "";
        }
    return NULL;
}

int main(int argc, char **argv) {
    entered_s = now_s(CLOCK_BOOTTIME);
    original_argv = argv;
    const char *root = "/run/pclite-runtime", *format = "text";
    log_copy = getenv("PCLITE_RUNTIME_LOG");
    if (log_copy && !*log_copy) log_copy = NULL;
    int i = 1;
    for (; i < argc && argv[i][0] == '-' && argv[i][1]; i++) {
        const char *name = NULL, *value = flag(argc, argv, &i, &name);
        if (!value) hand_over();
        if (!strcmp(name, "root")) root = value;
        else if (!strcmp(name, "log")) log_path = value;
        else if (!strcmp(name, "log-format")) format = value;
    }
    log_json = !strcmp(format, "json");
    if (i >= argc) hand_over();
    const char *command = argv[i++], *id = NULL;
    int force = 0;
    for (; i < argc; i++) {
        const char *arg = argv[i];
        if (!strcmp(command, "delete") && (!strcmp(arg, "-f") || !strcmp(arg, "--force") || !strcmp(arg, "-force")))
            force = 1;
        else if (arg[0] == '-' || id) hand_over(); /* anything more than ID [--force] */
        else id = arg;
    }
    if (!id || !*id || strchr(id, '/') || !strcmp(id, ".") || !strcmp(id, "..") || strlen(id) > 1024) hand_over();
    char dir[4096 - 64]; /* room for the file names under it */
    if ((size_t)snprintf(dir, sizeof dir, "%s/%s", root, id) >= sizeof dir) hand_over();
    if (!strcmp(command, "start")) start(dir, id);
    if (!strcmp(command, "delete")) delete(dir, id, force);
    hand_over();
}
