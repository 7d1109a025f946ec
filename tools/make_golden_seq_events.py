#!/usr/bin/python3
"""make_golden_seq_events.py - PyTorch reference for the sequence tower's event-level
personalization (Kunlun; include/ember/seqtower.h, src/model/seqtower.c): groups of
event types, each with its own sub-tower (width, heads, blocks) over its own jagged
sub-sequences.

Run from anywhere with the system Python that has PyTorch:

    /usr/bin/python3 tools/make_golden_seq_events.py

It writes tests/golden/seq_events.safetensors (float32, fixed seed) for
tests/test_model_seq_events.c. Two models, <pfx> = "share" and "own":

  share  history items in the candidate's table (C3); 4 event types; groups
           "2,3:w16:h4:jattn:causal,hsp,gdpa:silu"  wider than D (projections), HSP
           "1:w4:h1:gdpa:relu2,swa:1"               narrower than D (projections)
           "0:h2:swa:2:causal,hsp"                  width D (no projections), HSP
         (2 + 1 + 2 + 1 + 2 = 8 vectors join the interaction)
  own    its own item table (9 rows); 3 event types; groups
           "2:w4:h2:jattn,hsp"   and   "0:h1:gdpa:gelu:causal"
         type 1 in no group: its events are dropped (no gradient for their items)

Both: 3 dense features, tables of 10, 7, 12 rows, D = 8, bottom 3-6-8, top (interaction
width)-8-1, max_len 150 (GDPA's scale), 8 age buckets, HSP 3 seeds -> 2 tokens, 2
Kronecker terms. The batch has 6 examples with histories of 0, 1, 4, 7, 3 and 140 events
(the last one's events mostly of type 0, so one group's sub-sequence spans two of the
kernels' 128-row tiles); types drawn so that some examples have no event of some group.
Per model the file holds (as tools/make_golden_seq.py)

  <pfx>.config, <pfx>.<param>, the batch (<pfx>.dense, .label, .indices, .offsets,
  .seq_items, .seq_age, .seq_type, .seq_offsets), <pfx>.out.{logits,loss,interaction,
  extra}, <pfx>.grad.<param>, <pfx>.train.<k>.* (5 steps; share: Adam lr 0.01 +
  row-wise AdaGrad lr 0.05; own: SGD lr 0.1 + AdaGrad lr 0.05), <pfx>.train.losses,
  <pfx>.final.<param>, <pfx>.final_state.<table>.

The reference computes per sample and head on explicit matrices (the kernels'
definitions in jattn.h, kunlun.h, hsp.h):
  x0 = item[items] + age[bucket(age)] + type[min(type, NT-1)]          (N, D)
  per group g (types T_g, width W, heads H): the events with type in T_g, in batch
  order, with their own offsets; X = x0[sel] Win^T (W != D) or x0[sel];
  mixing block: X += attn(X Wq^T, X Wk^T, X Wv^T) with H heads of W/H, GDPA's scale
  1/max_len; hsp: S += sum_i A_i^T softmax(s seeds K^T) V W_i;
  t = target attention of q = c Wq_t^T (W, D) over the final X (0 when empty);
  out_g = [t, S_0..] Wout^T (W != D) or as is; extra = [out_0, out_1, ...].
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
OUT = os.path.join(ROOT, "tests", "golden", "seq_events.safetensors")

NUM_DENSE, ROWS, D, BOT, B = 3, [10, 7, 12], 8, [3, 6, 8], 6
MAX_LEN, NA, CAND = 150, 8, 2
HSP = (3, 2, 2)  # seeds, tokens, Kronecker terms
ACTS = {"silu": F.silu, "gelu": F.gelu, "relu2": lambda x: torch.relu(x) ** 2}
SLEN = [0, 1, 4, 7, 3, 140]

# a group: (types, width or None for D, heads, blocks); a block: (kind, causal, act, window)
MODELS = {
    "share": dict(share=1, rows=ROWS[CAND], nt=4,
                  groups=[([2, 3], 16, 4, [("jattn", True, None, 0), ("hsp", False, None, 0), ("gdpa", False, "silu", 0)]),
                          ([1], 4, 1, [("gdpa", False, "relu2", 0), ("swa", False, None, 1)]),
                          ([0], None, 2, [("swa", True, None, 2), ("hsp", False, None, 0)])],
                  opt=("adam", 0.01, "rowwise_adagrad", 0.05)),
    "own": dict(share=0, rows=9, nt=3,
                groups=[([2], 4, 2, [("jattn", False, None, 0), ("hsp", False, None, 0)]),
                        ([0], None, 1, [("gdpa", True, "gelu", 0)])],
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
    return ",".join(out) if out else "none"


def events_str(groups):
    out = []
    for types, w, h, blocks in groups:
        s = ",".join(str(t) for t in types)
        if w is not None:
            s += ":w%d" % w
        out.append(s + ":h%d:" % h + block_str(blocks))
    return ";".join(out)


def n_extra_group(blocks):
    return 1 + (HSP[1] if any(b[0] == "hsp" for b in blocks) else 0)


def n_extra(spec):
    return sum(n_extra_group(g[3]) for g in spec["groups"])


def config_json(spec, dense_opt, sparse_opt):
    Fn = len(ROWS) + n_extra(spec)
    opt = lambda k, lr: {"kind": k, "lr": lr, "eps": 1e-8 if k.startswith("adam") else 1e-10,
                         "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0, "init_accum": 0.0}
    return json.dumps({
        "num_dense": NUM_DENSE, "rows": ROWS, "dim": D, "bot": BOT, "top": [D + Fn * (Fn + 1) // 2, 8, 1],
        "pooling": "sum", "dense_opt": opt(*dense_opt), "sparse_opt": opt(*sparse_opt), "seed": 1,
        "seq": {"num_seq": 1, "max_len": MAX_LEN, "cand": CAND, "share": spec["share"], "rows": spec["rows"],
                "heads": 2, "age_buckets": NA, "num_types": spec["nt"], "hsp": list(HSP),
                "blocks": "none", "events": events_str(spec["groups"])}})


def make_params(spec):
    """ember's names -> initial tensors (requires_grad), in ember's layout order."""
    p = {}
    Fn = len(ROWS) + n_extra(spec)
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
    p["seq.type.weight"] = torch.randn(spec["nt"], D) * 0.3
    m, m2, k = HSP
    for g, (_, w, _, blocks) in enumerate(spec["groups"]):
        W = w or D
        pre = f"seq.g{g}."
        if W != D:
            p[pre + "in.weight"] = torch.randn(W, D) * (1.2 / math.sqrt(D))
        for i, (kind, _, _, _) in enumerate(blocks):
            if kind != "hsp":
                p[f"{pre}{i}.q.weight"] = torch.randn(W, W) * (1.4 / math.sqrt(W))
            p[f"{pre}{i}.k.weight"] = torch.randn(W, W) * (1.4 / math.sqrt(W))
            p[f"{pre}{i}.v.weight"] = torch.randn(W, W) * (1.4 / math.sqrt(W))
            if kind == "hsp":
                p[f"{pre}{i}.seeds"] = torch.randn(m, W)
                p[f"{pre}{i}.kron_a"] = torch.randn(k, m, m2) * 0.5
                p[f"{pre}{i}.kron_w"] = torch.randn(k, W, W) * (1.1 / math.sqrt(W))
        p[pre + "tgt.q.weight"] = torch.randn(W, D) * (1.4 / math.sqrt(D))
        p[pre + "tgt.k.weight"] = torch.randn(W, W) * (1.4 / math.sqrt(W))
        p[pre + "tgt.v.weight"] = torch.randn(W, W) * (1.4 / math.sqrt(W))
        if W != D:
            p[pre + "out.weight"] = torch.randn(D, W) * (1.2 / math.sqrt(W))
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


def mix(kind, causal, act, w, q, k, v, offsets, W, H):
    dh = W // H
    s = 1.0 / math.sqrt(dh)
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


def hsp(sq, k, v, a, w, offsets, W, H):
    dh = W // H
    s = 1.0 / math.sqrt(dh)
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


def target(q, k, v, offsets, W, H):
    dh = W // H
    s = 1.0 / math.sqrt(dh)
    outs = []
    for b in range(len(offsets) - 1):
        lo, hi = offsets[b], offsets[b + 1]
        if hi == lo:
            outs.append(torch.zeros(W))
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


def group_tower(spec, g, p, X0, ty, soff, cand):
    types, w, H, blocks = spec["groups"][g]
    W = w or D
    pre = f"seq.g{g}."
    sel, offs = [], [0]
    for b in range(B):
        for i in range(soff[b], soff[b + 1]):
            if int(ty[i]) in types:
                sel.append(i)
        offs.append(len(sel))
    X = X0[torch.tensor(sel, dtype=torch.int64)] if sel else torch.zeros(0, D)
    if W != D:
        X = X @ p[pre + "in.weight"].T
    S = torch.zeros(B, HSP[1], W)
    for i, (kind, causal, act, win) in enumerate(blocks):
        if len(sel) == 0:
            break  # nothing to mix; S stays 0 (an empty sample pools to 0)
        K = X @ p[f"{pre}{i}.k.weight"].T
        V = X @ p[f"{pre}{i}.v.weight"].T
        if kind == "hsp":
            S = S + hsp(p[f"{pre}{i}.seeds"], K, V, p[f"{pre}{i}.kron_a"], p[f"{pre}{i}.kron_w"], offs, W, H)
            continue
        Q = X @ p[f"{pre}{i}.q.weight"].T
        X = X + mix(kind, causal, act, win, Q, K, V, offs, W, H)
    q = cand @ p[pre + "tgt.q.weight"].T
    if sel:
        t = target(q, X @ p[pre + "tgt.k.weight"].T, X @ p[pre + "tgt.v.weight"].T, offs, W, H)
    else:
        t = torch.zeros(B, W) + 0.0 * q  # keeps q in the graph: tgt.q gets a zero gradient
    out = t.unsqueeze(1)
    if n_extra_group(blocks) > 1:
        out = torch.cat([out, S], dim=1)
    if W != D:
        out = out @ p[pre + "out.weight"].T
    return out


def forward(spec, p, batch):
    dense, label, indices, offsets, items, age, typ, soff = batch
    x = dense
    for i in range(len(BOT) - 1):
        x = torch.relu(F.linear(x, p[f"bot.{i}.weight"], p[f"bot.{i}.bias"]))
    emb = embbag_tables([p[f"emb.{t}.weight"] for t in range(len(ROWS))], indices, offsets, B, "sum")
    itab = p[f"emb.{CAND}.weight"] if spec["share"] else p["seq.items.weight"]
    bk = torch.tensor([bucket(a) for a in age.tolist()], dtype=torch.int64)
    ty = torch.clamp(typ.to(torch.int64), max=spec["nt"] - 1)
    X0 = itab[items] + p["seq.age.weight"][bk] + p["seq.type.weight"][ty]
    so = soff.tolist()
    extra = torch.cat([group_tower(spec, g, p, X0, ty, so, emb[:, CAND, :]) for g in range(len(spec["groups"]))],
                      dim=1)
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
    lengths[CAND] = torch.tensor([1, 1, 0, 2, 1, 1])  # the candidate: mostly one id, one empty, one two
    idx, offs = [], [0]
    for t, r in enumerate(ROWS):
        for b in range(B):
            n = int(lengths[t][b])
            idx.append(torch.randint(0, r, (n,)))
            offs.append(offs[-1] + n)
    indices, offsets = torch.cat(idx), torch.tensor(offs, dtype=torch.int64)
    soff = torch.tensor([0] + list(torch.tensor(SLEN).cumsum(0)), dtype=torch.int64)
    N = int(soff[-1])
    items = torch.randint(0, spec["rows"], (N,))
    cand_ids = indices[offsets[CAND * B]:offsets[(CAND + 1) * B]]
    if spec["share"] and len(cand_ids) > 0:
        items[int(soff[3])] = int(cand_ids[0])
    age, typ = [], []
    for b in range(B):
        L = SLEN[b]
        a = sorted([int(x) for x in torch.randint(0, 5000, (L,))], reverse=True)
        if L >= 4:
            a[-1] = 0  # age 0 -> bucket 0
            a[0] = 10 ** 9  # clamped to the last bucket
        age += a
        if L >= 100:  # mostly type 0: one group's sub-sequence spans two 128-row tiles
            typ += [0 if float(u) < 0.95 else int(v) for u, v in zip(torch.rand(L), torch.randint(1, 5, (L,)))]
        elif b == 2:  # only type 0: the other groups are empty for this example
            typ += [0] * L
        else:
            typ += [int(x) for x in torch.randint(0, 5, (L,))]
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
        t[f"{pfx}.grad.{n}"] = v.grad.detach().clone() if v.grad is not None else torch.zeros_like(v)
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
            v.grad = torch.zeros_like(v)  # every parameter steps (Adam moves on zero gradients too)
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
    torch.manual_seed(20261202)
    torch.set_num_threads(1)
    t, meta = {}, {"generator": "tools/make_golden_seq_events.py", "torch": torch.__version__}
    for pfx, spec in MODELS.items():
        make_model(t, meta, pfx, spec)
    n = write_safetensors(OUT, t, meta)
    print(f"wrote {OUT} ({n} bytes, {len(t)} tensors)")
    assert n < 400_000


if __name__ == "__main__":
    main()
