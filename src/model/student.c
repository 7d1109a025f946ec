/*
 * student.c - ExFM's student heads (ember/student.h): distillation into the serving
 * head, the auxiliary distillation head with its beta-scaled gradient into the
 * backbone, and the student adapter.
 *
 * The student drives an unmodified DLRM through em_dlrm_train_step_hook: the hook
 * sees the top MLP's last hidden activation h and the serving logit z after the
 * forward, adds the serving head's distillation gradient to dL/dz (SERVING) or returns
 * the distillation head's gradient into h (AUX modes), and the DLRM's backward and
 * optimizer do the rest. The heads' own parameters live in two small flat blocks
 * stepped with em_optim_dense_step, like the DLRM's dense block.
 *
 * Arithmetic: per-example work in float as in the DLRM's kernels; batch sums (head
 * and adapter gradients, losses) in double, in example order, on the calling thread:
 * the heads are O(B * H), so threads would not pay, and results are independent of
 * the pool's size.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "ember/nn.h"
#include "ember/student.h"

static const char *const mode_names[] = {"none", "serving", "aux", "aux+adapter"};

const char *em_distill_name(em_distill_mode m) {
    return (unsigned)m < sizeof mode_names / sizeof mode_names[0] ? mode_names[m] : "?";
}

em_status em_distill_parse(const char *s, em_distill_mode *out) {
    for (int i = 0; i < (int)(sizeof mode_names / sizeof mode_names[0]); i++)
        if (strcmp(s, mode_names[i]) == 0) {
            *out = (em_distill_mode)i;
            return EM_OK;
        }
    if (strcmp(s, "aux-adapter") == 0 || strcmp(s, "adapter") == 0) {
        *out = EM_DISTILL_AUX_ADAPTER;
        return EM_OK;
    }
    return em_errorf(EM_ERR_INVALID, "distillation '%s': expected none, serving, aux or aux+adapter", s);
}

em_student_cfg em_student_default(void) {
    em_student_cfg c;
    memset(&c, 0, sizeof c);
    c.mode = EM_DISTILL_NONE;
    c.alpha = 1.f;
    c.beta = 1.f;
    c.w = 1.f;
    c.w_adapter = 1.f;
    c.adapter_hidden = 8;
    c.head_lr = 0.f;
    c.adapter_lr = 0.05f;
    return c;
}

em_status em_student_cfg_validate(const em_student_cfg *c) {
    if ((unsigned)c->mode > EM_DISTILL_AUX_ADAPTER) return em_errorf(EM_ERR_INVALID, "student: unknown distillation mode %d", (int)c->mode);
    if (!(c->alpha > 0) || !(c->beta >= 0) || !(c->w >= 0) || !(c->w_adapter >= 0) || !isfinite(c->alpha) ||
        !isfinite(c->beta) || !isfinite(c->w) || !isfinite(c->w_adapter))
        return em_errorf(EM_ERR_INVALID, "student: need alpha > 0, beta >= 0, w >= 0, w_adapter >= 0 (finite)");
    if (c->adapter_hidden < 2 || c->adapter_hidden > 256)
        return em_errorf(EM_ERR_INVALID, "student: adapter_hidden %d must be in 2..256", c->adapter_hidden);
    if (!(c->head_lr >= 0) || !(c->adapter_lr > 0))
        return em_errorf(EM_ERR_INVALID, "student: need head_lr >= 0 (0 = the model's) and adapter_lr > 0");
    return EM_OK;
}

static float sigm(float z) { return z >= 0 ? 1.f / (1.f + expf(-z)) : expf(z) / (1.f + expf(z)); }

/* BCE with logits against a soft target t in [0, 1], in double. */
static double bce_soft(float z, float t) {
    double zd = z;
    return (zd > 0 ? zd : 0) - zd * (double)t + log1p(exp(-fabs(zd)));
}

void em_student_heads_backward(const em_student_cfg *c, const float *h, int H, const float *z, const float *t_logit,
                               const float *mask, const float *a, const float *head, int B, float *dz, float *dh,
                               float *dhead, float *zd, double *loss) {
    const float invB = 1.0f / (float)B;
    const int aux = c->mode == EM_DISTILL_AUX || c->mode == EM_DISTILL_AUX_ADAPTER;
    const int adapt = c->mode == EM_DISTILL_AUX_ADAPTER && a;
    double L = 0, gc = 0;
    double *gv = NULL;
    double gv_small[1024]; /* wider heads accumulate in float (still in example order) */
    if (aux && dhead) gv = H <= 1024 ? gv_small : NULL;
    if (aux && dhead && !gv) memset(dhead, 0, (size_t)(H + 1) * sizeof(float));
    if (gv) memset(gv, 0, (size_t)H * sizeof(double));
    for (int i = 0; i < B; i++) {
        const float m = mask[i];
        float t = c->alpha * sigm(t_logit[i]);
        if (t > 1.f) t = 1.f;
        if (c->mode == EM_DISTILL_SERVING) {
            if (dz) dz[i] = m > 0 ? c->w * m * (sigm(z[i]) - t) * invB : 0.f;
            if (m > 0) L += (double)c->w * m * bce_soft(z[i], t) / B;
        } else if (dz) {
            dz[i] = 0.f;
        }
        if (!aux) continue;
        const float *hi = h + (size_t)i * (size_t)H;
        float s = head[H];
        for (int k = 0; k < H; k++) s += head[k] * hi[k];
        if (zd) zd[i] = s;
        float g = 0.f;
        if (m > 0) {
            const float p = sigm(s);
            g = c->w * m * (p - t);
            L += (double)c->w * m * bce_soft(s, t) / B;
            if (adapt) {
                g += c->w_adapter * m * (p - a[i]);
                L += (double)c->w_adapter * m * bce_soft(s, a[i]) / B;
            }
            g *= invB;
        }
        if (dh) {
            const float gb = c->beta * g;
            float *di = dh + (size_t)i * (size_t)H;
            for (int k = 0; k < H; k++) di[k] = gb * head[k];
        }
        if (dhead && g != 0.f) {
            if (gv) for (int k = 0; k < H; k++) gv[k] += (double)g * hi[k];
            else for (int k = 0; k < H; k++) dhead[k] += g * hi[k];
            gc += g;
        }
    }
    if (aux && dhead) {
        if (gv) for (int k = 0; k < H; k++) dhead[k] = (float)gv[k];
        dhead[H] = (float)gc;
    }
    if (loss) *loss = L;
}

/* ------------------------------------------------------------------ adapter */

void em_adapter_init(float *p, int K) {
    float *W1 = p, *b1 = p + K, *W2 = p + 2 * K;
    for (int j = 0; j < K; j++) {
        W1[j] = (j % 2 == 0) ? 1.f : -1.f;
        if (j < 2) {
            b1[j] = 0.f, W2[j] = W1[j]; /* relu(x) - relu(-x) = x */
        } else {
            /* hinges at points spread over [-4, 4] (teacher logits), silent at first */
            const float at = K > 3 ? -4.f + 8.f * (float)(j - 2) / (float)(K - 3) : 0.f;
            b1[j] = -W1[j] * at, W2[j] = 0.f;
        }
    }
    p[3 * K] = 0.f;
}

void em_adapter_forward(const float *p, int K, const float *x, int n, float *out) {
    const float *W1 = p, *b1 = p + K, *W2 = p + 2 * K;
    for (int i = 0; i < n; i++) {
        float s = p[3 * K];
        for (int j = 0; j < K; j++) {
            const float u = W1[j] * x[i] + b1[j];
            if (u > 0) s += W2[j] * u;
        }
        out[i] = s;
    }
}

double em_adapter_backward(const float *p, int K, const float *x, const float *y, const float *mask, int n,
                           float *dp) {
    const float *W1 = p, *b1 = p + K, *W2 = p + 2 * K;
    double acc[3 * 256 + 1];
    memset(acc, 0, (size_t)(3 * K + 1) * sizeof(double));
    double L = 0;
    const float invn = 1.0f / (float)n;
    for (int i = 0; i < n; i++) {
        if (!(mask[i] > 0)) continue;
        float s = p[3 * K];
        for (int j = 0; j < K; j++) {
            const float u = W1[j] * x[i] + b1[j];
            if (u > 0) s += W2[j] * u;
        }
        L += (double)mask[i] * bce_soft(s, y[i]) / n;
        const float g = mask[i] * (sigm(s) - y[i]) * invn;
        acc[3 * K] += g;
        for (int j = 0; j < K; j++) {
            const float u = W1[j] * x[i] + b1[j];
            if (!(u > 0)) continue;
            acc[2 * K + j] += (double)g * u;    /* dW2 */
            const float du = g * W2[j];
            acc[j] += (double)du * x[i];        /* dW1 */
            acc[K + j] += du;                   /* db1 */
        }
    }
    for (int j = 0; j < 3 * K + 1; j++) dp[j] = (float)acc[j];
    return L;
}

/* ------------------------------------------------------------------ student */

struct em_student {
    em_student_cfg cfg;
    em_dlrm *m;
    int H, K, spp;
    em_optim_cfg hopt, aopt;
    float *head, *hgrad, *hstate; /* H + 1 */
    float *ad, *agrad, *astate;   /* 3K + 1 */
    int64_t hsteps, asteps;
    int cap;
    float *dh, *dz, *a, *alogit;  /* (cap, H), (cap) x 3 */
    /* the current step, for the hook */
    const float *tl, *mask;
    double dloss;
};

void em_student_free(em_student *s) {
    if (!s) return;
    em_free(s->head), em_free(s->hgrad), em_free(s->hstate);
    em_free(s->ad), em_free(s->agrad), em_free(s->astate);
    em_free(s->dh), em_free(s->dz), em_free(s->a), em_free(s->alogit);
    em_free(s);
}

em_status em_student_create(em_student **out, const em_student_cfg *cfg, em_dlrm *m) {
    *out = NULL;
    em_status st = em_student_cfg_validate(cfg);
    if (st) return st;
    const em_dlrm_cfg *mc = em_dlrm_config(m);
    char name[64];
    snprintf(name, sizeof name, "top.%d.weight", mc->n_top - 2);
    size_t nw = 0, nb = 0;
    const float *W = em_dlrm_param(m, name, 0, &nw);
    snprintf(name, sizeof name, "top.%d.bias", mc->n_top - 2);
    const float *bias = em_dlrm_param(m, name, 0, &nb);
    if (!W || !bias || nb != 1 || nw != (size_t)mc->top[mc->n_top - 2])
        return em_errorf(EM_ERR_INVALID, "student: the model's last top layer is not a %d -> 1 layer", mc->top[mc->n_top - 2]);
    em_student *s = em_calloc(1, sizeof *s);
    if (!s) return em_errorf(EM_ERR_NOMEM, "student: out of memory");
    s->cfg = *cfg, s->m = m;
    s->H = mc->top[mc->n_top - 2], s->K = cfg->adapter_hidden;
    s->spp = em_optim_state_per_param(mc->dense_opt.kind);
    s->hopt = mc->dense_opt;
    if (cfg->head_lr > 0) s->hopt.lr = cfg->head_lr;
    s->aopt = mc->dense_opt;
    s->aopt.lr = cfg->adapter_lr;
    const size_t nh = (size_t)s->H + 1, na = 3 * (size_t)s->K + 1, sp = (size_t)s->spp;
    s->head = em_malloc(nh * sizeof(float));
    s->hgrad = em_calloc(nh, sizeof(float));
    s->hstate = em_calloc(nh * sp + 1, sizeof(float));
    s->ad = em_malloc(na * sizeof(float));
    s->agrad = em_calloc(na, sizeof(float));
    s->astate = em_calloc(na * sp + 1, sizeof(float));
    if (!s->head || !s->hgrad || !s->hstate || !s->ad || !s->agrad || !s->astate) {
        em_student_free(s);
        return em_errorf(EM_ERR_NOMEM, "student: out of memory");
    }
    memcpy(s->head, W, (size_t)s->H * sizeof(float));
    s->head[s->H] = bias[0];
    em_adapter_init(s->ad, s->K);
    if (mc->dense_opt.kind == EM_OPT_ADAGRAD) {
        for (size_t i = 0; i < nh * sp; i++) s->hstate[i] = mc->dense_opt.init_accum;
        for (size_t i = 0; i < na * sp; i++) s->astate[i] = mc->dense_opt.init_accum;
    }
    *out = s;
    return EM_OK;
}

static em_status ensure(em_student *s, int B) {
    if (B <= s->cap) return EM_OK;
    em_free(s->dh), em_free(s->dz), em_free(s->a), em_free(s->alogit);
    s->dh = em_malloc((size_t)B * (size_t)s->H * sizeof(float));
    s->dz = em_malloc((size_t)B * sizeof(float));
    s->a = em_malloc((size_t)B * sizeof(float));
    s->alogit = em_malloc((size_t)B * sizeof(float));
    if (!s->dh || !s->dz || !s->a || !s->alogit) {
        em_free(s->dh), em_free(s->dz), em_free(s->a), em_free(s->alogit);
        s->dh = s->dz = s->a = s->alogit = NULL;
        s->cap = 0;
        return em_errorf(EM_ERR_NOMEM, "student: no memory for a batch of %d", B);
    }
    s->cap = B;
    return EM_OK;
}

static em_status hook_fn(void *ud, const em_batch *b, const float *h, int H, const float *z, float *dlogit,
                         const float **dh, em_pool *pool) {
    (void)pool;
    em_student *s = ud;
    if (H != s->H) return em_errorf(EM_ERR_INVALID, "student: the model's last hidden width is %d, the heads' %d", H, s->H);
    const int aux = s->cfg.mode != EM_DISTILL_SERVING;
    em_student_heads_backward(&s->cfg, h, H, z, s->tl, s->mask, s->cfg.mode == EM_DISTILL_AUX_ADAPTER ? s->a : NULL,
                              s->head, b->B, s->dz, aux ? s->dh : NULL, aux ? s->hgrad : NULL, NULL, &s->dloss);
    if (aux) *dh = s->dh;
    else for (int i = 0; i < b->B; i++) dlogit[i] += s->dz[i];
    return EM_OK;
}

em_status em_student_train_step(em_student *s, const em_batch *b, const float *t_logit, const float *mask,
                                em_student_losses *losses, em_pool *pool) {
    em_student_losses L = {0};
    em_status st;
    if (s->cfg.mode == EM_DISTILL_NONE) {
        st = em_dlrm_train_step(s->m, b, &L.loss_label, pool);
        if (losses) *losses = L;
        return st;
    }
    if ((st = ensure(s, b->B))) return st;
    const int K = s->K, na = 3 * K + 1, nh = s->H + 1;
    if (s->cfg.mode == EM_DISTILL_AUX_ADAPTER) {
        /* fresh labels first: one adapter step, then its updated output as the target */
        L.loss_adapter = em_adapter_backward(s->ad, K, t_logit, b->label, mask, b->B, s->agrad);
        if ((st = em_optim_dense_step(&s->aopt, s->ad, s->agrad, s->astate, (size_t)na, s->asteps + 1, NULL))) return st;
        s->asteps++;
        em_adapter_forward(s->ad, K, t_logit, b->B, s->alogit);
        for (int i = 0; i < b->B; i++) s->a[i] = sigm(s->alogit[i]);
    }
    s->tl = t_logit, s->mask = mask, s->dloss = 0;
    em_dlrm_head_hook hk = {hook_fn, s};
    st = em_dlrm_train_step_hook(s->m, b, &hk, &L.loss_label, pool);
    s->tl = s->mask = NULL;
    if (st) return st;
    L.loss_distill = s->dloss;
    if (s->cfg.mode != EM_DISTILL_SERVING) {
        if ((st = em_optim_dense_step(&s->hopt, s->head, s->hgrad, s->hstate, (size_t)nh, s->hsteps + 1, NULL))) return st;
        s->hsteps++;
    }
    if (losses) *losses = L;
    return EM_OK;
}

size_t em_student_state_size(const em_student *s) {
    const size_t nh = (size_t)s->H + 1, na = 3 * (size_t)s->K + 1;
    return (nh + na) * (1 + (size_t)s->spp);
}

void em_student_get_state(const em_student *s, float *x, int64_t steps[2]) {
    const size_t nh = (size_t)s->H + 1, na = 3 * (size_t)s->K + 1, sp = (size_t)s->spp;
    memcpy(x, s->head, nh * sizeof(float)), x += nh;
    memcpy(x, s->hstate, nh * sp * sizeof(float)), x += nh * sp;
    memcpy(x, s->ad, na * sizeof(float)), x += na;
    memcpy(x, s->astate, na * sp * sizeof(float));
    steps[0] = s->hsteps, steps[1] = s->asteps;
}

em_status em_student_set_state(em_student *s, const float *x, size_t n, const int64_t steps[2]) {
    if (n != em_student_state_size(s) || steps[0] < 0 || steps[1] < 0)
        return em_errorf(EM_ERR_CORRUPT, "student: state of %zu values, expected %zu", n, em_student_state_size(s));
    const size_t nh = (size_t)s->H + 1, na = 3 * (size_t)s->K + 1, sp = (size_t)s->spp;
    memcpy(s->head, x, nh * sizeof(float)), x += nh;
    memcpy(s->hstate, x, nh * sp * sizeof(float)), x += nh * sp;
    memcpy(s->ad, x, na * sizeof(float)), x += na;
    memcpy(s->astate, x, na * sp * sizeof(float));
    s->hsteps = steps[0], s->asteps = steps[1];
    return EM_OK;
}

const float *em_student_head(const em_student *s, int *H) {
    if (H) *H = s->H;
    return s->head;
}

const float *em_student_adapter(const em_student *s, int *K) {
    if (K) *K = s->K;
    return s->ad;
}
