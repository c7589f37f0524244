"""Speed and memory benchmarks, each against a reference measured in the same process.

    python bench.py                 # every benchmark
    python bench.py model mntp      # only these
    python bench.py batches --dtype fp32   # the training steps on small.yaml's real batches (CPU: fp32)

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
from results import results_table
from synthetic import synth_study
from weights import load_llm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def timeit(fn, reps=3, warmup=1, each=False):
    """Median seconds of `fn()` over `reps` runs after `warmup` runs (each=True: every run's time)."""
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
    return times if each else statistics.median(times)


def timeit_many(fns: dict, reps=3, warmup=1):
    """{name: median seconds}, the runs interleaved (a, b, c, a, b, c, ...) so that load from other
    processes on a shared machine falls on all of them alike."""
    for fn in fns.values():
        timeit(fn, 0, warmup, each=True)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name] += timeit(fn, 1, 0, each=True)
    return {name: statistics.median(t) for name, t in times.items()}


def autocast(precision):
    return torch.autocast(DEVICE, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def smollm2_pair(dtype=torch.float32):
    """Our LLM and transformers' LlamaForCausalLM with the same SmolLM2-135M weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    ours, tok = load_llm("smollm2", dtype=dtype, device=DEVICE)
    c = ours.config
    ref = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=True, attn_implementation="sdpa")).to(DEVICE, dtype)
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


def matmul_peak(dtype, reps=5):
    """This machine's matmul FLOP/s in `dtype`, the roof for model FLOPs utilisation: the best of
    `reps` timed runs of each of a few square sizes (the best, not the median: the roof)."""
    sizes = (2048, 4096, 8192) if DEVICE == "cuda" else (512, 1024, 2048)
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, device=DEVICE), torch.randn(n, n, dtype=dtype, device=DEVICE)
        best = max(best, *(2 * n ** 3 / t for t in timeit(lambda: a @ b, reps, warmup=2, each=True)))
    return best


def lora_pair(dropout, layers=None, dtype=torch.float32):
    """Ours and transformers + peft with the same SmolLM2-135M weights, the same LoRA (r 16, alpha 32
    on q/k/v/o/gate/up/down, the same non-zero adapter weights), both bidirectional as LLM2Vec makes
    the HF model (no causal mask in any layer)."""
    from peft import LoraConfig, get_peft_model
    ours, ref, tok = smollm2_pair(dtype)  # the base in dtype, the adapters fp32 in both
    ref.config.is_causal = False
    for m in ref.modules():
        if hasattr(m, "is_causal"):
            m.is_causal = False
    targets = list(M.STAGE1_TARGETS)
    M.add_lora(ours, targets, r=16, alpha=32, dropout=dropout, layers=layers)
    ref = get_peft_model(ref, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=targets,
                                         layers_to_transform=ours.lora_config["layers_to_transform"]))
    lora = {k: v for k, v in ours.state_dict().items() if ".lora_" in k}
    with torch.no_grad():
        for k, v in lora.items():
            if ".lora_B" in k:
                v.normal_(std=0.01)
    missing = set(lora) - {k.removeprefix("base_model.model.").replace(".default", "") for k in ref.state_dict()}
    assert not missing, sorted(missing)[:3]
    ref.load_state_dict({"base_model.model." + k.replace(".weight", ".default.weight"): v for k, v in lora.items()},
                        strict=False)
    return ours, ref, tok


def bench_train(args):
    """The stage-1 training steps, forward + backward, ours vs transformers + peft
    (same weights, batch, LoRA; both bidirectional), timed interleaved in one run:
    - mntp: logits and loss at the masked positions only; the reference as LLM2Vec trains (every
      logit, then cross-entropy on the masked ones) and, apples to apples, with the same masked head;
    - contrastive: mean pooling, SupCon loss.
    LoRA dropout 0 and 0.05; then LoRA on the top `--lora-layers` layers only (ours), where the
    frozen layers below run without grad. MFU: model FLOPs / the measured matmul peak in that dtype.
    --dtype bf16 (default): bf16 base weights under bf16 autocast, as configs/small.yaml trains;
    fp32: fp32 weights, no autocast."""
    import losses
    B, T = args.batch, args.seq
    precision = args.dtype
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peaks = [matmul_peak(dtype)]
    rows = []
    for dropout, layers in ((0.0, None), (0.05, None), (0.05, args.lora_layers)):
        ours, ref, _ = lora_pair(dropout, layers, dtype)
        c = ours.config
        ids, labels = mntp_batch(None, B, T, c.vocab_size)
        mask = torch.ones_like(ids)
        groups = torch.arange(B, device=DEVICE) // 2
        ref_llm, ref_head = ref.base_model.model.model, ref.base_model.model.lm_head
        ours.eval(), ref.eval()
        with torch.no_grad():  # the two compute the same function: max |diff| / max |h|
            h, h_ref = ours(ids, mask, causal=False), ref_llm(input_ids=ids, attention_mask=mask).last_hidden_state
            same = (h - h_ref).abs().max() / h_ref.abs().max()
        ours.train(), ref.train()  # as in training: LoRA dropout on where p > 0

        def step(model, loss_fn):
            def run():
                with autocast(precision):
                    loss = loss_fn()
                loss.backward()
                model.zero_grad(set_to_none=True)
            return run

        def full_logits():  # LLM2Vec: every logit, then cross-entropy on the masked ones
            logits = ref(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))

        steps = {
            "mntp": (step(ours, lambda: losses.mntp_loss(ours(ids, mask, causal=False), labels, ours.lm_head)),
                     dict(ref_masked_head=step(ref, lambda: losses.mntp_loss(
                         ref_llm(input_ids=ids, attention_mask=mask).last_hidden_state, labels, ref_head)),
                          ref_llm2vec_full_logits=step(ref, full_logits))),
            "contrastive": (step(ours, lambda: losses.supcon_loss(M.pool(ours(ids, mask, causal=False), mask, "mean")
                                                                  .float(), groups, 0.02)),
                            dict(ref=step(ref, lambda: losses.supcon_loss(M.pool(
                                ref_llm(input_ids=ids, attention_mask=mask).last_hidden_state, mask, "mean").float(),
                                groups, 0.02)))),
        }
        # model FLOPs per token, base frozen: forward 2N, backward to the activations 2N (only above
        # the first adapted layer), attention QK^T and AV 4 T d per layer forward, twice that backward;
        # MNTP adds the LM head on the masked fraction of tokens
        first = ours.first_trainable_layer()
        per_layer = [sum(p.numel() for n, p in blk.named_parameters() if n.endswith("proj.weight"))
                     + 2 * T * c.num_attention_heads * c.head_dim for blk in ours.model.layers]
        flops_tok = 2 * sum(per_layer) + 2 * sum(per_layer[first:])
        head = 4 * c.vocab_size * c.hidden_size * (labels[:, 1:] != -100).float().mean().item()
        for stage, (mine, refs) in steps.items():
            times = timeit_many({"ours": mine, **refs}, args.reps)
            flops = flops_tok + (head if stage == "mntp" else 0)
            row = dict(bench="train_step", stage=stage, dtype=precision, lora_dropout=dropout,
                       lora_layers=layers or c.num_hidden_layers, tokens=B * T, ours_tok_s=B * T / times["ours"],
                       model_tflops_s=flops * B * T / times["ours"] / 1e12,
                       hidden_rel_diff=same.item(), ours_peak_mb=peak_rss_mb(mine))
            for name in refs:
                row[f"ratio_vs_{name}"] = times[name] / times["ours"]
            if layers is None:
                row["ref_peak_mb"] = peak_rss_mb(next(iter(refs.values())))
            rows.append(row)
        del ours, ref
        peaks.append(matmul_peak(dtype))  # again after each part: the machine's load may change
    for row in rows:
        row["mfu_ours"], row["peak_tflops"] = row["model_tflops_s"] * 1e12 / max(peaks), max(peaks) / 1e12
    return rows


def bench_batches(args):
    """One MNTP and one contrastive training step on the batches configs/small.yaml trains on (Open-I
    training reports; a contrastive batch holds whole reports beside short impressions, their wrong
    copies and rewritten sentences), LoRA r 16 on the top --lora-layers layers, dropout 0, in --dtype: ours in --buckets forward
    passes over rows of similar length (text.length_buckets) against transformers + peft on the same batch
    in one pass padded to its longest row (as LLM2Vec pads a batch), and against ours in one padded pass.
    Both models get the same positions (counted over real tokens) and compute the same losses
    (loss_rel_diff). Each timed run is a step on each of --reps different batches."""
    import data
    import losses
    import train_text
    from encoders import pad_id
    from runtime import load_config
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "small.yaml"), [])
    t, dtype = cfg.text, torch.bfloat16 if args.dtype == "bf16" else torch.float32
    reports = data.load_reports(cfg)["train"]
    ours, ref, tok = lora_pair(0.0, args.lora_layers, dtype)
    ours.train(), ref.train()
    encoder, ref_llm, pad = M.TextEncoder(ours, "mean"), ref.base_model.model.model, pad_id(ours.config)
    device = lambda b: {k: v.to(DEVICE) for k, v in b.items()}
    contrastive = data.ContrastiveBatches(reports, tok, pad, t.contrastive.batch_size, t.variants_per_report,
                                          cfg.model.max_len, hard_negative_share=t.hard_negative_share,
                                          summarize_share=t.summarize_share, impression_negatives=t.impression_negatives,
                                          sentence_share=t.sentence_share)
    collator = data.MNTPCollator(tok, cfg.model.max_len, pad, tok.token_to_id(t.mask_token), t.mask_prob)
    mntp = data.MNTPBatches(reports, collator, t.mntp.batch_size, seed=0)
    batches = {"contrastive": [device(contrastive[i]) for i in range(args.reps)],
               "mntp": [device(mntp[i]) for i in range(args.reps)]}

    def hidden_ref(b):  # the reference, with our positions: over real tokens, as for a right-padded row
        positions = (b["attention_mask"].cumsum(1) - 1).clamp(min=0)
        return ref_llm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=positions).last_hidden_state

    def supcon(e, b):
        return losses.supcon_loss(e.float(), data.groups_from_keys(b["group_keys"].cpu()).to(DEVICE), t.temperature,
                                  b["is_hard_negative"])
    losses_of = {
        "contrastive": {
            "ours": lambda b: supcon(M.embed_in_buckets(encoder, b, args.buckets), b),
            "ours_one_pass": lambda b: supcon(encoder(b["input_ids"], b["attention_mask"], b["embed_mask"]), b),
            "ref": lambda b: supcon(M.pool(hidden_ref(b), b["embed_mask"], "mean"), b)},
        "mntp": {
            "ours": lambda b: train_text.mntp_loss_in_buckets(ours, ours.lm_head, b, args.buckets),
            "ours_one_pass": lambda b: losses.mntp_loss(ours(b["input_ids"], b["attention_mask"], causal=False),
                                                        b["labels"], ours.lm_head),
            "ref": lambda b: losses.mntp_loss(hidden_ref(b), b["labels"], ref.base_model.model.lm_head)}}
    rows = []
    for stage, fns in losses_of.items():
        with torch.no_grad():
            got = {name: torch.stack([fn(b) for b in batches[stage]]) for name, fn in fns.items()}

        def steps(fn):
            def run():
                for b in batches[stage]:
                    with autocast(args.dtype):
                        loss = fn(b)
                    loss.backward()
                    ours.zero_grad(set_to_none=True), ref.zero_grad(set_to_none=True)
            return run
        times = timeit_many({name: steps(fn) for name, fn in fns.items()}, reps=3)
        real = sum(int(b["attention_mask"].sum()) for b in batches[stage])
        padded = sum(b["attention_mask"].numel() for b in batches[stage])
        rows.append(dict(bench="real_batches", stage=stage, dtype=args.dtype, buckets=args.buckets,
                         lora_layers=args.lora_layers, rows_per_batch=batches[stage][0]["input_ids"].shape[0],
                         real_token_share=real / padded, ours_tok_s=real / times["ours"],
                         ratio_vs_ref=times["ref"] / times["ours"],
                         ratio_one_pass_vs_ref=times["ref"] / times["ours_one_pass"],
                         loss_rel_diff=((got["ours"] - got["ref"]).abs().max() / got["ref"].abs().max()).item(),
                         ours_peak_mb=peak_rss_mb(steps(fns["ours"])), ref_peak_mb=peak_rss_mb(steps(fns["ref"]))))
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


BENCHES = {"model": bench_model, "mntp": bench_mntp, "train": bench_train, "batches": bench_batches,
           "synthetic": bench_synthetic, "retrieval": bench_retrieval}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", default=list(BENCHES), help=f"benchmarks to run: {', '.join(BENCHES)}")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="train: the base weights and compute")
    p.add_argument("--lora-layers", type=int, default=8, help="train: LoRA on the top N layers only, too; batches: "
                   "LoRA on the top N layers")
    p.add_argument("--buckets", type=int, default=3, help="batches: forward passes per batch, by length")
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
    tables = [f"# bench.py on {DEVICE}, torch {torch.__version__}, {torch.get_num_threads()} threads\n"]
    for name in dict.fromkeys(r["bench"] for r in rows):  # a Markdown table per benchmark, a row per run
        mine = [{k: v for k, v in r.items() if k != "bench"} for r in rows if r["bench"] == name]
        tables.append(f"## {name}\n\n" + results_table({str(i + 1): r for i, r in enumerate(mine)}))
    md = os.path.splitext(args.out)[0] + ".md"
    with open(md, "w") as f:
        f.write("\n".join(tables))
    print("\n".join(tables), f"written: {args.out}, {md}", sep="\n")


if __name__ == "__main__":
    main()
