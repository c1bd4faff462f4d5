"""A GGUF with some tensors taken from another GGUF of the same model: e.g. only the MoE experts quantized, the
rest as in the F16, to measure the experts' share of a quantization's KL divergence.

gguf-py reads both files and writes the result (metadata of ``base``; a tensor whose name matches ``pattern``
from ``donor``, bytes unchanged, else from ``base``). Used by benchmarks/moe_bench.py; a benchmark helper,
never part of an artifact.

    python benchmarks/splice.py BASE.gguf DONOR.gguf OUT.gguf --pattern _exps.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np


def splice(base: Path, donor: Path, out: Path, pattern: str) -> Path:
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    b, d = GGUFReader(base), GGUFReader(donor)
    donor_t = {t.name: t for t in d.tensors}
    arch = b.fields["general.architecture"].contents()
    tmp = out.with_name(f".{out.name}.tmp")
    w = GGUFWriter(tmp, arch)
    for f in b.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    for t in b.tensors:
        src = donor_t[t.name] if re.search(pattern, t.name) else t
        # the reader's array is in PyTorch order, quantized rows as bytes: what add_tensor takes with raw_dtype
        w.add_tensor(src.name, np.asarray(src.data), raw_dtype=src.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("donor", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--pattern", required=True, help="regular expression on GGUF tensor names taken from DONOR")
    a = ap.parse_args()
    print(splice(a.base, a.donor, a.out, a.pattern))


if __name__ == "__main__":
    main()
