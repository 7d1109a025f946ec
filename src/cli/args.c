/*
 * args.c - option parsing for every verb. Flags are "--name value" or "--name=value";
 * a JSON config file goes through the same setters, so a config key and a flag can
 * never mean different things. Later settings win (flags after --config override it).
 */
#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"

void cli_fail(const char *what, em_status st) {
    const char *d = em_last_error();
    if (d && *d) fprintf(stderr, "ember: %s: %s\n", what, d);
    else fprintf(stderr, "ember: %s: %s\n", what, em_status_str(st));
}

int cli_int(const char *opt, const char *v, long long lo, long long hi, long long *out) {
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (*v == 0 || *end || errno || x < lo || x > hi) {
        fprintf(stderr, "ember: --%s: expected an integer in [%lld, %lld], got '%s'\n", opt, lo, hi, v);
        return -1;
    }
    *out = x;
    return 0;
}

int cli_float(const char *opt, const char *v, double *out) {
    char *end;
    double x = strtod(v, &end);
    if (*v == 0 || *end || x != x) {
        fprintf(stderr, "ember: --%s: expected a number, got '%s'\n", opt, v);
        return -1;
    }
    *out = x;
    return 0;
}

void cli_help(FILE *f, const char *verb, const char *usage, const cli_opt *opts, int nopts) {
    fprintf(f, "usage: ember %s %s\n\n", verb, usage);
    for (int i = 0; i < nopts; i++) {
        char left[64];
        snprintf(left, sizeof left, "--%s%s%s", opts[i].name, opts[i].arg ? " " : "", opts[i].arg ? opts[i].arg : "");
        fprintf(f, "  %-26s %s\n", left, opts[i].help);
    }
    fprintf(f, "  %-26s %s\n", "--help", "show this help");
}

static const cli_opt *find_opt(const cli_opt *opts, int nopts, const char *name, size_t len) {
    for (int i = 0; i < nopts; i++) {
        const char *a = opts[i].name;
        size_t k = 0;
        for (; k < len && a[k]; k++) {
            char c = name[k] == '_' ? '-' : name[k];
            if (c != a[k]) break;
        }
        if (k == len && a[k] == 0) return &opts[i];
    }
    return NULL;
}

static int apply(const char *verb, const cli_opt *o, void *ctx, const char *value) {
    if (!o->arg && value && strcmp(value, "true") != 0 && strcmp(value, "1") != 0) {
        if (strcmp(value, "false") == 0 || strcmp(value, "0") == 0) return 0;
        fprintf(stderr, "ember %s: --%s takes no value\n", verb, o->name);
        return -1;
    }
    return o->set(ctx, o->arg ? value : NULL);
}

static int load_config(const char *verb, const cli_opt *opts, int nopts, void *ctx, const char *path) {
    json_error_t err;
    json_t *j = json_load_file(path, 0, &err);
    if (!j) {
        fprintf(stderr, "ember %s: %s:%d:%d: %s\n", verb, path, err.line, err.column, err.text);
        return -1;
    }
    if (!json_is_object(j)) {
        fprintf(stderr, "ember %s: %s: expected a JSON object of option names to values\n", verb, path);
        json_decref(j);
        return -1;
    }
    const char *key;
    json_t *v;
    int rc = 0;
    json_object_foreach(j, key, v) {
        const cli_opt *o = find_opt(opts, nopts, key, strlen(key));
        if (!o || strcmp(o->name, "config") == 0) {
            fprintf(stderr, "ember %s: %s: unknown key '%s' (see ember %s --help)\n", verb, path, key, verb);
            rc = -1;
            break;
        }
        char buf[4096] = "";
        if (json_is_string(v)) snprintf(buf, sizeof buf, "%s", json_string_value(v));
        else if (json_is_integer(v)) snprintf(buf, sizeof buf, "%lld", (long long)json_integer_value(v));
        else if (json_is_real(v)) snprintf(buf, sizeof buf, "%.17g", json_real_value(v));
        else if (json_is_boolean(v)) snprintf(buf, sizeof buf, "%s", json_is_true(v) ? "true" : "false");
        else if (json_is_array(v)) {
            size_t i, len = 0;
            json_t *e;
            json_array_foreach(v, i, e) {
                if (!json_is_integer(e)) {
                    fprintf(stderr, "ember %s: %s: key '%s': arrays must hold integers\n", verb, path, key);
                    json_decref(j);
                    return -1;
                }
                len += (size_t)snprintf(buf + len, sizeof buf - len, "%s%lld", i ? "," : "", (long long)json_integer_value(e));
                if (len >= sizeof buf) break;
            }
        } else {
            fprintf(stderr, "ember %s: %s: key '%s' has an unsupported value type\n", verb, path, key);
            rc = -1;
            break;
        }
        if (apply(verb, o, ctx, buf) != 0) {
            fprintf(stderr, "ember %s: (from %s, key '%s')\n", verb, path, key);
            rc = -1;
            break;
        }
    }
    json_decref(j);
    return rc;
}

int cli_parse(const char *verb, const char *usage, const cli_opt *opts, int nopts, void *ctx, int argc, char **argv,
              char **pos, int *npos, int max_pos) {
    *npos = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            cli_help(stdout, verb, usage, opts, nopts);
            return 1;
        }
        if (strncmp(a, "--", 2) != 0 || a[2] == 0) {
            if (*npos == max_pos) {
                fprintf(stderr, "ember %s: unexpected argument '%s' (see ember %s --help)\n", verb, a, verb);
                return -1;
            }
            pos[(*npos)++] = argv[i];
            continue;
        }
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        const cli_opt *o = find_opt(opts, nopts, name, len);
        if (!o) {
            fprintf(stderr, "ember %s: unknown option '%s' (see ember %s --help)\n", verb, a, verb);
            return -1;
        }
        const char *value = eq ? eq + 1 : NULL;
        if (o->arg && !value) {
            if (i + 1 >= argc) {
                fprintf(stderr, "ember %s: --%s needs a value (%s)\n", verb, o->name, o->arg);
                return -1;
            }
            value = argv[++i];
        }
        if (strcmp(o->name, "config") == 0) {
            if (load_config(verb, opts, nopts, ctx, value) != 0) return -1;
            continue;
        }
        if (apply(verb, o, ctx, value) != 0) return -1;
    }
    return 0;
}
