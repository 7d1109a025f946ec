#!/usr/bin/python3
"""make_golden_jattn.py - PyTorch reference for ember's Jagged Flash Attention.

Run from anywhere with the system Python that has PyTorch:

    /usr/bin/python3 tools/make_golden_jattn.py

It writes tests/golden/jattn.safetensors (float32, fixed seed) for
tests/test_nn_jattn.c. Each case <pfx> stores, in ember's jagged layout
(include/ember/jattn.h):

  <pfx>_offsets  (B+1) I64
  <pfx>_q        (total, H*dh) self / (B, H*dh) target
  <pfx>_k, _v    (total, H*dh)
  <pfx>_do       like q: the upstream gradient, loss = sum(do * o)
  <pfx>_o, _lse  forward output and log-sum-exp (rows, H)
  <pfx>_dq, _dk, _dv   autograd gradients

The reference is per sample and per head: torch.softmax over the explicitly masked
(causal) scores, torch.logsumexp for lse, autograd for the gradients. An empty target
history gives o = 0, lse = -inf and no gradient (ember's convention). Cases:

  self_d8_causal   H=2 dh=8, causal, scale 0.3, lengths 0 1 5 70 3 65
  self_d32         H=2 dh=32, scale 1/sqrt(dh), lengths 1 65 0 7
  target_d8        H=2 dh=8, one query per sample, lengths 0 1 5 70 3 65

The file is written with tools/make_golden.py's hand-made safetensors writer (8-byte
tensors first, so the I64 offsets are aligned).
"""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_golden import write_safetensors  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "golden", "jattn.safetensors")


def attention(q, k, v, H, dh, offsets, scale, causal, target):
    """Returns o, lse built per sample/head from differentiable torch ops."""
    B = len(offsets) - 1
    outs, lses = [], []
    for b in range(B):
        lo, hi = offsets[b], offsets[b + 1]
        L = hi - lo
        qb = q[b:b + 1] if target else q[lo:hi]
        M = qb.shape[0]
        if L == 0:
            outs.append(torch.zeros(M, H * dh))
            lses.append(torch.full((M, H), -math.inf))
            continue
        oh, lh = [], []
        for h in range(H):
            c = slice(h * dh, (h + 1) * dh)
            s = scale * (qb[:, c] @ k[lo:hi, c].T)
            if causal and not target:
                mask = torch.ones(L, L, dtype=torch.bool).triu(1)
                s = s.masked_fill(mask, -math.inf)
            oh.append(torch.softmax(s, dim=1) @ v[lo:hi, c])
            lh.append(torch.logsumexp(s, dim=1, keepdim=True))
        outs.append(torch.cat(oh, dim=1))
        lses.append(torch.cat(lh, dim=1))
    return torch.cat(outs, dim=0), torch.cat(lses, dim=0)


def make_case(tensors, pfx, lens, H, dh, scale, causal, target):
    offsets = [0]
    for n in lens:
        offsets.append(offsets[-1] + n)
    total, B = offsets[-1], len(lens)
    nq = B if target else total
    q = torch.randn(nq, H * dh, requires_grad=True)
    k = torch.randn(total, H * dh, requires_grad=True)
    v = torch.randn(total, H * dh, requires_grad=True)
    do = torch.randn(nq, H * dh)
    sc = scale if scale > 0 else 1.0 / math.sqrt(dh)
    o, lse = attention(q, k, v, H, dh, offsets, sc, causal, target)
    (o * do).sum().backward()
    tensors[pfx + "_offsets"] = torch.tensor(offsets, dtype=torch.int64)
    for name, t in (("q", q), ("k", k), ("v", v), ("do", do), ("o", o), ("lse", lse),
                    ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        tensors[pfx + "_" + name] = t.detach().float().contiguous()


def main():
    torch.manual_seed(20240601)
    tensors = {}
    lens = [0, 1, 5, 70, 3, 65]
    make_case(tensors, "self_d8_causal", lens, 2, 8, 0.3, True, False)
    make_case(tensors, "self_d32", [1, 65, 0, 7], 2, 32, 0.0, False, False)
    make_case(tensors, "target_d8", lens, 2, 8, 0.0, False, True)
    n = write_safetensors(OUT, tensors, {"generator": "tools/make_golden_jattn.py",
                                         "torch": torch.__version__})
    print(f"wrote {OUT} ({n} bytes)")


if __name__ == "__main__":
    main()
