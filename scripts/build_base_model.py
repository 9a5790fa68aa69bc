"""Build the small base model prefalign ships: a byte-level BPE tokenizer and a Llama-shape causal LM
trained on the IMDb movie-review corpus (Maas et al. 2011; ../shared/data/imdb), saved as a standard
HF folder in src/prefalign/assets/imdb-lm, then the demo's review prefixes (scripts/build_prefixes.py).

    python scripts/build_base_model.py --minutes 25        # what the shipped model was built with

Train text: the 50k unlabelled + 25k train reviews; held out: the test reviews (perplexity on 500 of
them; the prefixes come from the others). Reviews are cleaned of <br /> tags, joined with EOS and packed into
fixed-length rows. The schedule is warmup + cosine over the number of steps the time budget allows
(measured on the first steps), so the run ends on time with the learning rate annealed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from build_prefixes import reviews, shuffled_test, write_prefixes

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "src" / "prefalign" / "assets"
OUT = ASSETS / "imdb-lm"


def build_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>", model_max_length=1024)


def pack(tokenizer, texts: list[str], seq: int, max_tokens: int) -> torch.Tensor:
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for i in range(0, len(texts), 1000):
        for row in tokenizer(texts[i:i + 1000], add_special_tokens=False)["input_ids"]:
            ids += row + [eos]
        if len(ids) >= max_tokens:
            break
    n = len(ids) // seq
    return torch.tensor(ids[:n * seq]).view(n, seq)


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, batch: int = 32) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        x = rows[i:i + batch]
        logits = model(x).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                         reduction="sum"))
        count += x[:, 1:].numel()
    model.train()
    return math.exp(total / count)


def main() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget for the training loop")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train-tokens", type=int, default=12_000_000, help="tokens packed for training (upper bound)")
    ap.add_argument("--prefixes", type=int, default=600, help="train + test prefixes (build_prefixes.py)")
    ap.add_argument("--validation-prefixes", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    t_all = time.perf_counter()

    train_texts = reviews("unsup") + reviews("train")
    random.Random(args.seed).shuffle(train_texts)
    test_texts = shuffled_test(args.seed)
    tokenizer = build_tokenizer(train_texts[:20_000], args.vocab)
    train = pack(tokenizer, train_texts, args.seq, args.train_tokens)
    held_out = pack(tokenizer, test_texts[:500], args.seq, 10**9)
    print(f"tokenizer {len(tokenizer)}; {train.numel():,} train tokens, {held_out.numel():,} held-out tokens; "
          f"{time.perf_counter() - t_all:.0f} s", flush=True)

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3),
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    budget, warmup, planned = args.minutes * 60, 100, None
    order = torch.randperm(len(train))
    step, t0, seen = 0, time.perf_counter(), 0
    while True:
        elapsed = time.perf_counter() - t0
        if step == 30:  # the speed is known now: fit warmup + cosine into the budget
            planned = max(warmup + 1, int(budget / (elapsed / 30)))
            print(f"{elapsed / 30:.2f} s/step -> {planned} steps in {args.minutes} min", flush=True)
        if planned is not None and step >= planned:
            break
        lr = args.lr * min(1.0, (step + 1) / warmup)
        if planned is not None and step > warmup:
            lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (planned - warmup))))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = order[(step * args.batch) % len(train):][:args.batch]
        if len(idx) < args.batch:
            order = torch.randperm(len(train))
            idx = order[:args.batch]
        x = train[idx]
        loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        seen += x.numel()
        if step % 200 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {seen / (time.perf_counter() - t0):.0f} tok/s",
                  flush=True)
    train_seconds = time.perf_counter() - t0
    ppl = perplexity(model, held_out)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    sample_in = tokenizer("This movie was", return_tensors="pt")
    torch.manual_seed(0)
    sample = model.generate(**sample_in, do_sample=True, top_k=0, top_p=0.95, max_new_tokens=40,
                            pad_token_id=tokenizer.pad_token_id)
    record = {
        "command": "python scripts/build_base_model.py " + " ".join(sys.argv[1:]),
        "parameters": n_params,
        "steps": step,
        "train_tokens_seen": seen,
        "train_seconds": train_seconds,
        "tokens_per_s": seen / train_seconds,
        "held_out_perplexity": ppl,
        "held_out_tokens": held_out.numel(),
        "total_seconds": time.perf_counter() - t_all,
        "torch_threads": torch.get_num_threads(),
        "sample": tokenizer.decode(sample[0], skip_special_tokens=True),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2))
    write_prefixes(ASSETS, args.prefixes, args.validation_prefixes, args.seed)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
