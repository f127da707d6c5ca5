#!/usr/bin/env python3
"""Seed inputs for the fuzz targets (fuzz/seeds/<target>/, not committed), from the test
fixtures and from the libraries that write these formats: gguf-py (llama.cpp's writer) for
small GGUF files of every supported tensor type with a real tokenizer's metadata, safetensors'
own writer, numpy's .npy writer. `tools/fuzz.sh` runs this before fuzzing; what the fuzzer
finds interesting is minimized into fuzz/corpus/<target>/ (committed).

Needs: gguf, safetensors, numpy (pip install gguf==0.19.0 safetensors==0.8.0 numpy==2.4.6).
"""

import json
import pathlib
import shutil

import gguf
import numpy as np
from safetensors.numpy import save as st_save

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = ROOT / "fuzz" / "seeds"


def put(target, name, data):
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def small_ggufs():
    """Tiny GGUF files, one per tensor type, carrying a fixture's real metadata (tokenizer,
    chat template, hyperparameters) as gguf-py writes it."""
    src = gguf.GGUFReader(FIX / "llm" / "llama-gqa-f32" / "model-q8_0.gguf")
    rng = np.random.default_rng(0)
    # gguf-py does not quantize K-quants: two rows of a llama.cpp-quantized fixture instead.
    kq = {}
    for tensor in gguf.GGUFReader(FIX / "llm" / "llama-q-256" / "model-q4_k_m.gguf").tensors:
        t = tensor.tensor_type
        if t in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K) and t not in kq:
            row = gguf.GGML_QUANT_SIZES[t][1]  # one 256-element block per row
            kq[t] = np.frombuffer(tensor.data.tobytes()[: 2 * row], dtype=np.uint8).copy()
    types = [
        gguf.GGMLQuantizationType.F32,
        gguf.GGMLQuantizationType.F16,
        gguf.GGMLQuantizationType.BF16,
        gguf.GGMLQuantizationType.Q8_0,
        gguf.GGMLQuantizationType.Q4_0,
        gguf.GGMLQuantizationType.Q4_1,
        gguf.GGMLQuantizationType.Q5_0,
        gguf.GGMLQuantizationType.Q5_1,
        gguf.GGMLQuantizationType.Q4_K,
        gguf.GGMLQuantizationType.Q6_K,
    ]
    for with_meta in (False, True):
        for t in types:
            path = OUT / "tmp.gguf"
            w = gguf.GGUFWriter(path, "llama")
            if with_meta:
                for f in src.fields.values():
                    if f.name.startswith("GGUF.") or f.name == "general.architecture":
                        continue
                    v = f.contents()
                    vt = f.types[0]
                    if vt == gguf.GGUFValueType.ARRAY:
                        w.add_array(f.name, v)
                    else:
                        w.add_key_value(f.name, v, vt)
            k = 256 if t in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K) else 64
            x = rng.standard_normal((2, k)).astype(np.float32)
            if t == gguf.GGMLQuantizationType.F32:
                w.add_tensor("w", x)
            elif t == gguf.GGMLQuantizationType.F16:
                w.add_tensor("w", x.astype(np.float16))
            elif t in kq:
                w.add_tensor("w", kq[t].reshape(2, -1), raw_dtype=t)
            else:
                q = gguf.quants.quantize(x, t)
                w.add_tensor("w", q, raw_dtype=t)
            w.add_tensor("norm", np.ones(k, dtype=np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            put("gguf", f"{t.name.lower()}{'-meta' if with_meta else ''}.gguf", path.read_bytes())
            if with_meta:
                put("tokenizer_gguf", f"{t.name.lower()}.gguf", path.read_bytes())
            path.unlink()


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    small_ggufs()
    # Fixture GGUF metadata prefixes (the tokenizers of every fixture family).
    for f in sorted((FIX / "llm").glob("*/*.gguf")):
        b = f.read_bytes()
        put("tokenizer_gguf", f"{f.parent.name}-{f.stem}.gguf", b[: min(len(b), 64 << 10)])
    # safetensors: a few tensors of each dtype, with and without __metadata__.
    rng = np.random.default_rng(1)
    for dt in ("float32", "float16"):
        t = {"a": rng.standard_normal((3, 4)).astype(dt), "b": np.zeros((2,), dt)}
        put("safetensors", f"{dt}.safetensors", st_save(t))
        put("safetensors", f"{dt}-meta.safetensors", st_save(t, metadata={"format": "pt"}))
    for case in sorted((FIX / "llm").iterdir()):
        cfg = case / "config.json"
        gen = case / "generation_config.json"
        if cfg.exists():
            put("llm_config", case.name, cfg.read_bytes() + b"\0" + (gen.read_bytes() if gen.exists() else b"{}"))
        tok = case / "tokenizer.json"
        tc = case / "tokenizer_config.json"
        if tok.exists():
            put("tokenizer_json", case.name, tok.read_bytes() + b"\0" + (tc.read_bytes() if tc.exists() else b""))
        if tc.exists():
            tpl = json.loads(tc.read_text()).get("chat_template")
            if isinstance(tpl, str):
                put("chat_template", case.name, tpl.encode() + b"\0be brief\0hi\0hello\0more")
    # Diffusers configs: kind byte (0 U-Net, 1 VAE, 2 CLIP, 3 scheduler, 4 image options), steps.
    for case in sorted((FIX / "sd").iterdir()):
        for kind, path in ((0, "unet/config.json"), (1, "vae/config.json"), (2, "text_encoder/config.json"), (3, "scheduler/scheduler_config.json")):
            p = case / path
            if p.exists():
                put("diffusers_config", f"{case.name}-{kind}", bytes([kind, 20]) + p.read_bytes())
        tok = case / "tokenizer" / "tokenizer.json"
        if tok.exists():
            put("tokenizer_json", f"clip-{case.name}", tok.read_bytes())
    seen = set()
    for c in json.loads((FIX / "schedulers" / "cases.json").read_text())["cases"]:
        if c["config"] not in seen:
            seen.add(c["config"])
            put("diffusers_config", f"sched-{c['name']}", bytes([3, c["steps"]]) + c["config"].encode())
    put("diffusers_config", "image-options", bytes([4, 0]) + b'{"prompt": "a cat", "steps": 4, "width": 64}')
    for i, f in enumerate(sorted(p for p in FIX.rglob("*.npy") if p.stat().st_size < 4096)[:8]):
        put("npy", f"{i}.npy", f.read_bytes())
    import io

    for arr in (np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros((0,), np.float32), np.ones((1, 2, 3), np.float32)):
        b = io.BytesIO()
        np.save(b, arr)
        put("npy", f"np-{arr.shape}.npy", b.getvalue())
    n = sum(1 for _ in OUT.rglob("*") if _.is_file())
    print(f"{n} seeds in {OUT}")


if __name__ == "__main__":
    main()
