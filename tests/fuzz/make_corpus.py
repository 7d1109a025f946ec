#!/usr/bin/env python3
"""make_corpus.py - writes the seed corpus of fuzz_request (tests/fuzz/corpus_request/).

Each file is one request body, as a client would POST it: json_* files for
/v1/predict, bin_* files for /v1/predict.bin (docs/SERVING.md), valid ones (ok_) and
malformed ones (bad_) of each kind. fuzz_request feeds every input to both parsers,
so a JSON seed is also a bad binary request and the other way round.
Deterministic (fixed seed); rerun after changing it: tests/fuzz/make_corpus.py
(files it no longer writes are not deleted: crash reproducers live there too).
"""
import os
import random
import struct

ND, NS = 13, 26
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus_request")
rng = random.Random(20240611)


def put(name, data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)


# ------------------------------------------------------------------ JSON

def tsv_fields(empty_rate=0.2):
    dense = ["" if rng.random() < empty_rate else str(rng.randrange(-2, 5000)) for _ in range(ND)]
    sparse = ["" if rng.random() < empty_rate else "%x" % rng.getrandbits(rng.choice([8, 32, 64]))
              for _ in range(NS)]
    sparse = [s.upper() if rng.random() < 0.3 else s for s in sparse]
    return dense, sparse


def tsv(label=None, empty_rate=0.2):
    d, s = tsv_fields(empty_rate)
    f = ([label] if label is not None else []) + d + s
    return "\\t".join(f)  # a JSON string literal's \t


def obj(nulls=0.15):
    dense = []
    for _ in range(ND):
        r = rng.random()
        dense.append("null" if r < nulls else str(rng.randrange(-3, 100000)) if r < 0.7
                     else "%.6g" % (rng.random() * 1000))
    sparse = []
    for _ in range(NS):
        r = rng.random()
        sparse.append("null" if r < nulls / 2 else '""' if r < nulls else '"%x"' % rng.getrandbits(32))
    return '{"dense": [%s], "sparse": [%s]}' % (", ".join(dense), ", ".join(sparse))


def examples(items):
    return '{"examples": [%s]}' % ", ".join(items)


def q(s):
    return '"%s"' % s


def gen_json():
    put("json_ok_tsv_one", examples([q(tsv())]))
    put("json_ok_tsv_label", examples([q(tsv("1")), q(tsv("0"))]))
    put("json_ok_tsv_all_empty", examples([q("\\t" * (ND + NS - 1))]))
    put("json_ok_tsv_crlf", examples([q(tsv() + "\\r\\n")]))
    put("json_ok_tsv_many", examples([q(tsv()) for _ in range(40)]))
    put("json_ok_object_one", examples([obj()]))
    put("json_ok_object_nulls", examples([obj(nulls=0.9)]))
    put("json_ok_object_extremes", examples(['{"dense": [0, -1, 1e300, 1.5e-300, 9007199254740993, -0.0, 1e-9, '
                                             '2147483648, null, 3, 4, 5, 6], "sparse": ["ffffffffffffffff", '
                                             '"FFFFFFFFFFFFFFFF", "0", "0000000000000000", "aBcDeF", "\\u0061", '
                                             + ", ".join(['"1"'] * (NS - 6)) + '], "label": 1, "id": "x"}']))
    put("json_ok_mixed", examples([q(tsv()), obj(), q(tsv("1")), obj(nulls=0.5)]))
    put("json_ok_many_objects", examples([obj() for _ in range(24)]))
    put("json_ok_whitespace", "\n\t " + examples([obj()]).replace(", ", " ,\n  ") + " \r\n")
    put("json_ok_ids", '{"examples": [%s, %s], "ids": [7, "18446744073709551615"], "vertical": 3}' % (q(tsv()), obj()))
    put("json_bad_ids_count", '{"examples": [%s, %s], "ids": [7], "vertical": 4294967296}' % (q(tsv()), obj()))
    put("json_ok_dup_keys", '{"examples": [], "examples": [%s]}' % obj())

    one = q(tsv())
    full = examples([one, obj()])
    put("json_bad_truncated", full[: len(full) // 2])
    put("json_bad_truncated_string", full[: full.index("\\t") + 1])
    put("json_bad_empty", "")
    put("json_bad_not_object", "[%s]" % one)
    put("json_bad_no_examples", '{"example": [%s]}' % one)
    put("json_bad_examples_empty", '{"examples": []}')
    put("json_bad_examples_object", '{"examples": {"0": %s}}' % one)
    put("json_bad_example_number", '{"examples": [1, null, true]}')
    put("json_bad_tsv_38_fields", examples([q("\\t".join(["1"] * ND + ["a"] * (NS - 1)))]))
    put("json_bad_tsv_41_fields", examples([q("\\t".join(["0"] + ["1"] * ND + ["a"] * (NS + 1)))]))
    put("json_bad_tsv_label_2", examples([q("\\t".join(["2"] + ["1"] * ND + ["a"] * NS))]))
    put("json_bad_tsv_dense_garbage", examples([q(tsv().replace("\\t", "\\t12zz", 1))]))
    d, s = tsv_fields(0)
    s[3] = "12zz"
    put("json_bad_tsv_bad_hex", examples([q("\\t".join(d + s))]))
    s[3] = "1" * 17
    put("json_bad_tsv_hex_17", examples([q("\\t".join(d + s))]))
    s[3] = "a" + "\u00e9" * 30  # non-hex UTF-8, quoted (40 bytes of it) in the error message
    put("json_bad_tsv_hex_utf8", examples([q("\\t".join(d + s))]))
    d, s = tsv_fields(0)
    d[2] = "1" * 19
    put("json_bad_tsv_dense_huge", examples([q("\\t".join(d + s))]))
    d[2] = "-"
    put("json_bad_tsv_dense_sign", examples([q("\\t".join(d + s))]))
    d[2] = "1.5"
    put("json_bad_tsv_dense_float", examples([q("\\t".join(d + s))]))
    put("json_bad_object_dense_12", examples(['{"dense": [%s], "sparse": [%s]}' % (", ".join(["1"] * 12),
                                                                                   ", ".join(['"a"'] * NS))]))
    put("json_bad_object_sparse_27", examples(['{"dense": [%s], "sparse": [%s]}' % (", ".join(["1"] * ND),
                                                                                    ", ".join(['"a"'] * 27))]))
    put("json_bad_object_dense_string", examples(['{"dense": ["1"%s], "sparse": [%s]}' % (", 1" * (ND - 1),
                                                                                          ", ".join(['"a"'] * NS))]))
    put("json_bad_object_sparse_number", examples(['{"dense": [%s], "sparse": [1%s]}' % (", ".join(["1"] * ND),
                                                                                         ', "a"' * (NS - 1))]))
    for name, v in [("bad_hex", '"12zz"'), ("hex_17", '"%s"' % ("f" * 17)), ("hex_utf8", '"a%s"' % ("\u00e9" * 30)),
                    ("hex_long_utf8", '"%s"' % ("\u4e2d" * 20 + "g"))]:
        put("json_bad_object_" + name, examples(['{"dense": [%s], "sparse": [%s%s]}' % (
            ", ".join(["1"] * ND), ", ".join(['"a"'] * (NS - 1)), ", " + v)]))
    put("json_bad_object_no_sparse", examples(['{"dense": [%s]}' % ", ".join(["1"] * ND)]))
    put("json_bad_huge_number", examples(['{"dense": [1e999%s], "sparse": [%s]}' % (
        ", 1" * (ND - 1), ", ".join(['"a"'] * NS))]))
    put("json_bad_huge_integer", examples(['{"dense": [123456789012345678901234567890%s], "sparse": [%s]}' % (
        ", 1" * (ND - 1), ", ".join(['"a"'] * NS))]))
    put("json_bad_nan", examples(['{"dense": [NaN%s], "sparse": [%s]}' % (", 1" * (ND - 1),
                                                                          ", ".join(['"a"'] * NS))]))
    put("json_bad_infinity", examples(['{"dense": [-Infinity%s], "sparse": [%s]}' % (
        ", 1" * (ND - 1), ", ".join(['"a"'] * NS))]))
    put("json_bad_deep_nesting", '{"examples": ' + "[" * 5000 + "]" * 5000 + "}")
    put("json_bad_deep_objects", '{"examples": [' + '{"a": ' * 3000 + "1" + "}" * 3000 + "]}")
    put("json_bad_nul_escape", examples([q(tsv().replace("\\t", "\\u0000", 1))]))
    put("json_bad_raw_tab", examples([q(tsv().replace("\\t", "\t"))]))
    put("json_bad_invalid_utf8", examples([q("\xff")]).encode("latin-1"))
    put("json_bad_long_string_utf8", examples([q("\u00e9" * 200)])[:-3])  # cut: error text quotes it
    put("json_bad_trailing", examples([obj()]) + " x")


# ------------------------------------------------------------------ binary

REC = 8 + 4 * ND + 8 * NS


def header(count, magic=b"EMRQ", version=1, nd=ND, ns=NS, reserved=0):
    return magic + struct.pack("<HHHHI", version, nd, ns, reserved, count)


def record(miss=None, dense=None, ids=None):
    if miss is None:
        miss = rng.getrandbits(NS) & rng.getrandbits(NS) & rng.getrandbits(NS)
    if dense is None:
        dense = [rng.random() * 8 for _ in range(ND)]
    if ids is None:
        ids = [rng.getrandbits(64) for _ in range(NS)]
    return struct.pack("<Q", miss) + struct.pack("<%df" % ND, *dense) + struct.pack("<%dQ" % NS, *ids)


def gen_bin():
    put("bin_ok_one_zero", header(1) + record(0, [0.0] * ND, [0] * NS))
    put("bin_ok_three", header(3) + b"".join(record() for _ in range(3)))
    put("bin_ok_all_missing", header(2) + record((1 << NS) - 1) + record((1 << NS) - 1, [0.0] * ND))
    put("bin_ok_many", header(32) + b"".join(record() for _ in range(32)))
    put("bin_ok_extremes", header(1) + record(1 << (NS - 1), [3.4e38, -3.4e38, 1e-45, -0.0] + [1.0] * (ND - 4),
                                              [2**64 - 1] * NS))
    put("bin_v2_ids", header(2, version=2, reserved=5) + b"".join(struct.pack("<Q", 100 + i) + record() for i in range(2)))
    put("bin_ok_reserved_set", header(1, reserved=0xFFFF) + record())

    two = header(2) + record() + record()
    put("bin_bad_short", two[:10])
    put("bin_bad_header_only", header(1))
    put("bin_bad_count_0", header(0))
    put("bin_bad_count_0_data", header(0) + record())
    put("bin_bad_magic", header(1, magic=b"EMRX") + record())
    put("bin_bad_magic_lower", header(1, magic=b"emrq") + record())
    put("bin_bad_version_2", header(1, version=2) + record())
    put("bin_bad_version_0", header(1, version=0) + record())
    put("bin_bad_nd_12", header(1, nd=12) + record())
    put("bin_bad_ns_27", header(1, ns=27) + record())
    put("bin_bad_ns_64", header(1, ns=64) + record())
    put("bin_bad_ns_65535", header(1, ns=65535, nd=65535) + record())
    put("bin_bad_truncated", two[:-7])
    put("bin_bad_trailing_byte", two + b"\0")
    put("bin_bad_count_high", header(3) + record() + record())
    put("bin_bad_count_low", header(1) + record() + record())
    put("bin_bad_count_max", header(0xFFFFFFFF) + record())
    put("bin_bad_count_wrap", header(0x10000000) + record())
    put("bin_bad_nan", header(2) + record() + record(dense=[1.0] * 5 + [float("nan")] + [1.0] * (ND - 6)))
    put("bin_bad_inf", header(1) + record(dense=[float("-inf")] + [1.0] * (ND - 1)))
    put("bin_bad_mask_bit_26", header(1) + record(miss=1 << NS))
    put("bin_bad_mask_bit_63", header(2) + record() + record(miss=1 << 63))
    put("bin_bad_json_magic", b'{"examples": [' + header(1)[4:] + record())


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    gen_json()
    gen_bin()
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print("%d files, %d bytes in %s" % (len(os.listdir(OUT)), total, os.path.relpath(OUT)))
