#!/usr/bin/python3
"""make_golden_hsp.py - PyTorch reference for ember's hierarchical seed pooling
(Kunlun's HSP, include/ember/hsp.h).

Run from anywhere with the system Python that has PyTorch:

    /usr/bin/python3 tools/make_golden_hsp.py

It writes tests/golden/hsp.safetensors (float32, fixed seed) for tests/test_nn_hsp.c.
Each case <pfx> stores, in ember's layouts (D = H*dh):

  <pfx>_dims           (7) I64: B, H, dh, m, m2, D2, k
  <pfx>_scale          (1) F32: the score scale passed to ember (0: 1/sqrt(dh))
  <pfx>_offsets        (B+1) I64
  <pfx>_sq             (m, D) seeds;  <pfx>_k, _v (total, D) jagged keys / values
  <pfx>_a              (k, m, m2);    <pfx>_w (k, D, D2)
  <pfx>_dy             (B, m2, D2): the upstream gradient, loss = sum(dy * y)
  <pfx>_z, _lse        (B, m, D), (B, m, H): seed attention output and log-sum-exp
  <pfx>_y              (B, m2, D2)
  <pfx>_dsq, _dk, _dv, _da, _dw   autograd gradients

The reference is per sample and head on the explicit m x L scores:
  z_b,h = softmax(s sq_h k_b,h^T) v_b,h,  lse = torch.logsumexp over the keys;
  an empty sample gives z_b = 0 and lse = -inf (torch's empty matmul / logsumexp);
  y_b = sum_i a_i^T z_b w_i.
Cases:
  hsp_small  H = 2, dh = 8, m = 3, m2 = 2, D2 = 5, k = 2, lengths 0 1 5 37 3 20,
             s = 1/sqrt(dh)
  hsp_long   H = 1, dh = 16, m = 4, m2 = 4, D2 = 16, k = 3, lengths 9 300 0 2,
             s = 0.3 (more than two 128-key tiles)

The file is written with tools/make_golden.py's safetensors writer.
"""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_golden import write_safetensors  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "golden", "hsp.safetensors")


def hsp(sq, k, v, a, w, offsets, H, dh, s):
    """Returns z (B, m, D), lse (B, m, H), y (B, m2, D2) from differentiable ops."""
    zs, lses = [], []
    for b in range(len(offsets) - 1):
        lo, hi = offsets[b], offsets[b + 1]
        zh, lh = [], []
        for h in range(H):
            c = slice(h * dh, (h + 1) * dh)
            sc = s * (sq[:, c] @ k[lo:hi, c].T)          # (m, L)
            zh.append(torch.softmax(sc, dim=1) @ v[lo:hi, c])  # L = 0: zeros
            lh.append(torch.logsumexp(sc, dim=1, keepdim=True))  # L = 0: -inf
        zs.append(torch.cat(zh, dim=1))
        lses.append(torch.cat(lh, dim=1))
    z = torch.stack(zs)                                   # (B, m, D)
    lse = torch.stack(lses)                               # (B, m, H)
    y = sum(a[i].T @ z @ w[i] for i in range(a.shape[0]))  # (B, m2, D2)
    return z, lse, y


def make_case(tensors, pfx, lens, H, dh, m, m2, D2, k, scale):
    offsets = [0]
    for n in lens:
        offsets.append(offsets[-1] + n)
    total, D, B = offsets[-1], H * dh, len(lens)
    sq = torch.randn(m, D, requires_grad=True)
    kk = torch.randn(total, D, requires_grad=True)
    v = torch.randn(total, D, requires_grad=True)
    a = (torch.randn(k, m, m2) / math.sqrt(m)).requires_grad_()
    w = (torch.randn(k, D, D2) / math.sqrt(D)).requires_grad_()
    dy = torch.randn(B, m2, D2)
    s = scale if scale > 0 else 1.0 / math.sqrt(dh)
    z, lse, y = hsp(sq, kk, v, a, w, offsets, H, dh, s)
    (y * dy).sum().backward()
    tensors[pfx + "_dims"] = torch.tensor([B, H, dh, m, m2, D2, k], dtype=torch.int64)
    tensors[pfx + "_scale"] = torch.tensor([scale], dtype=torch.float32)
    tensors[pfx + "_offsets"] = torch.tensor(offsets, dtype=torch.int64)
    named = [("sq", sq), ("k", kk), ("v", v), ("a", a), ("w", w), ("dy", dy), ("z", z),
             ("lse", lse), ("y", y), ("dsq", sq.grad), ("dk", kk.grad), ("dv", v.grad),
             ("da", a.grad), ("dw", w.grad)]
    for name, t in named:
        tensors[pfx + "_" + name] = t.detach().float().contiguous()


def main():
    torch.manual_seed(20261123)
    tensors = {}
    make_case(tensors, "hsp_small", [0, 1, 5, 37, 3, 20], 2, 8, 3, 2, 5, 2, 0.0)
    make_case(tensors, "hsp_long", [9, 300, 0, 2], 1, 16, 4, 4, 16, 3, 0.3)
    n = write_safetensors(OUT, tensors, {"generator": "tools/make_golden_hsp.py",
                                         "torch": torch.__version__})
    print(f"wrote {OUT} ({n} bytes)")


if __name__ == "__main__":
    main()
