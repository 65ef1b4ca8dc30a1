/*
 * A power cut, simulated: loaded with LD_PRELOAD into the server, this
 * keeps, for every regular file under $CSM_SHADOW_ROOT, a copy of its
 * content as of its last successful fsync or fdatasync, under
 * $CSM_SHADOW_DIR. After the server is killed, the test puts those copies
 * back and drops what was never synced: what is left is what a disk would
 * hold after losing power, with every write that no sync covered gone
 * (sync_file_range, which flushes no drive cache, counts as no sync).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void make_parents(char *path) {
    for (char *p = path + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            mkdir(path, 0700);
            *p = '/';
        }
    }
}

static void shadow(int fd) {
    const char *root = getenv("CSM_SHADOW_ROOT");
    const char *dir = getenv("CSM_SHADOW_DIR");
    if (!root || !dir) return;
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0) return;
    path[n] = 0;
    size_t root_len = strlen(root);
    if (strncmp(path, root, root_len) != 0 || path[root_len] != '/') return;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return;
    char target[PATH_MAX], temp[PATH_MAX + 8];
    snprintf(target, sizeof target, "%s%s", dir, path + root_len);
    snprintf(temp, sizeof temp, "%s.part", target);
    pthread_mutex_lock(&lock);
    make_parents(target);
    int in = open(path, O_RDONLY | O_CLOEXEC);
    int out = open(temp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (in >= 0 && out >= 0) {
        char buf[1 << 16];
        ssize_t got;
        int ok = 1;
        while ((got = read(in, buf, sizeof buf)) > 0) {
            if (write(out, buf, (size_t)got) != got) { ok = 0; break; }
        }
        if (got < 0) ok = 0;
        close(out);
        out = -1;
        if (ok) rename(temp, target); else unlink(temp);
    }
    if (in >= 0) close(in);
    if (out >= 0) close(out);
    pthread_mutex_unlock(&lock);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    int saved, rc = real(fd);
    saved = errno;
    if (rc == 0) shadow(fd);
    errno = saved;
    return rc;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    int saved, rc = real(fd);
    saved = errno;
    if (rc == 0) shadow(fd);
    errno = saved;
    return rc;
}
