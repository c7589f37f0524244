"""Speed and memory benchmarks, each against a reference measured in the same process.

    python bench.py                 # every benchmark
    python bench.py model mntp      # only these

Reported as ratios ours / reference, since absolute numbers on shared machines are noisy.
transformers and peft are used here only as references.
"""
import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext

import torch

import model as M
from synthetic import synth_study
from weights import load_llm

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
    ours, tok = load_llm("smollm2", device=DEVICE)
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


def peak_rss_mb(fn):
    """Run fn and return the growth of peak resident memory (MB) it caused. The kernel's peak
    counter (VmHWM) is reset first, so earlier peaks (model loading) do not hide it."""
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:  # hand memory freed by earlier runs back to the kernel, or reusing it would not show as growth
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return status("VmHWM") - base


def mntp_batch(tok, B, T, vocab, seed=0):
    """B sequences of T tokens with 20% of positions masked (labels -100 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = torch.where(torch.rand(B, T, generator=g) < 0.2, ids, torch.full_like(ids, -100))
    return ids.to(DEVICE), labels.to(DEVICE)


def bench_mntp(args):
    """MNTP loss: logits at masked positions only vs the full (B, T, vocab) logits, same model."""
    import losses
    llm, _ = load_llm("smollm2", dtype=torch.bfloat16, device=DEVICE)
    M.add_lora(llm, r=16, alpha=32, dropout=0.0)
    B, T = args.batch, args.seq
    ids, labels = mntp_batch(None, B, T, llm.config.vocab_size)

    def masked():
        with autocast("bf16"):
            losses.mntp_loss(llm(ids, causal=False), labels, llm.lm_head).backward()

    def full():  # what LLM2Vec does: every logit, then cross-entropy on the masked ones
        with autocast("bf16"):
            logits = llm.lm_head(llm(ids, causal=False))[:, :-1].float()
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)).backward()
    t_m, t_f = timeit(masked, args.reps), timeit(full, args.reps)
    m_m, m_f = peak_rss_mb(masked), peak_rss_mb(full)
    return [dict(bench="mntp", tokens=B * T, masked_tok_s=B * T / t_m, full_tok_s=B * T / t_f, speedup=t_f / t_m,
                 masked_peak_mb=m_m, full_peak_mb=m_f, memory_ratio=m_m / m_f)]


def matmul_peak(dtype, n=2048, reps=5):
    """Measured matmul FLOP/s of this machine: the roof for model FLOPs utilisation."""
    a, b = torch.randn(n, n, dtype=dtype, device=DEVICE), torch.randn(n, n, dtype=dtype, device=DEVICE)
    return 2 * n ** 3 / timeit(lambda: a @ b, reps)


def bench_train(args):
    """One MNTP and one contrastive training step (LoRA r16 on q/k/v/o/gate/up/down, bf16 autocast):
    ours vs transformers + peft with full logits (as LLM2Vec trains), tokens/s and MFU."""
    import losses
    from peft import LoraConfig, get_peft_model
    ours, ref, _ = smollm2_pair()
    targets = list(M.STAGE1_TARGETS)
    M.add_lora(ours, targets, r=16, alpha=32, dropout=0.05)
    ref = get_peft_model(ref, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets))
    B, T = args.batch, args.seq
    ids, labels = mntp_batch(None, B, T, ours.config.vocab_size)
    mask = torch.ones_like(ids)
    groups = torch.arange(B, device=DEVICE) // 2

    def ours_mntp():
        with autocast("bf16"):
            loss = losses.mntp_loss(ours(ids, mask, causal=False), labels, ours.lm_head)
        loss.backward()

    def ref_mntp():
        with autocast("bf16"):
            logits = ref(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        loss.backward()

    def ours_contrastive():
        with autocast("bf16"):
            h = ours(ids, mask, causal=False)
            loss = losses.supcon_loss(M.pool(h, mask, "mean").float(), groups, 0.02)
        loss.backward()

    def ref_contrastive():
        with autocast("bf16"):
            h = ref.base_model.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            loss = losses.supcon_loss(M.pool(h, mask, "mean").float(), groups, 0.02)
        loss.backward()

    # model FLOPs per token with a frozen base: forward 2N + backward through activations 2N, plus
    # attention (QK^T and AV: 4 T d per layer forward, twice that backward)
    c = ours.config
    n_matmul = sum(p.numel() for n, p in ours.named_parameters() if n.endswith("proj.weight"))
    flops_tok = 4 * n_matmul + 12 * T * c.num_attention_heads * c.head_dim * c.num_hidden_layers
    peak = matmul_peak(torch.bfloat16)
    rows = []
    for name, mine, theirs in (("mntp", ours_mntp, ref_mntp), ("contrastive", ours_contrastive, ref_contrastive)):
        t_ours, t_ref = timeit(mine, args.reps), timeit(theirs, args.reps)
        rows.append(dict(bench="train_step", stage=name, ours_tok_s=B * T / t_ours, ref_tok_s=B * T / t_ref,
                         ratio=t_ref / t_ours, mfu_ours=flops_tok * B * T / t_ours / peak,
                         bf16_peak_tflops=peak / 1e12))
    return rows


def bench_synthetic(args):
    """Synthetic radiographs: images per second at 256 px in one process (target: 10,000 in < 60 s)."""
    n = args.synthetic_n
    t = time.perf_counter()
    for i in range(n):
        synth_study(0, i, size=256)
    dt = time.perf_counter() - t
    return [dict(bench="synthetic", images=n, seconds=dt, images_per_s=n / dt, seconds_per_10k=dt / n * 10000)]


def bench_retrieval(args):
    """Chunked retrieval ranks at 10k and 100k gallery items (d=512), time and extra peak memory,
    against the naive full similarity matrix where it fits in memory."""
    import evaluate
    rows = []
    for n in (10_000, 100_000):
        g = torch.Generator().manual_seed(0)
        q = torch.nn.functional.normalize(torch.randn(n, 512, generator=g), dim=-1).to(DEVICE)
        gal = torch.nn.functional.normalize(q + 0.5 * torch.randn(n, 512, generator=g).to(DEVICE), dim=-1)
        for bf16 in (False, True):
            run = lambda: evaluate.retrieval_ranks(q, gal, bf16=bf16)
            t = timeit(run, reps=1, warmup=0)
            rows.append(dict(bench="retrieval", n=n, dtype="bf16" if bf16 else "fp32", seconds=t,
                             peak_mb=peak_rss_mb(run)))
        if n * n * 4 < 2**31:  # the naive way: one (n, n) matrix, argsort each row
            def naive():
                sims = q @ gal.T
                return (sims > sims.diagonal()[:, None]).sum(1) + 1
            agree = (naive().cpu() == evaluate.retrieval_ranks(q, gal).cpu()).float().mean().item()
            rows.append(dict(bench="retrieval", n=n, dtype="fp32 naive", seconds=timeit(naive, reps=1, warmup=0),
                             peak_mb=peak_rss_mb(naive), same_ranks=agree))
    return rows


BENCHES = {"model": bench_model, "mntp": bench_mntp, "train": bench_train, "synthetic": bench_synthetic,
           "retrieval": bench_retrieval}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", default=list(BENCHES), help=f"benchmarks to run: {', '.join(BENCHES)}")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--synthetic-n", type=int, default=10_000)
    p.add_argument("--out", default="bench_results.json")
    args = p.parse_args()
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    torch.manual_seed(0)
    rows = []
    for name in args.names:
        new = BENCHES[name](args)
        for r in new:
            print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
        rows += new
    with open(args.out, "w") as f:
        json.dump(dict(device=DEVICE, torch=torch.__version__, threads=torch.get_num_threads(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
