/*
 * plan_io.c - table specs for the planner: the JSON spec file and the built-in
 * presets ("kaggle", "large").
 *
 * A spec file is a JSON list of table objects, or an object whose "tables" key holds
 * that list. Only rows and dim are required; the defaults (pooling 1, zipf 0,
 * bytes 4, opt_bytes 4, sharding "auto", name "t<i>") describe an fp32 table trained
 * with row-wise AdaGrad. Unknown keys are errors (a misspelt "pooling" must not
 * silently become 1). Every error names the file, the table index and the field.
 *
 * The "large" preset is synthetic and stated in docs/PLANNER.md: 800 tables with
 * rows_t = max(1000, 1e9 / (t+1)^1.8) (about 1.9e9 rows, ~1 TB in fp32), D = 128,
 * pooling 20..100 spread deterministically, Zipf 1.05, plus a 100M-parameter dense
 * part at 2 flops per parameter per example.
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "ember/plan.h"

static em_status field_err(const char *path, size_t i, const char *field, const char *what) {
    return em_errorf(EM_ERR_PARSE, "%s: tables[%zu]: field '%s': %s", path, i, field, what);
}

static em_status parse_table(const char *path, size_t i, json_t *o, em_table_spec *t) {
    *t = (em_table_spec){.pooling = 1, .zipf = 0, .elem_bytes = 4, .opt_bytes = 4, .shard = EM_SHARD_AUTO};
    snprintf(t->name, sizeof t->name, "t%zu", i);
    if (!json_is_object(o)) return em_errorf(EM_ERR_PARSE, "%s: tables[%zu]: expected an object", path, i);
    int have_rows = 0, have_dim = 0;
    const char *key;
    json_t *v;
    json_object_foreach(o, key, v) {
        if (!strcmp(key, "name")) {
            if (!json_is_string(v) || strlen(json_string_value(v)) >= sizeof t->name)
                return field_err(path, i, key, "expected a string of at most 63 bytes");
            snprintf(t->name, sizeof t->name, "%s", json_string_value(v));
        } else if (!strcmp(key, "rows")) {
            if (!json_is_integer(v) || json_integer_value(v) < 1) return field_err(path, i, key, "expected an integer >= 1");
            t->rows = (int64_t)json_integer_value(v), have_rows = 1;
        } else if (!strcmp(key, "dim")) {
            if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > (1 << 20))
                return field_err(path, i, key, "expected an integer in [1, 1048576]");
            t->dim = (int)json_integer_value(v), have_dim = 1;
        } else if (!strcmp(key, "pooling") || !strcmp(key, "zipf")) {
            if (!json_is_number(v) || !(json_number_value(v) >= 0) || !isfinite(json_number_value(v)))
                return field_err(path, i, key, "expected a number >= 0");
            *(!strcmp(key, "pooling") ? &t->pooling : &t->zipf) = json_number_value(v);
        } else if (!strcmp(key, "bytes")) {
            if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > 8)
                return field_err(path, i, key, "expected an integer in [1, 8]");
            t->elem_bytes = (int)json_integer_value(v);
        } else if (!strcmp(key, "opt_bytes")) {
            if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > (1 << 24))
                return field_err(path, i, key, "expected an integer >= 0");
            t->opt_bytes = (int)json_integer_value(v);
        } else if (!strcmp(key, "sharding")) {
            const char *s = json_is_string(v) ? json_string_value(v) : "";
            int found = 0;
            for (int k = EM_SHARD_AUTO; k <= EM_SHARD_DATA; k++)
                if (!strcmp(s, em_shard_name((em_shard_type)k))) t->shard = (em_shard_type)k, found = 1;
            if (!found) return field_err(path, i, key, "expected one of auto, table, row, column, data");
        } else {
            return field_err(path, i, key, "unknown field (known: name rows dim pooling zipf bytes opt_bytes sharding)");
        }
    }
    if (!have_rows) return field_err(path, i, "rows", "missing");
    if (!have_dim) return field_err(path, i, "dim", "missing");
    return EM_OK;
}

em_status em_plan_load_tables(const char *path, em_table_spec **out, int *n) {
    *out = NULL, *n = 0;
    json_error_t err;
    json_t *root = json_load_file(path, 0, &err);
    if (!root) return em_errorf(EM_ERR_PARSE, "%s:%d:%d: %s", path, err.line, err.column, err.text);
    json_t *list = json_is_object(root) ? json_object_get(root, "tables") : root;
    em_status st = EM_OK;
    if (!json_is_array(list) || json_array_size(list) == 0 || json_array_size(list) > (1u << 20)) {
        st = em_errorf(EM_ERR_PARSE, "%s: field 'tables': expected a non-empty list of table specs", path);
        goto done;
    }
    size_t nt = json_array_size(list);
    em_table_spec *t = em_calloc(nt, sizeof *t);
    if (!t) {
        st = em_errorf(EM_ERR_NOMEM, "%s: out of memory", path);
        goto done;
    }
    for (size_t i = 0; i < nt && st == EM_OK; i++) st = parse_table(path, i, json_array_get(list, i), &t[i]);
    if (st) {
        em_free(t);
        goto done;
    }
    *out = t, *n = (int)nt;
done:
    json_decref(root);
    return st;
}

static const int64_t kaggle_rows[26] = {1460,  583,     10131227, 2202608, 305,   24,   12517, 633,     3,
                                        93145, 5683,    8351593,  3194,    27,    14992, 5461306, 10, 5652,
                                        2173,  4,       7046547,  18,      15,    286181, 105,    142572};

em_status em_plan_preset(const char *name, em_table_spec **out, int *n, em_plan_cfg *cfg) {
    *out = NULL, *n = 0;
    int nt;
    if (!strcmp(name, "kaggle")) nt = 26;
    else if (!strcmp(name, "large")) nt = 800;
    else return em_errorf(EM_ERR_INVALID, "unknown preset '%s' (kaggle, large)", name);
    em_table_spec *t = em_calloc((size_t)nt, sizeof *t);
    if (!t) return em_errorf(EM_ERR_NOMEM, "out of memory");
    for (int i = 0; i < nt; i++) {
        snprintf(t[i].name, sizeof t[i].name, "%s%d", nt == 26 ? "C" : "t", i + 1);
        t[i].zipf = 1.05, t[i].elem_bytes = 4, t[i].opt_bytes = 4, t[i].shard = EM_SHARD_AUTO;
        if (nt == 26) {
            t[i].rows = kaggle_rows[i], t[i].dim = 16, t[i].pooling = 1;
        } else {
            double r = floor(1e9 / pow(i + 1, 1.8));
            t[i].rows = r < 1000 ? 1000 : (int64_t)r;
            t[i].dim = 128;
            t[i].pooling = 20 + (i * 37) % 81;
        }
    }
    if (cfg) {
        if (nt == 26) {
            /* bottom 13-512-256-64-16, top 367-512-256-1 */
            cfg->dense_params = (13 * 512 + 512) + (512 * 256 + 256) + (256 * 64 + 64) + (64 * 16 + 16) +
                                (367 * 512 + 512) + (512 * 256 + 256) + (256 + 1);
            cfg->dense_flops = 2 * cfg->dense_params + 2.0 * 351 * 16; /* MLPs + 351 pairwise dots */
        } else {
            cfg->dense_params = 1e8;
            cfg->dense_flops = 2e8;
        }
    }
    *out = t, *n = nt;
    return EM_OK;
}
