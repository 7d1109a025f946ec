/*
 * test_model_student.c - ExFM's student heads (ember/student.h): the heads' losses
 * and gradients against PyTorch (tests/golden/exfm.safetensors from
 * tools/make_golden_exfm.py: distillation into the serving head, the auxiliary head
 * with its beta-scaled backbone gradient, the adapter's loss, gradient, update and new
 * output, the head with the adapter's target); the adapter's update order inside a
 * student step (its updated output is the target); the hook's gradients reaching the
 * DLRM (a soft label equal to the label doubles the label gradient: the student's step
 * equals a plain step at twice, or 1 + beta times, the learning rate); mode NONE is
 * the plain step bitwise; the state round trip and allocation failures.
 */
#include "ember/student.h"
#include "test.h"

static em_pool *pool;

/* ------------------------------------------------------------ golden */

static void test_golden(void) {
    char path[512];
    em_st *f = NULL;
    CHECK_OK(em_st_open(&f, em_test_path("golden/exfm.safetensors", path, sizeof path)));
    if (!f) return;
    const int64_t *dims = em_st_expect(f, "dims", EM_I64, 4);
    const float *hy = em_st_expect(f, "hyper", EM_F32, 5);
    CHECK(dims && hy);
    if (!dims || !hy) {
        em_st_close(f);
        return;
    }
    const int B = (int)dims[0], H = (int)dims[1], K = (int)dims[2];
#define G(name, n) ((const float *)em_st_expect(f, name, EM_F32, (n)))
    const float *h = G("h", B * H), *z = G("z", B), *tl = G("tl", B), *mask = G("mask", B), *y = G("y", B),
                *head = G("head", H + 1), *ad = G("adapter", 3 * K + 1);
    CHECK(h && z && tl && mask && y && head && ad);
    if (!h || !z || !tl || !mask || !y || !head || !ad) {
        em_st_close(f);
        return;
    }
    em_student_cfg c = em_student_default();
    c.alpha = hy[0], c.beta = hy[1], c.w = hy[2], c.w_adapter = hy[3];
    float dz[64], dh[64 * 16], dhead[17], zd[64];
    double loss;

    c.mode = EM_DISTILL_SERVING;
    em_student_heads_backward(&c, h, H, z, tl, mask, NULL, head, B, dz, NULL, NULL, NULL, &loss);
    CHECK_NEAR(loss, G("serving_loss", 1)[0], 1e-6);
    CHECK_REL(dz, G("serving_dz", B), (size_t)B, 1e-5);

    c.mode = EM_DISTILL_AUX;
    em_student_heads_backward(&c, h, H, z, tl, mask, NULL, head, B, dz, dh, dhead, zd, &loss);
    CHECK_NEAR(loss, G("aux_loss", 1)[0], 1e-6);
    CHECK_REL(dh, G("aux_dh", B * H), (size_t)(B * H), 1e-5);
    CHECK_REL(dhead, G("aux_dhead", H + 1), (size_t)(H + 1), 1e-5);
    CHECK_REL(zd, G("aux_zd", B), (size_t)B, 1e-5);
    for (int i = 0; i < B; i++) CHECK(dz[i] == 0.f); /* the serving head sees no teacher */

    float g[3 * 16 + 1], p[3 * 16 + 1], lg[64], a[64];
    double la = em_adapter_backward(ad, K, tl, y, mask, B, g);
    CHECK_NEAR(la, G("adapter_loss", 1)[0], 1e-6);
    CHECK_REL(g, G("adapter_grad", 3 * K + 1), (size_t)(3 * K + 1), 1e-5);
    for (int j = 0; j < 3 * K + 1; j++) p[j] = ad[j] - hy[4] * g[j];
    CHECK_REL(p, G("adapter_after", 3 * K + 1), (size_t)(3 * K + 1), 1e-5);
    em_adapter_forward(p, K, tl, B, lg);
    for (int i = 0; i < B; i++) a[i] = 1.f / (1.f + expf(-lg[i]));
    CHECK_REL(a, G("adapter_a", B), (size_t)B, 1e-5);

    c.mode = EM_DISTILL_AUX_ADAPTER;
    em_student_heads_backward(&c, h, H, z, tl, mask, G("adapter_a", B), head, B, NULL, dh, dhead, NULL, &loss);
    CHECK_NEAR(loss, G("both_loss", 1)[0], 1e-6);
    CHECK_REL(dh, G("both_dh", B * H), (size_t)(B * H), 1e-5);
    CHECK_REL(dhead, G("both_dhead", H + 1), (size_t)(H + 1), 1e-5);
#undef G
    em_st_close(f);
}

/* The identity start: sigmoid(A(x)) = sigmoid(x). */
static void test_adapter_identity(void) {
    float p[3 * 8 + 1], x[7] = {-5, -1.5f, -0.1f, 0, 0.3f, 2, 9}, out[7];
    em_adapter_init(p, 8);
    em_adapter_forward(p, 8, x, 7, out);
    for (int i = 0; i < 7; i++) CHECK_NEAR(out[i], x[i], 1e-6);
}

/* ------------------------------------------------------------ with a DLRM */

#define NB 24
#define ROWS 40

typedef struct {
    float label[NB], dense[NB * 13];
    int64_t idx[NB * 26], off[NB * 26 + 1];
    em_batch b;
} batch_buf;

static void make_batch(batch_buf *bb, uint64_t seed) {
    em_rng r;
    em_rng_seed(&r, seed);
    for (int i = 0; i < NB; i++) {
        bb->label[i] = em_rng_uniform(&r) < 0.3 ? 1.f : 0.f;
        for (int j = 0; j < 13; j++) bb->dense[i * 13 + j] = (float)em_rng_uniform(&r) * 2.f;
    }
    int k = 0;
    for (int t = 0; t < 26; t++)
        for (int i = 0; i < NB; i++) {
            bb->off[t * NB + i] = k;
            bb->idx[k++] = (int64_t)em_rng_below(&r, ROWS);
        }
    bb->off[26 * NB] = k;
    memset(&bb->b, 0, sizeof bb->b);
    bb->b.B = NB, bb->b.num_dense = 13, bb->b.num_sparse = 26;
    bb->b.label = bb->label, bb->b.dense = bb->dense, bb->b.indices = bb->idx, bb->b.offsets = bb->off;
}

static em_dlrm_cfg model_cfg(int hidden, float lr) {
    em_dlrm_cfg m = em_dlrm_kaggle(ROWS);
    for (int t = 0; t < 26; t++) m.rows[t] = ROWS;
    m.dim = 4;
    int bot[] = {13, 8, 4};
    m.n_bot = 3;
    memcpy(m.bot, bot, sizeof bot);
    int w = em_dot_interact_out_dim(26, 4);
    if (hidden) {
        int top[] = {w, hidden, 1};
        m.n_top = 3;
        memcpy(m.top, top, sizeof top);
    } else {
        int top[] = {w, 1};
        m.n_top = 2;
        memcpy(m.top, top, sizeof top);
    }
    m.dense_opt = em_optim_default(EM_OPT_SGD, lr);
    m.sparse_opt = em_optim_default(EM_OPT_SGD, lr);
    m.seed = 7;
    return m;
}

static const char *param_names[] = {"bot.0.weight", "bot.0.bias", "bot.1.weight", "bot.1.bias", "top.0.weight",
                                    "top.0.bias",   "emb.0.weight", "emb.5.weight", "emb.25.weight"};

static double param_err(em_dlrm *a, em_dlrm *b, const char *name) {
    size_t n = 0, n2 = 0;
    const float *x = em_dlrm_param(a, name, 0, &n), *y = em_dlrm_param(b, name, 0, &n2);
    if (!x || !y || n != n2) return 1e9;
    return rel_err_f(x, y, n, 1e-6);
}

/* Soft labels equal to the labels (teacher logits +-30): distillation into the serving
 * head doubles the label gradient, so one student step at lr is a plain step at 2 lr;
 * with the auxiliary head (a copy of the serving head at the start) the backbone gets
 * (1 + beta) times the gradient and the serving head 1 times. */
static void test_hook_gradients(void) {
    batch_buf bb;
    make_batch(&bb, 11);
    float tl[NB], mask[NB];
    for (int i = 0; i < NB; i++) tl[i] = bb.label[i] > 0 ? 30.f : -30.f, mask[i] = 1.f;
    const float lr = 0.05f;
    const float betas[] = {1.f, 0.5f};
    for (int mode = 0; mode < 3; mode++) {
        const float beta = mode == 2 ? betas[1] : betas[0];
        em_dlrm *s = NULL, *backbone = NULL, *serving = NULL;
        em_dlrm_cfg cs = model_cfg(6, lr);
        em_dlrm_cfg cb = model_cfg(6, mode == 0 ? 2 * lr : (1 + beta) * lr);
        em_dlrm_cfg cv = model_cfg(6, lr);
        CHECK_OK(em_dlrm_create(&s, &cs, pool));
        CHECK_OK(em_dlrm_create(&backbone, &cb, pool));
        CHECK_OK(em_dlrm_create(&serving, &cv, pool));
        em_student_cfg sc = em_student_default();
        sc.mode = mode == 0 ? EM_DISTILL_SERVING : EM_DISTILL_AUX;
        sc.beta = beta;
        em_student *st = NULL;
        CHECK_OK(em_student_create(&st, &sc, s));
        if (!st) return;
        int H;
        const float *head = em_student_head(st, &H);
        CHECK(H == 6 && memcmp(head, em_dlrm_param(s, "top.1.weight", 0, NULL), 6 * sizeof(float)) == 0);
        em_student_losses L;
        CHECK_OK(em_student_train_step(st, &bb.b, tl, mask, &L, pool));
        CHECK(L.loss_distill > 0 && L.loss_label > 0);
        CHECK_OK(em_dlrm_train_step(backbone, &bb.b, NULL, pool));
        CHECK_OK(em_dlrm_train_step(serving, &bb.b, NULL, pool));
        for (size_t k = 0; k < sizeof param_names / sizeof *param_names; k++) {
            double e = param_err(s, backbone, param_names[k]);
            if (!(e < 2e-5)) fprintf(stderr, "  mode %d %s: rel err %.3g\n", mode, param_names[k], e);
            CHECK(e < 2e-5);
        }
        em_dlrm *last = mode == 0 ? backbone : serving; /* the serving layer: 2x or 1x */
        CHECK(param_err(s, last, "top.1.weight") < 2e-5);
        CHECK(param_err(s, last, "top.1.bias") < 2e-5);
        if (mode > 0) { /* the head took the serving layer's step */
            CHECK(rel_err_f(head, em_dlrm_param(serving, "top.1.weight", 0, NULL), 6, 1e-6) < 2e-5);
            CHECK_NEAR(head[6], em_dlrm_param(serving, "top.1.bias", 0, NULL)[0], 1e-6);
        }
        em_student_free(st);
        em_dlrm_free(s), em_dlrm_free(backbone), em_dlrm_free(serving);
    }
}

/* The adapter is trained on the batch's labels first and its updated output is the
 * target: with a one-layer top MLP, h is the interaction output of a forward pass, so
 * the head's step can be recomputed from outside. */
static void test_adapter_update_order(void) {
    batch_buf bb;
    make_batch(&bb, 12);
    float tl[NB], mask[NB];
    em_rng r;
    em_rng_seed(&r, 3);
    for (int i = 0; i < NB; i++) tl[i] = (float)em_rng_normal(&r) * 2.f, mask[i] = i % 5 == 4 ? 0.f : 1.f;
    em_dlrm_cfg mc = model_cfg(0, 0.05f);
    em_dlrm *m = NULL;
    CHECK_OK(em_dlrm_create(&m, &mc, pool));
    em_student_cfg sc = em_student_default();
    sc.mode = EM_DISTILL_AUX_ADAPTER;
    sc.alpha = 1.2f, sc.beta = 0.7f, sc.w = 0.8f, sc.w_adapter = 0.6f, sc.adapter_lr = 0.2f, sc.head_lr = 0.03f;
    sc.adapter_hidden = 4;
    em_student *st = NULL;
    CHECK_OK(em_student_create(&st, &sc, m));
    if (!st) return;
    /* a non-identity adapter, so that one step changes it visibly */
    size_t n = em_student_state_size(st);
    float state[512];
    int64_t steps[2];
    CHECK(n < 512);
    em_student_get_state(st, state, steps);
    int H;
    em_student_head(st, &H);
    float *ad = state + H + 1;
    for (int j = 0; j < 13; j++) ad[j] += 0.1f * (float)((j * 7) % 5 - 2);
    CHECK_OK(em_student_set_state(st, state, n, steps));
    float ad0[13], head0[512];
    memcpy(ad0, ad, sizeof ad0);
    memcpy(head0, state, (size_t)(H + 1) * sizeof(float));
    /* from outside: h and z of this batch before the step */
    const int W = H;
    float z[NB];
    CHECK_OK(em_dlrm_forward(m, &bb.b, z, pool));
    float *h = em_malloc((size_t)NB * (size_t)W * sizeof(float));
    memcpy(h, em_dlrm_interaction(m), (size_t)NB * (size_t)W * sizeof(float));
    /* the expected adapter step and the targets before / after it */
    float g[13], ad1[13], lg[NB], a_new[NB], a_old[NB];
    em_adapter_backward(ad0, 4, tl, bb.label, mask, NB, g);
    for (int j = 0; j < 13; j++) ad1[j] = ad0[j] - sc.adapter_lr * g[j];
    em_adapter_forward(ad1, 4, tl, NB, lg);
    for (int i = 0; i < NB; i++) a_new[i] = 1.f / (1.f + expf(-lg[i]));
    em_adapter_forward(ad0, 4, tl, NB, lg);
    for (int i = 0; i < NB; i++) a_old[i] = 1.f / (1.f + expf(-lg[i]));
    float dhead_new[512], dhead_old[512], head_new[512], head_old[512];
    em_student_heads_backward(&sc, h, W, z, tl, mask, a_new, head0, NB, NULL, NULL, dhead_new, NULL, NULL);
    em_student_heads_backward(&sc, h, W, z, tl, mask, a_old, head0, NB, NULL, NULL, dhead_old, NULL, NULL);
    for (int k = 0; k <= W; k++) head_new[k] = head0[k] - sc.head_lr * dhead_new[k];
    for (int k = 0; k <= W; k++) head_old[k] = head0[k] - sc.head_lr * dhead_old[k];
    em_student_losses L;
    CHECK_OK(em_student_train_step(st, &bb.b, tl, mask, &L, pool));
    int K;
    const float *ad_after = em_student_adapter(st, &K);
    CHECK(K == 4 && rel_err_f(ad_after, ad1, 13, 1e-6) < 1e-6);
    const float *head_after = em_student_head(st, NULL);
    double e_new = rel_err_f(head_after, head_new, (size_t)W + 1, 1e-6),
           e_old = rel_err_f(head_after, head_old, (size_t)W + 1, 1e-6);
    CHECK(e_new < 1e-5);
    CHECK(e_old > 100 * e_new + 1e-6); /* the old target would have moved it elsewhere */
    em_student_get_state(st, state, steps);
    CHECK(steps[0] == 1 && steps[1] == 1);
    CHECK(em_student_set_state(st, state, n - 1, steps) == EM_ERR_CORRUPT);
    em_free(h);
    em_student_free(st);
    em_dlrm_free(m);
}

/* Mode NONE is em_dlrm_train_step, bit for bit. */
static void test_none_is_plain(void) {
    batch_buf bb;
    make_batch(&bb, 13);
    float tl[NB] = {0}, mask[NB] = {0};
    em_dlrm_cfg mc = model_cfg(6, 0.05f);
    em_dlrm *a = NULL, *b = NULL;
    CHECK_OK(em_dlrm_create(&a, &mc, pool));
    CHECK_OK(em_dlrm_create(&b, &mc, pool));
    em_student_cfg sc = em_student_default();
    em_student *st = NULL;
    CHECK_OK(em_student_create(&st, &sc, a));
    for (int i = 0; i < 3 && st; i++) {
        CHECK_OK(em_student_train_step(st, &bb.b, tl, mask, NULL, pool));
        CHECK_OK(em_dlrm_train_step(b, &bb.b, NULL, pool));
    }
    for (size_t k = 0; k < sizeof param_names / sizeof *param_names; k++) CHECK(param_err(a, b, param_names[k]) == 0);
    em_student_free(st);
    em_dlrm_free(a), em_dlrm_free(b);
}

static void test_errors_and_nomem(void) {
    em_dlrm_cfg mc = model_cfg(6, 0.05f);
    em_dlrm *m = NULL;
    CHECK_OK(em_dlrm_create(&m, &mc, pool));
    em_student_cfg sc = em_student_default();
    em_student *st = NULL;
    sc.adapter_hidden = 1;
    CHECK(em_student_create(&st, &sc, m) == EM_ERR_INVALID && !st);
    sc = em_student_default();
    sc.alpha = 0;
    CHECK(em_student_create(&st, &sc, m) == EM_ERR_INVALID);
    sc = em_student_default();
    sc.mode = EM_DISTILL_AUX_ADAPTER;
    for (long k = 0; k < 8; k++) {
        em_mem_fail_after(k);
        em_status s = em_student_create(&st, &sc, m);
        em_mem_fail_after(-1);
        CHECK((s == EM_OK) == (st != NULL));
        if (s == EM_OK) break;
        CHECK(s == EM_ERR_NOMEM);
    }
    em_student_free(st);
    em_student_free(NULL);
    em_distill_mode md;
    CHECK(em_distill_parse("aux+adapter", &md) == EM_OK && md == EM_DISTILL_AUX_ADAPTER);
    CHECK(em_distill_parse("bogus", &md) == EM_ERR_INVALID);
    CHECK(strcmp(em_distill_name(EM_DISTILL_SERVING), "serving") == 0);
    em_dlrm_free(m);
}

static void test_setup(void) { CHECK_OK(em_pool_create(&pool, 2)); }
static void test_teardown(void) { em_pool_free(pool); }

TEST_MAIN({"setup", test_setup}, {"golden", test_golden}, {"adapter_identity", test_adapter_identity},
          {"hook_gradients", test_hook_gradients}, {"adapter_update_order", test_adapter_update_order},
          {"none_is_plain", test_none_is_plain}, {"errors_and_nomem", test_errors_and_nomem}, {"teardown", test_teardown})
