/*
 * test_nn_attn_padded.c - padded dense attention (ember/attn_padded.h).
 *
 *   - against Jagged Flash Attention (ember/jattn.h, itself tested against a float64
 *     reference and PyTorch goldens): O and dQ/dK/dV after unpadding, lengths
 *     5, 0, 200, 1, 65, 64, 257 in one batch padded to Lmax = 257 and to 300 (extra
 *     padding), H = 2, dh = 8 and 32, causal and not, explicit scale and default;
 *     forward within 1e-5 and gradients within 1e-4 (relative to the largest value);
 *     gradients start non-zero, so accumulation is checked;
 *   - padding: O rows of padding are 0, P rows of padding are 0, padded gradient rows
 *     keep their initial values (nothing added), pad/unpad round trip is exact;
 *   - bitwise equality for pools of 1, 2, 3 threads and a NULL pool;
 *   - bad input (Lmax below the longest sample, bad offsets) -> EM_ERR_INVALID;
 *     backward scratch allocation failure -> EM_ERR_NOMEM with nothing leaked.
 */
#include "test.h"
#include "ember/attn_padded.h"
#include "ember/jattn.h"

static const int LENS[] = {5, 0, 200, 1, 65, 64, 257};
#define NB ((int)(sizeof LENS / sizeof LENS[0]))

static void fill(float *x, size_t n, em_rng *r) {
    for (size_t i = 0; i < n; i++) x[i] = (float)em_rng_normal(r);
}
static float g0(size_t i) { return (float)((int)(i % 7) - 3) * 0.25f; }

typedef struct {
    int H, dh, Lmax;
    int64_t off[NB + 1];
    em_jattn_cfg cfg;
    size_t nj, np, nP; /* jagged, padded and P element counts */
    float *Q, *K, *V, *dO;                        /* jagged inputs */
    float *O, *lse, *dQ, *dK, *dV;                /* jagged flash outputs */
    float *pQ, *pK, *pV, *pdO, *pO, *P, *pdQ, *pdK, *pdV; /* padded */
} pcase;

static void pcase_init(pcase *c, int H, int dh, int Lmax, int causal, float scale, uint64_t seed) {
    memset(c, 0, sizeof *c);
    c->H = H, c->dh = dh, c->Lmax = Lmax;
    for (int b = 0; b < NB; b++) c->off[b + 1] = c->off[b] + LENS[b];
    c->cfg = (em_jattn_cfg){.B = NB, .H = H, .dh = dh, .offsets = c->off, .scale = scale, .causal = causal};
    c->nj = (size_t)c->off[NB] * H * dh;
    c->np = (size_t)NB * H * Lmax * dh;
    c->nP = (size_t)NB * H * Lmax * Lmax;
    float **jag[] = {&c->Q, &c->K, &c->V, &c->dO, &c->O, &c->dQ, &c->dK, &c->dV};
    for (size_t k = 0; k < sizeof jag / sizeof jag[0]; k++) *jag[k] = malloc(sizeof(float) * c->nj);
    float **pad[] = {&c->pQ, &c->pK, &c->pV, &c->pdO, &c->pO, &c->pdQ, &c->pdK, &c->pdV};
    for (size_t k = 0; k < sizeof pad / sizeof pad[0]; k++) *pad[k] = malloc(sizeof(float) * c->np);
    c->lse = malloc(sizeof(float) * (size_t)c->off[NB] * H + 4);
    c->P = malloc(sizeof(float) * c->nP);
    em_rng r;
    em_rng_seed(&r, seed);
    fill(c->Q, c->nj, &r), fill(c->K, c->nj, &r), fill(c->V, c->nj, &r), fill(c->dO, c->nj, &r);
    for (size_t i = 0; i < c->nj; i++) c->dQ[i] = g0(i), c->dK[i] = g0(i + 1), c->dV[i] = g0(i + 2);
    CHECK_OK(em_attn_pad(c->pQ, c->Q, &c->cfg, Lmax, NULL));
    CHECK_OK(em_attn_pad(c->pK, c->K, &c->cfg, Lmax, NULL));
    CHECK_OK(em_attn_pad(c->pV, c->V, &c->cfg, Lmax, NULL));
    CHECK_OK(em_attn_pad(c->pdO, c->dO, &c->cfg, Lmax, NULL));
    /* padded gradients start from the same values on real rows, 7 on padding rows */
    for (size_t i = 0; i < c->np; i++) c->pdQ[i] = c->pdK[i] = c->pdV[i] = 7.f;
    CHECK_OK(em_attn_pad(c->pdQ, c->dQ, &c->cfg, Lmax, NULL));
    CHECK_OK(em_attn_pad(c->pdK, c->dK, &c->cfg, Lmax, NULL));
    CHECK_OK(em_attn_pad(c->pdV, c->dV, &c->cfg, Lmax, NULL));
    for (int b = 0; b < NB; b++) /* restore the 7s that em_attn_pad zeroed */
        for (int h = 0; h < H; h++)
            for (int i = LENS[b]; i < Lmax; i++)
                for (int d = 0; d < dh; d++) {
                    const size_t at = (((size_t)b * H + h) * Lmax + i) * dh + d;
                    c->pdQ[at] = c->pdK[at] = c->pdV[at] = 7.f;
                }
}

static void pcase_free(pcase *c) {
    float *all[] = {c->Q, c->K, c->V, c->dO, c->O, c->lse, c->dQ, c->dK, c->dV, c->pQ, c->pK,
                    c->pV, c->pdO, c->pO, c->P, c->pdQ, c->pdK, c->pdV};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) free(all[k]);
}

static em_status run_padded(pcase *c, em_pool *pool) {
    em_status st = em_attn_padded_forward(c->pO, c->P, c->pQ, c->pK, c->pV, &c->cfg, c->Lmax, pool);
    if (st) return st;
    return em_attn_padded_backward(c->pdQ, c->pdK, c->pdV, c->pdO, c->pQ, c->pK, c->pV, c->P, &c->cfg, c->Lmax, pool);
}

static void vs_jattn(int H, int dh, int Lmax, int causal, float scale) {
    pcase c;
    pcase_init(&c, H, dh, Lmax, causal, scale, 100 + dh + causal);
    CHECK_OK(em_jattn_forward(c.O, c.lse, c.Q, c.K, c.V, &c.cfg, NULL));
    CHECK_OK(em_jattn_backward(c.dQ, c.dK, c.dV, c.dO, c.Q, c.K, c.V, c.O, c.lse, &c.cfg, NULL));
    CHECK_OK(run_padded(&c, NULL));
    float *u = malloc(sizeof(float) * c.nj);
    CHECK_OK(em_attn_unpad(u, c.pO, &c.cfg, Lmax, NULL));
    CHECK_REL(u, c.O, c.nj, 1e-5);
    CHECK_OK(em_attn_unpad(u, c.pdQ, &c.cfg, Lmax, NULL));
    CHECK_REL(u, c.dQ, c.nj, 1e-4);
    CHECK_OK(em_attn_unpad(u, c.pdK, &c.cfg, Lmax, NULL));
    CHECK_REL(u, c.dK, c.nj, 1e-4);
    CHECK_OK(em_attn_unpad(u, c.pdV, &c.cfg, Lmax, NULL));
    CHECK_REL(u, c.dV, c.nj, 1e-4);
    /* padding: O and P rows 0, padded gradient rows untouched (still 7) */
    int bad_o = 0, bad_p = 0, bad_g = 0;
    for (int b = 0; b < NB; b++)
        for (int h = 0; h < H; h++)
            for (int i = LENS[b]; i < Lmax; i++) {
                const size_t u0 = ((size_t)b * H + h) * Lmax + i;
                for (int d = 0; d < dh; d++) {
                    const size_t at = u0 * dh + d;
                    bad_o += c.pO[at] != 0.f;
                    bad_g += c.pdQ[at] != 7.f || c.pdK[at] != 7.f || c.pdV[at] != 7.f;
                }
                for (int j = 0; j < Lmax; j++) bad_p += c.P[u0 * Lmax + j] != 0.f;
            }
    CHECK(bad_o == 0);
    CHECK(bad_p == 0);
    CHECK(bad_g == 0);
    /* each real row of P sums to 1 over its visible keys and is 0 beyond them */
    double worst = 0;
    int bad_mask = 0;
    for (int b = 0; b < NB; b++)
        for (int i = 0; i < LENS[b]; i++) {
            const float *row = c.P + (((size_t)b * H) * Lmax + i) * Lmax;
            const int vis = causal ? i + 1 : LENS[b];
            double s = 0;
            for (int j = 0; j < Lmax; j++) {
                if (j < vis) s += row[j];
                else bad_mask += row[j] != 0.f;
            }
            worst = fabs(s - 1) > worst ? fabs(s - 1) : worst;
        }
    CHECK(worst < 1e-5);
    CHECK(bad_mask == 0);
    free(u);
    pcase_free(&c);
}

static void test_vs_jattn(void) {
    vs_jattn(2, 8, 257, 0, 0.f);
    vs_jattn(2, 8, 257, 1, 0.f);
    vs_jattn(2, 32, 300, 0, 0.f);
    vs_jattn(2, 32, 257, 1, 0.3f);
    vs_jattn(1, 32, 257, 0, 0.1f);
}

static void test_pad_roundtrip(void) {
    pcase c;
    pcase_init(&c, 2, 8, 260, 0, 0.f, 7);
    float *u = malloc(sizeof(float) * c.nj);
    CHECK_OK(em_attn_unpad(u, c.pQ, &c.cfg, 260, NULL));
    CHECK(!memcmp(u, c.Q, sizeof(float) * c.nj));
    int nz = 0; /* padding rows of pQ are exactly 0 */
    for (int b = 0; b < NB; b++)
        for (int h = 0; h < 2; h++)
            for (int i = LENS[b]; i < 260; i++)
                for (int d = 0; d < 8; d++) nz += c.pQ[(((size_t)b * 2 + h) * 260 + i) * 8 + d] != 0.f;
    CHECK(nz == 0);
    free(u);
    pcase_free(&c);
}

static void test_threads_bitwise(void) {
    for (int causal = 0; causal < 2; causal++) {
        pcase c[4];
        for (int k = 0; k < 4; k++) {
            pcase_init(&c[k], 2, 8, 257, causal, 0.f, 11);
            em_pool *pool = NULL;
            if (k > 0) CHECK_OK(em_pool_create(&pool, k));
            CHECK_OK(run_padded(&c[k], pool));
            em_pool_free(pool);
        }
        for (int k = 1; k < 4; k++) {
            CHECK(!memcmp(c[0].pO, c[k].pO, c[0].np * sizeof(float)));
            CHECK(!memcmp(c[0].P, c[k].P, c[0].nP * sizeof(float)));
            CHECK(!memcmp(c[0].pdQ, c[k].pdQ, c[0].np * sizeof(float)));
            CHECK(!memcmp(c[0].pdK, c[k].pdK, c[0].np * sizeof(float)));
            CHECK(!memcmp(c[0].pdV, c[k].pdV, c[0].np * sizeof(float)));
        }
        for (int k = 0; k < 4; k++) pcase_free(&c[k]);
    }
}

static void test_invalid_nomem(void) {
    pcase c;
    pcase_init(&c, 2, 8, 257, 0, 0.f, 3);
    CHECK(em_attn_padded_maxlen(&c.cfg) == 257);
    CHECK(em_attn_padded_forward(c.pO, c.P, c.pQ, c.pK, c.pV, &c.cfg, 256, NULL) == EM_ERR_INVALID);
    CHECK(strstr(em_last_error(), "Lmax") != NULL);
    CHECK(em_attn_pad(c.pQ, c.Q, &c.cfg, 100, NULL) == EM_ERR_INVALID);
    CHECK(em_attn_padded_backward(c.pdQ, c.pdK, c.pdV, c.pdO, c.pQ, c.pK, c.pV, c.P, &c.cfg, 0, NULL) ==
          EM_ERR_INVALID);
    int64_t bad[3] = {0, 2, 1};
    em_jattn_cfg bc = {.B = 2, .H = 1, .dh = 4, .offsets = bad};
    CHECK(em_attn_padded_forward(c.pO, c.P, c.pQ, c.pK, c.pV, &bc, 4, NULL) == EM_ERR_INVALID);
    const size_t before = em_mem_in_use();
    CHECK_OK(em_attn_padded_forward(c.pO, c.P, c.pQ, c.pK, c.pV, &c.cfg, 257, NULL));
    CHECK(em_mem_in_use() == before); /* forward allocates nothing */
    float *keep = malloc(sizeof(float) * c.np);
    memcpy(keep, c.pdV, sizeof(float) * c.np);
    em_mem_fail_after(0);
    em_status st = em_attn_padded_backward(c.pdQ, c.pdK, c.pdV, c.pdO, c.pQ, c.pK, c.pV, c.P, &c.cfg, 257, NULL);
    em_mem_fail_after(-1);
    CHECK(st == EM_ERR_NOMEM);
    CHECK(em_mem_in_use() == before);
    CHECK(!memcmp(keep, c.pdV, sizeof(float) * c.np)); /* a failed backward adds nothing */
    free(keep);
    pcase_free(&c);
}

TEST_MAIN({"vs_jattn", test_vs_jattn}, {"pad_roundtrip", test_pad_roundtrip},
          {"threads_bitwise", test_threads_bitwise}, {"invalid_nomem", test_invalid_nomem})
