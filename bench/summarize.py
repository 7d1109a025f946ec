#!/usr/bin/env python3
"""Summarize bench/dlrm.sh's raw results (OUT/*.jsonl): medians over runs, ember/torch
ratios, fraction of the sgemm roofline, quality beside the planted optimum. Prints a
readable table on stderr and one JSON object as the last line of stdout."""
import json, os, statistics, sys

out = sys.argv[1] if len(sys.argv) > 1 else "bench/out"
FLOP_PER_EXAMPLE = 3 * 2 * (13*512 + 512*256 + 256*64 + 64*16 + 367*512 + 512*256 + 256*1)  # fwd + 2x bwd

def lines(name):
    p = os.path.join(out, name)
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else []

res = {}
sg = lines("sgemm.jsonl")
if sg:
    res["sgemm_gflops"] = statistics.median(r["sgemm_gflops"] for r in sg)
    res["roofline_examples_per_s"] = res["sgemm_gflops"] * 1e9 / FLOP_PER_EXAMPLE
    if all("dlrm_gemm_gflops" in r for r in sg):
        # OpenBLAS (2 threads) on exactly this model's GEMM shapes at batch 2048
        res["dlrm_gemm_gflops"] = statistics.median(r["dlrm_gemm_gflops"] for r in sg)
        res["dlrm_gemm_examples_per_s"] = statistics.median(r["dlrm_gemm_examples_per_s"] for r in sg)

speed = {}
for r in lines("speed.jsonl"):
    x = r["r"]
    key = f'{x["config"]}_b{x["batch"]}'
    speed.setdefault(key, {}).setdefault(r["side"], []).append(x["examples_per_s"])
    if r["side"] == "ember":
        speed[key].setdefault("rss", []).append(x.get("peak_rss_mb", 0))
        speed[key].setdefault("state", []).append(x.get("state_mb", 0))
for key, v in speed.items():
    e = statistics.median(v["ember"]) if v.get("ember") else None
    t = statistics.median(v["torch"]) if v.get("torch") else None
    d = {"ember_examples_per_s": e, "torch_examples_per_s": t, "runs": len(v.get("ember", []))}
    if e and t:
        d["ratio"] = e / t
    if e and key.startswith("kaggle") and "roofline_examples_per_s" in res:
        d["fraction_of_roofline"] = e / res["roofline_examples_per_s"]
        d["achieved_gflops"] = e * FLOP_PER_EXAMPLE / 1e9
        if "dlrm_gemm_examples_per_s" in res:
            d["fraction_of_dlrm_gemm_roofline"] = e / res["dlrm_gemm_examples_per_s"]
    if v.get("rss"):
        d["peak_rss_mb"] = max(v["rss"])
        d["state_mb"] = statistics.median(v["state"])
        d["rss_over_state"] = d["peak_rss_mb"] / d["state_mb"] if d["state_mb"] else None
    res["speed_" + key] = d

# the roofline measured against itself: per run, the median over its pairs of
# (training GFLOP/s / sgemm GFLOP/s); then the median and range over runs
pr = {}
for r in lines("paired.jsonl"):
    x = r["r"]
    pr.setdefault(x.get("linear", "kernels"), []).append(x["vs_sgemm"])
for lin, runs in pr.items():
    med = [v["ratio_median"] for v in runs]
    res["paired_" + lin] = {"runs": len(runs), "ratio_median": statistics.median(med), "ratio_min_run": min(med),
                            "ratio_max_run": max(med), "pairs_per_run": runs[0]["pairs"],
                            "train_gflops_median": statistics.median(v["train_gflops_median"] for v in runs),
                            "sgemm_gflops_median": statistics.median(v["sgemm_gflops_median"] for v in runs),
                            "all_ratios": [x for v in runs for x in v["ratios"]]}

q = {}
for r in lines("quality.jsonl"):
    if r["side"] == "ember":
        rep = r["report"]
        d = {"auc": rep["test"]["auc"], "ne": rep["test"]["ne"], "optimum_auc": rep["optimum"]["auc"],
             "optimum_ne": rep["optimum"]["ne"], "examples_per_s": rep["run"]["examples_per_s"],
             "peak_rss_mb": rep["run"].get("peak_rss_mb"), "state_mb": rep["run"].get("state_mb")}
        d["auc_gap_to_optimum"] = d["auc"] - d["optimum_auc"]
    else:
        d = {"auc": r["r"]["auc"], "ne": r["r"].get("ne")}
    q[f'{r["side"]}_{r["setting"]}_{r["rows"]}'] = d
for s in ("b128_sgd", "b2048_rowwise"):
    e, t = q.get(f"ember_{s}_1000000"), q.get(f"torch_{s}_1000000")
    if e and t:
        q[f"auc_ember_minus_torch_{s}"] = e["auc"] - t["auc"]
res["quality"] = q

for k, v in res.items():
    print(f"{k}: {json.dumps(v, indent=None)}", file=sys.stderr)
print(json.dumps(res))
