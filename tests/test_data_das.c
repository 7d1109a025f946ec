/*
 * test_data_das.c - the teacher-prediction store and the join (ember/das.h): round
 * trips across flushes and reopen-for-append, torn tails, corrupted records, duplicates
 * (last wins), missing ids, vertical filtering, order/thread-count independence of the
 * join, concurrent appends, directories of segments, and allocation failures.
 */
#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ember/das.h"
#include "test.h"

static char g_dir[256];

static const char *tmp_path(const char *name, char *buf, size_t cap) {
    if (!g_dir[0]) {
        snprintf(g_dir, sizeof g_dir, "/tmp/ember_das_XXXXXX");
        if (!mkdtemp(g_dir)) abort();
    }
    snprintf(buf, cap, "%s/%s", g_dir, name);
    return buf;
}

static em_das_rec mkrec(uint64_t id, uint32_t vertical, uint32_t version) {
    em_das_rec r = {id, vertical, (float)((double)(id % 1000) / 100.0 - 5.0 + version), version};
    return r;
}

/* n records with ids id0.. written in one writer session, in `chunk`-sized appends. */
static void write_log(const char *path, uint64_t id0, size_t n, size_t chunk, uint32_t version) {
    em_das_writer *w;
    CHECK_OK(em_das_writer_open(&w, path));
    em_das_rec *r = malloc(chunk * sizeof *r);
    for (size_t i = 0; i < n; i += chunk) {
        size_t k = n - i < chunk ? n - i : chunk;
        for (size_t j = 0; j < k; j++) r[j] = mkrec(id0 + i + j, (uint32_t)((id0 + i + j) % 3), version);
        CHECK_OK(em_das_append(w, r, k));
    }
    free(r);
    CHECK_OK(em_das_writer_close(w));
}

static off_t file_size(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 ? sb.st_size : -1;
}

static void test_round_trip(void) {
    char p[300];
    tmp_path("rt.das", p, sizeof p);
    unlink(p);
    em_das_writer *w;
    CHECK_OK(em_das_writer_open(&w, p));
    em_das_rec r[1000];
    for (int c = 0; c < 10; c++) { /* 10000 records, a flush after every other chunk */
        for (int j = 0; j < 1000; j++) r[j] = mkrec((uint64_t)(c * 1000 + j) * 7919u, (uint32_t)j % 3, 1);
        CHECK_OK(em_das_append(w, r, 1000));
        if (c % 2) CHECK_OK(em_das_flush(w));
    }
    uint64_t nrec, dropped;
    em_das_writer_info(w, &nrec, &dropped);
    CHECK(nrec == 10000 && dropped == 0);
    CHECK_OK(em_das_writer_close(w));
    CHECK(file_size(p) == 32 + 24 * 10000);

    /* reopen for append */
    CHECK_OK(em_das_writer_open(&w, p));
    em_das_writer_info(w, &nrec, &dropped);
    CHECK(nrec == 10000 && dropped == 0);
    for (int j = 0; j < 1000; j++) r[j] = mkrec((uint64_t)(10000 + j) * 7919u, (uint32_t)j % 3, 2);
    CHECK_OK(em_das_append(w, r, 1000));
    CHECK_OK(em_das_writer_close(w));

    em_das_index *ix;
    const char *paths[] = {p};
    CHECK_OK(em_das_index_open(&ix, paths, 1, EM_DAS_STRICT));
    em_das_stats st;
    em_das_index_stats(ix, &st);
    CHECK(st.files == 1 && st.records == 11000 && st.entries == 11000 && st.duplicates == 0);
    CHECK(st.corrupt == 0 && st.torn == 0 && st.torn_bytes == 0);
    int bad = 0;
    for (uint64_t i = 0; i < 11000; i++) {
        em_das_rec got, want = mkrec(i * 7919u, (uint32_t)(i % 1000) % 3, i < 10000 ? 1 : 2);
        if (!em_das_lookup(ix, i * 7919u, &got) || got.id != want.id || got.vertical != want.vertical ||
            got.version != want.version || memcmp(&got.logit, &want.logit, 4) != 0)
            bad++;
    }
    CHECK(bad == 0);
    CHECK(!em_das_lookup(ix, 1, NULL) && !em_das_lookup(ix, 11000ull * 7919u, NULL));
    em_das_index_free(ix);
    unlink(p);
}

static void test_torn_tail(void) {
    char p[300];
    tmp_path("torn.das", p, sizeof p);
    unlink(p);
    write_log(p, 0, 100, 33, 1);
    off_t full = file_size(p);
    CHECK(full == 32 + 2400);
    CHECK(truncate(p, full - 10) == 0); /* record 99 torn mid-way */
    em_das_index *ix;
    const char *paths[] = {p};
    CHECK_OK(em_das_index_open(&ix, paths, 1, EM_DAS_STRICT));
    em_das_stats st;
    em_das_index_stats(ix, &st);
    CHECK(st.records == 99 && st.entries == 99 && st.torn == 1 && st.torn_bytes == 14 && st.corrupt == 0);
    CHECK(em_das_lookup(ix, 98, NULL) && !em_das_lookup(ix, 99, NULL));
    em_das_index_free(ix);

    /* A crash that grew the file but left the last record's bytes unwritten (zeros). */
    CHECK(truncate(p, full) == 0);
    CHECK_OK(em_das_index_open(&ix, paths, 1, EM_DAS_STRICT));
    em_das_index_stats(ix, &st);
    CHECK(st.records == 99 && st.torn == 1 && st.torn_bytes == 24 && st.corrupt == 0);
    em_das_index_free(ix);

    /* The writer cuts the torn tail before appending, so new records stay aligned. */
    CHECK(truncate(p, full - 10) == 0);
    em_das_writer *w;
    CHECK_OK(em_das_writer_open(&w, p));
    uint64_t nrec, dropped;
    em_das_writer_info(w, &nrec, &dropped);
    CHECK(nrec == 99 && dropped == 14);
    em_das_rec r = mkrec(99, 0, 1);
    CHECK_OK(em_das_append(w, &r, 1));
    CHECK_OK(em_das_writer_close(w));
    CHECK(file_size(p) == full);
    CHECK_OK(em_das_index_open(&ix, paths, 1, EM_DAS_STRICT));
    em_das_index_stats(ix, &st);
    CHECK(st.records == 100 && st.torn == 0);
    em_das_index_free(ix);

    /* A header torn by a crash right after creation: no records, tolerated and reset. */
    CHECK(truncate(p, 5) == 0);
    CHECK_OK(em_das_index_open(&ix, paths, 1, EM_DAS_STRICT));
    em_das_index_stats(ix, &st);
    CHECK(st.files == 1 && st.records == 0 && st.torn == 1 && st.torn_bytes == 5);
    em_das_index_free(ix);
    CHECK_OK(em_das_writer_open(&w, p));
    em_das_writer_info(w, &nrec, &dropped);
    CHECK(nrec == 0 && dropped == 5);
    CHECK_OK(em_das_writer_close(w));
    CHECK(file_size(p) == 32);
    unlink(p);
}

static void flip_byte(const char *path, off_t off) {
    int fd = open(path, O_RDWR);
    unsigned char b;
    CHECK(pread(fd, &b, 1, off) == 1);
    b ^= 0x10;
    CHECK(pwrite(fd, &b, 1, off) == 1);
    close(fd);
}

static void test_corrupt(void) {
    char p[300];
    tmp_path("corrupt.das", p, sizeof p);
    unlink(p);
    write_log(p, 0, 100, 100, 1);
    flip_byte(p, 32 + 50 * 24 + 13); /* record 50's logit */
    em_das_index *ix = NULL;
    const char *paths[] = {p};
    CHECK_OK(em_das_index_open(&ix, paths, 1, 0));
    em_das_stats st;
    em_das_index_stats(ix, &st);
    CHECK(st.records == 99 && st.corrupt == 1 && st.torn == 0);
    CHECK(!em_das_lookup(ix, 50, NULL) && em_das_lookup(ix, 51, NULL) && em_das_lookup(ix, 99, NULL));
    em_das_index_free(ix);
    ix = (em_das_index *)1;
    CHECK(em_das_index_open(&ix, paths, 1, EM_DAS_STRICT) == EM_ERR_CORRUPT && ix == NULL);
    CHECK(strstr(em_last_error(), "record 50") != NULL);

    /* A damaged header is refused, by readers and by the writer. */
    flip_byte(p, 32 + 50 * 24 + 13);
    flip_byte(p, 9);
    CHECK(em_das_index_open(&ix, paths, 1, 0) == EM_ERR_CORRUPT);
    em_das_writer *w = NULL;
    CHECK(em_das_writer_open(&w, p) == EM_ERR_CORRUPT && w == NULL);
    /* Not a log at all. */
    FILE *f = fopen(p, "w");
    fputs("label\tI1\tI2\n0\t1\t2\n1\t3\t4\n", f);
    fclose(f);
    CHECK(em_das_index_open(&ix, paths, 1, 0) == EM_ERR_CORRUPT);
    CHECK(em_das_writer_open(&w, p) == EM_ERR_CORRUPT);
    const char *missing[] = {"/nonexistent/teacher.das"};
    CHECK(em_das_index_open(&ix, missing, 1, 0) == EM_ERR_IO);
    unlink(p);
}

static void test_duplicates(void) {
    char a[300], b[300];
    tmp_path("dup_a.das", a, sizeof a);
    tmp_path("dup_b.das", b, sizeof b);
    unlink(a), unlink(b);
    write_log(a, 0, 50, 7, 1);  /* ids 0..49, version 1 */
    write_log(a, 40, 20, 7, 2); /* ids 40..59, version 2: 10 duplicates in the same file */
    write_log(b, 55, 10, 7, 3); /* ids 55..64, version 3: 5 duplicates across files */
    em_das_index *ix;
    const char *ab[] = {a, b};
    CHECK_OK(em_das_index_open(&ix, ab, 2, EM_DAS_STRICT));
    em_das_stats st;
    em_das_index_stats(ix, &st);
    CHECK(st.files == 2 && st.records == 80 && st.entries == 65 && st.duplicates == 15);
    em_das_rec r;
    CHECK(em_das_lookup(ix, 39, &r) && r.version == 1);
    CHECK(em_das_lookup(ix, 45, &r) && r.version == 2);
    CHECK(em_das_lookup(ix, 57, &r) && r.version == 3 && r.logit == mkrec(57, 0, 3).logit);
    em_das_index_free(ix);
    /* File order decides: b then a makes a's records the later ones. */
    const char *ba[] = {b, a};
    CHECK_OK(em_das_index_open(&ix, ba, 2, EM_DAS_STRICT));
    CHECK(em_das_lookup(ix, 57, &r) && r.version == 2);
    CHECK(em_das_lookup(ix, 62, &r) && r.version == 3);
    /* In-memory puts replace too. */
    em_das_rec up = mkrec(62, 1, 9);
    CHECK_OK(em_das_index_put(ix, &up));
    CHECK(em_das_lookup(ix, 62, &r) && r.version == 9 && r.vertical == 1);
    em_das_index_stats(ix, &st);
    CHECK(st.entries == 65 && st.duplicates == 16);
    em_das_index_free(ix);
    unlink(a), unlink(b);
}

static void test_directory(void) {
    char d[300], p[400];
    tmp_path("segs", d, sizeof d);
    mkdir(d, 0755);
    snprintf(p, sizeof p, "%s/0002.das", d), write_log(p, 100, 100, 64, 2);
    snprintf(p, sizeof p, "%s/0001.das", d), write_log(p, 0, 150, 64, 1);
    snprintf(p, sizeof p, "%s/notes.txt", d);
    FILE *f = fopen(p, "w");
    fputs("not a segment\n", f);
    fclose(f);
    em_das_index *ix;
    const char *paths[] = {d};
    CHECK_OK(em_das_index_open(&ix, paths, 1, EM_DAS_STRICT));
    em_das_stats st;
    em_das_index_stats(ix, &st);
    CHECK(st.files == 2 && st.records == 250 && st.entries == 200 && st.duplicates == 50);
    em_das_rec r;
    CHECK(em_das_lookup(ix, 120, &r) && r.version == 2); /* 0002 is read after 0001 */
    CHECK(em_das_lookup(ix, 20, &r) && r.version == 1);
    em_das_index_free(ix);
    unlink(p);
    snprintf(p, sizeof p, "%s/0001.das", d), unlink(p);
    snprintf(p, sizeof p, "%s/0002.das", d), unlink(p);
    rmdir(d);
}

/* Index holding ids 0, 2, 4, ... < 2n (odd ids missing), vertical = id % 3. */
static em_das_index *even_index(size_t n) {
    em_das_index *ix;
    CHECK_OK(em_das_index_create(&ix, n));
    for (uint64_t i = 0; i < n; i++) {
        em_das_rec r = mkrec(2 * i, (uint32_t)((2 * i) % 3), 4);
        CHECK_OK(em_das_index_put(ix, &r));
    }
    return ix;
}

static void test_join_missing_and_vertical(void) {
    em_das_index *ix = even_index(1000);
    enum { N = 600 };
    uint64_t ids[N];
    uint32_t vert[N], ver[N];
    float logit[N], mask[N];
    uint8_t keep[N];
    for (int i = 0; i < N; i++) ids[i] = (uint64_t)i * 3, vert[i] = (uint32_t)((i * 3) % 3 == 0 ? i % 3 : 0);
    /* No filter: even ids present, odd ids missing (mask 0, logit 0). */
    em_das_join_stats js;
    CHECK_OK(em_das_join(ix, ids, NULL, N, -1, logit, mask, ver, keep, &js, NULL));
    int bad = 0;
    for (int i = 0; i < N; i++) {
        int has = ids[i] % 2 == 0;
        em_das_rec r = mkrec(ids[i], 0, 4);
        if (keep[i] != 1 || mask[i] != (has ? 1.0f : 0.0f) || logit[i] != (has ? r.logit : 0.0f) ||
            ver[i] != (has ? 4u : 0u))
            bad++;
    }
    CHECK(bad == 0);
    CHECK(js.present == N / 2 && js.missing == N / 2 && js.other_vertical == 0);

    /* Filter by the stream's verticals: other verticals are dropped without a lookup. */
    for (int i = 0; i < N; i++) vert[i] = (uint32_t)(i % 3);
    CHECK_OK(em_das_join(ix, ids, vert, N, 1, logit, mask, NULL, keep, &js, NULL));
    uint64_t pres = 0, miss = 0, oth = 0;
    bad = 0;
    for (int i = 0; i < N; i++) {
        int k = i % 3 == 1, has = k && ids[i] % 2 == 0;
        pres += has, miss += k && !has, oth += !k;
        if (keep[i] != k || mask[i] != (float)has || (!has && logit[i] != 0.0f)) bad++;
    }
    CHECK(bad == 0 && js.present == pres && js.missing == miss && js.other_vertical == oth);

    /* Filter by the teacher's verticals (the stream has none): ids 3i have vertical
     * 3i % 3 = 0 in the index, so vertical 0 keeps all present ones; missing are kept. */
    CHECK_OK(em_das_join(ix, ids, NULL, N, 0, logit, mask, NULL, keep, &js, NULL));
    CHECK(js.present == N / 2 && js.missing == N / 2 && js.other_vertical == 0);
    CHECK_OK(em_das_join(ix, ids, NULL, N, 2, logit, mask, NULL, keep, &js, NULL));
    CHECK(js.present == 0 && js.missing == N / 2 && js.other_vertical == N / 2);
    bad = 0;
    for (int i = 0; i < N; i++)
        if (mask[i] != 0.0f || logit[i] != 0.0f || keep[i] != (ids[i] % 2 == 1)) bad++;
    CHECK(bad == 0);
    CHECK(em_das_join(ix, ids, NULL, N, 1ll << 40, logit, mask, NULL, NULL, NULL, NULL) == EM_ERR_INVALID);
    CHECK(em_das_join(ix, NULL, NULL, N, -1, logit, mask, NULL, NULL, NULL, NULL) == EM_ERR_INVALID);
    CHECK_OK(em_das_join(ix, NULL, NULL, 0, -1, NULL, NULL, NULL, NULL, NULL, NULL));
    em_das_index_free(ix);

    /* An empty index: everything missing. */
    CHECK_OK(em_das_index_create(&ix, 0));
    CHECK_OK(em_das_join(ix, ids, NULL, N, -1, logit, mask, NULL, keep, &js, NULL));
    CHECK(js.present == 0 && js.missing == N);
    em_das_index_free(ix);
}

/* The join of a permuted batch is the permuted join, bitwise, for 1..3 threads. */
static void test_join_order_and_threads(void) {
    const size_t n = 50000; /* above the parallel threshold */
    em_das_index *ix = even_index(40000);
    uint64_t *ids = malloc(n * 8), *pids = malloc(n * 8);
    size_t *perm = malloc(n * sizeof *perm);
    float *l0 = malloc(n * 4), *m0 = malloc(n * 4), *l1 = malloc(n * 4), *m1 = malloc(n * 4);
    em_rng rng;
    em_rng_seed(&rng, 5);
    for (size_t i = 0; i < n; i++) ids[i] = em_rng_below(&rng, 100000), perm[i] = i;
    for (size_t i = n - 1; i > 0; i--) {
        size_t j = (size_t)em_rng_below(&rng, i + 1), t = perm[i];
        perm[i] = perm[j], perm[j] = t;
    }
    for (size_t i = 0; i < n; i++) pids[i] = ids[perm[i]];
    em_das_join_stats s0, s1;
    CHECK_OK(em_das_join(ix, ids, NULL, n, -1, l0, m0, NULL, NULL, &s0, NULL));
    for (int nth = 1; nth <= 3; nth++) {
        em_pool *pool;
        CHECK_OK(em_pool_create(&pool, nth));
        CHECK_OK(em_das_join(ix, pids, NULL, n, -1, l1, m1, NULL, NULL, &s1, pool));
        int bad = 0;
        for (size_t i = 0; i < n; i++)
            if (memcmp(&l1[i], &l0[perm[i]], 4) || memcmp(&m1[i], &m0[perm[i]], 4)) bad++;
        CHECK(bad == 0);
        CHECK(s1.present == s0.present && s1.missing == s0.missing && s0.present + s0.missing == n);
        em_pool_free(pool);
    }
    free(ids), free(pids), free(perm), free(l0), free(m0), free(l1), free(m1);
    em_das_index_free(ix);
}

typedef struct {
    em_das_writer *w;
    int t;
} app_arg;

enum { PER_THREAD = 30000 };

static void *appender(void *p) {
    app_arg *a = p;
    em_das_rec r[97];
    for (int i = 0; i < PER_THREAD;) {
        int k = 1 + (i * 31 + a->t) % 97;
        if (k > PER_THREAD - i) k = PER_THREAD - i;
        for (int j = 0; j < k; j++) r[j] = mkrec((uint64_t)a->t * 1000000u + (uint64_t)(i + j), (uint32_t)a->t, 1);
        if (em_das_append(a->w, r, (size_t)k) != EM_OK) return p;
        if (i % 5000 < 97 && em_das_flush(a->w) != EM_OK) return p;
        i += k;
    }
    return NULL;
}

static void test_concurrent_appends(void) {
    char p[300];
    tmp_path("conc.das", p, sizeof p);
    unlink(p);
    em_das_writer *w;
    CHECK_OK(em_das_writer_open(&w, p));
    pthread_t th[3];
    app_arg args[3];
    for (int t = 0; t < 3; t++) args[t] = (app_arg){w, t}, pthread_create(&th[t], NULL, appender, &args[t]);
    for (int t = 0; t < 3; t++) {
        void *ret;
        pthread_join(th[t], &ret);
        CHECK(ret == NULL);
    }
    CHECK_OK(em_das_writer_close(w));
    CHECK(file_size(p) == 32 + 24 * 3 * PER_THREAD);
    em_das_index *ix;
    const char *paths[] = {p};
    CHECK_OK(em_das_index_open(&ix, paths, 1, EM_DAS_STRICT));
    em_das_stats st;
    em_das_index_stats(ix, &st);
    CHECK(st.records == 3 * PER_THREAD && st.entries == 3 * PER_THREAD && st.duplicates == 0 && st.corrupt == 0);
    int bad = 0;
    for (int t = 0; t < 3; t++)
        for (int i = 0; i < PER_THREAD; i++) {
            em_das_rec r;
            if (!em_das_lookup(ix, (uint64_t)t * 1000000u + (uint64_t)i, &r) || r.vertical != (uint32_t)t) bad++;
        }
    CHECK(bad == 0);
    em_das_index_free(ix);
    unlink(p);
}

static void test_batch_ids(void) {
    em_batch b = {0};
    b.B = 4, b.first_pos = 10, b.end_pos = 14;
    uint64_t ids[4];
    CHECK_OK(em_das_batch_ids(&b, 3, ids));
    for (int i = 0; i < 4; i++) CHECK(ids[i] == ((3ull << 48) | (uint64_t)(10 + i)));
    CHECK(em_das_example_id(0, 5) == 5);
    b.end_pos = 15; /* a malformed line was skipped inside the batch */
    CHECK(em_das_batch_ids(&b, 3, ids) == EM_ERR_INVALID);
    b.end_pos = 14;
    CHECK(em_das_batch_ids(&b, 70000, ids) == EM_ERR_INVALID);
}

static void test_alloc_failure(void) {
    char p[300], d[300], q[400];
    tmp_path("nomem.das", p, sizeof p);
    tmp_path("nomem_dir", d, sizeof d);
    unlink(p);
    write_log(p, 0, 3000, 500, 1);
    mkdir(d, 0755);
    snprintf(q, sizeof q, "%s/a.das", d), write_log(q, 0, 10, 10, 1);
    snprintf(q, sizeof q, "%s/b.das", d), write_log(q, 5, 10, 10, 1);
    int nomem = 0, ok = 0;
    for (long k = 0; k < 20; k++) {
        size_t base = em_mem_in_use();
        em_das_index *ix = NULL;
        const char *paths[] = {p, d};
        em_mem_fail_after(k);
        em_status st = em_das_index_open(&ix, paths, 2, 0);
        em_mem_fail_after(-1);
        if (st == EM_OK) {
            em_das_stats s;
            em_das_index_stats(ix, &s);
            CHECK(s.entries == 3000 && s.records == 3020);
            em_das_index_free(ix);
            ok++;
        } else {
            CHECK(st == EM_ERR_NOMEM && ix == NULL);
            nomem++;
        }
        CHECK(em_mem_in_use() == base);

        em_das_writer *w = NULL;
        em_mem_fail_after(k);
        st = em_das_writer_open(&w, p);
        em_mem_fail_after(-1);
        if (st == EM_OK) CHECK_OK(em_das_writer_close(w));
        else CHECK(st == EM_ERR_NOMEM && w == NULL);
        CHECK(em_mem_in_use() == base);

        /* Growing the index by puts. */
        CHECK_OK(em_das_index_create(&ix, 0));
        st = EM_OK;
        em_mem_fail_after(k);
        for (uint64_t i = 0; i < 200 && st == EM_OK; i++) {
            em_das_rec r = mkrec(i, 0, 1);
            st = em_das_index_put(ix, &r);
        }
        em_mem_fail_after(-1);
        CHECK(st == EM_OK || st == EM_ERR_NOMEM);
        em_das_index_free(ix);
        CHECK(em_mem_in_use() == base);
    }
    CHECK(nomem > 0 && ok > 0);
    unlink(p);
    snprintf(q, sizeof q, "%s/a.das", d), unlink(q);
    snprintf(q, sizeof q, "%s/b.das", d), unlink(q);
    rmdir(d);
}

/* Follow a log while it grows byte by byte in odd chunks, as a reader racing a writer
 * would see it: every record arrives exactly once, nothing is counted as corrupt. */
static void test_follow_growing(void) {
    char src[300], dst[300];
    tmp_path("follow_src.das", src, sizeof src);
    tmp_path("follow_dst.das", dst, sizeof dst);
    unlink(src), unlink(dst);
    write_log(src, 1000, 500, 50, 1);
    FILE *f = fopen(src, "rb");
    unsigned char *bytes = malloc(32 + 24 * 500);
    size_t total = fread(bytes, 1, 32 + 24 * 500, f);
    fclose(f);
    CHECK(total == 32 + 24 * 500);
    int fd = open(dst, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    em_das_index *ix;
    CHECK_OK(em_das_index_create(&ix, 0));
    uint64_t off = 0, added, sum = 0;
    for (size_t at = 0; at < total;) {
        size_t k = 1 + (at * 7) % 61;
        if (k > total - at) k = total - at;
        CHECK(write(fd, bytes + at, k) == (ssize_t)k);
        at += k;
        CHECK_OK(em_das_index_follow(ix, dst, &off, EM_DAS_STRICT, &added));
        sum += added;
        CHECK(off <= at && (off == 0 || (off - 32) % 24 == 0));
    }
    close(fd);
    em_das_stats st;
    em_das_index_stats(ix, &st);
    CHECK(sum == 500 && off == total && st.records == 500 && st.entries == 500 && st.corrupt == 0);
    CHECK(st.files == 1);
    CHECK_OK(em_das_index_follow(ix, dst, &off, 0, &added));
    CHECK(added == 0);
    /* A not-yet-valid (zero-filled) last record is left for later, then read. */
    CHECK(truncate(dst, (off_t)total + 24) == 0);
    CHECK_OK(em_das_index_follow(ix, dst, &off, 0, &added));
    CHECK(added == 0 && off == total);
    em_das_writer *w;
    CHECK_OK(em_das_writer_open(&w, dst)); /* cuts the zeros */
    em_das_rec r = mkrec(7, 2, 5);
    CHECK_OK(em_das_append(w, &r, 1));
    CHECK_OK(em_das_writer_close(w));
    CHECK_OK(em_das_index_follow(ix, dst, &off, 0, &added));
    CHECK(added == 1 && off == total + 24 && em_das_lookup(ix, 7, &r) && r.version == 5);
    uint64_t bad_off = 33;
    CHECK(em_das_index_follow(ix, dst, &bad_off, 0, NULL) == EM_ERR_INVALID);
    CHECK(truncate(dst, 100) == 0);
    CHECK(em_das_index_follow(ix, dst, &off, 0, NULL) == EM_ERR_CORRUPT);
    em_das_index_free(ix);
    free(bytes);
    unlink(src), unlink(dst);
}

static void test_evict(void) {
    em_das_index *ix = even_index(5000); /* ids 0, 2, ..., 9998 */
    uint64_t removed;
    CHECK_OK(em_das_index_evict(ix, 0, 5000, &removed));
    CHECK(removed == 2500);
    em_das_stats st;
    em_das_index_stats(ix, &st);
    CHECK(st.entries == 2500 && st.evicted == 2500);
    int bad = 0;
    for (uint64_t i = 0; i < 10000; i += 2) bad += em_das_lookup(ix, i, NULL) != (i >= 5000);
    CHECK(bad == 0);
    CHECK_OK(em_das_index_evict(ix, 0, 5000, &removed));
    CHECK(removed == 0);
    em_mem_fail_after(0);
    CHECK(em_das_index_evict(ix, 9000, 20000, &removed) == EM_ERR_NOMEM);
    em_mem_fail_after(-1);
    em_das_index_stats(ix, &st);
    CHECK(st.entries == 2500 && em_das_lookup(ix, 9998, NULL)); /* unchanged on failure */
    /* Joins and puts keep working on the shrunk table. */
    em_das_rec r = mkrec(1, 0, 1);
    CHECK_OK(em_das_index_put(ix, &r));
    uint64_t ids[3] = {1, 4000, 6000};
    float l[3], m[3];
    CHECK_OK(em_das_join(ix, ids, NULL, 3, -1, l, m, NULL, NULL, NULL, NULL));
    CHECK(m[0] == 1.0f && m[1] == 0.0f && m[2] == 1.0f);
    em_das_index_free(ix);
}

static void test_cleanup(void) {
    if (g_dir[0]) rmdir(g_dir);
}

TEST_MAIN({"round_trip", test_round_trip}, {"torn_tail", test_torn_tail}, {"corrupt", test_corrupt},
          {"duplicates", test_duplicates}, {"directory", test_directory},
          {"join_missing_and_vertical", test_join_missing_and_vertical},
          {"join_order_and_threads", test_join_order_and_threads},
          {"concurrent_appends", test_concurrent_appends}, {"batch_ids", test_batch_ids},
          {"follow_growing", test_follow_growing}, {"evict", test_evict},
          {"alloc_failure", test_alloc_failure}, {"cleanup", test_cleanup})
