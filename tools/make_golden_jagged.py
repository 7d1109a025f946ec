#!/usr/bin/python3
"""make_golden_jagged.py - PyTorch reference file for ember's jagged ops.

Run from anywhere with the system Python that has PyTorch:

    /usr/bin/python3 tools/make_golden_jagged.py

It writes tests/golden/jagged.safetensors (deterministic: torch.manual_seed(7),
float32), read by tests/test_nn_jagged.c. One batch of B = 8 sequences with lengths
5, 0, 1, 70, 7, 0, 33, 2 (empty, single-row, and longer than max_len = 40, so the
padded conversions truncate; 70 and 33 also cross the sgemm threshold of the jagged x
jagged matmul) is pushed through every op. The references use plain PyTorch, per
sample (slices of the flat values tensor) or padded; gradients come from autograd
with random upstream gradients stored in the file.

Layout (include/ember/jagged.h): values (total_len, D) row-major, offsets int64
(B + 1); the per-sample Q_b K_b^T blocks are stored back to back, block b at
block_offsets[b] = sum_{c<b} L_c^2.

Tensors (T = total_len = 118, D = 12, ML = 40):
  offsets I64 (B+1), block_offsets I64 (B+1)
  tp_x (T,D) -> tp_out (B,ML,D) [pad -1.5, truncate]; tp_dout -> tp_dx
  pj_x (B,ML,D) -> pj_out (T,D) [rows past ML are 0]; pj_dout -> pj_dx
  pool_x (T,D) -> sum_out, mean_out (B,D); sum_dout/mean_dout -> sum_dx/mean_dx
  sm_x (T,D) -> sm_out (softmax along each sequence, per column); sm_dout -> sm_dx
  jd_x (T,K=12) @ jd_W (K,N=10) -> jd_out (T,N); jd_dout -> jd_dx, jd_dW
  jj_q, jj_k (T,D) -> jj_s (sum L^2); jj_ds -> jj_dq, jj_dk
"""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from make_golden import write_safetensors  # noqa: E402  (the shared hand-written writer)

LENGTHS = [5, 0, 1, 70, 7, 0, 33, 2]
D, ML, PAD, K, N = 12, 40, -1.5, 12, 10


def seqs(x, offs):
    return [x[offs[b]:offs[b + 1]] for b in range(len(offs) - 1)]


def main():
    torch.manual_seed(7)
    B = len(LENGTHS)
    offs = [0]
    for L in LENGTHS:
        offs.append(offs[-1] + L)
    T = offs[-1]
    boffs = [0]
    for L in LENGTHS:
        boffs.append(boffs[-1] + L * L)
    t = {"offsets": torch.tensor(offs, dtype=torch.int64),
         "block_offsets": torch.tensor(boffs, dtype=torch.int64)}

    # jagged -> padded (truncating): padded[b, :min(L, ML)] = x_b, pad elsewhere
    x = torch.randn(T, D, requires_grad=True)
    rows = []
    for xb in seqs(x, offs):
        keep = xb[:ML]
        fill = torch.full((ML - keep.shape[0], D), PAD)
        rows.append(torch.cat([keep, fill], 0))
    out = torch.stack(rows)
    dout = torch.randn_like(out)
    out.backward(dout)
    t.update(tp_x=x, tp_out=out, tp_dout=dout, tp_dx=x.grad)

    # padded -> jagged (truncating): rows past ML become 0
    p = torch.randn(B, ML, D, requires_grad=True)
    parts = []
    for b, L in enumerate(LENGTHS):
        keep = min(L, ML)
        parts.append(p[b, :keep])
        parts.append(torch.zeros(L - keep, D))
    out = torch.cat(parts, 0)
    dout = torch.randn_like(out)
    out.backward(dout)
    t.update(pj_x=p, pj_out=out, pj_dout=dout, pj_dx=p.grad)

    # sum / mean pooling, via a padded tensor and a mask (empty -> 0)
    x = torch.randn(T, D)
    mask = torch.zeros(B, ML + 100, 1)
    for b, L in enumerate(LENGTHS):
        mask[b, :L] = 1
    t["pool_x"] = x
    for mode in ("sum", "mean"):
        xv = x.clone().requires_grad_(True)
        padded = torch.zeros(B, ML + 100, D)
        idx = torch.cat([torch.arange(L) + b * (ML + 100) for b, L in enumerate(LENGTHS)])
        padded = padded.reshape(-1, D).index_copy(0, idx, xv).reshape(B, ML + 100, D)
        s = (padded * mask).sum(1)
        if mode == "mean":
            lens = torch.tensor(LENGTHS, dtype=torch.float32).clamp(min=1).unsqueeze(1)
            s = s / lens
        dout = torch.randn_like(s)
        s.backward(dout)
        t.update({f"{mode}_out": s, f"{mode}_dout": dout, f"{mode}_dx": xv.grad})

    # softmax along each sequence, independently per column
    x = (3 * torch.randn(T, D)).requires_grad_(True)
    out = torch.cat([torch.softmax(xb, dim=0) for xb in seqs(x, offs)], 0)
    dout = torch.randn_like(out)
    out.backward(dout)
    t.update(sm_x=x, sm_out=out, sm_dout=dout, sm_dx=x.grad)

    # jagged x dense
    x = torch.randn(T, K, requires_grad=True)
    W = torch.randn(K, N, requires_grad=True)
    out = x @ W
    dout = torch.randn_like(out)
    out.backward(dout)
    t.update(jd_x=x, jd_W=W, jd_out=out, jd_dout=dout, jd_dx=x.grad, jd_dW=W.grad)

    # per-sample jagged x jagged: S_b = Q_b K_b^T, flattened back to back
    q = torch.randn(T, D, requires_grad=True)
    k = torch.randn(T, D, requires_grad=True)
    blocks = [(qb @ kb.t()).reshape(-1) for qb, kb in zip(seqs(q, offs), seqs(k, offs))]
    s = torch.cat(blocks)
    ds = torch.randn_like(s)
    s.backward(ds)
    t.update(jj_q=q, jj_k=k, jj_s=s, jj_ds=ds, jj_dq=q.grad, jj_dk=k.grad)

    path = os.path.join(ROOT, "tests", "golden", "jagged.safetensors")
    n = write_safetensors(path, t, {"generator": "tools/make_golden_jagged.py",
                                    "torch": torch.__version__})
    print(f"wrote {path} ({n} bytes)")


if __name__ == "__main__":
    main()
