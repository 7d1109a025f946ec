/*
 * status.c - status codes and the per-thread detail message.
 *
 * The library never prints: a failing call stores a sentence in a thread-local
 * buffer (em_errorf) and returns its code; the caller decides what to show.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "ember/core.h"

static _Thread_local char tl_error[1024];

const char *em_status_str(em_status s) {
    switch (s) {
    case EM_OK: return "ok";
    case EM_ERR_NOMEM: return "out of memory";
    case EM_ERR_INVALID: return "invalid argument";
    case EM_ERR_IO: return "i/o error";
    case EM_ERR_PARSE: return "malformed input";
    case EM_ERR_CORRUPT: return "corrupt file";
    case EM_ERR_EOF: return "end of stream";
    case EM_ERR_UNSUPPORTED: return "unsupported";
    case EM_ERR_THREAD: return "thread error";
    default: return "unknown status";
    }
}

const char *em_last_error(void) { return tl_error; }

void em_clear_error(void) { tl_error[0] = 0; }

em_status em_errorf(em_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tl_error, sizeof tl_error, fmt, ap);
    va_end(ap);
    return s;
}

void em__assert_fail(const char *expr, const char *file, int line) {
    /* Programmer error, not bad input: the one place the library writes and stops. */
    fprintf(stderr, "ember: assertion failed: %s (%s:%d)\n", expr, file, line);
    abort();
}
