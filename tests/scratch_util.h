/*
 * scratch_util.h - what the tests of on-disk stores share: one scratch directory per
 * test process under /tmp (mkdtemp, made on first use) and a recursive remove.
 * Include after defining _GNU_SOURCE (nftw's flags).
 */
#ifndef EMBER_TEST_SCRATCH_UTIL_H
#define EMBER_TEST_SCRATCH_UTIL_H

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

static char t_scratch[64];

/* The process's scratch directory, /tmp/ember-TAG-XXXXXX; aborts if it cannot be made. */
static inline const char *t_scratch_dir(const char *tag) {
    if (!t_scratch[0]) {
        snprintf(t_scratch, sizeof t_scratch, "/tmp/ember-%s-XXXXXX", tag);
        if (!mkdtemp(t_scratch)) abort();
    }
    return t_scratch;
}

static inline int t_rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

/* Remove p and everything under it (symlinks not followed). */
static inline void t_rmtree(const char *p) { nftw(p, t_rm_cb, 16, FTW_DEPTH | FTW_PHYS); }

#endif
