#!/usr/bin/python3
"""make_golden.py - PyTorch reference ("golden") files for ember's tests.

Run from the repository root with the system Python that has PyTorch:

    /usr/bin/python3 tools/make_golden.py

It writes, deterministically (fixed torch.manual_seed per section, float32):

  tests/golden/layers.safetensors   linear, relu, sigmoid, dot interaction, BCE with
                                    logits and table-batched embedding bags (sum, mean,
                                    weighted sum): inputs, outputs, autograd gradients
  tests/golden/optim.safetensors    10-step trajectories of the dense optimizers
                                    (SGD+wd, Adagrad, Adam, AdamW) and of the sparse
                                    ones applied through embedding bags (SGD, Adagrad,
                                    row-wise AdaGrad)
  tests/golden/dlrm.safetensors     a small DLRM: batch, parameters, logits, loss,
                                    interaction and every parameter gradient
  tests/golden/dlrm_train_<dense>_<sparse>.safetensors
                                    10 training steps of the same model per optimizer pair

Tests never need PyTorch: the generated files are committed. The files are written in
the safetensors layout by hand (no safetensors package): u64 LE header length, a JSON
header padded with spaces to a multiple of 8, then raw little-endian data (see
include/ember/safetensors.h).

Embedding bags use ember's (FBGEMM's) table-batched layout: for table t and example b
the bag is indices[offsets[t*B+b] : offsets[t*B+b+1]], offsets has T*B+1 entries and
the pooled output is (B, T, D). The reference computes each table with
F.embedding_bag on its slice, so PyTorch's own kernels define the expected values.
"""

import json
import math
import os
import struct
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "tests", "golden")

# ----------------------------------------------------------------- file writer

_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
}


def _as_array(v):
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    a = np.asarray(v)
    if a.dtype not in _DTYPES:
        raise TypeError(f"unsupported dtype {a.dtype}")
    # np.array, not np.ascontiguousarray: the latter turns 0-d scalars into shape [1]
    return np.array(a, dtype=a.dtype.newbyteorder("<"), order="C", copy=True)


def write_safetensors(path, tensors, metadata):
    """tensors: dict name -> array/tensor (insertion order kept); metadata: str -> str."""
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    # Tensors are packed without gaps, so 8-byte dtypes go first (stable otherwise):
    # every tensor then starts at a multiple of its element size, and readers that
    # load the file into aligned memory can use the data in place (as the safetensors
    # library itself orders them).
    arrays = sorted(((n, _as_array(v)) for n, v in tensors.items()),
                    key=lambda kv: -kv[1].dtype.itemsize)
    blobs, off = [], 0
    for name, a in arrays:
        raw = a.tobytes()
        header[name] = {"dtype": _DTYPES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((-len(h)) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for raw in blobs:
            f.write(raw)
    os.replace(tmp, path)
    return 8 + len(h) + off


# --------------------------------------------------------------- shared pieces

def dot_interact(x, emb):
    """x (B, D), emb (B, F, D) -> (B, D + F(F+1)/2): [x, strict lower tri of Gram]."""
    T = torch.cat([x.unsqueeze(1), emb], dim=1)  # (B, F+1, D)
    Z = torch.bmm(T, T.transpose(1, 2))           # (B, F+1, F+1)
    n = T.shape[1]
    li, lj = torch.tril_indices(n, n, offset=-1)
    return torch.cat([x, Z[:, li, lj]], dim=1)


def random_bags(gen_lengths, rows, B):
    """Table-batched bags: lengths[t][b] ids drawn uniformly from rows[t].
    Returns (indices I64, offsets I64 of length T*B+1)."""
    idx, offs = [], [0]
    for t, r in enumerate(rows):
        for b in range(B):
            n = int(gen_lengths[t][b])
            ids = torch.randint(0, r, (n,), dtype=torch.int64)
            idx.append(ids)
            offs.append(offs[-1] + n)
    indices = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
    return indices, torch.tensor(offs, dtype=torch.int64)


def embbag_tables(weights, indices, offsets, B, mode, psw=None, sparse=False):
    """Pool every table's bags with F.embedding_bag; returns (B, T, D). sparse=True
    gives the tables sparse (COO) gradients, as nn.EmbeddingBag(sparse=True) does."""
    outs = []
    for t, W in enumerate(weights):
        lo, hi = int(offsets[t * B]), int(offsets[(t + 1) * B])
        off_t = offsets[t * B:(t + 1) * B + 1] - lo
        w_t = None if psw is None else psw[lo:hi]
        outs.append(F.embedding_bag(indices[lo:hi], W, off_t, mode=mode,
                                    per_sample_weights=w_t, include_last_offset=True,
                                    sparse=sparse))
    return torch.stack(outs, dim=1)


def randn(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float32) * scale


# ------------------------------------------------------------------ 1. layers

def make_layers():
    torch.manual_seed(1)
    t = {}

    # linear: y = x W^T + b
    B, I, O = 5, 7, 3
    x = randn(B, I).requires_grad_()
    lin = nn.Linear(I, O)
    y = lin(x)
    dy = randn(B, O)
    y.backward(dy)
    t.update({"linear.x": x, "linear.W": lin.weight, "linear.b": lin.bias, "linear.y": y,
              "linear.dy": dy, "linear.dx": x.grad, "linear.dW": lin.weight.grad,
              "linear.db": lin.bias.grad})

    # relu (values kept away from 0, where the subgradient is a convention)
    x = randn(4, 6)
    x = torch.where(x.abs() < 0.05, torch.full_like(x, 0.5), x).requires_grad_()
    y = torch.relu(x)
    dy = randn(4, 6)
    y.backward(dy)
    t.update({"relu.x": x, "relu.y": y, "relu.dy": dy, "relu.dx": x.grad})

    # sigmoid, including saturated inputs (stability: no NaN/inf, exact 0/1 limits)
    x = torch.cat([randn(20, scale=3.0), torch.tensor([-90.0, -30.0, 30.0, 90.0])])
    x = x.requires_grad_()
    y = torch.sigmoid(x)
    dy = randn(24)
    y.backward(dy)
    t.update({"sigmoid.x": x, "sigmoid.y": y, "sigmoid.dy": dy, "sigmoid.dx": x.grad})

    # dot interaction
    B, Fn, D = 3, 4, 5
    x = randn(B, D).requires_grad_()
    emb = randn(B, Fn, D).requires_grad_()
    out = dot_interact(x, emb)
    dout = randn(*out.shape)
    out.backward(dout)
    t.update({"interact.x": x, "interact.emb": emb, "interact.out": out,
              "interact.dout": dout, "interact.dx": x.grad, "interact.demb": emb.grad})

    # BCE with logits, mean reduction (includes large |z| for stability)
    z = torch.cat([randn(12, scale=2.0), torch.tensor([-40.0, 25.0, 60.0, -0.0])])
    z = z.requires_grad_()
    yl = (torch.rand(16) < 0.5).float()
    yl[12], yl[13], yl[14] = 1.0, 0.0, 1.0  # -40 with y=1 and 25 with y=0: large losses
    loss = F.binary_cross_entropy_with_logits(z, yl, reduction="mean")
    loss.backward()
    t.update({"bce.logits": z, "bce.labels": yl, "bce.loss": loss.detach().reshape(()),
              "bce.dlogit": z.grad})

    # table-batched embedding bags
    rows, D, B = [6, 4, 9], 5, 4
    lengths = [[0, 3, 1, 2], [2, 0, 3, 3], [1, 3, 0, 2]]
    indices, offsets = random_bags(lengths, rows, B)
    # guarantee duplicates inside a bag and across bags of one table
    s = int(offsets[1])                         # table 0, example 1 (3 ids)
    indices[s + 1] = indices[s]
    s2 = int(offsets[1 * B + 2])                # table 1, example 2 (3 ids)
    indices[s2:s2 + 3] = torch.tensor([2, 2, 2])
    s3 = int(offsets[1 * B + 3])                # table 1, example 3 shares row 2
    indices[s3] = 2
    W0 = [randn(r, D) for r in rows]
    psw = randn(indices.numel())
    dout = randn(B, len(rows), D)
    t["embbag.rows"] = torch.tensor(rows, dtype=torch.int64)
    for i, W in enumerate(W0):
        t[f"embbag.W.{i}"] = W
    t["embbag.indices"] = indices
    t["embbag.offsets"] = offsets
    t["embbag.per_sample_weights"] = psw
    t["embbag.dout"] = dout
    for mode, name, use_w in (("sum", "sum", False), ("mean", "mean", False),
                              ("sum", "weighted", True)):
        Ws = [W.clone().requires_grad_() for W in W0]
        p = psw.clone().requires_grad_() if use_w else None
        out = embbag_tables(Ws, indices, offsets, B, mode, p)
        out.backward(dout)
        t[f"embbag.{name}.out"] = out
        for i, W in enumerate(Ws):
            t[f"embbag.{name}.dW.{i}"] = W.grad
        if use_w:
            t[f"embbag.{name}.dpsw"] = p.grad

    meta = {"generator": "tools/make_golden.py", "torch": torch.__version__,
            "linear": "B=5,I=7,O=3", "interact": "B=3,F=4,D=5",
            "embbag": "T=3,rows=6,4,9,D=5,B=4"}
    return t, meta


# ------------------------------------------------------------------- 2. optim

def rowwise_adagrad_step(W, state, grad, lr, eps):
    """FBGEMM's row-wise AdaGrad on a sparse (COO) gradient of W (rows, D):
    m[r] += mean_d(g_r^2); w_r -= lr * g_r / (sqrt(m[r]) + eps), touched rows only."""
    g = grad.coalesce()
    rows = g.indices()[0]
    vals = g.values()
    state.index_add_(0, rows, (vals * vals).mean(dim=1))
    denom = state[rows].sqrt() + eps
    W.index_add_(0, rows, -lr * vals / denom.unsqueeze(1))


def drop_empty_sparse_grads(params):
    """A table no bag of the batch touched gets a sparse gradient with no entries,
    which torch's sparse Adagrad cannot handle; no gradient means no update."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse and p.grad._nnz() == 0:
            p.grad = None


def make_optim():
    torch.manual_seed(2)
    t = {}
    n, steps = 37, 10
    w0 = randn(n)
    grads = randn(steps, n)
    t["dense.w0"] = w0
    t["dense.grads"] = grads
    dense = {
        "sgd": lambda p: torch.optim.SGD([p], lr=0.1, weight_decay=0.01),
        "adagrad": lambda p: torch.optim.Adagrad([p], lr=0.1),
        "adam": lambda p: torch.optim.Adam([p], lr=0.01),
        "adamw": lambda p: torch.optim.AdamW([p], lr=0.01, weight_decay=0.01),
    }
    for name, make in dense.items():
        p = nn.Parameter(w0.clone())
        opt = make(p)
        for k in range(steps):
            opt.zero_grad()
            p.grad = grads[k].clone()
            opt.step()
            if k == 0:
                t[f"dense.{name}.w1"] = p.detach().clone()
        t[f"dense.{name}.w10"] = p.detach().clone()
        if name == "adagrad":
            t["dense.adagrad.state10"] = opt.state[p]["sum"].clone()

    # sparse optimizers through embedding bags
    rows, D, B = [7, 5], 4, 3
    t["sparse.rows"] = torch.tensor(rows, dtype=torch.int64)
    W0 = [randn(r, D) for r in rows]
    for i, W in enumerate(W0):
        t[f"sparse.W0.{i}"] = W
    batches = []
    for k in range(steps):
        lengths = torch.randint(0, 4, (len(rows), B)).tolist()
        indices, offsets = random_bags(lengths, rows, B)
        dout = randn(B, len(rows), D)
        batches.append((indices, offsets, dout))
        t[f"sparse.batch.{k}.indices"] = indices
        t[f"sparse.batch.{k}.offsets"] = offsets
        t[f"sparse.batch.{k}.dout"] = dout
    lr, eps = 0.1, 1e-10
    for name in ("sgd", "adagrad", "rowwise_adagrad"):
        bags = [nn.EmbeddingBag(r, D, mode="sum", sparse=True) for r in rows]
        for bag, W in zip(bags, W0):
            with torch.no_grad():
                bag.weight.copy_(W)
        params = [bag.weight for bag in bags]
        if name == "sgd":
            opt = torch.optim.SGD(params, lr=lr)
        elif name == "adagrad":
            opt = torch.optim.Adagrad(params, lr=lr, eps=eps)
        else:
            opt = None
            rstate = [torch.zeros(r) for r in rows]
        losses = []
        for k, (indices, offsets, dout) in enumerate(batches):
            for p in params:
                p.grad = None
            out = embbag_tables([b.weight for b in bags], indices, offsets, B, "sum",
                                sparse=True)
            loss = (out * dout).sum()
            losses.append(loss.item())
            loss.backward()
            drop_empty_sparse_grads(params)
            if opt is not None:
                opt.step()
            else:
                with torch.no_grad():
                    for p, s in zip(params, rstate):
                        if p.grad is not None:
                            rowwise_adagrad_step(p.data, s, p.grad, lr, eps)
        t[f"sparse.{name}.losses"] = torch.tensor(losses, dtype=torch.float32)
        for i, p in enumerate(params):
            t[f"sparse.{name}.W.{i}"] = p.detach().clone()
            if name == "adagrad":
                t[f"sparse.{name}.state.{i}"] = opt.state[p]["sum"].clone()
            elif name == "rowwise_adagrad":
                t[f"sparse.{name}.state.{i}"] = rstate[i].clone()

    meta = {"generator": "tools/make_golden.py", "torch": torch.__version__,
            "dense": "n=37 steps=10; sgd lr=0.1 wd=0.01; adagrad lr=0.1; adam lr=0.01; "
                     "adamw lr=0.01 wd=0.01",
            "sparse": "T=2 rows=7,5 D=4 B=3 steps=10 sum pooling; lr=0.1 eps=1e-10; "
                      "loss=sum(out*dout)"}
    return t, meta


# -------------------------------------------------------------------- 3. DLRM

NUM_DENSE, ROWS, DIM, BOT, TOP, BATCH = 5, [10, 7, 5, 12], 4, [5, 8, 4], [14, 8, 1], 6


class SmallDLRM(nn.Module):
    """The golden DLRM: ReLU after every bottom layer and every top layer but the
    last; sum-pooled embedding bags (sparse grads); dot interaction."""

    def __init__(self):
        super().__init__()
        self.bot = nn.ModuleList(nn.Linear(a, b) for a, b in zip(BOT[:-1], BOT[1:]))
        self.top = nn.ModuleList(nn.Linear(a, b) for a, b in zip(TOP[:-1], TOP[1:]))
        self.emb = nn.ModuleList(nn.EmbeddingBag(r, DIM, mode="sum", sparse=True)
                                 for r in ROWS)
        for e in self.emb:
            nn.init.normal_(e.weight, 0.0, 0.3)

    def forward(self, dense, indices, offsets):
        x = dense
        for l in self.bot:
            x = torch.relu(l(x))
        B = dense.shape[0]
        emb = embbag_tables([e.weight for e in self.emb], indices, offsets, B, "sum",
                            sparse=True)
        self.inter = dot_interact(x, emb)
        z = self.inter
        for i, l in enumerate(self.top):
            z = l(z)
            if i + 1 < len(self.top):
                z = torch.relu(z)
        return z.squeeze(1)

    def named(self):
        """ember's parameter names -> tensors."""
        d = {}
        for i, l in enumerate(self.bot):
            d[f"bot.{i}.weight"], d[f"bot.{i}.bias"] = l.weight, l.bias
        for i, l in enumerate(self.top):
            d[f"top.{i}.weight"], d[f"top.{i}.bias"] = l.weight, l.bias
        for t, e in enumerate(self.emb):
            d[f"emb.{t}.weight"] = e.weight
        return d

    def dense_params(self):
        return [p for n, p in self.named().items() if not n.startswith("emb.")]

    def emb_params(self):
        return [e.weight for e in self.emb]


def dlrm_batch():
    dense = torch.log1p(torch.rand(BATCH, NUM_DENSE) * 20.0)
    label = (torch.rand(BATCH) < 0.5).float()
    lengths = torch.randint(0, 4, (len(ROWS), BATCH)).tolist()
    lengths[0][0], lengths[1][1], lengths[2][2] = 0, 3, 0  # some empty and multi-hot bags
    indices, offsets = random_bags(lengths, ROWS, BATCH)
    return dense, label, indices, offsets


DLRM_META = {"num_dense": str(NUM_DENSE), "rows": ",".join(map(str, ROWS)),
             "dim": str(DIM), "bot": "-".join(map(str, BOT)), "top": "-".join(map(str, TOP)),
             "batch": str(BATCH)}


def make_dlrm():
    torch.manual_seed(3)
    model = SmallDLRM()
    init = {n: p.detach().clone() for n, p in model.named().items()}
    dense, label, indices, offsets = dlrm_batch()
    t = {"dense": dense, "label": label, "indices": indices, "offsets": offsets}
    t.update(init)
    logits = model(dense, indices, offsets)
    loss = F.binary_cross_entropy_with_logits(logits, label, reduction="mean")
    loss.backward()
    t["out.logits"] = logits
    t["out.loss"] = loss.detach().reshape(())
    t["out.interaction"] = model.inter
    for n, p in model.named().items():
        g = p.grad
        t[f"grad.{n}"] = g.to_dense() if g.is_sparse else g
    meta = dict(DLRM_META, generator="tools/make_golden.py", torch=torch.__version__)
    files = {"dlrm.safetensors": (t, meta)}

    # training trajectories from the same initial parameters and a fixed batch stream
    torch.manual_seed(4)
    batches = [dlrm_batch() for _ in range(10)]
    for dense_opt, sparse_opt, dlr, slr in (("sgd", "sgd", 0.1, 0.1),
                                            ("adagrad", "adagrad", 0.05, 0.05),
                                            ("adam", "rowwise_adagrad", 0.01, 0.05)):
        m = SmallDLRM()
        with torch.no_grad():
            for n, p in m.named().items():
                p.copy_(init[n])
        dp, ep = m.dense_params(), m.emb_params()
        dopt = {"sgd": lambda: torch.optim.SGD(dp, lr=dlr),
                "adagrad": lambda: torch.optim.Adagrad(dp, lr=dlr),
                "adam": lambda: torch.optim.Adam(dp, lr=dlr)}[dense_opt]()
        sopt, rstate = None, None
        if sparse_opt == "sgd":
            sopt = torch.optim.SGD(ep, lr=slr)
        elif sparse_opt == "adagrad":
            sopt = torch.optim.Adagrad(ep, lr=slr)
        else:
            rstate = [torch.zeros(r) for r in ROWS]
        tt = dict(init)
        losses = []
        for k, (d, l, ix, of) in enumerate(batches):
            tt[f"batch.{k}.dense"], tt[f"batch.{k}.label"] = d, l
            tt[f"batch.{k}.indices"], tt[f"batch.{k}.offsets"] = ix, of
            for p in dp + ep:
                p.grad = None
            loss = F.binary_cross_entropy_with_logits(m(d, ix, of), l, reduction="mean")
            losses.append(loss.item())
            loss.backward()
            drop_empty_sparse_grads(ep)
            dopt.step()
            if sopt is not None:
                sopt.step()
            else:
                with torch.no_grad():
                    for p, s in zip(ep, rstate):
                        if p.grad is not None:
                            rowwise_adagrad_step(p.data, s, p.grad, slr, 1e-10)
        tt["losses"] = torch.tensor(losses, dtype=torch.float32)
        for n, p in m.named().items():
            tt[f"final.{n}"] = p.detach().clone()
        for i, p in enumerate(ep):
            if sparse_opt == "adagrad":
                tt[f"final_state.emb.{i}"] = sopt.state[p]["sum"].clone()
            elif sparse_opt == "rowwise_adagrad":
                tt[f"final_state.emb.{i}"] = rstate[i].clone()
        mt = dict(meta, dense_opt=dense_opt, sparse_opt=sparse_opt, dense_lr=repr(dlr),
                  sparse_lr=repr(slr), steps="10")
        files[f"dlrm_train_{dense_opt}_{sparse_opt}.safetensors"] = (tt, mt)
    return files


def main():
    torch.set_num_threads(1)  # reproducible reductions
    os.makedirs(OUT_DIR, exist_ok=True)
    files = {"layers.safetensors": make_layers(), "optim.safetensors": make_optim()}
    files.update(make_dlrm())
    total = 0
    for name, (tensors, meta) in files.items():
        size = write_safetensors(os.path.join(OUT_DIR, name), tensors, meta)
        total += size
        print(f"{name}: {len(tensors)} tensors, {size} bytes")
        assert size < 200_000, name
    assert total < 2_000_000
    print(f"total {total} bytes")


if __name__ == "__main__":
    sys.exit(main())
