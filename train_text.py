"""Stage 1 (LLM2VEC4CXR; Ko et al. 2025, arXiv 2509.15234, sec. 2): turn a decoder LLM into a chest X-ray report encoder.

    python train_text.py configs/small.yaml                 # SmolLM2-135M on Open-I, both stages
    python train_text.py configs/tiny.yaml text.stages=[mntp] out_dir=runs/t
    torchrun --nproc_per_node=2 train_text.py configs/small.yaml

1. The LLM runs bidirectionally (no causal mask; LLM2Vec).
2. MNTP: 20% of report tokens masked, each predicted from the state one position before it,
   through the LM head, with LoRA on all seven projections. The adapter is then merged.
3. Contrastive: K clinically equivalent variants of each report (abbreviated, shuffled, impression
   only, ...) are positives, every other report in the batch a negative, plus error-injected hard
   negatives and findings -> impression pairs; supervised contrastive loss at temperature 0.02,
   with a fresh LoRA and the pooler trained.
`text.init=runs/x/text` starts from an earlier run's encoder instead of the raw LLM (one MNTP run
feeding several contrastive ablations, as configs/ablations.py does).
Each stage ends with a short held-out evaluation (acronym retrieval, error discrimination). The
encoder is written to `out_dir/text/encoder.json` (base model + adapters, in order), which
train_clip.py and evaluate.py load with `encoders.load_text_encoder`.
"""
import dataclasses
import json
import os
import random
import sys

import data
import evaluate
import losses
import model as M
from cases import build_text_cases
from encoders import build_llm, load_text_encoder, make_embed, pad_id, save_stage
from results import plot_losses
from runtime import EndlessBatches, load_config, save_config, setup, train_loop

# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def held_out_eval(encoder, tokenizer, reports, cfg, env):
    """Acronym retrieval and error discrimination on held-out reports (evaluate.py's tasks)."""
    cases = build_text_cases(reports[:cfg.text.eval_reports], random.Random(cfg.seed))
    metric = {"acronym": "R@1", "paraphrase": "R@1", "error": "top1_accuracy"}
    res = evaluate.evaluate_text_tasks(make_embed(encoder, tokenizer, cfg.model, env.precision),
                                       {k: v for k, v in cases.items() if k in metric})
    return {f"{task}_{metric[task]}": res[task][metric[task]] for task in metric if task in res}


def start_from(cfg, out, device):
    """(llm, tokenizer, stages already in it) to train on: the configured LLM, or with `text.init`
    the LLM of an earlier run's encoder, its stages merged (so one MNTP run can feed several
    contrastive ablations). Its stages are listed first in our encoder.json, by relative path;
    its pooler is not carried over (this run's model.pooling decides)."""
    if not cfg.text.init:
        return *build_llm(cfg.model, cfg.seed, device), []
    encoder, tokenizer, base = load_text_encoder(cfg.text.init, device)
    for key in ("path", "random_init"):
        if getattr(base, key) != getattr(cfg.model, key):
            raise ValueError(f"text.init {cfg.text.init!r} was trained from model.{key}={getattr(base, key)!r}, "
                             f"this config has {getattr(cfg.model, key)!r}")
    with open(os.path.join(cfg.text.init, "encoder.json")) as f:
        stages = json.load(f)["stages"]
    relative = lambda d: os.path.relpath(os.path.join(cfg.text.init, d), out)
    stages = [{k: v for k, v in s.items() if k != "pooler"} | {"dir": relative(s["dir"])} for s in stages]
    return encoder.llm, tokenizer, stages


def check_config(cfg, llm):
    t = cfg.text
    unknown = [s for s in t.stages if s not in ("mntp", "contrastive")]
    if unknown:
        raise ValueError(f"unknown text.stages {unknown}; choose from ['mntp', 'contrastive']")
    if t.contrastive.batch_size % t.variants_per_report or t.variants_per_report < 2:
        raise ValueError(f"text.contrastive.batch_size ({t.contrastive.batch_size}) must be a multiple of "
                         f"text.variants_per_report ({t.variants_per_report}, at least 2)")
    if cfg.model.max_len > llm.config.max_position_embeddings:
        raise ValueError(f"model.max_len {cfg.model.max_len} exceeds the model's limit {llm.config.max_position_embeddings}")


# ---------------------------------------------------------------------------------------------
# The two stages
# ---------------------------------------------------------------------------------------------

def main(argv):
    cfg = load_config(argv[0], argv[1:])
    env = setup(cfg)
    out = os.path.join(cfg.out_dir, "text")
    os.makedirs(out, exist_ok=True)
    if env.is_main:
        save_config(cfg, os.path.join(out, "config.yaml"))
    reports = data.load_reports(cfg)
    llm, tokenizer, adapters = start_from(cfg, out, env.device)
    check_config(cfg, llm)
    llm.gradient_checkpointing = cfg.train.grad_checkpointing
    t = cfg.text
    encoder = M.TextEncoder(llm, cfg.model.pooling, cfg.model.num_latents).to(env.device)
    results = {"before": held_out_eval(encoder, tokenizer, reports["val"], cfg, env)} if env.is_main else {}

    for stage in t.stages:
        run_dir = os.path.join(out, stage)
        if t.lora:
            M.add_lora(llm, M.STAGE1_TARGETS, t.lora_r, t.lora_alpha, t.lora_dropout)
        else:
            llm.requires_grad_(True)
        if stage == "mntp":
            mask_id = tokenizer.token_to_id(t.mask_token)
            if mask_id is None:
                raise ValueError(f"text.mask_token {t.mask_token!r} is not a single token of this tokenizer")
            collator = data.MNTPCollator(tokenizer, cfg.model.max_len, pad_id(llm.config), mask_id, t.mask_prob)
            batches = data.MNTPBatches(reports["train"], collator, t.mntp.batch_size, cfg.seed)

            def loss_fn(net, b):
                h = net(b["input_ids"], b["attention_mask"], causal=False)       # (B, T, d)
                return losses.mntp_loss(h, b["labels"], llm.lm_head), int(b["attention_mask"].sum())
            train_loop("mntp", llm, loss_fn, EndlessBatches(batches, env), t.mntp, cfg, env, run_dir)
        else:
            if encoder.pooler is not None:
                encoder.pooler.requires_grad_(True)
            batches = data.ContrastiveBatches(
                reports["train"], tokenizer, pad_id(llm.config), t.contrastive.batch_size, t.variants_per_report,
                cfg.model.max_len, cfg.model.instruction or None, t.summarize_instruction or None,
                t.hard_negative_share, t.summarize_share, padding_side=cfg.model.padding_side, seed=cfg.seed)

            def loss_fn(net, b):
                e = net(b["input_ids"], b["attention_mask"], b["embed_mask"])      # (N, d)
                # ids count from 0 in every batch: offset them per rank so that gathered groups from
                # different ranks never merge (identical texts on two ranks then count as negatives)
                groups = b["group_ids"] + env.rank * len(b["group_ids"])
                loss = losses.supcon_loss(e.float(), groups, t.temperature, b["is_hard_negative"])
                return loss, int(b["attention_mask"].sum())
            train_loop("contrastive", encoder, loss_fn, EndlessBatches(batches, env), t.contrastive, cfg, env, run_dir)
        if env.is_main:
            adapters.append(save_stage(encoder, run_dir, t.lora))
            results[stage] = held_out_eval(encoder, tokenizer, reports["val"], cfg, env)
            print(f"{stage}: held-out {results[stage]} (before training: {results['before']})")
        if t.lora:
            M.merge_lora(llm)  # LLM2Vec: merge, then the next stage trains a fresh adapter
        llm.requires_grad_(False)

    if env.is_main:
        spec = dict(model=dataclasses.asdict(cfg.model), seed=cfg.seed, stages=adapters)
        with open(os.path.join(out, "encoder.json"), "w") as f:
            json.dump(spec, f, indent=2)
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(results, f, indent=2)
        plot_losses({s: os.path.join(out, s, "log.jsonl") for s in t.stages}, os.path.join(out, "loss.png"))
    return encoder, tokenizer, results


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python train_text.py CONFIG.yaml [key=value ...]")
    main(sys.argv[1:])
