#!/usr/bin/env python3
"""read_checkpoint.py - inspect an ember checkpoint (or any safetensors file) with numpy only.

    python3 tools/read_checkpoint.py ckpt.safetensors            # tensors, stats, metadata
    python3 tools/read_checkpoint.py --dump mlp.0.weight ckpt.safetensors

The format needs no ember and no safetensors/torch package:

    OFFSET  SIZE  DESCRIPTION
    0       8     N: little-endian u64, length of the JSON header
    8       N     {"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [b, e]}}
    8+N     ...   raw little-endian tensor data; [b, e) relative to 8+N

ember stores "ember.xxh64" in __metadata__: the 16-hex-digit XXH64 (seed 0) of everything
after the header. It is verified when the `xxhash` module is installed (else skipped with a
note). A malformed or corrupt file exits with status 1 and a message on stderr.
"""
import argparse
import json
import struct
import sys

import numpy as np

DTYPES = {"F32": "<f4", "F64": "<f8", "I32": "<i4", "I64": "<i8", "U64": "<u8", "U8": "u1",
          "F16": "<f2", "BF16": "<u2"}  # BF16 is widened to float32 by hand below
MAX_HEADER = 100_000_000


class Malformed(Exception):
    pass


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise Malformed("header JSON has duplicate keys")
    return dict(pairs)


def _is_int(x):
    return type(x) is int  # bool is an int subclass: refuse true/false


def load(path):
    """Returns (metadata dict, [(name, dtype, shape, ndarray)] in header order, data bytes)."""
    with open(path, "rb") as f:
        buf = f.read()
    if len(buf) < 8:
        raise Malformed(f"file of {len(buf)} bytes is too small for a safetensors header")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > MAX_HEADER or n > len(buf) - 8:
        raise Malformed(f"header length {n} exceeds the file ({len(buf)} bytes) or is implausible")
    try:
        header = json.loads(buf[8:8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise Malformed(f"header JSON is malformed: {e}")
    if not isinstance(header, dict):
        raise Malformed("header is not a JSON object")
    data = memoryview(buf)[8 + n:]
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise Malformed("__metadata__ is not an object of strings")
    tensors, spans = [], []
    for name, e in header.items():
        where = f"tensor '{name}'"
        if not isinstance(e, dict):
            raise Malformed(f"{where}: entry is not an object")
        dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in DTYPES:
            raise Malformed(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and d >= 0 for d in shape):
            raise Malformed(f"{where}: shape {shape!r} is not a list of at most 8 non-negative ints")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs):
            raise Malformed(f"{where}: data_offsets is not [begin, end]")
        b, end = offs
        if b < 0 or end < b:
            raise Malformed(f"{where}: data_offsets [{b}, {end}] are not ordered")
        if end > len(data):
            raise Malformed(f"{where}: data_offsets [{b}, {end}] exceed data section of {len(data)} bytes")
        itemsize = np.dtype(DTYPES[dtype]).itemsize
        numel = int(np.prod(shape, dtype=object)) if shape else 1
        if numel * itemsize != end - b:
            raise Malformed(f"{where}: data_offsets [{b}, {end}] hold {end - b} bytes, "
                            f"but {dtype} {shape} needs {numel * itemsize}")
        arr = np.frombuffer(data[b:end], dtype=DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        tensors.append((name, dtype, shape, arr))
        if end > b:
            spans.append((b, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise Malformed(f"tensors '{n0}' [{b0}, {e0}] and '{n1}' [{b1}, {e1}] overlap")
    return meta, tensors, data


def check_sum(meta, data):
    """Returns a line describing the checksum status; raises Malformed on a mismatch."""
    want = meta.get("ember.xxh64")
    if want is None:
        return "checksum: none stored (not written by ember)"
    try:
        import xxhash
    except ImportError:
        return "checksum: not verified (python module 'xxhash' not installed)"
    got = xxhash.xxh64(data, seed=0).hexdigest()
    if got != want:
        raise Malformed(f"checksum mismatch: file is corrupt or truncated (header says {want}, data hashes to {got})")
    return f"checksum: ok (xxh64 {got})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file")
    ap.add_argument("--dump", metavar="NAME", help="print the values of tensor NAME")
    args = ap.parse_args()
    try:
        meta, tensors, data = load(args.file)
        note = check_sum(meta, data)
    except (OSError, Malformed) as e:
        print(f"{args.file}: {e}", file=sys.stderr)
        return 1

    if args.dump is not None:
        for name, dtype, shape, arr in tensors:
            if name == args.dump:
                np.set_printoptions(threshold=sys.maxsize, linewidth=120)
                print(f"{name} {dtype} {shape}")
                print(arr)
                return 0
        print(f"{args.file}: no tensor named '{args.dump}'", file=sys.stderr)
        return 1

    print(f"{args.file}: {len(tensors)} tensors, {len(data)} data bytes")
    print(note)
    width = max([len(t[0]) for t in tensors] + [4])
    for name, dtype, shape, arr in tensors:
        stats = ""
        if arr.size:
            x = arr.astype(np.float64)
            stats = f"  mean={x.mean():.6g}  absmax={np.abs(x).max():.6g}"
            if not np.all(np.isfinite(x)):
                stats += "  (non-finite values)"
        print(f"  {name:<{width}}  {dtype:<4}  {str(shape):<16}{stats}")
    for k, v in meta.items():
        print(f"meta {k} = {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
