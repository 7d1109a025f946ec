/*
 * ember/student.h - ExFM's student (vertical model) heads (TECHNIQUES.md section 4):
 * distillation from a teacher's logged predictions into a DLRM student, with the
 * auxiliary distillation head and the student adapter.
 *
 * Notation, per example of a batch of B: y the label, z the serving logit (the DLRM's
 * output), h (H) the input of the DLRM's last top layer (the backbone's last hidden
 * activation), l_T the teacher's logit and m = 1 when the teacher's prediction exists
 * (else 0), t = min(alpha * sigmoid(l_T), 1) the soft label.
 *
 *   NONE:        L = BCE(z, y)
 *   SERVING:     L = BCE(z, y) + w m BCE(z, t)
 *   AUX:         L = BCE(z, y) + w m BCE(z_d, t),               z_d = <v, h> + c
 *   AUX_ADAPTER: L = BCE(z, y) + w m BCE(z_d, t) + w_a m BCE(z_d, a)
 * every term a mean over the B examples. The distillation head (v, c) is a separate
 * linear head on h; its gradient reaches the backbone through an identity whose
 * backward multiplies by beta: dL/dh gets beta * dL_d/dz_d * v (the head's own
 * gradient is unscaled). The serving head's weights never see the teacher in AUX modes.
 * Only the DLRM (the serving head) is exported; the heads are training state.
 *
 * The student adapter: a tiny MLP a = sigmoid(A(l_T)), A: 1 -> K (ReLU) -> 1, that
 * maps the teacher's logit to an adapted probability. Each step it is first trained
 * on the batch's fresh labels (L_A = mean over B of m BCE(A(l_T), y), one optimizer
 * step), and then its output with the updated weights, as a constant (stop-gradient),
 * is the second distillation target a. It starts as the identity (a = sigmoid(l_T)):
 * units 0/1 are relu(x) - relu(-x), the others hinge at spread points with output
 * weight 0, so it learns a piecewise-linear correction of the teacher's calibration.
 *
 * Optimizers: the heads use the DLRM's dense optimizer kind (SGD, AdaGrad, Adam,
 * AdamW) with their own learning rates and step counts; the distillation head starts
 * as a copy of the serving head's last layer.
 */
#ifndef EMBER_STUDENT_H
#define EMBER_STUDENT_H

#include "core.h"
#include "data.h"
#include "dlrm.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    EM_DISTILL_NONE = 0,    /* the student alone */
    EM_DISTILL_SERVING,     /* the teacher's soft label into the serving head */
    EM_DISTILL_AUX,         /* the auxiliary distillation head */
    EM_DISTILL_AUX_ADAPTER, /* auxiliary head + student adapter */
} em_distill_mode;

const char *em_distill_name(em_distill_mode m); /* "none", "serving", "aux", "aux+adapter" */
em_status em_distill_parse(const char *s, em_distill_mode *out);

typedef struct {
    em_distill_mode mode;
    float alpha;        /* soft label min(alpha * p_teacher, 1) (default 1) */
    float beta;         /* scale of the distillation head's gradient into the backbone (default 1) */
    float w;            /* weight of the distillation loss (default 1) */
    float w_adapter;    /* weight of the adapter's target (default 1) */
    int adapter_hidden; /* K, 2..256 (default 8) */
    float head_lr;      /* distillation head learning rate; 0 = the DLRM's dense lr */
    float adapter_lr;   /* adapter learning rate (default 0.05) */
} em_student_cfg;

em_student_cfg em_student_default(void);
em_status em_student_cfg_validate(const em_student_cfg *c);

/* ------------------------------------------------ the heads as pure functions */

/* The distillation losses' gradients for one batch (the label term BCE(z, y) is the
 * DLRM's own). Inputs: h (B, H), z (B), t_logit (B), mask (B), a (B) the adapter's
 * probabilities (AUX_ADAPTER only, else NULL), head = [v (H), c]. Outputs, overwritten:
 * dz (B) the distillation's gradient on the serving logit (SERVING; zeros otherwise),
 * dh (B, H) the gradient into the backbone (AUX modes: beta-scaled; zeros otherwise),
 * dhead (H + 1) the distillation head's gradient, zd (B) the head's logits. *loss
 * receives the distillation terms' sum (w and w_a included). Any output may be NULL
 * when the mode does not produce it. */
void em_student_heads_backward(const em_student_cfg *c, const float *h, int H, const float *z, const float *t_logit,
                               const float *mask, const float *a, const float *head, int B, float *dz, float *dh,
                               float *dhead, float *zd, double *loss);

/* The adapter, params = [W1 (K), b1 (K), W2 (K), b2] (3K + 1 values). Forward: logits
 * out (n) of the teacher logits x (n). Backward of L_A = sum_i mask_i BCE(A(x_i), y_i) / n:
 * dparams (3K + 1) overwritten; returns L_A. */
void em_adapter_forward(const float *params, int K, const float *x, int n, float *out);
double em_adapter_backward(const float *params, int K, const float *x, const float *y, const float *mask, int n,
                           float *dparams);
/* The identity start described above. */
void em_adapter_init(float *params, int K);

/* ------------------------------------------------------------- the student */

typedef struct em_student em_student;

/* Heads for model `m` (the DLRM whose top MLP feeds them; the distillation head copies
 * its last layer). The model is not owned. */
em_status em_student_create(em_student **out, const em_student_cfg *cfg, em_dlrm *m);
void em_student_free(em_student *s); /* NULL is a no-op */

typedef struct {
    double loss_label;   /* mean BCE(z, y) before the update */
    double loss_distill; /* the distillation terms */
    double loss_adapter; /* L_A before the adapter's update */
} em_student_losses;

/* One training step of the student on batch b joined with the teacher: t_logit (B)
 * and mask (B) (1 = present). Order: the adapter's step on (t_logit, y) first; then
 * its output a with the updated weights; then the DLRM's step with the heads'
 * gradients added (em_dlrm_train_step_hook); then the distillation head's step. With
 * mode NONE this is exactly em_dlrm_train_step. losses may be NULL. */
em_status em_student_train_step(em_student *s, const em_batch *b, const float *t_logit, const float *mask,
                                em_student_losses *losses, em_pool *pool);

/* The flat training state: [head (H+1), head optimizer state, adapter (3K+1), adapter
 * optimizer state], plus the two step counts. For checkpoints (the stream stores it in
 * its checkpoint's metadata); set_state checks the size. */
size_t em_student_state_size(const em_student *s);
void em_student_get_state(const em_student *s, float *state, int64_t steps[2]);
em_status em_student_set_state(em_student *s, const float *state, size_t n, const int64_t steps[2]);
/* The distillation head [v, c] and the adapter's parameters (for tests and reports). */
const float *em_student_head(const em_student *s, int *H);
const float *em_student_adapter(const em_student *s, int *K);

#ifdef __cplusplus
}
#endif
#endif
