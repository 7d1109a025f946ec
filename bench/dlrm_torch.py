#!/usr/bin/python3
"""dlrm_torch.py - the PyTorch peer that ember's benchmarks are measured against.

The same DLRM as ember (include/ember/dlrm.h), written as well as stock PyTorch on a
CPU allows:

  dense (B, 13) -> bottom MLP (ReLU after every layer) -> x (B, D)
  one nn.EmbeddingBag(rows, D, mode="sum", sparse=True) per table -> (B, T, D)
  dot interaction: [x, strict lower triangle of Gram([x, e_0..e_{T-1}])]
  top MLP (ReLU after all but the last layer) -> logit; BCEWithLogitsLoss (mean)

DLRM's initialisation: weights N(0, sqrt(2/(in+out))), biases N(0, sqrt(1/out)),
tables U(-sqrt(1/rows), sqrt(1/rows)).

Optimizers. Embedding tables get sparse (COO) gradients, so only the touched rows are
updated, as in ember's fused backward:
  sgd              torch.optim.SGD over all parameters (sparse grads supported)
  adagrad          torch.optim.Adagrad over all parameters (sparse grads supported)
  rowwise_adagrad  FBGEMM's row-wise AdaGrad for the tables, written by hand on the
                   coalesced sparse gradient (m[r] += mean_d g^2; w[r] -= lr g/(sqrt(m)+eps)),
                   plus torch.optim.Adagrad for the dense parameters
The dense parameters sit in their own param group using the multi-tensor (foreach)
kernels; the sparse group uses the per-tensor path, the only one that takes sparse grads.

Sub-commands:
  speed    synthetic data preloaded as tensors; times only the training loop (forward,
           loss, backward, optimizer steps) after warmup; prints one JSON line.
  infer    inference only (model.eval(), torch.inference_mode()) on synthetic batches
           preloaded as tensors, the same shapes as `speed`; each forward call is timed
           alone: examples/s over the timed calls, ms per batch and per-call latency
           percentiles (the figure that matters at --batch 1). Small batches cycle
           through more distinct batches (about 64k ids per table, 8 to 4096 batches,
           as `ember bench --infer`) so the embedding rows read are not all cache-hot.
  quality  trains one epoch on a Criteo TSV in file order, evaluates on another TSV;
           prints one JSON line with AUC, logloss and normalised entropy. Parsing is
           vectorised numpy over whole blocks of lines and not timed (parse_s);
           train_s covers the epoch loop, including slicing each batch's tensors out
           of the parsed arrays. Malformed lines are skipped and counted.

Threads: --threads N (default 2) sets OMP/OpenBLAS/MKL thread counts BEFORE torch is
imported (they are read once at load time), and torch.set_num_threads(N).
OMP_WAIT_POLICY defaults to PASSIVE so idle OpenMP workers do not spin against the
process's other threads.

Examples:
  /usr/bin/python3 bench/dlrm_torch.py speed --config kaggle --batch 2048 --opt sgd
  /usr/bin/python3 bench/dlrm_torch.py infer --config kaggle --batch 1 --steps 5000
  /usr/bin/python3 bench/dlrm_torch.py quality --train train.tsv --test test.tsv \
      --batch 128 --lr 0.1 --opt sgd --rows-cap 1000000
"""

import os
import sys


def _threads_from_argv(argv):
    """--threads must be known before torch is imported, so read it from argv here;
    argparse validates it again later."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return "2"


_THREADS = _threads_from_argv(sys.argv[1:])
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["OMP_NUM_THREADS"] = _THREADS
os.environ["OPENBLAS_NUM_THREADS"] = _THREADS
os.environ["MKL_NUM_THREADS"] = _THREADS


def _tune_malloc():
    """Keep freed memory in the process, as a long-running trainer or server would.
    glibc's malloc returns every freed block above its (adaptive) mmap threshold to the
    OS and trims the top of its heap, so a loop that allocates and frees the same
    multi-megabyte activations every step takes fresh zeroed pages, i.e. page faults,
    on every step. On a VM where page faults are costly that made PyTorch's inference
    at batch 2048 5x slower (24k against 124-134k examples/s on the same machine) and
    its training up to 2x slower. mallopt: mmap only above 32 MiB (the maximum), never
    trim, 256 MiB of top pad. --malloc glibc keeps glibc's defaults."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1) \
        and libc.mallopt(M_TOP_PAD, 256 << 20)
    if not ok:
        sys.exit("dlrm_torch.py: mallopt failed")


if "--malloc=glibc" not in sys.argv[1:] and not any(
        a == "--malloc" and i + 1 < len(sys.argv) - 1 and sys.argv[i + 2] == "glibc" for i, a in enumerate(sys.argv[1:])):
    _tune_malloc()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

KAGGLE_CARDINALITIES = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683,
                        8351593, 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18,
                        15, 286181, 105, 142572]
NUM_DENSE, NUM_SPARSE = 13, 26

CONFIGS = {
    # Criteo Kaggle: one id per bag, D=16
    "kaggle": dict(rows=KAGGLE_CARDINALITIES, dim=16, bot=[13, 512, 256, 64, 16],
                   top=[367, 512, 256, 1], bag=1),
    # embedding-heavy: 26 x 100k rows, D=64, 20 ids per bag
    "embheavy": dict(rows=[100_000] * 26, dim=64, bot=[13, 512, 256, 64],
                     top=[415, 512, 256, 1], bag=20),
}


# ---------------------------------------------------------------------- model

class DLRM(nn.Module):
    def __init__(self, rows, dim, bot, top):
        super().__init__()
        T = len(rows)
        if bot[-1] != dim:
            raise ValueError(f"bottom MLP must end at D={dim}")
        if top[0] != dim + T * (T + 1) // 2 or top[-1] != 1:
            raise ValueError(f"top MLP must be {dim + T * (T + 1) // 2}-...-1")
        layers = []
        for a, b in zip(bot[:-1], bot[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.bot = nn.Sequential(*layers)
        layers = []
        for i, (a, b) in enumerate(zip(top[:-1], top[1:])):
            layers.append(nn.Linear(a, b))
            if i + 2 < len(top):
                layers.append(nn.ReLU())
        self.top = nn.Sequential(*layers)
        self.emb = nn.ModuleList(nn.EmbeddingBag(r, dim, mode="sum", sparse=True) for r in rows)
        # flat positions of the strictly-lower triangle (row by row) in a (T+1)^2 Gram
        li, lj = torch.tril_indices(T + 1, T + 1, offset=-1)
        self.register_buffer("tril_flat", li * (T + 1) + lj, persistent=False)
        self._dlrm_init()

    @torch.no_grad()
    def _dlrm_init(self):
        for m in list(self.bot) + list(self.top):
            if isinstance(m, nn.Linear):
                fo, fi = m.weight.shape
                m.weight.normal_(0.0, math.sqrt(2.0 / (fi + fo)))
                m.bias.normal_(0.0, math.sqrt(1.0 / fo))
        for e in self.emb:
            a = math.sqrt(1.0 / e.num_embeddings)
            e.weight.uniform_(-a, a)

    def forward(self, dense, indices, offsets):
        """dense (B, 13); indices[t], offsets[t]: table t's bags (offsets = bag starts)."""
        x = self.bot(dense)
        pooled = [e(i, o) for e, i, o in zip(self.emb, indices, offsets)]
        T = torch.stack([x] + pooled, dim=1)                       # (B, T+1, D)
        Z = torch.bmm(T, T.transpose(1, 2)).flatten(1)             # (B, (T+1)^2)
        R = torch.cat([x, Z.index_select(1, self.tril_flat)], 1)   # (B, D + T(T+1)/2)
        return self.top(R).squeeze(1)

    def dense_params(self):
        return list(self.bot.parameters()) + list(self.top.parameters())

    def emb_params(self):
        return [e.weight for e in self.emb]


class RowwiseAdagrad:
    """FBGEMM's row-wise AdaGrad on sparse table gradients: one fp32 accumulator per
    row, m[r] += mean_d(g_r^2), w_r -= lr * g_r / (sqrt(m[r]) + eps), touched rows only."""

    def __init__(self, params, lr, eps=1e-10):
        self.params, self.lr, self.eps = params, lr, eps
        self.state = [torch.zeros(p.shape[0], dtype=p.dtype) for p in params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for p, m in zip(self.params, self.state):
            if p.grad is None:
                continue
            g = p.grad.coalesce()  # one entry per touched row: the update is non-linear
            rows, vals = g.indices()[0], g.values()
            if rows.numel() == 0:
                continue
            m.index_add_(0, rows, vals.square().mean(dim=1))
            denom = m.index_select(0, rows).sqrt_().add_(self.eps).unsqueeze(1)
            # rows are unique: gather, update, scatter back (2x faster than a 2-D
            # index_add_, which CPU PyTorch runs one row at a time)
            p.index_copy_(0, rows, p.index_select(0, rows).addcdiv_(vals, denom, value=-self.lr))


def make_optimizers(model, opt, lr):
    """Optimizers to step every iteration (each has zero_grad/step)."""
    dense, emb = model.dense_params(), model.emb_params()
    if opt == "sgd":
        return [torch.optim.SGD([{"params": dense, "foreach": True},
                                 {"params": emb, "foreach": False}], lr=lr)]
    if opt == "adagrad":
        return [torch.optim.Adagrad([{"params": dense, "foreach": True},
                                     {"params": emb, "foreach": False}], lr=lr)]
    if opt == "rowwise_adagrad":
        return [torch.optim.Adagrad(dense, lr=lr, foreach=True), RowwiseAdagrad(emb, lr)]
    raise ValueError(f"unknown optimizer {opt}")


def train_step(model, loss_fn, opts, dense, label, indices, offsets):
    for o in opts:
        o.zero_grad(set_to_none=True) if isinstance(o, torch.optim.Optimizer) else o.zero_grad()
    loss = loss_fn(model(dense, indices, offsets), label)
    loss.backward()
    for o in opts:
        o.step()
    return loss


# ---------------------------------------------------------------------- speed

def synthetic_batches(cfg, B, n, gen):
    rows, bag = cfg["rows"], cfg["bag"]
    out = []
    offs = torch.arange(0, B * bag, bag, dtype=torch.int64)
    for _ in range(n):
        dense = torch.log1p(torch.rand(B, NUM_DENSE, generator=gen) * 100.0)
        label = (torch.rand(B, generator=gen) < 0.25).float()
        idx = [torch.randint(0, r, (B * bag,), generator=gen, dtype=torch.int64) for r in rows]
        out.append((dense, label, idx, [offs] * len(rows)))
    return out


def cmd_speed(args):
    cfg = CONFIGS[args.config]
    torch.manual_seed(args.seed)
    model = DLRM(cfg["rows"], cfg["dim"], cfg["bot"], cfg["top"])
    lr = args.lr if args.lr is not None else (0.1 if args.opt == "sgd" else 0.01)
    opts = make_optimizers(model, args.opt, lr)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = synthetic_batches(cfg, args.batch, min(args.steps + args.warmup, args.distinct), gen)
    for k in range(args.warmup):
        train_step(model, loss_fn, opts, *batches[k % len(batches)])
    t0 = time.perf_counter()
    for k in range(args.steps):
        train_step(model, loss_fn, opts, *batches[(args.warmup + k) % len(batches)])
    dt = time.perf_counter() - t0
    print(json.dumps({"config": args.config, "batch": args.batch, "opt": args.opt,
                      "threads": args.threads, "examples_per_s": args.batch * args.steps / dt,
                      "ms_per_step": 1000.0 * dt / args.steps, "steps": args.steps}), flush=True)


def _pct(xs, q):
    """Nearest-rank percentile q in [0, 1] of the sorted list xs."""
    k = max(0, min(len(xs) - 1, math.ceil(q * len(xs)) - 1))
    return xs[k]


def cmd_infer(args):
    cfg = CONFIGS[args.config]
    B = args.batch
    steps = args.steps if args.steps is not None else (50 if B >= 2000 else 20000 if B <= 5 else 100000 // B)
    warmup = args.warmup if args.warmup is not None else (5 if steps < 100 else steps // 20)
    ids = B * cfg["bag"]
    distinct = args.distinct if args.distinct is not None else (8 if ids >= 8192 else min(4096, 65536 // ids))
    torch.manual_seed(args.seed)
    model = DLRM(cfg["rows"], cfg["dim"], cfg["bot"], cfg["top"])
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = synthetic_batches(cfg, B, min(steps + warmup, distinct), gen)
    times = []
    check = 0.0
    with torch.inference_mode():
        for k in range(warmup + steps):
            dense, _, idx, offs = batches[k % len(batches)]
            t0 = time.perf_counter()
            out = model(dense, idx, offs)
            t1 = time.perf_counter()
            if k >= warmup:
                times.append(t1 - t0)
            check += float(out[0])
    total = sum(times)
    times.sort()
    print(json.dumps({"config": args.config, "mode": "infer", "batch": B, "threads": args.threads,
                      "steps": steps, "distinct_batches": len(batches),
                      "examples_per_s": B * steps / total, "ms_per_batch": 1000.0 * total / steps,
                      "us_p50": 1e6 * _pct(times, 0.5), "us_p90": 1e6 * _pct(times, 0.9),
                      "us_p99": 1e6 * _pct(times, 0.99), "us_min": 1e6 * times[0],
                      "us_max": 1e6 * times[-1], "checksum": check}), flush=True)


# -------------------------------------------------------------------- quality

_DIGIT = np.full(256, 255, dtype=np.uint8)
_DIGIT[ord("0"):ord("9") + 1] = np.arange(10)
_HEX = _DIGIT.copy()
_HEX[ord("a"):ord("f") + 1] = np.arange(10, 16)
_HEX[ord("A"):ord("F") + 1] = np.arange(10, 16)


def _parse_block(a, rows_u64):
    """Parse whole Criteo lines held in the uint8 array `a` (each line ends with '\\n').
    Returns (label f32 (N), dense f32 (N,13), cat int32 (N,26) reduced, -1 = missing,
    number of malformed lines skipped). Fully vectorised: per field we only keep start
    and end offsets and run Horner's rule column-wise over character positions."""
    nf = 1 + NUM_DENSE + NUM_SPARSE
    nl = np.flatnonzero(a == 10)
    if nl.size == 0:
        return (np.zeros(0, np.float32), np.zeros((0, NUM_DENSE), np.float32),
                np.zeros((0, NUM_SPARSE), np.int32), 0)
    line_lo = np.concatenate(([0], nl[:-1] + 1))
    line_hi = nl - (a[np.maximum(nl - 1, 0)] == 13) * (nl > line_lo)  # strip '\r'
    tabs = np.flatnonzero(a == 9)
    t0 = np.searchsorted(tabs, line_lo)
    ntabs = np.searchsorted(tabs, nl) - t0
    good = ntabs == nf - 1
    bad = int((~good).sum())
    line_lo, line_hi, t0 = line_lo[good], line_hi[good], t0[good]
    n = line_lo.size
    tab = tabs[t0[:, None] + np.arange(nf - 1)]                    # (n, 39)
    lo = np.concatenate([line_lo[:, None], tab + 1], axis=1)       # field starts
    hi = np.concatenate([tab, line_hi[:, None]], axis=1)           # field ends
    width = hi - lo
    ok = np.ones(n, dtype=bool)
    last = a.size - 1

    # label: exactly one digit 0/1
    lab_c = a[np.minimum(lo[:, 0], last)]
    ok &= (width[:, 0] == 1) & ((lab_c == 48) | (lab_c == 49))
    label = (lab_c == 49).astype(np.float32)

    # dense integers with an optional leading '-'; empty = missing -> 0
    dlo, dw = lo[:, 1:1 + NUM_DENSE], width[:, 1:1 + NUM_DENSE]
    neg = (dw > 0) & (a[np.minimum(dlo, last)] == ord("-"))
    dlo, dw = dlo + neg, dw - neg
    ok &= ~((neg & (dw == 0)).any(axis=1)) & (dw <= 18).all(axis=1)
    val = np.zeros(dlo.shape, dtype=np.int64)
    for p in range(int(min(dw.max(initial=0), 18))):
        on = p < dw
        d = _DIGIT[a[np.minimum(dlo + p, last)]]
        ok &= ~(on & (d == 255)).any(axis=1)
        val = np.where(on, val * 10 + d.astype(np.int64), val)
    val = np.where(neg, -val, val)
    dense = np.log1p(np.maximum(val, 0).astype(np.float64)).astype(np.float32)

    # categoricals: 1..16 hex digits -> u64 -> mod rows; empty -> -1 (empty bag)
    clo, cw = lo[:, 1 + NUM_DENSE:], width[:, 1 + NUM_DENSE:]
    ok &= (cw <= 16).all(axis=1)
    h = np.zeros(clo.shape, dtype=np.uint64)
    for p in range(int(min(cw.max(initial=0), 16))):
        on = p < cw
        d = _HEX[a[np.minimum(clo + p, last)]]
        ok &= ~(on & (d == 255)).any(axis=1)
        h = np.where(on, (h << np.uint64(4)) | d.astype(np.uint64), h)
    cat = (h % rows_u64[None, :]).astype(np.int32)  # rows < 2^31: half the memory
    cat[cw == 0] = -1

    bad += int((~ok).sum())
    return label[ok], dense[ok], cat[ok], bad


def read_criteo(path, rows, block_bytes=64 << 20):
    """Read a whole Criteo TSV into arrays (label, dense, cat, malformed), in blocks of
    whole lines so memory stays near the size of the parsed arrays."""
    if max(rows) >= 2**31:
        raise SystemExit("table rows must be < 2^31")
    rows_u64 = np.asarray(rows, dtype=np.uint64)
    parts, bad, rest = [], 0, b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block_bytes)
            buf = rest + chunk
            if not chunk:
                if buf and not buf.endswith(b"\n"):
                    buf += b"\n"
                rest = b""
            else:
                cut = buf.rfind(b"\n") + 1
                buf, rest = buf[:cut], buf[cut:]
            if buf:
                lab, den, cat, nb = _parse_block(np.frombuffer(buf, dtype=np.uint8), rows_u64)
                parts.append((lab, den, cat))
                bad += nb
            if not chunk:
                break
    if not parts:
        return (np.zeros(0, np.float32), np.zeros((0, NUM_DENSE), np.float32),
                np.zeros((0, NUM_SPARSE), np.int32), bad)
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]), bad)


def make_batch(label, dense, cat, lo, hi):
    """Tensors for examples [lo, hi): per table the present ids and bag starts."""
    c = cat[lo:hi].T                      # (26, b): table-major
    present = c >= 0
    counts = present.sum(axis=1)
    starts = np.cumsum(present, axis=1) - present   # bag start within its table
    ids = c[present].astype(np.int64)     # table-major concatenation
    split = np.cumsum(counts)[:-1]
    idx = [torch.from_numpy(x) for x in np.split(ids, split)]
    offs = [torch.from_numpy(np.ascontiguousarray(s, dtype=np.int64)) for s in starts]
    return (torch.from_numpy(dense[lo:hi]), torch.from_numpy(label[lo:hi]), idx, offs)


def cmd_quality(args):
    card = [int(x) for x in args.cardinalities.split(",")]
    if len(card) != NUM_SPARSE:
        raise SystemExit(f"--cardinalities needs {NUM_SPARSE} values")
    rows = [min(c, args.rows_cap) if args.rows_cap > 0 else c for c in card]
    bot = [int(x) for x in args.bot.split("-")]
    top = [int(x) for x in args.top.split("-")]
    t0 = time.perf_counter()
    tr = read_criteo(args.train, rows)
    te = read_criteo(args.test, rows)
    parse_s = time.perf_counter() - t0

    torch.manual_seed(args.seed)
    model = DLRM(rows, args.dim, bot, top)
    opts = make_optimizers(model, args.opt, args.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    n_train = tr[0].size
    t0 = time.perf_counter()
    model.train()
    for lo in range(0, n_train, args.batch):
        train_step(model, loss_fn, opts, *make_batch(*tr[:3], lo, min(lo + args.batch, n_train)))
    train_s = time.perf_counter() - t0

    model.eval()
    n_test = te[0].size
    logits = []
    with torch.no_grad():
        for lo in range(0, n_test, 4096):
            d, _, i, o = make_batch(*te[:3], lo, min(lo + 4096, n_test))
            logits.append(model(d, i, o))
    z = torch.cat(logits) if logits else torch.zeros(0)
    y = torch.from_numpy(te[0])
    res = {"train": args.train, "test": args.test, "batch": args.batch, "lr": args.lr,
           "opt": args.opt, "threads": args.threads, "rows_cap": args.rows_cap,
           "train_examples": n_train, "test_examples": n_test,
           "malformed": tr[3] + te[3], "parse_s": round(parse_s, 3),
           "train_s": round(train_s, 3),
           "examples_per_s": n_train / train_s if train_s > 0 else None,
           "auc": None, "logloss": None, "ne": None}
    if n_test:
        logloss = F.binary_cross_entropy_with_logits(z.double(), y.double()).item()
        ctr = float(y.double().mean())
        res["logloss"] = logloss
        if 0.0 < ctr < 1.0:
            from sklearn.metrics import roc_auc_score
            res["auc"] = float(roc_auc_score(te[0], torch.sigmoid(z).numpy()))
            res["ne"] = logloss / -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
    print(json.dumps(res), flush=True)


# ----------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
        p.add_argument("--malloc", choices=("tuned", "glibc"), default="tuned",
                       help="tuned (default): keep freed memory (mallopt, see _tune_malloc); glibc: its defaults")
        p.add_argument("--batch", type=int, required=True)
        p.add_argument("--seed", type=int, default=0)

    sp = sub.add_parser("speed", help="training throughput on synthetic data")
    common(sp)
    sp.add_argument("--config", choices=sorted(CONFIGS), required=True)
    sp.add_argument("--opt", choices=["sgd", "adagrad", "rowwise_adagrad"], default="sgd")
    sp.add_argument("--steps", type=int, default=50)
    sp.add_argument("--warmup", type=int, default=5)
    sp.add_argument("--lr", type=float, default=None, help="default 0.1 (sgd) / 0.01")
    sp.add_argument("--distinct", type=int, default=32,
                    help="distinct preloaded batches, cycled (default 32)")

    ip = sub.add_parser("infer", help="inference throughput and per-call latency on synthetic data")
    common(ip)
    ip.add_argument("--config", choices=sorted(CONFIGS), required=True)
    ip.add_argument("--steps", type=int, default=None,
                    help="timed calls (default: 100k examples' worth, 50..20000)")
    ip.add_argument("--warmup", type=int, default=None, help="untimed calls first (default steps/20, >= 5)")
    ip.add_argument("--distinct", type=int, default=None,
                    help="distinct preloaded batches, cycled (default 65536/(batch*bag), 8..4096)")

    qp = sub.add_parser("quality", help="one epoch on a Criteo TSV, then AUC/logloss/NE")
    common(qp)
    qp.add_argument("--train", required=True)
    qp.add_argument("--test", required=True)
    qp.add_argument("--lr", type=float, default=0.1)
    qp.add_argument("--opt", choices=["sgd", "adagrad", "rowwise_adagrad"], default="sgd")
    qp.add_argument("--rows-cap", type=int, default=0, help="cap table rows (0 = none)")
    qp.add_argument("--cardinalities", default=",".join(map(str, KAGGLE_CARDINALITIES)))
    qp.add_argument("--dim", type=int, default=16)
    qp.add_argument("--bot", default="13-512-256-64-16")
    qp.add_argument("--top", default="367-512-256-1")

    args = ap.parse_args(argv)
    if args.threads < 1:
        raise SystemExit("--threads must be positive")
    if args.batch < 1:
        raise SystemExit("--batch must be positive")
    torch.set_num_threads(args.threads)
    if args.cmd == "speed":
        if args.steps < 1 or args.warmup < 0 or args.distinct < 1:
            raise SystemExit("--steps >= 1, --warmup >= 0, --distinct >= 1")
        cmd_speed(args)
    elif args.cmd == "infer":
        if (args.steps is not None and args.steps < 1) or (args.warmup is not None and args.warmup < 0) \
                or (args.distinct is not None and args.distinct < 1):
            raise SystemExit("--steps >= 1, --warmup >= 0, --distinct >= 1")
        cmd_infer(args)
    else:
        cmd_quality(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
