#!/usr/bin/python3
"""make_golden_seq.py - PyTorch reference for ember's sequence model: the DLRM with the
sequence tower (include/ember/seqtower.h, composed in src/model/dlrm.c).

Run from anywhere with the system Python that has PyTorch:

    /usr/bin/python3 tools/make_golden_seq.py

It writes tests/golden/seq_model.safetensors (float32, fixed seed) for
tests/test_model_seq.c. Two models, <pfx> = "share" and "own":

  share  the history's items are rows of the candidate's table (C3); blocks
         jattn:causal, gdpa:silu, hsp, swa:2, gdpa:gelu:causal; HSP 3 seeds -> 2 tokens,
         2 Kronecker terms (3 vectors join the interaction)
  own    the history has its own item table (9 rows); blocks jattn, gdpa:relu2,
         swa:1:causal (1 vector joins the interaction)

Both: 3 dense features, tables of 10, 7, 12 rows, D = 8, 2 heads of 4, bottom 3-6-8,
top (interaction width)-8-1, max_len 6, 8 age buckets, 3 event types (type 4 shares
row 2). Per model the file holds

  <pfx>.config          (metadata) the model configuration as ember's JSON
  <pfx>.<param>         every parameter under ember's name (initial values)
  <pfx>.dense, .label, .indices, .offsets          the batch (table-batched bags)
  <pfx>.seq_items, .seq_age (I64), .seq_type (I32), .seq_offsets    its history
  <pfx>.out.logits, .out.loss, .out.interaction, .out.extra (B, E, D)
  <pfx>.grad.<param>    autograd gradients of the mean BCE loss (tables dense)
  <pfx>.train.<k>.*     batches of a 5-step training run, <pfx>.train.losses and
  <pfx>.final.<param>   the parameters after it (share: Adam lr 0.01 + row-wise AdaGrad
                        lr 0.05; own: SGD lr 0.1 + AdaGrad lr 0.05), and
  <pfx>.final_state.<table>  the sparse optimizer's state of every table

The reference computes everything per sample and head on explicit matrices with
differentiable torch ops (the kernels' definitions in jattn.h, kunlun.h, hsp.h):
  x0 = item[items] + age[bucket(age)] + type[min(type, NT-1)], bucket(a) = 0 for a <= 0
       else min(NA-1, 1 + floor(log2 a));
  mixing block: X += attn(X Wq^T, X Wk^T, X Wv^T); GDPA's output scale is 1/max_len;
  hsp block:    S += sum_i A_i^T softmax(s seeds K^T) V W_i  (K, V projections of X);
  target:       t = softmax(s (c Wq^T) K^T) V over the final X, c the candidate's
                pooled embedding, 0 for an empty history;
  the interaction sees [x, emb_0..emb_{T-1}, t, S_0..S_{m2-1}].
Shared table: one parameter, so its gradient is the candidate bags' plus the
history's, and the row-wise AdaGrad step sees their sum.

The file is written with tools/make_golden.py's safetensors writer.
"""

import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_golden import dot_interact, embbag_tables, write_safetensors  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "golden", "seq_model.safetensors")

NUM_DENSE, ROWS, D, H, BOT, B = 3, [10, 7, 12], 8, 2, [3, 6, 8], 5
MAX_LEN, NA, NT, CAND = 6, 8, 3, 2
HSP = (3, 2, 2)  # seeds, tokens, Kronecker terms
ACTS = {"silu": F.silu, "gelu": F.gelu, "relu2": lambda x: torch.relu(x) ** 2}

MODELS = {
    "share": dict(share=1, rows=ROWS[CAND],
                  blocks=[("jattn", True, None, 0), ("gdpa", False, "silu", 0), ("hsp", False, None, 0),
                          ("swa", False, None, 2), ("gdpa", True, "gelu", 0)],
                  opt=("adam", 0.01, "rowwise_adagrad", 0.05)),
    "own": dict(share=0, rows=9,
                blocks=[("jattn", False, None, 0), ("gdpa", False, "relu2", 0), ("swa", True, None, 1)],
                opt=("sgd", 0.1, "adagrad", 0.05)),
}


def block_str(blocks):
    out = []
    for kind, causal, act, w in blocks:
        s = kind
        if kind == "gdpa":
            s += ":" + act
        if kind == "swa":
            s += ":%d" % w
        if causal:
            s += ":causal"
        out.append(s)
    return ",".join(out)


def n_extra(blocks):
    return 1 + (HSP[1] if any(b[0] == "hsp" for b in blocks) else 0)


def config_json(spec, dense_opt, sparse_opt):
    E = n_extra(spec["blocks"])
    Fn = len(ROWS) + E
    opt = lambda k, lr: {"kind": k, "lr": lr, "eps": 1e-8 if k.startswith("adam") else 1e-10,
                         "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0, "init_accum": 0.0}
    return json.dumps({
        "num_dense": NUM_DENSE, "rows": ROWS, "dim": D, "bot": BOT, "top": [D + Fn * (Fn + 1) // 2, 8, 1],
        "pooling": "sum", "dense_opt": opt(*dense_opt), "sparse_opt": opt(*sparse_opt), "seed": 1,
        "seq": {"num_seq": 1, "max_len": MAX_LEN, "cand": CAND, "share": spec["share"], "rows": spec["rows"],
                "heads": H, "age_buckets": NA, "num_types": NT, "hsp": list(HSP),
                "blocks": block_str(spec["blocks"])}})


def make_params(spec):
    """ember's names -> initial tensors (requires_grad), in a fixed order."""
    p = {}
    E = n_extra(spec["blocks"])
    Fn = len(ROWS) + E
    top = [D + Fn * (Fn + 1) // 2, 8, 1]
    for i, (a, b) in enumerate(zip(BOT[:-1], BOT[1:])):
        p[f"bot.{i}.weight"], p[f"bot.{i}.bias"] = torch.randn(b, a) * 0.5, torch.randn(b) * 0.1
    for i, (a, b) in enumerate(zip(top[:-1], top[1:])):
        p[f"top.{i}.weight"], p[f"top.{i}.bias"] = torch.randn(b, a) * 0.3, torch.randn(b) * 0.1
    for t, r in enumerate(ROWS):
        p[f"emb.{t}.weight"] = torch.randn(r, D) * 0.4
    if not spec["share"]:
        p["seq.items.weight"] = torch.randn(spec["rows"], D) * 0.4
    p["seq.age.weight"] = torch.randn(NA, D) * 0.3
    p["seq.type.weight"] = torch.randn(NT, D) * 0.3
    m, m2, k = HSP
    for i, (kind, _, _, _) in enumerate(spec["blocks"]):
        if kind != "hsp":
            p[f"seq.{i}.q.weight"] = torch.randn(D, D) * 0.5
        p[f"seq.{i}.k.weight"] = torch.randn(D, D) * 0.5
        p[f"seq.{i}.v.weight"] = torch.randn(D, D) * 0.5
        if kind == "hsp":
            p[f"seq.{i}.seeds"] = torch.randn(m, D)
            p[f"seq.{i}.kron_a"] = torch.randn(k, m, m2) * 0.5
            p[f"seq.{i}.kron_w"] = torch.randn(k, D, D) * 0.4
    for n in ("q", "k", "v"):
        p[f"seq.tgt.{n}.weight"] = torch.randn(D, D) * 0.5
    return {n: t.float().requires_grad_() for n, t in p.items()}


def visible(L, causal, window):
    i = torch.arange(L).view(L, 1)
    j = torch.arange(L).view(1, L)
    v = torch.ones(L, L, dtype=torch.bool)
    if causal:
        v &= j <= i
    if window is not None:
        v &= (j >= i - window) & (j <= i + window)
    return v


def mix(kind, causal, act, w, q, k, v, offsets):
    dh, s = D // H, 1.0 / math.sqrt(D // H)
    outs = []
    for b in range(len(offsets) - 1):
        lo, hi = offsets[b], offsets[b + 1]
        L = hi - lo
        if L == 0:
            continue
        vis = visible(L, causal, w if kind == "swa" else None)
        oh = []
        for h in range(H):
            c = slice(h * dh, (h + 1) * dh)
            sc = s * (q[lo:hi, c] @ k[lo:hi, c].T)
            if kind == "gdpa":
                oh.append((1.0 / MAX_LEN) * (ACTS[act](sc).masked_fill(~vis, 0.0) @ v[lo:hi, c]))
            else:
                oh.append(torch.softmax(sc.masked_fill(~vis, -math.inf), dim=1) @ v[lo:hi, c])
        outs.append(torch.cat(oh, dim=1))
    return torch.cat(outs, dim=0)


def hsp(sq, k, v, a, w, offsets):
    dh, s = D // H, 1.0 / math.sqrt(D // H)
    zs = []
    for b in range(len(offsets) - 1):
        lo, hi = offsets[b], offsets[b + 1]
        zh = []
        for h in range(H):
            c = slice(h * dh, (h + 1) * dh)
            if hi == lo:
                zh.append(torch.zeros(sq.shape[0], dh))
            else:
                zh.append(torch.softmax(s * (sq[:, c] @ k[lo:hi, c].T), dim=1) @ v[lo:hi, c])
        zs.append(torch.cat(zh, dim=1))
    z = torch.stack(zs)
    return sum(a[i].T @ z @ w[i] for i in range(a.shape[0]))


def target(q, k, v, offsets):
    dh, s = D // H, 1.0 / math.sqrt(D // H)
    outs = []
    for b in range(len(offsets) - 1):
        lo, hi = offsets[b], offsets[b + 1]
        if hi == lo:
            outs.append(torch.zeros(D))
            continue
        oh = []
        for h in range(H):
            c = slice(h * dh, (h + 1) * dh)
            p = torch.softmax(s * (k[lo:hi, c] @ q[b, c]), dim=0)
            oh.append(p @ v[lo:hi, c])
        outs.append(torch.cat(oh))
    return torch.stack(outs)


def bucket(a):
    a = int(a)
    return 0 if a <= 0 else min(NA - 1, a.bit_length())


def forward(spec, p, batch):
    dense, label, indices, offsets, items, age, typ, soff = batch
    x = dense
    for i in range(len(BOT) - 1):
        x = torch.relu(F.linear(x, p[f"bot.{i}.weight"], p[f"bot.{i}.bias"]))
    emb = embbag_tables([p[f"emb.{t}.weight"] for t in range(len(ROWS))], indices, offsets, B, "sum")
    itab = p[f"emb.{CAND}.weight"] if spec["share"] else p["seq.items.weight"]
    bk = torch.tensor([bucket(a) for a in age.tolist()], dtype=torch.int64)
    ty = torch.clamp(typ.to(torch.int64), max=NT - 1)
    X = itab[items] + p["seq.age.weight"][bk] + p["seq.type.weight"][ty]
    so = soff.tolist()
    S = torch.zeros(B, HSP[1], D)
    for i, (kind, causal, act, w) in enumerate(spec["blocks"]):
        K = X @ p[f"seq.{i}.k.weight"].T
        V = X @ p[f"seq.{i}.v.weight"].T
        if kind == "hsp":
            S = S + hsp(p[f"seq.{i}.seeds"], K, V, p[f"seq.{i}.kron_a"], p[f"seq.{i}.kron_w"], so)
            continue
        Q = X @ p[f"seq.{i}.q.weight"].T
        X = X + mix(kind, causal, act, w, Q, K, V, so)
    q = emb[:, CAND, :] @ p["seq.tgt.q.weight"].T
    t = target(q, X @ p["seq.tgt.k.weight"].T, X @ p["seq.tgt.v.weight"].T, so)
    extra = t.unsqueeze(1)
    if n_extra(spec["blocks"]) > 1:
        extra = torch.cat([extra, S], dim=1)
    inter = dot_interact(x, torch.cat([emb, extra], dim=1))
    z = inter
    for i in range(2):
        z = F.linear(z, p[f"top.{i}.weight"], p[f"top.{i}.bias"])
        if i == 0:
            z = torch.relu(z)
    logits = z.squeeze(1)
    loss = F.binary_cross_entropy_with_logits(logits, label, reduction="mean")
    return logits, loss, inter, extra


def make_batch(spec):
    dense = torch.log1p(torch.rand(B, NUM_DENSE) * 20.0)
    label = (torch.rand(B) < 0.5).float()
    lengths = torch.randint(0, 3, (len(ROWS), B))
    lengths[CAND] = torch.tensor([1, 1, 0, 2, 1])  # the candidate: mostly one id, one empty, one two
    idx, offs = [], [0]
    for t, r in enumerate(ROWS):
        for b in range(B):
            n = int(lengths[t][b])
            idx.append(torch.randint(0, r, (n,)))
            offs.append(offs[-1] + n)
    indices, offsets = torch.cat(idx), torch.tensor(offs, dtype=torch.int64)
    slen = [0, 1, 4, 6, 3]
    soff = torch.tensor([0] + list(torch.tensor(slen).cumsum(0)), dtype=torch.int64)
    N = int(soff[-1])
    items = torch.randint(0, spec["rows"], (N,))
    # the candidate's own id appears in example 3's history (a repeat, as the generator plants)
    cand_ids = indices[offsets[CAND * B]:offsets[(CAND + 1) * B]]
    if spec["share"] and len(cand_ids) > 0:
        items[int(soff[3])] = int(cand_ids[0])
    age, typ = [], []
    for b in range(B):
        a = sorted([int(x) for x in torch.randint(0, 5000, (slen[b],))], reverse=True)
        if slen[b] >= 4:
            a[-1] = 0  # age 0 -> bucket 0
            a[0] = 10 ** 9  # clamped to the last bucket
        age += a
        typ += [int(x) for x in torch.randint(0, 5, (slen[b],))]
    return (dense, label, indices, offsets, items, torch.tensor(age, dtype=torch.int64),
            torch.tensor(typ, dtype=torch.int32), soff)


def put_batch(t, pfx, batch):
    names = ("dense", "label", "indices", "offsets", "seq_items", "seq_age", "seq_type", "seq_offsets")
    for n, v in zip(names, batch):
        t[pfx + n] = v


def rowwise_adagrad(W, state, g, lr, eps=1e-10):
    state += (g * g).mean(dim=1)
    W -= lr * g / (state.sqrt() + eps).unsqueeze(1)


def make_model(t, meta, pfx, spec):
    p = make_params(spec)
    init = {n: v.detach().clone() for n, v in p.items()}
    batch = make_batch(spec)
    logits, loss, inter, extra = forward(spec, p, batch)
    loss.backward()
    for n, v in init.items():
        t[f"{pfx}.{n}"] = v
    put_batch(t, pfx + ".", batch)
    t[pfx + ".out.logits"] = logits.detach()
    t[pfx + ".out.loss"] = loss.detach().reshape(())
    t[pfx + ".out.interaction"] = inter.detach()
    t[pfx + ".out.extra"] = extra.detach()
    for n, v in p.items():
        t[f"{pfx}.grad.{n}"] = v.grad.detach().clone()
    dk, dlr, sk, slr = spec["opt"]
    meta[pfx + ".config"] = config_json(spec, (dk, dlr), (sk, slr))

    # a 5-step training run from the same initial parameters
    p = {n: v.clone().requires_grad_() for n, v in init.items()}
    tables = [n for n in p if n.startswith("emb.") or n == "seq.items.weight"]
    dense_p = [p[n] for n in p if n not in tables]
    dopt = torch.optim.Adam(dense_p, lr=dlr) if dk == "adam" else torch.optim.SGD(dense_p, lr=dlr)
    state = {n: torch.zeros(p[n].shape[0]) if sk == "rowwise_adagrad" else torch.zeros_like(p[n]) for n in tables}
    losses = []
    for k in range(5):
        bt = make_batch(spec)
        put_batch(t, f"{pfx}.train.{k}.", bt)
        for v in p.values():
            v.grad = None
        _, l, _, _ = forward(spec, p, bt)
        losses.append(l.item())
        l.backward()
        dopt.step()
        with torch.no_grad():
            for n in tables:
                g = p[n].grad
                if sk == "rowwise_adagrad":
                    rowwise_adagrad(p[n].data, state[n], g, slr)
                else:  # torch.optim.Adagrad on a dense gradient: untouched rows have g = 0
                    state[n] += g * g
                    p[n].data -= slr * g / (state[n].sqrt() + 1e-10)
    t[pfx + ".train.losses"] = torch.tensor(losses)
    for n, v in p.items():
        t[f"{pfx}.final.{n}"] = v.detach().clone()
    for n in tables:
        t[f"{pfx}.final_state.{n}"] = state[n]


def main():
    torch.manual_seed(20261201)
    torch.set_num_threads(1)
    t, meta = {}, {"generator": "tools/make_golden_seq.py", "torch": torch.__version__}
    for pfx, spec in MODELS.items():
        make_model(t, meta, pfx, spec)
    n = write_safetensors(OUT, t, meta)
    print(f"wrote {OUT} ({n} bytes, {len(t)} tensors)")
    assert n < 300_000


if __name__ == "__main__":
    main()
