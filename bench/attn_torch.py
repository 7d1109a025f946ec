#!/usr/bin/env python3
"""bench/attn_torch.py - the PyTorch peer of `ember bench --workload jattn | attn_padded`:
padded dense self attention as PyTorch users write it for variable-length sequences
(pad to (B, H, Lmax, dh), scores = q @ k^T * scale, masked_fill of the key padding,
softmax, @ v, backward by autograd), forward + backward on the same lengths as ember
(read from the file `ember bench --workload jattn --dump-lengths FILE` writes).

Threads are set up as in the foundation benchmark (bench/dlrm_torch.py): --threads N
(default 2) sets OMP/OpenBLAS/MKL thread counts before torch is imported, with
OMP_WAIT_POLICY=PASSIVE, then torch.set_num_threads(N). Inputs are
padded leaf tensors created before timing (the padding itself is not timed, as for
ember's padded path). Each step: forward, loss = sum(out * dO) over real rows, backward.
Reports the median step time after warmup and the process's peak RSS (ru_maxrss), so
run one measurement per process. Prints one JSON line.
Run with /usr/bin/python3 (Debian's python3-torch).
"""
import os
import sys


def _threads_from_argv(argv):
    """--threads must be known before torch is imported (OpenMP/OpenBLAS read their
    thread counts once at load time); argparse validates it again later."""
    for i, x in enumerate(argv):
        if x == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if x.startswith("--threads="):
            return x.split("=", 1)[1]
    return "2"


_THREADS = _threads_from_argv(sys.argv[1:])
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = _THREADS

import argparse
import json
import resource
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", required=True, help="one sequence length per line (ember --dump-lengths)")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=0, help="pad to this (default: the longest length)")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    with open(a.lengths) as f:
        lens = [int(x) for x in f.read().split()]
    B, H, dh = len(lens), a.heads, a.head_dim
    Lmax = max(a.max_len, max(lens))
    lengths = torch.tensor(lens)
    valid = torch.arange(Lmax)[None, :] < lengths[:, None]  # (B, Lmax) real rows
    key_pad = ~valid[:, None, None, :]  # (B, 1, 1, Lmax): keys to mask
    if a.causal:
        key_pad = key_pad | torch.ones(Lmax, Lmax, dtype=torch.bool).triu(1)[None, None]
    qmask = valid[:, None, :, None].float()  # loss only over real query rows
    q, k, v, do = (torch.randn(B, H, Lmax, dh) * qmask for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    scale = dh ** -0.5

    def step():
        scores = (q @ k.transpose(-2, -1)) * scale
        scores = scores.masked_fill(key_pad, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        out = p @ v
        loss = (out * do).sum()
        for x in (q, k, v):
            x.grad = None
        loss.backward()
        return out

    times = []
    for s in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        out = step()
        t1 = time.perf_counter()
        if s >= a.warmup:
            times.append(t1 - t0)
    pairs = sum((L * (L + 1) // 2) if a.causal else L * L for L in lens)
    useful = 4.0 * dh * H * pairs * 3.5  # forward 4*dh*H*pairs, backward 2.5x (ember's convention)
    med = statistics.median(times)
    print(json.dumps({
        "workload": "torch_padded", "batch": B, "heads": H, "head_dim": dh, "max_len": Lmax,
        "causal": int(a.causal), "threads": a.threads, "torch": torch.__version__, "steps": a.steps,
        "ms_per_step": round(1e3 * med, 3), "ms_best": round(1e3 * min(times), 3),
        "useful_gflop": round(useful / 1e9, 4), "useful_gflops": round(useful / 1e9 / med, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "checksum": float(out[valid[:, None, :].expand(B, H, Lmax)].sum()),
    }))


if __name__ == "__main__":
    main()
