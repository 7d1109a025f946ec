#!/usr/bin/python3
"""make_golden_exfm.py - PyTorch reference for ember's ExFM student heads
(include/ember/student.h, src/model/student.c).

Run from anywhere with the system Python that has PyTorch (Debian's python3-torch):

    /usr/bin/python3 tools/make_golden_exfm.py

It writes tests/golden/exfm.safetensors (float32, fixed seed) for
tests/test_model_student.c, which needs no PyTorch. Notation as in student.h:
h (B, H) the backbone's last hidden activation (>= 0, some zeros), z (B) the serving
logit, tl (B) the teacher's logit, m (B) the presence mask, y (B) the labels,
head = [v (H), c], t = min(alpha * sigmoid(tl), 1), every loss term a mean over B.

Inputs:  dims (4) I64: B, H, K, 0;  hyper (5) F32: alpha, beta, w, w_a, adapter lr;
         h, z, tl, mask, y, head (H + 1), adapter (3K + 1) = [W1 (K), b1 (K), W2 (K), b2]
Outputs, by autograd:
  serving_loss (1), serving_dz (B)            L = w mean(m BCE(z, t))
  aux_loss (1), aux_dh (B, H), aux_dhead (H + 1), aux_zd (B)
                                              L = w mean(m BCE(zd, t)), zd = G(h) v + c,
                                              G the identity whose backward scales by beta
  adapter_loss (1), adapter_grad (3K + 1)     L_A = mean(m BCE(A(tl), y)), A: 1 -> K ReLU -> 1
  adapter_after (3K + 1), adapter_a (B)       one SGD step of A, then a = sigmoid(A(tl))
  both_loss (1), both_dh (B, H), both_dhead (H + 1)
                                              L = w mean(m BCE(zd, t)) + w_a mean(m BCE(zd, a)),
                                              a = adapter_a as a constant (stop-gradient)
alpha = 1.5 so that some soft labels clip at 1.
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_golden import write_safetensors  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "golden", "exfm.safetensors")


class ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by beta."""

    @staticmethod
    def forward(ctx, x, beta):
        ctx.beta = beta
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.beta, None


def soft_bce(logit, target, mask, B):
    return F.binary_cross_entropy_with_logits(logit, target, weight=mask, reduction="sum") / B


def adapter(p, K, x):
    W1, b1, W2, b2 = p[:K], p[K:2 * K], p[2 * K:3 * K], p[3 * K]
    u = torch.relu(x[:, None] * W1[None, :] + b1[None, :])
    return u @ W2 + b2


def main():
    torch.manual_seed(5)
    B, H, K = 9, 6, 5
    alpha, beta, w, wa, lr = 1.5, 0.5, 0.7, 0.4, 0.3
    h = torch.relu(torch.randn(B, H))
    z = torch.randn(B) * 1.5
    tl = torch.randn(B) * 2.0
    tl[0] = 6.0  # sigmoid(6) * 1.5 > 1: clipped
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.float32)
    y = (torch.rand(B) < 0.4).float()
    head = torch.randn(H + 1) * 0.5
    ad = torch.randn(3 * K + 1) * 0.7
    t = torch.clamp(alpha * torch.sigmoid(tl), max=1.0)
    out = {"dims": torch.tensor([B, H, K, 0], dtype=torch.int64),
           "hyper": torch.tensor([alpha, beta, w, wa, lr]),
           "h": h, "z": z, "tl": tl, "mask": mask, "y": y, "head": head, "adapter": ad}

    # distillation into the serving head
    zz = z.clone().requires_grad_(True)
    L = w * soft_bce(zz, t, mask, B)
    L.backward()
    out["serving_loss"] = L.detach().reshape(1)
    out["serving_dz"] = zz.grad

    # auxiliary head
    def aux(a=None):
        hh = h.clone().requires_grad_(True)
        hd = head.clone().requires_grad_(True)
        zd = ScaleGrad.apply(hh, beta) @ hd[:H] + hd[H]
        L = w * soft_bce(zd, t, mask, B)
        if a is not None:
            L = L + wa * soft_bce(zd, a, mask, B)
        L.backward()
        return L.detach().reshape(1), hh.grad, hd.grad, zd.detach()

    out["aux_loss"], out["aux_dh"], out["aux_dhead"], out["aux_zd"] = aux()

    # the adapter: its loss and gradient, one SGD step, its new output
    p = ad.clone().requires_grad_(True)
    LA = soft_bce(adapter(p, K, tl), y, mask, B)
    LA.backward()
    out["adapter_loss"] = LA.detach().reshape(1)
    out["adapter_grad"] = p.grad
    after = (ad - lr * p.grad).detach()
    out["adapter_after"] = after
    a = torch.sigmoid(adapter(after, K, tl)).detach()
    out["adapter_a"] = a

    # auxiliary head + adapter target
    out["both_loss"], out["both_dh"], out["both_dhead"], _ = aux(a)

    n = write_safetensors(OUT, {k: v.detach().contiguous() for k, v in out.items()},
                          {"tool": "tools/make_golden_exfm.py", "torch": torch.__version__})
    print(f"wrote {OUT} ({n} bytes)")


if __name__ == "__main__":
    main()
