"""Stage 2 (LLM2CLIP4CXR; Ko et al. 2025, arXiv 2509.15234, sec. 2; LLM2CLIP, arXiv 2411.04997): align a ViT image tower with the stage-1 report encoder.

    python train_text.py configs/small.yaml && python train_clip.py configs/small.yaml
    python train_clip.py configs/tiny.yaml clip.text_mode=lora out_dir=runs/t
    python train_clip.py configs/small.yaml clip.text_encoder=raw out_dir=runs/small-raw  # raw vs adapted LLM
    python train_clip.py configs/small.yaml data.train_styles=[shorthand] out_dir=runs/shift  # style shift
    torchrun --nproc_per_node=2 train_clip.py configs/small.yaml

1. Text tower: the stage-1 encoder (`clip.text_encoder: trained`, read from out_dir/text, or the path
   of another run's text/ folder) or the untrained LLM with mean pooling, run causally (`raw`: the
   paper's baseline) or without the causal mask (`raw_bidirectional`), as in evaluate.py; used in one
   of two ways:
   - `frozen` (LLM2CLIP's cheap variant): every report is embedded once by the frozen encoder and
     kept in a cache (encoders.embedding_cache) keyed by the encoder's files; only an adapter MLP reads
     the embeddings. A step then costs a ViT pass, not an LLM pass: this makes CPU training practical.
   - `lora`: LoRA (r 16, alpha 32, dropout 0.1) on q/k/v/o of the LLM; reports tokenised per batch.
2. Image tower: a ViT from model.VISION_PRESETS (random init) or a Hugging Face CLIP folder, on
   1-channel radiographs of data.image_size pixels; random-resized crop (scale 0.9-1.0) in training.
3. Loss: symmetric CLIP InfoNCE, learnable temperature from 0.07, logit scale clamped at 100. Under
   torchrun the features of all ranks are gathered, so N processes with batch b train exactly as one
   process with batch N·b (tests/test_train_clip.py checks it). clip.optim.batch_size is per process.
4. Data: synthetic radiographs with reports (synthetic.SyntheticStudies): `clip.train_n` studies written in
   data.train_styles, `clip.val_n` validation and `clip.test_n` test studies, each evaluated in every
   one of data.test_styles separately: the same images, their reports in another style (the paper's
   external generalisation). `clip.images: real` trains on the data.source reports whose images exist.
5. Evaluation: image -> report and report -> image Recall@1/5/10 and mean rank, identical reports
   merged (evaluate.report_keys), on the validation split every `clip.eval_every` steps (default:
   once per epoch) and on the test split at the end. Chance R@k is k / the number of distinct reports.

Everything goes to out_dir/clip: model.safetensors (the trained weights) and clip.json (how to rebuild
the model), log.jsonl, val.jsonl, loss.png, eval.json + eval.md, ckpt.pt (resume: rerun the command),
and cache/ (the drawn images, the frozen encoder's report embeddings; `clip.cache_dir` lets several runs
share one, as configs/ablations.py does). To use the model elsewhere:

    from encoders import load_clip_model; from evaluate import image_features
    model, text_fn = load_clip_model("runs/small/clip")          # text_fn(list of str) -> (N, e)
    image = json.load(open("runs/small/clip/clip.json"))["image"]  # size, channels, mean, std
    dataset = synthetic.SyntheticStudies(200, size=image["size"], split="test", transform=data.ImageTransform(**image))
    image_f, kept = image_features(model, dataset)               # (N, e), and the items that could be read
"""
import dataclasses
import functools
import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

import data
import evaluate
import losses
import model as M
import synthetic
from encoders import (RAW_ENCODERS, embedding_cache, frozen_embedder, make_text_fn, pad_id, standardized, text_dir_of,
                      text_source, tokenized_text)
from results import plot_losses, results_table, write_results
from runtime import (EndlessBatches, all_mean, atomic_write, leave_process_group, load_config, rank0_first,
                     save_config, setup, trainable_state, train_loop, write_text)
from weights import load_clip_vision

# openai CLIP's normalisation, for its checkpoints; a gray image takes the channel average (weights.load_clip_vision)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

# ---------------------------------------------------------------------------------------------
# Data: studies, and the text side of a batch
# ---------------------------------------------------------------------------------------------

def cached_text(embeddings, indices, texts):
    """Frozen mode: a batch's text side is its rows of the embedding cache, (B, d)."""
    return {"text": embeddings[indices]}


def load_studies(cfg, mean, std, cache_dir):
    """(train dataset, its report texts, {"val" | "test": (dataset, {style: report text per item})}).
    Items are (image (C, H, W), text, index), or None for an unreadable image (real data only)."""
    d, c = cfg.data, cfg.clip
    image = dict(size=d.image_size, channels=c.channels, mean=mean, std=std)
    train_tf, eval_tf = data.ImageTransform(train=True, seed=cfg.seed, **image), data.ImageTransform(**image)
    if c.images == "synthetic":
        unknown = [s for s in d.train_styles + d.test_styles if s not in synthetic.REPORT_STYLES]
        if unknown:
            raise ValueError(f"unknown report styles {unknown}; choose from {synthetic.REPORT_STYLES}")
        studies = lambda n, styles, split, tf: synthetic.SyntheticStudies(n, cfg.seed, d.image_size, styles, split, tf,
                                                                      cache_dir)  # drawn once, then memory-mapped
        train = studies(c.train_n or d.synthetic_n, d.train_styles, "train", train_tf)
        evals = {}
        for split, n in (("val", c.val_n), ("test", c.test_n)):
            ds = studies(n, d.test_styles, split, eval_tf)
            evals[split] = ds, {s: [ds.report(i, s).text() for i in range(n)] for s in d.test_styles}
        return train, [train.report(i).text() for i in range(len(train))], evals
    if c.images != "real":
        raise ValueError(f"clip.images must be synthetic or real, got {c.images!r}")
    reports = data.load_reports(cfg)
    train = data.ImageReportDataset(reports["train"], train_tf)
    if not len(train):
        raise FileNotFoundError(f"no {d.source} training reports with images found (data.path={d.path!r}, "
                                f"data.image_root={d.image_root!r}); use clip.images=synthetic without images")
    evals = {}
    for split in ("val", "test"):
        ds = data.ImageReportDataset(reports[split], eval_tf)
        evals[split] = ds, {d.source: [r.text() for r in ds.reports]}
    return train, [r.text() for r in train.reports], evals


# ---------------------------------------------------------------------------------------------
# Model: the image tower
# ---------------------------------------------------------------------------------------------

def image_normalisation(c):
    """(mean, std) the image tower expects: 0.5 for a fresh ViT, openai CLIP's for its checkpoints."""
    if c.vision in M.VISION_PRESETS:
        return 0.5, 0.5
    if c.channels == 1:
        return float(np.mean(CLIP_MEAN)), float(np.mean(CLIP_STD))
    return list(CLIP_MEAN), list(CLIP_STD)


def build_vision(c, image_size):
    if c.vision in M.VISION_PRESETS:
        return M.ViT(M.VisionConfig.preset(c.vision, image_size=image_size, channels=c.channels))
    if os.path.isdir(c.vision):
        return load_clip_vision(c.vision, channels=c.channels)  # its position table is resized to the images
    raise ValueError(f"clip.vision {c.vision!r} is neither a preset ({list(M.VISION_PRESETS)}) nor a folder")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def main(argv):
    cfg = load_config(argv[0], argv[1:])
    env = setup(cfg)
    c = cfg.clip
    if c.text_mode not in M.TEXT_MODES:
        raise ValueError(f"unknown clip.text_mode {c.text_mode!r}; choose from {M.TEXT_MODES}")
    if c.optim.batch_size < 2:
        raise ValueError("clip.optim.batch_size must be at least 2: the other pairs of a batch are the negatives")
    out = os.path.join(cfg.out_dir, "clip")
    cache_dir = c.cache_dir or os.path.join(out, "cache")
    os.makedirs(out, exist_ok=True)
    if env.is_main:
        save_config(cfg, os.path.join(out, "config.yaml"))
    kind = c.text_encoder if c.text_encoder in RAW_ENCODERS else "trained"
    text_dir = None if kind in RAW_ENCODERS else text_dir_of(c.text_encoder, cfg)
    mcfg, encoder_id, load_encoder = text_source(kind, text_dir, cfg.model, cfg.seed)
    mean, std = image_normalisation(c)
    train_set, train_texts, evals = rank0_first(env, lambda: load_studies(cfg, mean, std, cache_dir))

    # the text tower; the model is seeded afresh after it, as loading a random LLM reseeds
    if c.text_mode == "frozen":
        embed = functools.partial(embedding_cache, frozen_embedder(load_encoder, mcfg, env, c.embed_batch_size),
                                  cache_dir=cache_dir, encoder_id=encoder_id, batch_size=c.embed_batch_size)
        eval_texts = [t for _, by_style in evals.values() for texts in by_style.values() for t in texts]
        # every distinct report once, shortest first (batches of similar length pad little), in up to 8
        # pieces, each saved to the cache as it is done (an interrupted run keeps them); then read back
        todo = sorted(set(train_texts + eval_texts), key=len)
        piece = max(256, -(-len(todo) // 8))
        with tqdm(total=len(todo), desc="embedding reports", unit="report", disable=not env.is_main) as bar:
            rank0_first(env, lambda: [bar.update(len(embed(todo[i:i + piece]))) for i in range(0, len(todo), piece)])
        train_emb = embed(train_texts)                                     # (N, d)
        text_stats = {"text_mean": train_emb.mean(0), "text_std": train_emb.std(0).clamp(min=1e-6)}
        train_emb = (train_emb - text_stats["text_mean"]) / text_stats["text_std"]
        embed = standardized(embed, text_stats["text_mean"], text_stats["text_std"])
        torch.manual_seed(cfg.seed)
        model = M.CLIPModel(build_vision(c, cfg.data.image_size), c.embed_dim, text_mode="frozen",
                            text_dim=train_emb.shape[1])
        text_side, tokenize = functools.partial(cached_text, train_emb), None
    else:
        encoder, tokenizer = load_encoder(env.device)
        encoder.llm.gradient_checkpointing = cfg.train.grad_checkpointing or c.optim.grad_checkpointing
        torch.manual_seed(cfg.seed)
        model = M.CLIPModel(build_vision(c, cfg.data.image_size), c.embed_dim, encoder, "lora",
                            lora_r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout)
        text_side = tokenize = functools.partial(tokenized_text, tokenizer, mcfg, pad_id(encoder.llm.config))
        embed, text_stats = None, {}
    model.vision_model.gradient_checkpointing = cfg.train.grad_checkpointing or c.optim.grad_checkpointing
    model.to(env.device)
    trainable, total = M.count_parameters(model)
    if env.is_main:
        print(f"CLIP ({c.text_mode} text tower, {c.text_encoder} encoder, ViT {c.vision}): "
              f"{trainable:,} of {total:,} parameters train; {len(train_set)} training pairs")
    text_fn = make_text_fn(model, env, c.embed_batch_size, embed, tokenize)

    batches = data.PairBatches(train_set, text_side, c.optim.batch_size, cfg.seed)
    skipped = [0]

    def loss_fn(net, b):
        skipped[0] += b["n_skipped"]
        image_f, text_f, scale = net(b["images"], b["text"], b.get("attention_mask"), b.get("embed_mask"))
        return losses.clip_loss(image_f, text_f, scale, gather=True), len(b["images"])

    last_val = {}

    def validate(m, step):  # on rank 0 only; the others wait for it at the next step's all-reduce
        if env.is_main:
            last_val.update(evaluate.evaluate_split(m, text_fn, *evals["val"], env.precision))
            with open(os.path.join(out, "val.jsonl"), "a") as f:
                f.write(json.dumps(dict(step=step, **last_val)) + "\n")
            print(f"step {step} validation image->report R@5: " +
                  ", ".join(f"{s} {r['image_to_text']['R@5']:.1f}% (chance {r['chance']['R@5']:.1f}%)"
                            for s, r in last_val.items()))

    steps_per_epoch = max(1, len(batches) // env.world_size // c.optim.grad_accum)
    train_loop("clip", model, loss_fn, EndlessBatches(batches, env), c.optim, cfg, env, out,
               after_step=lambda m: m.clamp_logit_scale(),  # open_clip: temperature never below 0.01
               evaluate=validate, eval_every=c.eval_every or steps_per_epoch)
    skipped = round(all_mean(float(skipped[0]), env) * env.world_size)

    results = {}
    if env.is_main:
        from safetensors.torch import save_file
        weights = {k: v.contiguous() for k, v in (trainable_state(model) | text_stats).items()}
        atomic_write(os.path.join(out, "model.safetensors"), lambda p: save_file(weights, p))
        spec = dict(text_mode=c.text_mode, text_encoder=kind, encoder_id=encoder_id,
                    text_dir=text_dir and os.path.relpath(text_dir, out), cache_dir=os.path.relpath(cache_dir, out),
                    model=dataclasses.asdict(mcfg), seed=cfg.seed, embed_dim=c.embed_dim,
                    text_dim=model.text_projection[0].normalized_shape[0], embed_batch_size=c.embed_batch_size,
                    lora=dict(lora_r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout),
                    vision=dataclasses.asdict(model.vision_model.config), precision=env.precision,
                    image=dict(size=cfg.data.image_size, channels=c.channels, mean=mean, std=std))
        write_text(os.path.join(out, "clip.json"), json.dumps(spec, indent=2))
        val = last_val or evaluate.evaluate_split(model, text_fn, *evals["val"], env.precision)  # a finished run, resumed
        test = evaluate.evaluate_split(model, text_fn, *evals["test"], env.precision)
        results = {f"val/{s}": r for s, r in val.items()} | {f"test/{s}": r for s, r in test.items()}
        write_results(results, out, "eval")
        plot_losses({"clip": os.path.join(out, "log.jsonl")}, os.path.join(out, "loss.png"))
        if skipped:
            print(f"{skipped} unreadable training images were replaced by other studies")
        print(results_table({k: dict(image_to_text=v["image_to_text"], text_to_image=v["text_to_image"],
                                              chance=v["chance"]) for k, v in results.items()}))
    leave_process_group(env)
    return model, results


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python train_clip.py CONFIG.yaml [key=value ...]")
    main(sys.argv[1:])
