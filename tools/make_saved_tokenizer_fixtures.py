#!/usr/bin/env python3
"""Tokenizer folders exactly as transformers 5 saves them, for Kiln's chat-template tests.

transformers 5's `save_pretrained` writes the chat template to `chat_template.jinja` beside
`tokenizer_config.json` (which then has no `chat_template` key). This script loads the tokenizer
of two LLM fixtures (tests/fixtures/llm/<case>, made by make_llm_fixtures.py), saves it with
`save_pretrained` untouched into tests/fixtures/llm-tokenizer-saved/<case>/, and records
`apply_chat_template(messages, tokenize=False, add_generation_prompt=True)` of the reloaded folder
in expected.json.

    pip install transformers==5.24.0 tokenizers==0.23.3 sentencepiece==0.2.3
    python3 tools/make_saved_tokenizer_fixtures.py
"""
import json
import pathlib
import shutil

from transformers import AutoTokenizer

REPO = pathlib.Path(__file__).resolve().parent.parent
SRC = REPO / "tests" / "fixtures" / "llm"
OUT = REPO / "tests" / "fixtures" / "llm-tokenizer-saved"
CASES = ["qwen2-f32", "llama-mqa-tied-bf16"]


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    for case in CASES:
        out = OUT / case
        AutoTokenizer.from_pretrained(str(SRC / case)).save_pretrained(str(out))
        assert (out / "chat_template.jinja").is_file(), sorted(p.name for p in out.iterdir())
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        assert "chat_template" not in cfg, "the template is expected in chat_template.jinja only"
        messages = json.loads((SRC / case / "expected.json").read_text())["chat"]["messages"]
        tok = AutoTokenizer.from_pretrained(str(out))
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        (out / "expected.json").write_text(json.dumps({"messages": messages, "rendered": rendered},
                                                      indent=2, ensure_ascii=False) + "\n")
        print(case, sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main()
