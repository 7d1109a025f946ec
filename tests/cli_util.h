/*
 * cli_util.h - what the end-to-end tests of the `ember` binary share: run a shell
 * command, read a whole file, and pick a number out of a report.json section.
 */
#ifndef EMBER_TEST_CLI_UTIL_H
#define EMBER_TEST_CLI_UTIL_H

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

/* system() of the formatted command; its exit status, or -1 if it did not exit. */
static inline int run(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static inline int run(const char *fmt, ...) {
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int rc = system(cmd);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

/* The whole file at the formatted path, NUL-terminated (caller frees), or NULL. */
static inline char *slurp(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static inline char *slurp(const char *fmt, ...) {
    char path[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(path, sizeof path, fmt, ap);
    va_end(ap);
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    size_t got = fread(s, 1, (size_t)n, f);
    s[got] = 0;
    fclose(f);
    return s;
}

/* The number after "key": inside section `sect` of report.json (crude but enough). */
static inline double report_num(const char *report, const char *sect, const char *key) {
    const char *s = report ? strstr(report, sect) : NULL;
    if (!s) return NAN;
    char k[64];
    snprintf(k, sizeof k, "\"%s\":", key);
    const char *p = strstr(s, k);
    return p ? atof(p + strlen(k)) : NAN;
}

#endif
