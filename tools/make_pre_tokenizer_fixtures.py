#!/usr/bin/env python3
"""Byte-level BPE vocabularies with the pre-tokenizers of Llama 3 (`llama-bpe`), Mistral Nemo
(`tekken`) and Phi-4 / Llama 4 (`gpt-4o`), each as a `tokenizer.json` (what transformers loads)
and as the GGUF metadata llama.cpp's converter writes for it (tokens, token types, merges and the
`tokenizer.ggml.pre` name, through gguf-py's GGUFWriter), with transformers' ids for tricky
strings. Kiln rebuilds the tokenizer from the GGUF metadata alone; tests/tests/llm.rs
(`gguf_pre_tokenizers_match_transformers`) requires transformers' ids.

Writes tests/fixtures/llm-pre-tokenizers/<pre>/{tokenizer.json, vocab.gguf} and expected.json.

    pip install transformers==5.24.0 tokenizers==0.23.3 gguf==0.19.0
    python3 tools/make_pre_tokenizer_fixtures.py

The regexes are those of the models' own tokenizer.json files (the ones llama.cpp's
llama-vocab.cpp quotes as "original regex from tokenizer.json"); `ignore_merges` as the Llama 3
and Tekken files set it.
"""
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import make_llm_fixtures as mlf  # noqa: E402

OUT = mlf.REPO / "tests" / "fixtures" / "llm-pre-tokenizers"
STYLES = {
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+", True),
    "tekken": (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+", True),
    "gpt-4o": (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+", False),
}
EXTRA = [
    "HelloWorld CamelCaseWords ABCdef XMLHttpRequest iPhone",
    "I'M SURE they'RE here; we'VE seen it, 'LL do",
    "1234567 12 123 1234 3.14159 0x1F",
    "path/to/file.txt\r\nnext line\n\n\n  indented",
    "ÉCOLE Straße ǅemal ΣΊΣΥΦΟΣ",
]


def main():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    import gguf
    OUT.mkdir(parents=True, exist_ok=True)
    paras = mlf.corpus_paragraphs() + EXTRA * 5
    strings = mlf.TOKENIZER_STRINGS + EXTRA
    expected = {}
    for pre, (regex, ignore_merges) in STYLES.items():
        tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=2, special_tokens=[],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(paras, trainer)
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in mlf.SPECIALS])
        d = OUT / pre
        d.mkdir(exist_ok=True)
        tok.save(str(d / "tokenizer.json"), pretty=True)
        tj = json.loads((d / "tokenizer.json").read_text())
        assert tj["model"]["ignore_merges"] == ignore_merges
        hf = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
        # The GGUF metadata as llama.cpp's converter writes a byte-level BPE vocabulary
        # (TextModel._set_vocab_gpt2: tokens by id, type 1 normal / 3 control, merges as
        # "left right", the pre-tokenizer name).
        vocab = {**tj["model"]["vocab"], **{a["content"]: a["id"] for a in tj["added_tokens"]}}
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        special = {a["content"] for a in tj["added_tokens"]}
        w = gguf.GGUFWriter(str(d / "vocab.gguf"), "llama")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3 if t in special else 1 for t in tokens])
        w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
        w.add_bos_token_id(vocab["<|endoftext|>"])
        w.add_eos_token_id(vocab["<|im_end|>"])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        expected[pre] = [{"text": s, "ids": hf.encode(s, add_special_tokens=False)} for s in strings]
        print(pre, len(tokens), "tokens", flush=True)
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
