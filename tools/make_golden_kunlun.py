#!/usr/bin/python3
"""make_golden_kunlun.py - PyTorch reference for ember's Kunlun attention blocks
(GDPA and sliding-window attention, include/ember/kunlun.h).

Run from anywhere with the system Python that has PyTorch:

    /usr/bin/python3 tools/make_golden_kunlun.py

It writes tests/golden/kunlun.safetensors (float32, fixed seed) for
tests/test_nn_kunlun.c. Each case <pfx> stores, in ember's jagged layout:

  <pfx>_offsets        (B+1) I64
  <pfx>_q, _k, _v      (total, H*dh)
  <pfx>_do             (total, H*dh): the upstream gradient, loss = sum(do * o)
  <pfx>_o              forward output
  <pfx>_lse            (total, H), sliding window only
  <pfx>_dq, _dk, _dv   autograd gradients

The reference is per sample and per head on the explicit L x L scores:
  GDPA     o = scale_out * act(s * q k^T) v with masked (causal) entries of act(.) set
           to 0; act from torch.nn.functional (F.gelu's default, exact erf form);
  window   softmax over s * q k^T with keys outside [i - w, i + w] (causal:
           [i - w, i]) at -inf; lse by torch.logsumexp.
Cases (H = 2, dh = 8, lengths 0 1 5 37 3 20):
  gdpa_silu_causal   SiLU, causal, s = 1/sqrt(dh), scale_out = 1/max length
  gdpa_gelu          GELU, s = 0.3, scale_out = 0.05
  swa_w3             window 3
  swa_w3_causal      window 3, causal

The file is written with tools/make_golden.py's safetensors writer.
"""

import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_golden import write_safetensors  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "golden", "kunlun.safetensors")

ACTS = {"silu": F.silu, "gelu": F.gelu}


def visible(L, window, causal):
    i = torch.arange(L).view(L, 1)
    j = torch.arange(L).view(1, L)
    v = torch.ones(L, L, dtype=torch.bool)
    if causal:
        v &= j <= i
    if window is not None:
        v &= (j >= i - window) & (j <= i + window)
    return v


def attention(q, k, v, H, dh, offsets, scale, causal, act, scale_out, window):
    """Returns o and (sliding window) lse, per sample/head from differentiable ops."""
    outs, lses = [], []
    for b in range(len(offsets) - 1):
        lo, hi = offsets[b], offsets[b + 1]
        L = hi - lo
        if L == 0:
            continue
        vis = visible(L, window, causal)
        oh, lh = [], []
        for h in range(H):
            c = slice(h * dh, (h + 1) * dh)
            s = scale * (q[lo:hi, c] @ k[lo:hi, c].T)
            if act is not None:
                a = ACTS[act](s).masked_fill(~vis, 0.0)
                oh.append(scale_out * (a @ v[lo:hi, c]))
            else:
                s = s.masked_fill(~vis, -math.inf)
                oh.append(torch.softmax(s, dim=1) @ v[lo:hi, c])
                lh.append(torch.logsumexp(s, dim=1, keepdim=True))
        outs.append(torch.cat(oh, dim=1))
        if lh:
            lses.append(torch.cat(lh, dim=1))
    return torch.cat(outs, dim=0), (torch.cat(lses, dim=0) if lses else None)


def make_case(tensors, pfx, lens, H, dh, scale, causal, act=None, scale_out=0.0, window=None):
    offsets = [0]
    for n in lens:
        offsets.append(offsets[-1] + n)
    total = offsets[-1]
    q = torch.randn(total, H * dh, requires_grad=True)
    k = torch.randn(total, H * dh, requires_grad=True)
    v = torch.randn(total, H * dh, requires_grad=True)
    do = torch.randn(total, H * dh)
    sc = scale if scale > 0 else 1.0 / math.sqrt(dh)
    so = scale_out if scale_out > 0 else 1.0 / max(lens)
    o, lse = attention(q, k, v, H, dh, offsets, sc, causal, act, so, window)
    (o * do).sum().backward()
    tensors[pfx + "_offsets"] = torch.tensor(offsets, dtype=torch.int64)
    named = [("q", q), ("k", k), ("v", v), ("do", do), ("o", o)]
    if lse is not None:
        named.append(("lse", lse))
    named += [("dq", q.grad), ("dk", k.grad), ("dv", v.grad)]
    for name, t in named:
        tensors[pfx + "_" + name] = t.detach().float().contiguous()


def main():
    torch.manual_seed(20261122)
    tensors = {}
    lens = [0, 1, 5, 37, 3, 20]
    make_case(tensors, "gdpa_silu_causal", lens, 2, 8, 0.0, True, act="silu")
    make_case(tensors, "gdpa_gelu", lens, 2, 8, 0.3, False, act="gelu", scale_out=0.05)
    make_case(tensors, "swa_w3", lens, 2, 8, 0.0, False, window=3)
    make_case(tensors, "swa_w3_causal", lens, 2, 8, 0.0, True, window=3)
    n = write_safetensors(OUT, tensors, {"generator": "tools/make_golden_kunlun.py",
                                         "torch": torch.__version__})
    print(f"wrote {OUT} ({n} bytes)")


if __name__ == "__main__":
    main()
