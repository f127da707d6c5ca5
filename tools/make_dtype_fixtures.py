#!/usr/bin/env python3
"""Golden files for Kiln's GGUF block formats, made with llama.cpp's own gguf-py.

For each block type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS): random blocks (random quant bits, sane random f16 scales) and gguf-py's
dequantization of them; for the quantize-on-load types (Q8_0, Q4_0) random f32 rows and
gguf-py's quantization of them. Deterministic (seed 1234).

    pip install gguf==0.19.0 numpy
    python3 tools/make_dtype_fixtures.py      # writes tests/fixtures/dtypes/
"""
import pathlib
import numpy as np
from gguf import GGMLQuantizationType as Q, quants

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "dtypes"
rng = np.random.default_rng(1234)

# (type, elements per block, bytes per block, byte offsets of f16 scales, scale range)
LAYOUT = {
    "q8_0": (Q.Q8_0, 32, 34, [0], (0.002, 0.05)),
    "q4_0": (Q.Q4_0, 32, 18, [0], (0.002, 0.05)),
    "q4_k": (Q.Q4_K, 256, 144, [0, 2], (0.001, 0.01)),
    "q6_k": (Q.Q6_K, 256, 210, [208], (0.0005, 0.005)),
}

# Types added later, drawn after everything above so that the earlier files stay as they were.
LATER = {
    "q4_1": (Q.Q4_1, 32, 20, [0, 2], (0.002, 0.05)),
    "q5_0": (Q.Q5_0, 32, 22, [0], (0.002, 0.05)),
    "q5_1": (Q.Q5_1, 32, 24, [0, 2], (0.002, 0.05)),
}

# Added after LATER, drawn after it.
K_LATER = {
    "q5_k": (Q.Q5_K, 256, 176, [0, 2], (0.001, 0.01)),
    "q2_k": (Q.Q2_K, 256, 84, [80, 82], (0.001, 0.01)),
    "q3_k": (Q.Q3_K, 256, 110, [108], (0.0005, 0.005)),
    "iq4_nl": (Q.IQ4_NL, 32, 18, [0], (0.002, 0.05)),
    "iq4_xs": (Q.IQ4_XS, 256, 136, [0], (0.0002, 0.002)),
}


def random_blocks(name, nblocks):
    qt, _, nbytes, scale_offs, (lo, hi) = {**LAYOUT, **LATER, **K_LATER}[name]
    raw = rng.integers(0, 256, size=(nblocks, nbytes), dtype=np.uint8)
    for off in scale_offs:
        s = rng.uniform(lo, hi, size=nblocks).astype(np.float16)
        # Negative scales too: the formats allow them.
        s *= np.where(rng.random(nblocks) < 0.2, -1, 1).astype(np.float16)
        raw[:, off:off + 2] = s.view(np.uint8).reshape(nblocks, 2)
    return raw


def dequant_fixture(name, nblocks):
    """Random blocks of `name` and gguf-py's dequantization of them."""
    qt, elems = {**LAYOUT, **LATER, **K_LATER}[name][:2]
    raw = random_blocks(name, nblocks)
    deq = quants.dequantize(raw.reshape(1, -1), qt).astype(np.float32).reshape(-1)
    assert deq.size == nblocks * elems
    (OUT / f"{name}.blocks.bin").write_bytes(raw.tobytes())
    (OUT / f"{name}.dequant.f32").write_bytes(deq.tobytes())


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (_, elems, _, _, _) in LAYOUT.items():
        dequant_fixture(name, 64 if elems == 32 else 16)
    for name in ["q8_0", "q4_0"]:
        qt = LAYOUT[name][0]
        x = rng.normal(0, 1, size=(8, 256)).astype(np.float32)
        x[0, :32] = 0.0  # an all-zero block: scale 0
        q = quants.quantize(x, qt)
        (OUT / f"{name}.quant_in.f32").write_bytes(x.tobytes())
        (OUT / f"{name}.quant_out.bin").write_bytes(q.tobytes())
    for name in LATER:
        dequant_fixture(name, 64)
    for name, (_, elems, _, _, _) in K_LATER.items():
        dequant_fixture(name, 16 if elems == 256 else 64)
    print("wrote", sorted(p.name for p in OUT.iterdir()))


if __name__ == "__main__":
    main()
