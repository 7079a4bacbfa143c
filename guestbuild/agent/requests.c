/* pclite-agent: requests answered at once (files, clock, entropy, hostname, shutdown, mount). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

#define WF_APPEND 1u
#define WF_MKDIRS 2u
#define MOUNT_MKDIR 1u

/* mkdir -p of every parent directory of path. Returns 0, or -1 with errno set and the failing prefix in failed. */
static int make_parents(const char *path, char *failed, size_t failed_size) {
    size_t len = strlen(path);
    if (len >= failed_size) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(failed, path, len + 1);
    for (char *slash = strchr(failed + 1, '/'); slash; slash = strchr(slash + 1, '/')) {
        *slash = '\0';
        if (mkdir(failed, 0755) < 0 && errno != EEXIST)
            return -1;
        *slash = '/';
    }
    return 0;
}

static int write_all(int fd, const uint8_t *data, size_t len) {
    while (len) {
        ssize_t n = write(fd, data, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

void req_write_file(uint32_t id, const uint8_t *p, size_t len) {
    struct cursor c = {p, len, 8};
    const char *path = len >= 8 ? take_str(&c) : NULL;
    if (!path || !*path) {
        send_error(id, EINVAL, "WRITE_FILE: payload needs <II mode, flags> then a non-empty NUL-terminated path");
        return;
    }
    uint32_t mode = get_u32(p) & 07777, flags = get_u32(p + 4);
    if (flags & WF_MKDIRS) {
        char dir[4096];
        if (make_parents(path, dir, sizeof dir) < 0) {
            send_error(id, errno, "mkdir %s: %s", errno == ENAMETOOLONG ? path : dir, strerror(errno));
            return;
        }
    }
    int oflags = O_WRONLY | O_CREAT | O_CLOEXEC | O_NOCTTY | ((flags & WF_APPEND) ? O_APPEND : O_TRUNC);
    int fd = open(path, oflags, mode);
    if (fd < 0) {
        send_error(id, errno, "open %s: %s", path, strerror(errno));
        return;
    }
    /* The mode is exact (no umask), for a file that already existed too. */
    if (fchmod(fd, mode) < 0 || write_all(fd, p + c.off, len - c.off) < 0) {
        int err = errno;
        close(fd);
        send_error(id, err, "write %s: %s", path, strerror(err));
        return;
    }
    if (close(fd) < 0) {
        send_error(id, errno, "close %s: %s", path, strerror(errno));
        return;
    }
    send_ok(id);
}

void req_read_file(uint32_t id, const uint8_t *p, size_t len) {
    static uint8_t data[MAX_READ_LEN];
    struct cursor c = {p, len, 12};
    const char *path = len >= 12 ? take_str(&c) : NULL;
    if (!path || !*path) {
        send_error(id, EINVAL, "READ_FILE: payload needs <QI offset, max_len> then a NUL-terminated path");
        return;
    }
    uint64_t offset = get_u64(p);
    uint32_t max_len = get_u32(p + 8);
    if (max_len > MAX_READ_LEN || offset > (uint64_t)INT64_MAX) {
        send_error(id, EINVAL, "READ_FILE %s: max_len %u is over %u or offset %llu is too large", path, max_len,
                   MAX_READ_LEN, (unsigned long long)offset);
        return;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        send_error(id, errno, "open %s: %s", path, strerror(errno));
        return;
    }
    size_t got = 0;
    while (got < max_len) {
        ssize_t n = pread(fd, data + got, max_len - got, (off_t)(offset + got));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int err = errno;
            close(fd);
            send_error(id, err, "read %s: %s", path, strerror(err));
            return;
        }
        if (n == 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    send_frame(id, T_DATA, data, got);
}

static int refused_in_stdio_mode(uint32_t id, const char *what) {
    if (stdio_mode)
        send_error(id, EPERM, "%s is not allowed in --stdio mode (it would act on the host)", what);
    return stdio_mode;
}

void req_set_clock(uint32_t id, const uint8_t *p, size_t len) {
    if (refused_in_stdio_mode(id, "SET_CLOCK"))
        return;
    if (len < 12 || get_u32(p + 8) >= 1000000000u || get_u64(p) > (uint64_t)INT64_MAX) {
        send_error(id, EINVAL, "SET_CLOCK: payload needs <QI seconds, nanoseconds> with nanoseconds < 10^9");
        return;
    }
    struct timespec ts = {.tv_sec = (time_t)get_u64(p), .tv_nsec = (long)get_u32(p + 8)};
    if (clock_settime(CLOCK_REALTIME, &ts) < 0) {
        send_error(id, errno, "clock_settime CLOCK_REALTIME: %s", strerror(errno));
        return;
    }
    send_ok(id);
}

void req_reseed(uint32_t id, const uint8_t *p, size_t len) {
    struct rand_pool_info *info = malloc(sizeof *info + len);
    if (!info) {
        send_error(id, ENOMEM, "RESEED: cannot allocate %zu bytes", len);
        return;
    }
    info->entropy_count = (int)(len * 8);
    info->buf_size = (int)len;
    memcpy(info->buf, p, len);
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    int err = 0;
    if (fd < 0 || ioctl(fd, RNDADDENTROPY, info) < 0)
        err = errno;
    /* Credited entropy alone reseeds the CRNG only at its next interval (up to a minute): VM clones restored from
     * one snapshot would read identical /dev/urandom until then. Reseed now (ENODATA: the CRNG is not ready). */
    else if (ioctl(fd, RNDRESEEDCRNG) < 0 && errno != ENODATA)
        err = errno;
    if (fd >= 0)
        close(fd);
    free(info);
    if (err)
        send_error(id, err, "RNDADDENTROPY/RNDRESEEDCRNG on /dev/urandom: %s", strerror(err));
    else
        send_ok(id);
}

void req_set_hostname(uint32_t id, const uint8_t *p, size_t len) {
    if (sethostname((const char *)p, len) < 0) {
        send_error(id, errno, "sethostname (%zu bytes): %s", len, strerror(errno));
        return;
    }
    send_ok(id);
}

void req_shutdown(uint32_t id, const uint8_t *p, size_t len) {
    if (refused_in_stdio_mode(id, "SHUTDOWN"))
        return;
    if (len < 4 || get_u32(p) > 1) {
        send_error(id, EINVAL, "SHUTDOWN: payload needs <I how> with how 0 (poweroff) or 1 (reboot)");
        return;
    }
    send_ok(id);
    flush_output_blocking(1000);
    sync();
    /* No ACPI in a pclite microVM: a reset is its power switch, and the VMM stops on it, for both values of how. */
    reboot(RB_AUTOBOOT);
    send_error(id, errno, "reboot: %s", strerror(errno));
}

/* MOUNT: <II flags (MS_*), options>; source\0 target\0 fstype\0 data\0. Empty fstype/data pass NULL (bind mounts,
 * remounts). Option MKDIR creates the target and its parents first. */
void req_mount(uint32_t id, const uint8_t *p, size_t len) {
    struct cursor c = {p, len, 8};
    const char *source = len >= 8 ? take_str(&c) : NULL;
    const char *target = source ? take_str(&c) : NULL;
    const char *fstype = target ? take_str(&c) : NULL;
    const char *data = fstype ? take_str(&c) : NULL;
    if (!data || !*target) {
        send_error(id, EINVAL, "MOUNT: payload needs <II flags, options> then source, a non-empty target, fstype "
                               "and data, each NUL-terminated");
        return;
    }
    uint32_t flags = get_u32(p), options = get_u32(p + 4);
    if (options & MOUNT_MKDIR) {
        char dir[4096];
        if (make_parents(target, dir, sizeof dir) < 0 || (mkdir(target, 0755) < 0 && errno != EEXIST)) {
            send_error(id, errno, "mkdir %s: %s", errno == ENAMETOOLONG ? target : dir, strerror(errno));
            return;
        }
    }
    if (mount(*source ? source : "none", target, *fstype ? fstype : NULL, flags, *data ? data : NULL) < 0) {
        send_error(id, errno, "mount %s (%s, flags %#x) on %s: %s", *source ? source : "none",
                   *fstype ? fstype : "no type", flags, target, strerror(errno));
        return;
    }
    send_ok(id);
}
