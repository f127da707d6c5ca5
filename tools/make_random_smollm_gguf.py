"""A random-weight GGUF with SmolLM2-135M's shapes and metadata, for side-by-side benchmarks
(tools/bench-vs.sh): the real file's key-value metadata (architecture, sizes, tokenizer) is
copied as it is, and every tensor gets random values of its shape, quantized with gguf-py
(the reference implementation of llama.cpp's block formats) to the requested type; 1-D
tensors (norms) stay f32, as llama.cpp's converter writes them.

    python3 tools/make_random_smollm_gguf.py SmolLM2-135M-Instruct.Q4_1.gguf out.gguf [q4_0]
"""
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, quants


def main():
    src, dst = sys.argv[1], sys.argv[2]
    qtype = GGMLQuantizationType[(sys.argv[3] if len(sys.argv) > 3 else "q4_0").upper()]
    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(dst, arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.name", "general.file_type"):
            continue
        vtype = f.types[0]
        value = f.contents()
        if vtype == GGUFValueType.ARRAY:
            w.add_key_value(name, value, vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(name, value, vtype)
    w.add_name("random SmolLM2-135M-shaped " + qtype.name)
    w.add_file_type(LlamaFileType["MOSTLY_" + qtype.name])
    rng = np.random.default_rng(0)
    for t in r.tensors:
        shape = [int(d) for d in reversed(t.shape)]  # numpy order: rows first
        data = rng.uniform(-0.05, 0.05, size=shape).astype(np.float32)
        if len(shape) == 1:
            w.add_tensor(t.name, np.ones(shape, np.float32) + data)
        else:
            q = quants.quantize(data, qtype)
            w.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
