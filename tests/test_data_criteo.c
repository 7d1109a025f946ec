/* Criteo TSV line parser: good lines, missing fields, and every kind of malformed line. */
#include <math.h>

#include "test.h"

#define ND EM_CRITEO_DENSE
#define NS EM_CRITEO_SPARSE

/* Build a line from 40 field strings. */
static size_t join(char *out, const char *const *fields, int n, const char *eol) {
    size_t len = 0;
    for (int i = 0; i < n; i++) len += (size_t)sprintf(out + len, "%s%s", i ? "\t" : "", fields[i]);
    len += (size_t)sprintf(out + len, "%s", eol);
    return len;
}

static void base_fields(const char *f[40], char store[40][32]) {
    f[0] = "1";
    for (int j = 0; j < ND; j++) sprintf(store[1 + j], "%d", j * 10), f[1 + j] = store[1 + j];
    for (int k = 0; k < NS; k++) sprintf(store[14 + k], "%08x", 0x1000u + (unsigned)k), f[14 + k] = store[14 + k];
}

static em_status parse(const char *line, size_t len, float *label, float *dense, uint64_t *ids,
                       uint64_t *miss, int *bad) {
    return em_criteo_parse_line(line, len, ND, NS, label, dense, ids, miss, bad);
}

static void test_good_line(void) {
    const char *f[40];
    char st[40][32], line[2048];
    base_fields(f, st);
    float label, dense[ND];
    uint64_t ids[NS], miss = 123;
    int bad = 7;
    const char *eols[] = {"", "\n", "\r\n"};
    for (int e = 0; e < 3; e++) {
        size_t len = join(line, f, 40, eols[e]);
        CHECK_OK(parse(line, len, &label, dense, ids, &miss, &bad));
        CHECK(label == 1.f && miss == 0);
        for (int j = 0; j < ND; j++) CHECK(dense[j] == (float)log1p((double)(j * 10)));
        for (int k = 0; k < NS; k++) CHECK(ids[k] == 0x1000u + (uint64_t)k);
    }
}

static void test_missing_negative_hex_case(void) {
    const char *f[40];
    char st[40][32], line[2048];
    base_fields(f, st);
    f[0] = "0";
    f[1] = "";                     /* missing dense */
    f[2] = "-1";                   /* negative -> 0 */
    f[3] = "+7";
    f[4] = "123456789";            /* beyond the log1p table */
    f[5] = "000";
    f[14] = "";                    /* C1 missing */
    f[15] = "DEADBEEF";            /* uppercase */
    f[16] = "ffffffffffffffff";    /* 16 digits */
    f[17] = "aBc";
    f[39] = "";                    /* last field missing: line ends with a tab */
    size_t len = join(line, f, 40, "\r\n");
    float label, dense[ND];
    uint64_t ids[NS], miss;
    int bad;
    CHECK_OK(parse(line, len, &label, dense, ids, &miss, &bad));
    CHECK(label == 0.f);
    CHECK(dense[0] == 0.f && dense[1] == 0.f && dense[4] == 0.f);
    CHECK(dense[2] == (float)log1p(7.0));
    CHECK(dense[3] == (float)log1p(123456789.0));
    CHECK(miss == ((1ull << 0) | (1ull << 25)));
    CHECK(ids[0] == 0 && ids[25] == 0);
    CHECK(ids[1] == 0xdeadbeefull && ids[2] == UINT64_MAX && ids[3] == 0xabc);
    /* all fields empty but the label */
    for (int i = 1; i < 40; i++) f[i] = "";
    len = join(line, f, 40, "\n");
    CHECK_OK(parse(line, len, &label, dense, ids, &miss, &bad));
    CHECK(miss == (1ull << NS) - 1);
}

/* Expect EM_ERR_PARSE with bad_field and a message containing `msg`. */
static void expect_bad(const char *line, int want_field, const char *msg) {
    float label, dense[ND];
    uint64_t ids[NS], miss;
    int bad = 99;
    em_status s = parse(line, strlen(line), &label, dense, ids, &miss, &bad);
    CHECK(s == EM_ERR_PARSE);
    CHECK(bad == want_field);
    if (!strstr(em_last_error(), msg)) {
        CHECK(!"message");
        fprintf(stderr, "    got '%s', want '%s'\n", em_last_error(), msg);
    }
}

static void test_malformed(void) {
    const char *f[40];
    char st[40][32], line[4096];
    base_fields(f, st);
    /* field counts */
    join(line, f, 39, "\n");
    expect_bad(line, -1, "wrong field count: 39 fields, expected 40");
    f[39] = "1\tabc"; /* 41 fields */
    join(line, f, 40, "\n");
    expect_bad(line, -1, "41 fields");
    f[39] = st[39];
    expect_bad("", -1, "1 fields");
    expect_bad("\n", -1, "1 fields");
    /* a bad value on a line with the wrong count is reported as the count */
    f[0] = "x";
    join(line, f, 39, "\n");
    expect_bad(line, -1, "wrong field count");
    /* label */
    const char *labels[] = {"2", "", "01", "1.0", "-1", " 1"};
    for (int i = 0; i < 6; i++) {
        f[0] = labels[i];
        join(line, f, 40, "\n");
        expect_bad(line, 0, "field 0 (label): label must be 0 or 1");
    }
    f[0] = "1";
    /* dense */
    const char *ints[] = {"1a", "-", "+", "1.5", "0x10", " 3", "3 "};
    for (int i = 0; i < 7; i++) {
        f[3] = ints[i];
        join(line, f, 40, "\n");
        expect_bad(line, 3, "field 3 (I3): invalid integer");
    }
    f[3] = "12345678901234567890";
    join(line, f, 40, "\n");
    expect_bad(line, 3, "field 3 (I3): integer out of range '12345678901234567890'");
    f[3] = "999999999999999999"; /* 18 digits is fine */
    size_t len = join(line, f, 40, "\n");
    float label, dense[ND];
    uint64_t ids[NS], miss;
    int bad;
    CHECK_OK(parse(line, len, &label, dense, ids, &miss, &bad));
    f[3] = st[3];
    /* categorical */
    f[15] = "12zz";
    join(line, f, 40, "\n");
    expect_bad(line, 15, "field 15 (C2): invalid hex '12zz'");
    f[15] = st[15];
    f[39] = "12345678901234567"; /* 17 digits */
    join(line, f, 40, "\n");
    expect_bad(line, 39, "field 39 (C26): hex id longer than 16 digits");
    f[39] = "-1";
    join(line, f, 40, "\n");
    expect_bad(line, 39, "field 39 (C26): invalid hex '-1'");
    f[39] = "ab\r";          /* a '\r' inside the line, not at the end */
    len = join(line, f, 40, "\r\n");
    line[len - 2] = 'x';     /* ...\rx\n */
    expect_bad(line, 39, "invalid hex");
}

static void test_other_shapes(void) {
    float label, dense[2];
    uint64_t ids[3], miss;
    int bad;
    const char *l = "1\t5\t\ta\t\tff";
    CHECK_OK(em_criteo_parse_line(l, strlen(l), 2, 3, &label, dense, ids, &miss, &bad));
    CHECK(miss == 2 && ids[0] == 10 && ids[2] == 255 && dense[1] == 0.f);
    CHECK(em_criteo_parse_line(l, strlen(l), 2, 65, &label, dense, ids, &miss, &bad) == EM_ERR_INVALID);
    l = "0";
    CHECK_OK(em_criteo_parse_line(l, 1, 0, 0, &label, dense, ids, &miss, &bad));
    CHECK(label == 0.f);
}

TEST_MAIN({"good_line", test_good_line}, {"missing_negative_hex_case", test_missing_negative_hex_case},
          {"malformed", test_malformed}, {"other_shapes", test_other_shapes})
