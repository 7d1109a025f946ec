#!/usr/bin/python3
"""make_bodies.py - request bodies for ember serve's load tests (bench/wrk/predict.lua).

Writes N request bodies of K examples each to one file, for POST /v1/predict.bin
(--mode bin: the bodies back to back, each exactly 16 + K * 268 bytes, the layout of
docs/SERVING.md "Binary") or POST /v1/predict (--mode json: one JSON body per line,
{"examples": [TSV line without the label, ...]}).

The examples are synthetic and Criteo-shaped: 13 integer counts (lognormal, 10%
missing) and 26 categorical ids drawn uniformly from 32-bit values (5% missing), so the
server's reduction modulo each table's rows spreads reads uniformly over the tables
(the same access pattern as `ember bench --infer` and `dlrm_torch.py infer`). Binary
bodies carry the dense values already transformed (log(1 + max(x, 0)), missing = 0),
as the binary endpoint requires.

  /usr/bin/python3 bench/wrk/make_bodies.py --mode bin --per-request 1 --requests 4096 --out b1.bin
"""
import argparse
import json
import sys

import numpy as np

NUM_DENSE, NUM_SPARSE = 13, 26
REC = np.dtype([("missing", "<u8"), ("dense", "<f4", NUM_DENSE), ("ids", "<u8", NUM_SPARSE)])
assert REC.itemsize == 8 + 4 * NUM_DENSE + 8 * NUM_SPARSE


def examples(n, rng):
    """(counts int64 (n,13), dense-missing bool (n,13), ids uint64 (n,26), id-missing bool (n,26))."""
    counts = np.floor(np.exp(rng.normal(1.0, 1.5, size=(n, NUM_DENSE)))).astype(np.int64)
    dmiss = rng.random((n, NUM_DENSE)) < 0.10
    ids = rng.integers(0, 2**32, size=(n, NUM_SPARSE), dtype=np.uint64)
    smiss = rng.random((n, NUM_SPARSE)) < 0.05
    return counts, dmiss, ids, smiss


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["bin", "json"], required=True)
    ap.add_argument("--per-request", type=int, required=True, help="examples per request body")
    ap.add_argument("--requests", type=int, required=True, help="distinct bodies to write")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.per_request < 1 or a.requests < 1:
        raise SystemExit("--per-request and --requests must be positive")
    rng = np.random.default_rng(a.seed)
    K = a.per_request
    counts, dmiss, ids, smiss = examples(K * a.requests, rng)
    with open(a.out, "wb") as f:
        if a.mode == "bin":
            rec = np.zeros(K * a.requests, dtype=REC)
            bits = (smiss.astype(np.uint64) << np.arange(NUM_SPARSE, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
            rec["missing"] = bits
            rec["dense"] = np.where(dmiss, 0.0, np.log1p(np.maximum(counts, 0))).astype(np.float32)
            rec["ids"] = np.where(smiss, 0, ids)
            head = (b"EMRQ" + np.array([1, NUM_DENSE, NUM_SPARSE, 0], dtype="<u2").tobytes()
                    + np.array([K], dtype="<u4").tobytes())
            raw = rec.tobytes()
            step = K * REC.itemsize
            for r in range(a.requests):
                f.write(head)
                f.write(raw[r * step:(r + 1) * step])
        else:
            for r in range(a.requests):
                lines = []
                for i in range(r * K, (r + 1) * K):
                    d = ["" if dmiss[i, j] else str(counts[i, j]) for j in range(NUM_DENSE)]
                    s = ["" if smiss[i, j] else "%08x" % ids[i, j] for j in range(NUM_SPARSE)]
                    lines.append("\t".join(d + s))
                f.write(json.dumps({"examples": lines}, separators=(",", ":")).encode() + b"\n")
    print(json.dumps({"out": a.out, "mode": a.mode, "per_request": K, "requests": a.requests,
                      "body_bytes": 16 + K * REC.itemsize if a.mode == "bin" else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
