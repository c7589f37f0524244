"""Speed and memory benchmarks, each against a reference measured in the same process.

    python bench.py                 # every benchmark
    python bench.py model mntp      # only these

Reported as ratios ours / reference, since absolute numbers on shared machines are noisy.
transformers and peft are used here only as references.
"""
import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch

import model as M

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def timeit(fn, reps=3, warmup=1):
    """Median seconds of `fn()` over `reps` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def autocast(precision):
    return torch.autocast(DEVICE, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def smollm2_pair():
    """Our LLM and transformers' LlamaForCausalLM with the same SmolLM2-135M weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    ours, tok = M.load_llm("smollm2", device=DEVICE)
    c = ours.config
    ref = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=True, attn_implementation="sdpa")).to(DEVICE)
    ref.load_state_dict(ours.state_dict(), strict=False)
    return ours, ref, tok


def bench_model(args):
    """Forward and forward+backward tokens/s of the full causal LM (logits for every token)."""
    ours, ref, _ = smollm2_pair()
    B, T = args.batch, args.seq
    ids = torch.randint(0, ours.config.vocab_size, (B, T), device=DEVICE)
    rows = []
    for precision in ("fp32", "bf16"):
        for mode in ("forward", "forward+backward"):
            def run(m, logits):
                with autocast(precision):
                    if mode == "forward":
                        with torch.no_grad():
                            logits(ids)
                    else:
                        logits(ids).float().mean().backward()
                        m.zero_grad(set_to_none=True)
            t_ours = timeit(lambda: run(ours, ours.logits), args.reps)
            t_ref = timeit(lambda: run(ref, lambda x: ref(x).logits), args.reps)
            rows.append(dict(bench="model", precision=precision, mode=mode, ours_tok_s=B * T / t_ours,
                             ref_tok_s=B * T / t_ref, ratio=t_ref / t_ours))
    return rows


BENCHES = {"model": bench_model}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", default=list(BENCHES), help=f"benchmarks to run: {', '.join(BENCHES)}")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="bench_results.json")
    args = p.parse_args()
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    torch.manual_seed(0)
    rows = []
    for name in args.names:
        rows += BENCHES[name](args)
        for r in rows:
            print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    with open(args.out, "w") as f:
        json.dump(dict(device=DEVICE, torch=torch.__version__, threads=torch.get_num_threads(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
