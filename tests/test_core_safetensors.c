/*
 * test_core_safetensors.c - the safetensors writer/reader: round trips of every dtype
 * (scalars and empty tensors included), metadata, find/expect, atomic writes, and a
 * corrupt-file battery (every truncation, byte flips, bad lengths, hand-built headers
 * with overlapping/out-of-range offsets or unknown dtypes) that must be refused with a
 * message and never crash; allocation failure injection; the numpy reader script.
 */
#include <dirent.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test.h"

static char g_dir[64];
static void clear_dir(void);

static void remove_dir(void) {
    if (!g_dir[0]) return;
    clear_dir();
    rmdir(g_dir);
}

static const char *tmp_path(const char *name, char *buf, size_t cap) {
    if (!g_dir[0]) {
        snprintf(g_dir, sizeof g_dir, "/tmp/em_st_test_XXXXXX");
        if (!mkdtemp(g_dir)) {
            perror("mkdtemp");
            exit(1);
        }
        atexit(remove_dir);
    }
    snprintf(buf, cap, "%s/%s", g_dir, name);
    return buf;
}

static int count_dir_entries(void) {
    DIR *d = opendir(g_dir);
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    if (d) closedir(d);
    return n;
}

static void clear_dir(void) {
    DIR *d = opendir(g_dir);
    struct dirent *e;
    char p[600];
    while (d && (e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) unlink((snprintf(p, sizeof p, "%s/%s", g_dir, e->d_name), p));
    if (d) closedir(d);
}

static unsigned char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc(*n + 1);
    if (fread(b, 1, *n, f) != *n) *n = 0;
    fclose(f);
    return b;
}

static void spit(const char *path, const void *b, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return;
    fwrite(b, 1, n, f);
    fclose(f);
}

/* A hand-built file: 8-byte length, JSON (unpadded: hlen is whatever it is), data. */
static void write_raw(const char *path, const char *json, const void *data, size_t dlen) {
    size_t hl = strlen(json);
    unsigned char *b = malloc(8 + hl + dlen + 1);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memcpy(b + 8, json, hl);
    if (dlen) memcpy(b + 8 + hl, data, dlen);
    spit(path, b, 8 + hl + dlen);
    free(b);
}

/* ------------------------------------------------------------ the sample set */

static double s_f64[5] = {1.5, -2.25, 1e300, -0.0, 3.0};
static int64_t s_i64 = -1234567890123LL;
static uint64_t s_u64[3] = {0, 1, UINT64_MAX};
static float s_f32[12];
static int32_t s_i32[8] = {-1, 2, -3, 4, INT32_MIN, INT32_MAX, 0, 7};
static uint16_t s_f16[3] = {0x3c00, 0xc000, 0x7bff}; /* 1, -2, 65504 */
static uint16_t s_bf16[2] = {0x3f80, 0xc040};        /* 1, -3 */
static uint8_t s_u8[7] = {0, 1, 2, 127, 128, 254, 255};

/* 8-byte dtypes first so they stay aligned (the data section is contiguous). */
static int sample(em_st_tensor *t) {
    for (int i = 0; i < 12; i++) s_f32[i] = (float)i * 0.5f - 3.0f;
    int n = 0;
    t[n++] = (em_st_tensor){"w.f64", EM_F64, 1, {5}, s_f64};
    t[n++] = (em_st_tensor){"step", EM_I64, 0, {0}, &s_i64};
    t[n++] = (em_st_tensor){"ids", EM_U64, 1, {3}, s_u64};
    t[n++] = (em_st_tensor){"mlp.0.weight", EM_F32, 2, {3, 4}, s_f32};
    t[n++] = (em_st_tensor){"empty", EM_F32, 2, {0, 5}, NULL};
    t[n++] = (em_st_tensor){"cube", EM_I32, 3, {2, 2, 2}, s_i32};
    t[n++] = (em_st_tensor){"half", EM_F16, 1, {3}, s_f16};
    t[n++] = (em_st_tensor){"brain", EM_BF16, 2, {1, 2}, s_bf16};
    t[n++] = (em_st_tensor){"bytes", EM_U8, 1, {7}, s_u8};
    return n;
}

static const em_st_meta s_meta[] = {{"ember.format", "test/1"}, {"note", "h\xc3\xa9llo \"quoted\"\n"}, {"empty", ""}};

static void write_sample(const char *path) {
    em_st_tensor t[16];
    int n = sample(t);
    CHECK_OK(em_st_write(path, t, n, s_meta, 3));
}

/* ------------------------------------------------------------------ cases */

static void test_dtypes(void) {
    CHECK(em_dtype_size(EM_F32) == 4 && em_dtype_size(EM_F64) == 8 && em_dtype_size(EM_I32) == 4);
    CHECK(em_dtype_size(EM_I64) == 8 && em_dtype_size(EM_U64) == 8 && em_dtype_size(EM_U8) == 1);
    CHECK(em_dtype_size(EM_F16) == 2 && em_dtype_size(EM_BF16) == 2 && em_dtype_size((em_dtype)99) == 0);
    CHECK(strcmp(em_dtype_name(EM_BF16), "BF16") == 0 && strcmp(em_dtype_name(EM_U64), "U64") == 0);
}

static void test_round_trip(void) {
    char path[256];
    tmp_path("rt.safetensors", path, sizeof path);
    size_t base = em_mem_in_use();
    write_sample(path);
    em_st_tensor t[16];
    int n = sample(t);
    em_st *st = NULL;
    CHECK_OK(em_st_open(&st, path));
    if (!st) return;
    CHECK(em_st_count(st) == n);
    for (int i = 0; i < n && i < em_st_count(st); i++) {
        const em_st_tensor *r = em_st_at(st, i);
        CHECK(strcmp(r->name, t[i].name) == 0); /* writer's order is kept */
        CHECK(r->dtype == t[i].dtype && r->ndim == t[i].ndim);
        size_t nb = em_dtype_size(r->dtype);
        for (int d = 0; d < r->ndim; d++) {
            CHECK(r->shape[d] == t[i].shape[d]);
            nb *= (size_t)r->shape[d];
        }
        CHECK(r->data != NULL);
        if (nb) CHECK(memcmp(r->data, t[i].data, nb) == 0);
        if (nb && em_dtype_size(r->dtype) == 8) CHECK((uintptr_t)r->data % 8 == 0);
    }
    CHECK(em_st_at(st, -1) == NULL && em_st_at(st, n) == NULL);
    const em_st_tensor *sc = em_st_find(st, "step");
    CHECK(sc && sc->ndim == 0 && *(const int64_t *)sc->data == s_i64);
    const em_st_tensor *e = em_st_find(st, "empty");
    CHECK(e && e->ndim == 2 && e->shape[0] == 0 && e->shape[1] == 5);
    const double *f64 = em_st_expect(st, "w.f64", EM_F64, 5);
    CHECK(f64 && f64[2] == 1e300 && signbit(f64[3]));
    CHECK(em_st_expect(st, "empty", EM_F32, 0) != NULL);
    CHECK(em_st_expect(st, "step", EM_I64, 1) != NULL);
    em_st_close(st);
    em_st_close(NULL);
    CHECK(em_mem_in_use() == base);

    /* Overwriting an existing file replaces it; zero tensors is a valid file. */
    CHECK_OK(em_st_write(path, NULL, 0, NULL, 0));
    CHECK_OK(em_st_open(&st, path));
    if (st) {
        CHECK(em_st_count(st) == 0 && em_st_find(st, "w.f64") == NULL);
        CHECK(em_st_meta_get(st, "ember.xxh64") != NULL);
        em_st_close(st);
    }
    CHECK(em_mem_in_use() == base);
}

static void test_metadata_and_layout(void) {
    char path[256];
    tmp_path("meta.safetensors", path, sizeof path);
    write_sample(path);
    size_t n = 0;
    unsigned char *b = slurp(path, &n);
    CHECK(b && n > 8);
    if (!b) return;
    uint64_t hl = 0;
    for (int i = 0; i < 8; i++) hl |= (uint64_t)b[i] << (8 * i);
    CHECK(hl % 8 == 0 && 8 + hl <= n);
    CHECK(b[8] == '{');
    CHECK(memcmp(b + 8, "{\"__metadata__\":", 16) == 0); /* metadata first, compact */
    CHECK(b[8 + hl - 1] == '}' || b[8 + hl - 1] == ' ');
    /* data section = the tensors back to back, in order */
    em_st_tensor t[16];
    int nt = sample(t);
    size_t off = 8 + hl;
    for (int i = 0; i < nt; i++) {
        size_t nb = em_dtype_size(t[i].dtype);
        for (int d = 0; d < t[i].ndim; d++) nb *= (size_t)t[i].shape[d];
        if (nb) CHECK(off + nb <= n && memcmp(b + off, t[i].data, nb) == 0);
        off += nb;
    }
    CHECK(off == n);
    free(b);

    em_st *st = NULL;
    CHECK_OK(em_st_open(&st, path));
    if (!st) return;
    CHECK(strcmp(em_st_meta_get(st, "ember.format"), "test/1") == 0);
    CHECK(strcmp(em_st_meta_get(st, "note"), s_meta[1].value) == 0);
    CHECK(strcmp(em_st_meta_get(st, "empty"), "") == 0);
    CHECK(em_st_meta_get(st, "nope") == NULL);
    const char *h = em_st_meta_get(st, "ember.xxh64");
    CHECK(h && strlen(h) == 16 && strspn(h, "0123456789abcdef") == 16);
    em_st_close(st);

    /* A caller-supplied ember.xxh64 is ignored: the writer computes its own. */
    em_st_meta bogus[] = {{"ember.xxh64", "0000000000000000"}};
    float x = 1;
    em_st_tensor one = {"x", EM_F32, 1, {1}, &x};
    CHECK_OK(em_st_write(path, &one, 1, bogus, 1));
    CHECK_OK(em_st_open(&st, path));
    if (st) CHECK(strcmp(em_st_meta_get(st, "ember.xxh64"), "0000000000000000") != 0);
    em_st_close(st);
}

static void test_find_expect(void) {
    char path[256];
    tmp_path("fe.safetensors", path, sizeof path);
    write_sample(path);
    em_st *st = NULL;
    CHECK_OK(em_st_open(&st, path));
    if (!st) return;
    em_st_tensor t[16];
    int n = sample(t);
    for (int i = 0; i < n; i++) CHECK(em_st_find(st, t[i].name) == em_st_at(st, i));
    CHECK(em_st_find(st, "") == NULL && em_st_find(st, "zzz") == NULL && em_st_find(st, "mlp") == NULL);
    const float *w = em_st_expect(st, "mlp.0.weight", EM_F32, 12);
    CHECK(w && w[11] == s_f32[11]);
    em_clear_error();
    CHECK(em_st_expect(st, "mlp.1.weight", EM_F32, 12) == NULL);
    CHECK(strstr(em_last_error(), "fe.safetensors") && strstr(em_last_error(), "mlp.1.weight"));
    CHECK(strstr(em_last_error(), "not found") != NULL);
    CHECK(em_st_expect(st, "mlp.0.weight", EM_F64, 12) == NULL);
    CHECK(strstr(em_last_error(), "mlp.0.weight") && strstr(em_last_error(), "F32") && strstr(em_last_error(), "F64"));
    CHECK(em_st_expect(st, "mlp.0.weight", EM_F32, 13) == NULL);
    CHECK(strstr(em_last_error(), "12") && strstr(em_last_error(), "13") && strstr(em_last_error(), "[3, 4]"));
    CHECK(em_st_expect(st, "step", EM_I64, 0) == NULL);
    em_st_close(st);
}

static void test_atomic_write(void) {
    clear_dir();
    char path[256];
    tmp_path("atomic.safetensors", path, sizeof path);
    for (int rep = 0; rep < 3; rep++) write_sample(path);
    CHECK(count_dir_entries() == 1); /* no *.tmp.<pid> left behind */

    /* Invalid arguments create nothing and leave the old file intact. */
    float x[2] = {1, 2};
    em_st_tensor dup[2] = {{"a", EM_F32, 1, {1}, x}, {"a", EM_F32, 1, {1}, x + 1}};
    CHECK(em_st_write(path, dup, 2, NULL, 0) == EM_ERR_INVALID);
    CHECK(strstr(em_last_error(), "duplicate") != NULL);
    em_st_tensor nodata = {"b", EM_F32, 1, {2}, NULL};
    CHECK(em_st_write(path, &nodata, 1, NULL, 0) == EM_ERR_INVALID);
    em_st_tensor negdim = {"c", EM_F32, 2, {2, -1}, x};
    CHECK(em_st_write(path, &negdim, 1, NULL, 0) == EM_ERR_INVALID);
    em_st_tensor bigdim = {"c", EM_F32, 3, {1LL << 40, 1LL << 40, 1LL << 40}, x};
    CHECK(em_st_write(path, &bigdim, 1, NULL, 0) == EM_ERR_INVALID);
    em_st_tensor baddt = {"d", (em_dtype)42, 1, {2}, x};
    CHECK(em_st_write(path, &baddt, 1, NULL, 0) == EM_ERR_INVALID);
    em_st_tensor badname = {"\xff\xfe", EM_F32, 1, {2}, x};
    CHECK(em_st_write(path, &badname, 1, NULL, 0) == EM_ERR_INVALID);
    em_st_tensor reserved = {"__metadata__", EM_F32, 1, {2}, x};
    CHECK(em_st_write(path, &reserved, 1, NULL, 0) == EM_ERR_INVALID);
    em_st_meta nullv = {"k", NULL};
    CHECK(em_st_write(path, NULL, 0, &nullv, 1) == EM_ERR_INVALID);
    CHECK(count_dir_entries() == 1);
    em_st *st = NULL;
    CHECK_OK(em_st_open(&st, path));
    if (st) CHECK(em_st_count(st) == 9);
    em_st_close(st);

    /* A missing directory is an i/o error naming the path. */
    char bad[300];
    snprintf(bad, sizeof bad, "%s/no/such/dir/x.safetensors", g_dir);
    CHECK(em_st_write(bad, dup, 1, NULL, 0) == EM_ERR_IO);
    CHECK(strstr(em_last_error(), bad) && strstr(em_last_error(), "No such file"));
    CHECK(em_st_open(&st, bad) == EM_ERR_IO && st == NULL);
    CHECK(strstr(em_last_error(), bad) != NULL);
    /* A directory is not a checkpoint. */
    CHECK(em_st_open(&st, g_dir) == EM_ERR_IO && st == NULL);
    CHECK(count_dir_entries() == 1);
}

/* Every proper prefix of a valid file must be refused cleanly. */
static void test_truncated(void) {
    char path[256], cut[256];
    tmp_path("full.safetensors", path, sizeof path);
    tmp_path("cut.safetensors", cut, sizeof cut);
    write_sample(path);
    size_t n = 0;
    unsigned char *b = slurp(path, &n);
    if (!b) { CHECK(0); return; }
    size_t base = em_mem_in_use();
    int refused = 0, corrupt = 0;
    for (size_t len = 0; len < n; len++) {
        spit(cut, b, len);
        em_st *st = (em_st *)1;
        em_status s = em_st_open(&st, cut);
        refused += s != EM_OK && st == NULL && em_last_error()[0] != 0;
        corrupt += s == EM_ERR_CORRUPT;
        if (s == EM_OK) em_st_close(st);
    }
    CHECK(refused == (int)n);
    CHECK(corrupt == (int)n);
    CHECK(em_mem_in_use() == base);
    /* the data section cut short: the checksum (or a bound) says so */
    spit(cut, b, n - 1);
    em_st *st = NULL;
    CHECK(em_st_open(&st, cut) == EM_ERR_CORRUPT);
    CHECK(strstr(em_last_error(), "cut.safetensors") && strstr(em_last_error(), "data section of"));
    /* trailing garbage changes the hash of the data section */
    unsigned char *longer = malloc(n + 1);
    memcpy(longer, b, n);
    longer[n] = 0;
    spit(cut, longer, n + 1);
    CHECK(em_st_open(&st, cut) == EM_ERR_CORRUPT && strstr(em_last_error(), "checksum mismatch"));
    free(longer);
    free(b);
}

static void test_flipped_bytes(void) {
    char path[256], bad[256];
    tmp_path("flip_src.safetensors", path, sizeof path);
    tmp_path("flip.safetensors", bad, sizeof bad);
    write_sample(path);
    size_t n = 0;
    unsigned char *b = slurp(path, &n);
    if (!b) { CHECK(0); return; }
    uint64_t hl = 0;
    for (int i = 0; i < 8; i++) hl |= (uint64_t)b[i] << (8 * i);
    size_t base = em_mem_in_use();
    em_st *st = NULL;

    /* any flip in the data section: checksum mismatch */
    int caught = 0;
    for (size_t i = 8 + hl; i < n; i++) {
        b[i] ^= 0x10;
        spit(bad, b, n);
        b[i] ^= 0x10;
        em_status s = em_st_open(&st, bad);
        caught += s == EM_ERR_CORRUPT && strstr(em_last_error(), "checksum mismatch: file is corrupt or truncated");
        if (!s) em_st_close(st);
    }
    CHECK(caught == (int)(n - 8 - hl));

    /* a structural byte of the JSON: parse error naming the file */
    b[8] ^= 0x01;
    spit(bad, b, n);
    b[8] ^= 0x01;
    CHECK(em_st_open(&st, bad) == EM_ERR_CORRUPT && st == NULL);
    CHECK(strstr(em_last_error(), "flip.safetensors") && strstr(em_last_error(), "JSON"));

    /* every single-bit flip anywhere in the header: never a crash or a leak; flips
     * inside names or metadata text may yield a different valid file, structural
     * ones must be refused */
    int accepted = 0;
    for (size_t i = 0; i < 8 + hl; i++) {
        for (int bit = 0; bit < 8; bit += 3) {
            b[i] ^= (unsigned char)(1u << bit);
            spit(bad, b, n);
            b[i] ^= (unsigned char)(1u << bit);
            em_status s = em_st_open(&st, bad);
            if (!s) accepted++, em_st_close(st);
            else CHECK(st == NULL && em_last_error()[0]);
        }
    }
    CHECK(accepted < (int)(8 + hl)); /* most flips are caught */
    CHECK(em_mem_in_use() == base);
    free(b);
}

static void test_bad_header_length(void) {
    char path[256], bad[256];
    tmp_path("len_src.safetensors", path, sizeof path);
    tmp_path("len.safetensors", bad, sizeof bad);
    write_sample(path);
    size_t n = 0;
    unsigned char *b = slurp(path, &n);
    if (!b) { CHECK(0); return; }
    const uint64_t lens[] = {0, 1, 7, (uint64_t)n - 7, (uint64_t)n, 100000001ull, 1ull << 40, UINT64_MAX};
    em_st *st = NULL;
    for (size_t k = 0; k < sizeof lens / sizeof lens[0]; k++) {
        for (int i = 0; i < 8; i++) b[i] = (unsigned char)(lens[k] >> (8 * i));
        spit(bad, b, n);
        CHECK(em_st_open(&st, bad) == EM_ERR_CORRUPT && st == NULL);
        CHECK(strstr(em_last_error(), "len.safetensors") != NULL);
    }
    CHECK(strstr(em_last_error(), "header length") != NULL);
    free(b);
}

/* Hand-built headers: each must be refused with a message naming what is wrong. */
static void test_hand_built(void) {
    char p[256];
    tmp_path("hand.safetensors", p, sizeof p);
    unsigned char data[64];
    for (int i = 0; i < 64; i++) data[i] = (unsigned char)i;
    em_st *st = NULL;
    static const struct {
        const char *json;
        size_t dlen;
        const char *expect; /* substring of the error */
    } cases[] = {
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "overlap"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[8,12]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]}}", 12, "overlap"},
        {"{\"a\":{\"dtype\":\"F8\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2, "unknown dtype 'F8'"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, "exceed data section of 4 bytes"},
        {"{\"emb.3\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}", 16,
         "tensor 'emb.3': data_offsets [8, 24] exceed data section of 16 bytes"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 16, "needs"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 16, "shape[0]"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", 16, "shape[0]"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 16, "shape"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,8]}}", 16,
         "2^63"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 16, "not ordered"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-8,0]}}", 16, "not ordered"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", 16, "data_offsets"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 16, "data_offsets"},
        {"{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 16, "dtype"},
        {"{\"a\":{\"dtype\":7,\"shape\":[2],\"data_offsets\":[0,8]}}", 16, "dtype"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]}}", 16, "shape"},
        {"{\"a\":[1,2]}", 16, "not an object"},
        {"[1,2]", 16, "not a JSON object"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 16, "JSON"},
        {"{\"__metadata__\":{\"k\":3}}", 0, "metadata 'k'"},
        {"{\"__metadata__\":[]}", 0, "__metadata__"},
        {"{\"__metadata__\":{\"ember.xxh64\":\"xyz\"}}", 0, "hex"},
        {"{\"__metadata__\":{\"ember.xxh64\":\"0123456789ABCDEF\"}}", 0, "hex"},
        {"{\"__metadata__\":{\"ember.xxh64\":\"0123456789abcdef\"}}", 0, "checksum mismatch"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}} x", 16, "JSON"},
        {"{\"a\":\"\\u0000\"}", 16, "JSON"},
        {"", 16, "JSON"},
    };
    size_t base = em_mem_in_use();
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        write_raw(p, cases[k].json, data, cases[k].dlen);
        st = (em_st *)1;
        em_status s = em_st_open(&st, p);
        CHECK(s == EM_ERR_CORRUPT && st == NULL);
        if (s != EM_ERR_CORRUPT || !strstr(em_last_error(), cases[k].expect) || !strstr(em_last_error(), "hand.safetensors")) {
            fprintf(stderr, "  case %zu: %s -> %s: '%s'\n", k, cases[k].json, em_status_str(s), em_last_error());
            CHECK(0);
        }
        if (s == EM_OK) em_st_close(st);
    }
    CHECK(em_mem_in_use() == base);

    /* Accepted foreign files: no checksum, header length not a multiple of 8 (the data
     * must still come out 8-aligned), gaps, empty tensors sharing an offset, extra
     * keys; and an empty tensor inside another one owns no bytes. */
    double d[2] = {2.5, -1.0};
    write_raw(p,
              "{\"e\":{\"dtype\":\"F64\",\"shape\":[0],\"data_offsets\":[16,16]},"
              "\"x\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[0,16],\"extra\":1},"
              "\"e2\":{\"dtype\":\"I64\",\"shape\":[3,0],\"data_offsets\":[8,8]}}",
              d, sizeof d);
    CHECK_OK(em_st_open(&st, p));
    if (st) {
        CHECK(em_st_count(st) == 3 && strcmp(em_st_at(st, 0)->name, "e") == 0);
        const double *x = em_st_expect(st, "x", EM_F64, 2);
        CHECK(x && ((uintptr_t)x % 8) == 0 && x[0] == 2.5 && x[1] == -1.0);
        CHECK(em_st_meta_get(st, "ember.xxh64") == NULL);
        em_st_close(st);
    }
    uint8_t u[10] = {9, 9, 1, 2, 3, 9, 9, 9, 9, 9};
    write_raw(p, "{\"__metadata__\":{},\"s\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[4,5]},"
                 "\"v\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[2,4]}}", u, sizeof u);
    CHECK_OK(em_st_open(&st, p));
    if (st) {
        const uint8_t *s = em_st_expect(st, "s", EM_U8, 1), *v = em_st_expect(st, "v", EM_U8, 2);
        CHECK(s && v && *s == 3 && v[0] == 1 && v[1] == 2);
        em_st_close(st);
    }
    CHECK(em_mem_in_use() == base);
}

static void test_alloc_failures(void) {
    char path[256];
    tmp_path("oom.safetensors", path, sizeof path);
    write_sample(path);
    size_t base = em_mem_in_use();
    int k, saw_fail = 0;
    for (k = 0; k < 50; k++) {
        em_mem_fail_after(k);
        em_st *st = (em_st *)1;
        em_status s = em_st_open(&st, path);
        em_mem_fail_after(-1);
        if (s == EM_OK) {
            CHECK(em_st_count(st) == 9);
            em_st_close(st);
            break;
        }
        saw_fail = 1;
        CHECK(s == EM_ERR_NOMEM && st == NULL);
        CHECK(em_mem_in_use() == base);
    }
    CHECK(saw_fail && k < 50);
    CHECK(em_mem_in_use() == base);

    clear_dir();
    em_st_tensor t[16];
    int n = sample(t);
    saw_fail = 0;
    for (k = 0; k < 50; k++) {
        em_mem_fail_after(k);
        em_status s = em_st_write(path, t, n, s_meta, 3);
        em_mem_fail_after(-1);
        CHECK(em_mem_in_use() == base);
        if (s == EM_OK) break;
        saw_fail = 1;
        CHECK(s == EM_ERR_NOMEM);
        CHECK(count_dir_entries() == 0);
    }
    CHECK(saw_fail && k < 50);
    CHECK(count_dir_entries() == 1);
    em_st *st = NULL;
    CHECK_OK(em_st_open(&st, path));
    em_st_close(st);
}

/* The numpy-only reader in tools/ must read what we write (skipped without numpy). */
static void test_python_reader(void) {
    const char *src = getenv("EMBER_SRC");
    if (!src) {
        fprintf(stderr, "  skip: EMBER_SRC not set\n");
        return;
    }
    const char *py = NULL;
    static const char *cands[] = {"python3", "/usr/bin/python3"};
    for (int i = 0; i < 2 && !py; i++) {
        char cmd[256];
        snprintf(cmd, sizeof cmd, "%s -c 'import numpy' >/dev/null 2>&1", cands[i]);
        if (system(cmd) == 0) py = cands[i];
    }
    if (!py) {
        fprintf(stderr, "  skip: no python3 with numpy\n");
        return;
    }
    char path[256], cmd[1024], out[256];
    tmp_path("py.safetensors", path, sizeof path);
    tmp_path("py.out", out, sizeof out);
    write_sample(path);
    snprintf(cmd, sizeof cmd, "%s %s/tools/read_checkpoint.py %s > %s 2>&1", py, src, path, out);
    int rc = system(cmd);
    CHECK(rc == 0);
    size_t n = 0;
    char *text = (char *)slurp(out, &n);
    if (!text) { CHECK(0); return; }
    text[n] = 0;
    em_st_tensor t[16];
    int nt = sample(t);
    for (int i = 0; i < nt; i++) CHECK(strstr(text, t[i].name) != NULL);
    CHECK(strstr(text, "F64") && strstr(text, "BF16") && strstr(text, "test/1"));
    if (rc) fprintf(stderr, "%s", text);
    free(text);

    snprintf(cmd, sizeof cmd, "%s %s/tools/read_checkpoint.py --dump cube %s > %s 2>&1", py, src, path, out);
    CHECK(system(cmd) == 0);
    text = (char *)slurp(out, &n);
    if (text) {
        text[n] = 0;
        CHECK(strstr(text, "-2147483648") && strstr(text, "2147483647"));
        free(text);
    }
    /* a corrupt file: non-zero exit */
    char bad[256];
    tmp_path("py_bad.safetensors", bad, sizeof bad);
    unsigned char *b = slurp(path, &n);
    if (b) {
        spit(bad, b, n / 2);
        free(b);
    }
    snprintf(cmd, sizeof cmd, "%s %s/tools/read_checkpoint.py %s > %s 2>&1", py, src, bad, out);
    CHECK(system(cmd) != 0);
}

/* A 3-element F32 tensor listed before an I64 one: the writer still places the I64
 * data 8-byte aligned (grouped by element size, largest first, stable). */
static void test_write_aligns_by_dtype_size(void) {
    char path[] = "/tmp/ember_st_align_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    close(fd);
    float f[3] = {1, 2, 3};
    int64_t q[2] = {-7, 1LL << 40};
    uint8_t u[1] = {9};
    em_st_tensor ts[] = {{"a_f32", EM_F32, 1, {3}, f}, {"b_u8", EM_U8, 1, {1}, u}, {"c_i64", EM_I64, 1, {2}, q}};
    CHECK_OK(em_st_write(path, ts, 3, NULL, 0));
    em_st *st = NULL;
    CHECK_OK(em_st_open(&st, path));
    if (st) {
        const em_st_tensor *t = em_st_find(st, "c_i64");
        CHECK(t && ((uintptr_t)t->data % 8) == 0 && memcmp(t->data, q, sizeof q) == 0);
        CHECK(strcmp(em_st_at(st, 0)->name, "c_i64") == 0 && strcmp(em_st_at(st, 1)->name, "a_f32") == 0 &&
              strcmp(em_st_at(st, 2)->name, "b_u8") == 0);
        const em_st_tensor *a = em_st_find(st, "a_f32");
        CHECK(a && memcmp(a->data, f, sizeof f) == 0);
    }
    em_st_close(st);
    unlink(path);
}

TEST_MAIN({"write_aligns_by_dtype_size", test_write_aligns_by_dtype_size},{"dtypes", test_dtypes}, {"round_trip", test_round_trip}, {"metadata_and_layout", test_metadata_and_layout},
          {"find_expect", test_find_expect}, {"atomic_write", test_atomic_write}, {"truncated", test_truncated},
          {"flipped_bytes", test_flipped_bytes}, {"bad_header_length", test_bad_header_length},
          {"hand_built", test_hand_built}, {"alloc_failures", test_alloc_failures},
          {"python_reader", test_python_reader})
