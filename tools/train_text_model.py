#!/usr/bin/env python3
"""Train Kiln's default text model: a small Llama on the King James Bible.

Corpus: the KJV text shipped by Debian (`apt-get install bible-kjv`, whose `bible` program reads
the public-domain text of package bible-kjv-text). Every 50th verse is held out for validation.

Tokenizer: byte-level BPE (HF `tokenizers`), 4096 entries, with chat special tokens. Model:
LlamaForCausalLM (6 layers, hidden 192, GQA 6/2 heads, tied embeddings), trained with AdamW on
256-token windows: 80% plain scripture, 20% chat exchanges in which the user gives a verse and
the assistant answers with the verse that follows, so `kiln chat` answers in the same style.

Deterministic given --seed on one machine: fixed thread count, seeded generators, no data-loader
workers. Writes a Hugging Face folder (config.json, generation_config.json, model.safetensors in
f16, tokenizer.json, tokenizer_config.json with the chat template), plus:
  reference.json  transformers' greedy ids for fixed prompts (checked by Kiln's tests)
  report.json     validation loss/perplexity, samples, training settings and time

    python3 tools/train_text_model.py --out models/text-kjv          # about 25 min on a free core
"""
import argparse
import json
import math
import os
import random
import re
import subprocess
import time
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SAMPLE_PROMPTS = [
    "In the beginning",
    "And the LORD said unto Moses,",
    "Blessed are the",
    "The kingdom of heaven is like",
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models/text-kjv"))
    p.add_argument("--seed", type=int, default=1611)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--probe", action="store_true", help="time 10 steps and exit")
    return p.parse_args()


def load_verses():
    """[(reference, text)] for the whole KJV, from Debian's `bible` program."""
    try:
        raw = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise SystemExit("the `bible` program is missing: apt-get install bible-kjv")
    verses = []
    for line in raw.splitlines():
        m = re.match(r"^(\S+?\d+:\d+) (.*)$", line)
        if m:
            verses.append((m.group(1), m.group(2).strip()))
    if len(verses) != 31102:
        raise SystemExit(f"expected 31102 verses from `bible`, got {len(verses)}")
    return verses


def chapter_of(ref):
    return ref.split(":")[0]


def train_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main():
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()

    verses = load_verses()
    train_v = [v for i, v in enumerate(verses) if i % 50 != 49]
    val_v = [v for i, v in enumerate(verses) if i % 50 == 49]

    # Plain text: one verse per line, chapters separated by a blank line.
    def stream(vs):
        out, prev = [], None
        for ref, text in vs:
            if prev is not None and chapter_of(ref) != prev:
                out.append("")
            out.append(text)
            prev = chapter_of(ref)
        return "\n".join(out) + "\n"

    train_text, val_text = stream(train_v), stream(val_v)
    tok = train_tokenizer(train_text.splitlines(), args.vocab)
    sid = {s: tok.token_to_id(s) for s in SPECIALS}

    def chat_text(user, assistant):
        return f"<|user|>\n{user}<|end|>\n<|assistant|>\n{assistant}<|end|>\n"

    # Chat exchanges: a verse, then the verse that follows it (train verses only).
    chats = [chat_text(a[1], b[1]) for a, b in zip(train_v, train_v[1:]) if chapter_of(a[0]) == chapter_of(b[0])]
    plain_ids = np.array(tok.encode(train_text).ids, dtype=np.int64)
    chat_ids = np.array([i for c in chats for i in tok.encode(c).ids], dtype=np.int64)
    val_ids = np.array(tok.encode(val_text).ids, dtype=np.int64)
    print(f"corpus: {len(train_v)} train / {len(val_v)} val verses, {len(plain_ids)} plain + "
          f"{len(chat_ids)} chat tokens, {len(val_ids)} val tokens", flush=True)

    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 32 * 32,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 32,
        num_key_value_heads=max(1, args.hidden // 96),
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=sid["<|endoftext|>"],
        eos_token_id=[sid["<|end|>"], sid["<|endoftext|>"]],
        pad_token_id=sid["<|endoftext|>"],
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)

    gen = np.random.default_rng(args.seed)

    def batch():
        rows = []
        for _ in range(args.batch):
            src = chat_ids if gen.random() < 0.2 else plain_ids
            o = gen.integers(0, len(src) - args.seq - 1)
            rows.append(src[o : o + args.seq + 1])
        b = torch.from_numpy(np.stack(rows))
        return b[:, :-1], b[:, 1:]

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warm = max(1, args.steps // 30)

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (args.steps - warm))))

    @torch.no_grad()
    def val_loss(m, dtype=torch.float32):
        m.eval()
        total, count = 0.0, 0
        ids = torch.from_numpy(val_ids)
        n = (len(ids) - 1) // args.seq
        for i in range(0, n, 16):
            xs = torch.stack([ids[j * args.seq : (j + 1) * args.seq] for j in range(i, min(n, i + 16))])
            ys = torch.stack([ids[j * args.seq + 1 : (j + 1) * args.seq + 1] for j in range(i, min(n, i + 16))])
            logits = m(xs).logits.float()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys.reshape(-1), reduction="sum").item()
            count += ys.numel()
        m.train()
        return total / count

    steps = 10 if args.probe else args.steps
    model.train()
    t0 = time.time()
    history = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = batch()
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            el = time.time() - t0
            print(f"step {step}/{steps} loss {loss.item():.3f} lr {lr_at(step):.2e} {el:.0f}s "
                  f"({(step + 1) * args.batch * args.seq / el:.0f} tok/s)", flush=True)
            history.append({"step": step, "train_loss": round(loss.item(), 4)})
    if args.probe:
        print(f"probe: {(time.time() - t0) / steps:.2f} s/step")
        return
    train_s = time.time() - t0

    vl32 = val_loss(model)
    model = model.half()
    vl16 = val_loss(model)
    print(f"validation loss f32 {vl32:.4f} f16 {vl16:.4f} (ppl {math.exp(vl16):.1f})", flush=True)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = [sid["<|end|>"], sid["<|endoftext|>"]]
    model.generation_config.bos_token_id = sid["<|endoftext|>"]
    model.generation_config.pad_token_id = sid["<|endoftext|>"]
    model.save_pretrained(out, safe_serialization=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    # The template goes in tokenizer_config.json, where every loader looks (transformers 5 writes
    # it to chat_template.jinja instead).
    cfg_path = out / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text())
    tc["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)

    # Reference outputs and samples from transformers, on the saved f16 weights.
    model = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    gen_cfg = dict(max_new_tokens=40, do_sample=False, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    reference, samples = [], []
    for prompt in SAMPLE_PROMPTS:
        ids = tok.encode(prompt).ids
        with torch.no_grad():
            outp = model.generate(torch.tensor([ids]), **gen_cfg)[0, len(ids) :].tolist()
        text = tok.decode(outp)
        reference.append({"prompt": prompt, "prompt_ids": ids, "ids": outp})
        samples.append({"prompt": prompt, "greedy": prompt + text})
        print(f"  {prompt!r} -> {text!r}", flush=True)
    chat_prompt = fast.apply_chat_template([{"role": "user", "content": "The LORD is my shepherd; I shall not want."}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tok.encode(chat_prompt).ids
    with torch.no_grad():
        outp = model.generate(torch.tensor([ids]), **gen_cfg)[0, len(ids) :].tolist()
    reference.append({"prompt": chat_prompt, "prompt_ids": ids, "ids": outp, "chat": True})
    samples.append({"chat_user": "The LORD is my shepherd; I shall not want.",
                    "assistant": tok.decode(outp, skip_special_tokens=True)})
    (out / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")

    report = {
        "corpus": "King James Bible (1611), Debian package bible-kjv-text, every 50th verse held out",
        "train_verses": len(train_v), "val_verses": len(val_v),
        "train_tokens": {"plain": int(len(plain_ids)), "chat": int(len(chat_ids))}, "val_tokens": int(len(val_ids)),
        "parameters": n_params,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tokens_seen": steps * args.batch * args.seq,
        "val_loss_f32": round(vl32, 4), "val_loss_f16": round(vl16, 4), "val_perplexity": round(math.exp(vl16), 2),
        "train_seconds": round(train_s), "total_seconds": round(time.time() - t_start),
        "history": history, "samples": samples,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"done in {time.time() - t_start:.0f}s -> {out}")


if __name__ == "__main__":
    main()
