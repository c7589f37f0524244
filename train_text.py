"""Stage 1 (LLM2VEC4CXR; Ko et al. 2025, arXiv 2509.15234, sec. 2): turn a decoder LLM into a chest X-ray report encoder.

    python train_text.py configs/small.yaml                 # SmolLM2-135M on Open-I, both stages
    python train_text.py configs/tiny.yaml text.stages=[mntp] out_dir=runs/t
    torchrun --nproc_per_node=2 train_text.py configs/small.yaml

1. The LLM runs bidirectionally (no causal mask; LLM2Vec).
2. MNTP: 20% of report tokens masked, each predicted from the state one position before it,
   through the LM head, with LoRA on all seven projections (of the top text.lora_layers layers;
   0: every layer). The adapter is then merged.
3. Contrastive: K clinically equivalent variants of each report (abbreviated, shuffled, impression
   only, ...) are positives, every other report in the batch a negative, plus error-injected hard
   negatives and findings -> impression pairs; supervised contrastive loss at temperature 0.02,
   with a fresh LoRA (on the top text.contrastive_lora_layers layers; -1: as MNTP) and the pooler trained.
`text.init=runs/x/text` starts from an earlier run's encoder instead of the raw LLM (one MNTP run
feeding several contrastive ablations, as configs/ablations.py does).
Before and after training, a short held-out evaluation (acronym and paraphrase retrieval, error
discrimination; beside TF-IDF's scores, written to out_dir/text/eval.json). The
encoder is written to `out_dir/text/encoder.json` (base model or init run + adapters, in order), which
train_clip.py and evaluate.py load with `encoders.load_text_encoder`.
"""
import dataclasses
import json
import os
import random
import sys

from tqdm import tqdm

import data
import evaluate
import losses
import model as M
from cases import build_text_cases
from encoders import build_llm, embed_each_once, load_text_encoder, make_embed, pad_id, save_stage
from reports import idf_weights
from results import plot_losses
from runtime import EndlessBatches, leave_process_group, load_config, save_config, setup, train_loop, write_text

# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

HELD_OUT = {"acronym": "R@1", "paraphrase": "R@1", "error": "top1_accuracy"}  # task -> the number shown


def held_out_eval(embed, cases, name):
    """Acronym and paraphrase retrieval and error discrimination on the held-out cases (evaluate.py's
    tasks, built from text.eval_reports val reports) for embed(texts) -> (N, d): the encoder's, or the
    TF-IDF baseline's. Each distinct text is embedded once, shortest first, with a progress bar."""
    res = evaluate.evaluate_text_tasks(embed_each_once(embed, name, batch_size=32), cases)
    return {f"{task}_{metric}": res[task][metric] for task, metric in HELD_OUT.items() if task in res}


def start_from(cfg, out, device):
    """(llm, tokenizer, init) to train on: the configured LLM, or with `text.init` the LLM of an
    earlier run's encoder, its stages merged (so one MNTP run can feed several contrastive
    ablations). init: that run's folder relative to ours, for our encoder.json's "init" entry, which
    encoders.load_text_encoder follows first (our stage entries stay inside our folder); its pooler
    is not carried over (this run's model.pooling decides)."""
    if not cfg.text.init:
        return *build_llm(cfg.model, cfg.seed, device), None
    encoder, tokenizer, base = load_text_encoder(cfg.text.init, device)
    for key in ("path", "random_init"):
        if getattr(base, key) != getattr(cfg.model, key):
            raise ValueError(f"text.init {cfg.text.init!r} was trained from model.{key}={getattr(base, key)!r}, "
                             f"this config has {getattr(cfg.model, key)!r}")
    return encoder.llm, tokenizer, os.path.relpath(cfg.text.init, out)


def mntp_loss_in_buckets(llm, lm_head, batch, buckets):
    """losses.mntp_loss of an MNTP batch, run in `buckets` forward passes over reports of similar length
    (model.length_buckets): the mean over the masked tokens of all buckets, that of one padded pass.
    llm: the model as trained (under torchrun its DDP wrapper), lm_head: its LM head."""
    parts = [(losses.mntp_loss(llm(ids, mask, causal=False), labels, lm_head),        # llm(...): (b, t, d)
              int((labels[:, 1:] != -100).sum()))
             for _, (ids, mask, labels) in M.length_buckets(batch, buckets, ("input_ids", "attention_mask", "labels"))]
    if len(parts) == 1:
        return parts[0][0]
    return sum(loss * n for loss, n in parts) / max(1, sum(n for _, n in parts))


def contrastive_loss(embeddings, batch, temperature):
    """SupCon (losses.supcon_loss) over the global batch of all processes. The group ids are made
    from every process's rows at once: each row's keys (hashes of its normalised text and of its
    source report, data.group_keys) are gathered like the embeddings, in the same rank-major order,
    and merged there. So identical texts on two ranks are positives, unrelated reports never share
    an id, and N processes with batch b give the loss and gradients of one process with batch N·b."""
    keys, offset = losses.gather_features(batch["group_keys"])              # (M, 2), every rank's rows
    groups = data.groups_from_keys(keys.cpu()).to(keys.device)[offset:offset + len(embeddings)]
    return losses.supcon_loss(embeddings.float(), groups, temperature, batch["is_hard_negative"])


def check_config(cfg, llm):
    t = cfg.text
    unknown = [s for s in t.stages if s not in ("mntp", "contrastive")]
    if unknown:
        raise ValueError(f"unknown text.stages {unknown}; choose from ['mntp', 'contrastive']")
    if t.contrastive.batch_size % t.variants_per_report or t.variants_per_report < 2:
        raise ValueError(f"text.contrastive.batch_size ({t.contrastive.batch_size}) must be a multiple of "
                         f"text.variants_per_report ({t.variants_per_report}, at least 2)")
    if t.lora_layers < 0 or t.contrastive_lora_layers < -1:
        raise ValueError(f"text.lora_layers must be at least 0 (0: every layer) and text.contrastive_lora_layers at least "
                         f"-1 (-1: as text.lora_layers), got {t.lora_layers} and {t.contrastive_lora_layers}")
    for key in ("impression_negatives", "length_buckets"):
        if getattr(t, key) < 1:
            raise ValueError(f"text.{key} must be at least 1, got {getattr(t, key)}")
    if cfg.model.max_len > llm.config.max_position_embeddings:
        raise ValueError(f"model.max_len {cfg.model.max_len} exceeds the model's limit {llm.config.max_position_embeddings}")
    low = sorted({str(p.dtype) for p in llm.parameters() if p.dtype.itemsize < 4})
    if not t.lora and low:  # LoRA keeps fp32 adapters (model.LoRALinear); full fine-tuning would not
        raise ValueError(f"text.lora=false trains the LLM's own weights, which are {', '.join(low)} here "
                         f"(model.dtype={cfg.model.dtype}{', or text.init' if t.init else ''}): AdamW would update "
                         "them in place, and steps below bf16's resolution (1/256 of a weight) would be lost. "
                         "Set model.dtype=float32 for full fine-tuning (train.precision=bf16 still computes in "
                         "bf16), or keep text.lora=true")


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
    starting = tqdm(total=2, desc="loading reports", bar_format="{desc} ({n}/{total}, {elapsed})",
                    disable=not env.is_main)  # shown from the first second: reading and dequantising take a while
    reports = data.load_reports(cfg)
    starting.set_description_str(f"loading {cfg.model.path}")
    starting.update()
    llm, tokenizer, init = start_from(cfg, out, env.device)
    starting.update()
    starting.close()
    adapters = []
    check_config(cfg, llm)
    t = cfg.text
    encoder = M.TextEncoder(llm, cfg.model.pooling, cfg.model.num_latents).to(env.device)
    embed = lambda: make_embed(encoder, tokenizer, cfg.model, env.precision)
    if env.is_main:  # the val reports that occur in training are dropped (data.load_reports)
        train_texts = [r.text() for r in reports["train"]]
        cases = build_text_cases(reports["val"][:t.eval_reports], random.Random(cfg.seed),
                                 weights=idf_weights(train_texts))
        cases = {task: c for task, c in cases.items() if task in HELD_OUT}
        tfidf = evaluate.tfidf_embed(train_texts)
        results = {"overlap": reports["overlap"],
                   "baseline: TF-IDF": held_out_eval(tfidf, cases, "TF-IDF, held-out"),
                   "before": held_out_eval(embed(), cases, "before training, held-out")}
    else:
        results = {}

    for stage in t.stages:
        run_dir = os.path.join(out, stage)
        llm.gradient_checkpointing = cfg.train.grad_checkpointing or getattr(t, stage).grad_checkpointing
        if t.lora:
            layers = t.contrastive_lora_layers if stage == "contrastive" and t.contrastive_lora_layers >= 0 else t.lora_layers
            M.add_lora(llm, M.STAGE1_TARGETS, t.lora_r, t.lora_alpha, t.lora_dropout, layers=layers or None)
        else:
            llm.requires_grad_(True)
        if stage == "mntp":
            mask_id = tokenizer.token_to_id(t.mask_token)
            if mask_id is None:
                raise ValueError(f"text.mask_token {t.mask_token!r} is not a single token of this tokenizer")
            collator = data.MNTPCollator(tokenizer, cfg.model.max_len, pad_id(llm.config), mask_id, t.mask_prob)
            batches = data.MNTPBatches(reports["train"], collator, t.mntp.batch_size, cfg.seed)

            def loss_fn(net, b):
                return mntp_loss_in_buckets(net, llm.lm_head, b, t.length_buckets), int(b["attention_mask"].sum())
            train_loop("mntp", llm, loss_fn, EndlessBatches(batches, env), t.mntp, cfg, env, run_dir)
        else:
            if encoder.pooler is not None:
                encoder.pooler.requires_grad_(True)
            batches = data.ContrastiveBatches(
                reports["train"], tokenizer, pad_id(llm.config), t.contrastive.batch_size, t.variants_per_report,
                cfg.model.max_len, cfg.model.instruction or None, t.summarize_instruction or None,
                t.hard_negative_share, t.summarize_share, padding_side=cfg.model.padding_side, seed=cfg.seed,
                impression_negatives=t.impression_negatives, sentence_share=t.sentence_share)

            def loss_fn(net, b):
                e = M.embed_in_buckets(net, b, t.length_buckets)                  # (N, d)
                return contrastive_loss(e, b, t.temperature), int(b["attention_mask"].sum())
            train_loop("contrastive", encoder, loss_fn, EndlessBatches(batches, env), t.contrastive, cfg, env, run_dir)
        if env.is_main:
            adapters.append(save_stage(encoder, run_dir, t.lora))
            if stage == t.stages[-1]:  # the earlier stages' encoders: evaluate.py scores any saved run
                results[stage] = held_out_eval(embed(), cases, f"after {stage}, held-out")
                print(f"{stage}: held-out {results[stage]} (before training: {results['before']}; "
                      f"TF-IDF: {results['baseline: TF-IDF']})")
        if t.lora:
            M.merge_lora(llm)  # LLM2Vec: merge, then the next stage trains a fresh adapter
        llm.requires_grad_(False)

    if env.is_main:
        spec = dict(model=dataclasses.asdict(cfg.model), seed=cfg.seed, **({"init": init} if init else {}),
                    stages=adapters)
        write_text(os.path.join(out, "encoder.json"), json.dumps(spec, indent=2))
        write_text(os.path.join(out, "eval.json"), json.dumps(results, indent=2))
        plot_losses({s: os.path.join(out, s, "log.jsonl") for s in t.stages}, os.path.join(out, "loss.png"))
    leave_process_group(env)
    return encoder, tokenizer, results


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python train_text.py CONFIG.yaml [key=value ...]")
    main(sys.argv[1:])
