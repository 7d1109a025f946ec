/* test_data_count.c - em_data_count on TSV (with and without a final newline, empty)
 * and on the binary format written by em_convert_tsv_to_bin. */
#include <unistd.h>

#include "test.h"

static const char *LINE =
    "1\t5\t\t3\t-1\t0\t7\t1\t2\t0\t\t1\t4\t2\t68fd1e64\t80e26c9b\tfb936136\t7b4723c4\t25c83c98\t7e0ccccf\t"
    "de7995b8\t1f89b562\ta73ee510\ta8cd5504\tb2cb9c98\t37c9c164\t2824a5f6\t1adce6ef\t8ba8b39a\t891b62e7\t"
    "e5ba7672\tf54016b9\t21ddcdc9\tb1252a9d\t07b5194c\t\t3a171ecb\tc5c50484\te8b83407\t9727dd16";

static void write_file(const char *path, int lines, int final_newline) {
    FILE *f = fopen(path, "w");
    for (int i = 0; i < lines; i++) fprintf(f, "%s%s", LINE, i + 1 < lines || final_newline ? "\n" : "");
    fclose(f);
}

static void test_count(void) {
    char dir[] = "/tmp/ember_count_XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char tsv[128], bin[128];
    snprintf(tsv, sizeof tsv, "%s/a.tsv", dir);
    snprintf(bin, sizeof bin, "%s/a.bin", dir);
    uint64_t n = 99;
    write_file(tsv, 7, 1);
    CHECK_OK(em_data_count(tsv, &n));
    CHECK(n == 7);
    write_file(tsv, 7, 0);
    CHECK_OK(em_data_count(tsv, &n));
    CHECK(n == 7);
    write_file(tsv, 0, 1);
    CHECK_OK(em_data_count(tsv, &n));
    CHECK(n == 0);
    write_file(tsv, 5, 1);
    em_reader_stats rs;
    CHECK_OK(em_convert_tsv_to_bin(tsv, bin, 13, 26, 1, &rs));
    CHECK_OK(em_data_count(bin, &n));
    CHECK(n == 5);
    CHECK(em_data_count("/nonexistent/x.tsv", &n) == EM_ERR_IO);
    CHECK(em_data_count("-", &n) == EM_ERR_UNSUPPORTED);
    unlink(tsv), unlink(bin), rmdir(dir);
}

TEST_MAIN({"count", test_count})
