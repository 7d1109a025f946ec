/*
 * args.c - option parsing for every verb. Flags are "--name value" or "--name=value";
 * a JSON config file goes through the same typed descriptors, so a config key and a
 * flag can never mean different things. Later settings win (flags after --config
 * override it).
 *
 * Conversion, range checks and error messages live here once for all verbs; each
 * descriptor (cli.h) says the kind of value and where in the verb's context struct
 * it goes. Strings read from a config file are copied into storage kept until
 * cli_release() (argv strings need no copy), because the JSON document is freed as
 * soon as it has been applied.
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

int cli_int_list(const char *verb, const char *opt, const char *what, const char *v, int64_t *out, int max, int *n) {
    int k = 0;
    const char *s = v;
    while (*s) {
        char *end;
        errno = 0;
        long long x = strtoll(s, &end, 10);
        if (end == s || errno || x < 1 || k == max || (*end && *end != ',')) {
            fprintf(stderr, "ember %s: --%s: expected a comma-separated list of %s, got '%s'\n", verb, opt, what, v);
            return -1;
        }
        out[k++] = x;
        s = *end ? end + 1 : end;
    }
    *n = k;
    return 0;
}

/* Config strings outlive the JSON document: a list of copies, freed by cli_release. */
typedef struct kept_str {
    struct kept_str *next;
    char s[];
} kept_str;
static kept_str *kept;

static const char *keep(const char *v) {
    size_t n = strlen(v) + 1;
    kept_str *k = em_malloc(sizeof *k + n);
    if (!k) return NULL;
    memcpy(k->s, v, n);
    k->next = kept, kept = k;
    return k->s;
}

void cli_release(void) {
    while (kept) {
        kept_str *k = kept;
        kept = k->next;
        em_free(k);
    }
}

int cli_set_optim(void *ctx, const cli_opt *o, const char *v) {
    em_optim_kind k;
    if (em_optim_parse(v, &k) != EM_OK) {
        fprintf(stderr, "ember: --%s: unknown optimizer '%s' (sgd, adagrad, rowwise_adagrad, adam, adamw)\n", o->name, v);
        return -1;
    }
    memcpy((char *)ctx + o->off, &k, sizeof k);
    return 0;
}

int cli_layers(const char *verb, const char *opt, const char *v, int *sizes, int *n, int *given) {
    int k = em_parse_layers(v, sizes, EM_DLRM_MAX_LAYERS + 1);
    if (k < 2) {
        fprintf(stderr, "ember %s: --%s: expected sizes like 13-512-256-64-16, got '%s'\n", verb, opt, v);
        return -1;
    }
    *n = k, *given = 1;
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

/* Convert `value` as o's kind says and store it at ctx + o->off. `value` is NULL only
 * for a flag given without "=value"; `transient` says it dies after this call (a
 * config file's), so a string target gets a kept copy. */
static int apply(const char *verb, const cli_opt *o, void *ctx, const char *value, int transient) {
    char *dst = (char *)ctx + o->off;
    switch (o->kind) {
    case CLI_FLAG: {
        if (value && strcmp(value, "true") != 0 && strcmp(value, "1") != 0) {
            if (strcmp(value, "false") == 0 || strcmp(value, "0") == 0) return 0;
            fprintf(stderr, "ember %s: --%s takes no value\n", verb, o->name);
            return -1;
        }
        int one = 1;
        memcpy(dst, &one, sizeof one);
        return 0;
    }
    case CLI_STR: {
        const char *s = transient ? keep(value) : value;
        if (!s) {
            fprintf(stderr, "ember %s: out of memory\n", verb);
            return -1;
        }
        memcpy(dst, &s, sizeof s);
        return 0;
    }
    case CLI_INT:
    case CLI_UINT: {
        long long x;
        if (cli_int(o->name, value, o->lo, o->hi, &x)) return -1;
        /* In range, so the cast is exact; signedness only picks the C type. */
        if (o->size == 8 && o->kind == CLI_INT) memcpy(dst, &(int64_t){(int64_t)x}, 8);
        else if (o->size == 8) memcpy(dst, &(uint64_t){(uint64_t)x}, 8);
        else if (o->kind == CLI_INT) memcpy(dst, &(int32_t){(int32_t)x}, 4);
        else memcpy(dst, &(uint32_t){(uint32_t)x}, 4);
        return 0;
    }
    case CLI_DOUBLE: {
        double x;
        if (cli_float(o->name, value, &x)) return -1;
        if (o->positive && !(x > 0)) {
            fprintf(stderr, "ember %s: --%s must be > 0\n", verb, o->name);
            return -1;
        }
        memcpy(dst, &x, sizeof x);
        return 0;
    }
    case CLI_FN:
        return o->fn(ctx, o, value);
    case CLI_CONFIG: /* cli_parse loads it; a config naming "config" is refused earlier */
        break;
    }
    fprintf(stderr, "ember %s: --%s cannot be set here\n", verb, o->name);
    return -1;
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
        if (!o || o->kind == CLI_CONFIG) {
            fprintf(stderr, "ember %s: %s: unknown key '%s' (see ember %s --help)\n", verb, path, key, verb);
            rc = -1;
            break;
        }
        char buf[1 << 15] = ""; /* room for 1024 table sizes */
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
                if (len >= sizeof buf) {
                    fprintf(stderr, "ember %s: %s: key '%s': array too long\n", verb, path, key);
                    json_decref(j);
                    return -1;
                }
            }
        } else {
            fprintf(stderr, "ember %s: %s: key '%s' has an unsupported value type\n", verb, path, key);
            rc = -1;
            break;
        }
        if (apply(verb, o, ctx, buf, 1) != 0) {
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
        if (o->kind == CLI_CONFIG) {
            if (load_config(verb, opts, nopts, ctx, value) != 0) return -1;
            continue;
        }
        if (apply(verb, o, ctx, value, 0) != 0) return -1;
    }
    return 0;
}
