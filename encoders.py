"""Trained encoders on disk, and using them (a support module: skip it on a first read).

- The stage-1 encoder as train_text.py saves it: `encoder.json` (the base model and seed, or "init":
  the run it was trained on top of) and, per stage, a PEFT LoRA adapter (or full weights) and the
  pooler, inside the run's folder. `load_text_encoder` rebuilds it by merging each stage's adapter
  in order; `embed_texts` embeds reports with it, batched, without gradients, on the encoder's device:

      encoder, tokenizer, mcfg = load_text_encoder("runs/small/text", device="cpu")
      emb = embed_texts(encoder, tokenizer, ["No acute disease.", "Small left effusion."], mcfg)  # (2, d)

- The frozen encoder's embedding cache (LLM2CLIP's cheap stage 2, arXiv 2411.04997, sec. 3).
- The CLIP model as train_clip.py saves it: `load_clip_model(clip_dir) -> (CLIPModel, text_fn)`.

evaluate.py and train_clip.py load encoders only through this module.
"""
import dataclasses
import functools
import hashlib
import json
import os

import torch
from tqdm import tqdm

import data
import model as M
from runtime import Env, ModelConfig, atomic_write, trainable_state
from weights import load_adapter, load_llm, load_tokenizer, save_adapter


# ---------------------------------------------------------------------------------------------
# The stage-1 encoder: base model + each stage's adapter (or weights) + pooler
# ---------------------------------------------------------------------------------------------

def build_llm(mcfg: ModelConfig, seed: int, device):
    """The LLM and its tokenizer: real weights, or a random model for tests (`path: random`)."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[mcfg.dtype]
    if mcfg.path != "random":
        return load_llm(mcfg.path, dtype=dtype, device=device)
    tokenizer = load_tokenizer(mcfg.tokenizer)
    torch.manual_seed(seed)
    llm = M.LLM(M.LlamaConfig(vocab_size=tokenizer.get_vocab_size(), **mcfg.random_init)).init_weights()
    return llm.to(device, dtype).eval(), tokenizer


def pad_id(llm_config) -> int:
    c = llm_config
    return c.pad_token_id if c.pad_token_id is not None else (c.eos_token_id or 0)


def save_stage(encoder, stage_dir: str, lora: bool) -> dict:
    """Save what redoing this stage on load needs: its LoRA adapter (PEFT format) or its full
    weights, and the pooler if there is one. Returns the stage's entry for encoder.json."""
    from safetensors.torch import save_file
    entry = {"dir": os.path.basename(stage_dir)}
    if lora:
        save_adapter(encoder.llm, os.path.join(stage_dir, "adapter"))
        entry["adapter"] = "adapter"
    else:
        weights = {k: v.contiguous() for k, v in encoder.llm.state_dict().items() if k != "lm_head.weight"}
        atomic_write(os.path.join(stage_dir, "model.safetensors"), lambda p: save_file(weights, p))
        entry["weights"] = "model.safetensors"
    if encoder.pooler is not None:
        atomic_write(os.path.join(stage_dir, "pooler.safetensors"),
                     lambda p: save_file(dict(encoder.pooler.state_dict()), p))
        entry["pooler"] = "pooler.safetensors"
    return entry


def encoder_chain(text_dir: str) -> list:
    """[(text_dir, spec, stages)] of a stage-1 run and of the runs it was trained on top of, the
    first run first. spec: its encoder.json; stages: per stage, the paths of its files
    ({"adapter" | "weights", optionally "pooler"}). Every file a stage names must lie inside its own
    run's folder: an absolute path or one that climbs out ("../..") is refused, naming encoder.json
    and the entry. The one link to another folder is "init": the text/ folder of the run this one
    was trained on top of (text.init), itself read the same way."""
    chain, seen, named_by = [], set(), None
    while text_dir is not None:
        path = os.path.join(text_dir, "encoder.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path!r} not found: run train_text.py with this config first" if named_by is None
                                    else f"{path!r}, the \"init\" run of {named_by}, not found")
        if os.path.realpath(text_dir) in seen:
            raise ValueError(f"{path}: \"init\" leads back to a run already in the chain: {sorted(seen)}")
        seen.add(os.path.realpath(text_dir))
        with open(path) as f:
            spec = json.load(f)
        stages = [_stage_files(text_dir, path, i, stage) for i, stage in enumerate(spec["stages"])]
        chain.insert(0, (text_dir, spec, stages))
        text_dir, named_by = (os.path.join(text_dir, spec["init"]) if spec.get("init") else None), path
    return chain


def _stage_files(text_dir, path, i, stage) -> dict:
    """{"adapter" | "weights" [, "pooler"]: path} of stages[i] of text_dir/encoder.json, each inside text_dir."""
    def inside(key, *parts):
        rel = os.path.normpath(os.path.join(*parts)) if all(isinstance(p, str) for p in parts) else None
        if rel is None or os.path.isabs(rel) or rel == ".." or rel.startswith(".." + os.sep):
            raise ValueError(f"{path}: stages[{i}].{key} = {stage[key]!r} is not a path inside the run's folder "
                             f"{text_dir!r}; a stage's files must lie in its own run (a run trained on top of another "
                             "names that run's folder in \"init\"): retrain with train_text.py or fix the entry")
        return os.path.join(text_dir, rel)
    if "dir" not in stage or ("adapter" in stage) == ("weights" in stage):
        raise ValueError(f"{path}: stages[{i}] = {stage!r} needs \"dir\" and one of \"adapter\" or \"weights\"")
    inside("dir", stage["dir"])
    return {key: inside(key, stage["dir"], stage[key]) for key in ("adapter", "weights", "pooler") if key in stage}


def load_text_encoder(text_dir: str, device="cpu"):
    """(TextEncoder, tokenizer, ModelConfig) from `text_dir/encoder.json`: the base model, then each
    stage's adapter merged in order (or its full weights), first those of the runs it was trained on
    top of ("init"), then its own; then the pooler of its own last stage that has one."""
    from safetensors.torch import load_file
    chain = encoder_chain(text_dir)
    base, mcfg = chain[0][1], ModelConfig(**chain[-1][1]["model"])
    llm, tokenizer = build_llm(ModelConfig(**base["model"]), base["seed"], device)
    encoder = M.TextEncoder(llm, mcfg.pooling, mcfg.num_latents).to(device)
    for _, _, stages in chain:
        for files in stages:
            if "adapter" in files:
                M.merge_lora(load_adapter(llm, files["adapter"]))
            else:
                llm.load_state_dict(load_file(files["weights"]), strict=False)
    for files in chain[-1][2]:  # an earlier run's pooler is not carried over: this run's pooling decides
        if "pooler" in files:
            encoder.pooler.load_state_dict(load_file(files["pooler"]))
    return encoder.requires_grad_(False).eval(), tokenizer, mcfg


def text_dir_of(name, cfg):
    """The stage-1 folder of an eval.models entry: "trained" is out_dir/text; any other entry is a
    path, to a text/ folder or to an out_dir holding one."""
    path = os.path.join(cfg.out_dir, "text") if name == "trained" else name
    if not os.path.exists(os.path.join(path, "encoder.json")) \
            and os.path.exists(os.path.join(path, "text", "encoder.json")):
        path = os.path.join(path, "text")
    return path


@torch.no_grad()
def embed_texts(encoder, tokenizer, texts, mcfg: ModelConfig, batch_size=32, precision="fp32") -> torch.Tensor:
    """(N, d) fp32 embeddings, on the CPU, of `texts` by a TextEncoder on its own device: the reports
    tokenised as in training (mcfg: max_len, instruction, padding side), `batch_size` at a time,
    under autocast when precision is bf16 / fp16."""
    device = next(encoder.parameters()).device
    env, pad = Env(device, precision=precision), pad_id(encoder.llm.config)
    encoder.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        b = data.encode_batch(tokenizer, list(texts[i:i + batch_size]), mcfg.max_len, pad,
                              mcfg.instruction or None, mcfg.padding_side)
        with env.autocast():
            out.append(encoder(*(b[k].to(device) for k in ("input_ids", "attention_mask", "embed_mask"))).float().cpu())
    return torch.cat(out) if out else torch.empty(0, encoder.llm.config.hidden_size)


def make_embed(encoder, tokenizer, mcfg: ModelConfig, precision="fp32", batch_size=32):
    """embed(texts) -> (N, d): embed_texts with everything but the texts fixed."""
    return functools.partial(embed_texts, encoder, tokenizer, mcfg=mcfg, batch_size=batch_size, precision=precision)


def embed_each_once(embed, name, batch_size):
    """embed(texts) that encodes each distinct text once, shortest first so that a batch holds
    texts of similar length (little padding), with a tqdm bar. The tasks share many texts: the
    findings of summarisation and error discrimination, the true impressions of both."""
    cache = {}

    def cached(texts):
        new = sorted({t for t in texts if t not in cache}, key=lambda t: (len(t), t))
        with tqdm(total=len(new), desc=f"embedding ({name})", unit="text", disable=not new) as bar:
            for i in range(0, len(new), batch_size):
                batch = new[i:i + batch_size]
                cache.update(zip(batch, embed(batch)))
                bar.update(len(batch))
        return torch.stack([cache[t] for t in texts])
    return cached


# ---------------------------------------------------------------------------------------------
# The frozen encoder's embeddings, computed once per text
# ---------------------------------------------------------------------------------------------

def embedding_cache(encoder_fn, texts, cache_dir, encoder_id, batch_size=64) -> torch.Tensor:
    """(N, d) fp32 embeddings of `texts` by the frozen encoder, `encoder_fn(list of str) -> (b, d)`,
    computed once and kept in `cache_dir/emb-<hash of encoder_id>.safetensors`.

    Each row is keyed by sha256(encoder_id + text): texts not yet in the file are encoded (each
    distinct text once) and appended; the rest are read back. So an edited report costs one
    encoding, and a new encoder_id starts a new file. encoder_id must change whenever the weights
    do (e.g. the checkpoint path and its modification time). Rows of texts no longer asked for
    stay in the file, so train and validation splits can share it. The file is written only at
    the end, atomically: an interrupted run leaves the previous cache intact."""
    from safetensors.torch import load_file, save_file
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"emb-{hashlib.sha256(encoder_id.encode()).hexdigest()[:16]}.safetensors")
    keys = [hashlib.sha256(f"{encoder_id}\0{t}".encode()).digest() for t in texts]  # 32 bytes each
    cache = load_file(path) if os.path.exists(path) else {"keys": torch.empty(0, 32, dtype=torch.uint8),
                                                          "embeddings": torch.empty(0, 0)}
    row = {bytes(k): i for i, k in enumerate(cache["keys"].numpy())}
    todo = list({k: t for k, t in zip(keys, texts) if k not in row}.items())  # distinct new texts
    if todo:
        with torch.no_grad():
            new = torch.cat([encoder_fn([t for _, t in todo[i:i + batch_size]]).detach().float().cpu()
                             for i in range(0, len(todo), batch_size)])   # (n_new, d)
        new_keys = torch.frombuffer(bytearray(b"".join(k for k, _ in todo)), dtype=torch.uint8).view(-1, 32)
        old = cache["embeddings"] if row else new[:0]                     # (n_old, d)
        if old.shape[1] != new.shape[1]:
            raise ValueError(f"{path!r} holds width {old.shape[1]}, the encoder gives {new.shape[1]}: "
                             "a changed encoder needs a new encoder_id")
        row.update({k: len(row) + i for i, (k, _) in enumerate(todo)})
        cache = {"keys": torch.cat((cache["keys"], new_keys)), "embeddings": torch.cat((old, new))}
        atomic_write(path, lambda p: save_file(cache, p))
    return cache["embeddings"][[row[k] for k in keys]]                    # (N, d), in the order of texts


# ---------------------------------------------------------------------------------------------
# The CLIP model: its text side, and loading it back
# ---------------------------------------------------------------------------------------------

def _file_hash(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


RAW_ENCODERS = ("raw", "raw_bidirectional")  # the untrained LLM, mean-pooled: causal | without the causal mask


def text_source(kind, text_dir, model_cfg, seed):
    """(ModelConfig, encoder_id, load) of the stage-1 encoder in text_dir (kind `trained`) or of the
    untrained LLM of model_cfg with mean pooling: `raw` runs it causally, as it was pre-trained (the
    paper's baseline), `raw_bidirectional` without the causal mask (as evaluate.py's entries of the
    same names). encoder_id names the weights: encoder.json and a hash of every file it lists, so
    rerunning stage 1 starts a new embedding cache. load(device) -> (TextEncoder, tokenizer) is
    called only when the encoder must run."""
    if kind in RAW_ENCODERS:
        mcfg, causal = dataclasses.replace(model_cfg, pooling="mean"), kind == "raw"
        encoder_id = kind + ":" + json.dumps(dict(model=dataclasses.asdict(mcfg), seed=seed, causal=causal),
                                             sort_keys=True)

        def load(device):  # the seed matters only for model.path: random
            llm, tokenizer = build_llm(mcfg, seed, device)
            return M.TextEncoder(llm, "mean", causal=causal).to(device).requires_grad_(False).eval(), tokenizer
        return mcfg, encoder_id, load
    if kind != "trained":
        raise ValueError(f"clip.text_encoder must be trained, {', '.join(RAW_ENCODERS)} or a path, got {kind!r}")
    path = os.path.join(text_dir, "encoder.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no stage-1 encoder at {path!r}: run train_text.py with this config first "
                                "(or set clip.text_encoder=raw to align the images with the untrained LLM)")
    chain, files = encoder_chain(text_dir), []
    for _, _, stages in chain:
        for f in stages:
            files += [os.path.join(f["adapter"], n) for n in ("adapter_config.json", "adapter_model.safetensors")] \
                if "adapter" in f else [f["weights"]]
            files += [f["pooler"]] if "pooler" in f else []
    specs = ":".join(json.dumps(spec, sort_keys=True) for _, spec, _ in chain)  # one run: as before
    encoder_id = "trained:" + specs + ":" + ",".join(map(_file_hash, files))
    return ModelConfig(**chain[-1][1]["model"]), encoder_id, lambda device: load_text_encoder(text_dir, device)[:2]


def frozen_embedder(load, mcfg, env, batch_size):
    """texts -> (N, d) embeddings by the frozen encoder, loaded on the first call."""
    state = {}

    def embed(texts):
        if not state:
            encoder, tokenizer = load(env.device)
            state["fn"] = make_embed(encoder, tokenizer, mcfg, env.precision, batch_size)
        return state["fn"](texts)
    return embed


def standardized(embed, mean, std):
    """Frozen mode: the encoder's embeddings standardised per dimension with training-set statistics.
    Pooled LLM states share a large common component (and a few "massive" dimensions, Sun et al. 2024)
    that would dominate the adapter's LayerNorm; without this the tiny config collapses at lr 5e-3."""
    return lambda texts: (embed(texts) - mean) / std


def tokenized_text(tokenizer, mcfg, pad, indices, texts):
    """LoRA mode: the reports tokenised as in stage 1, padded to the batch's longest."""
    b = data.encode_batch(tokenizer, texts, mcfg.max_len, pad, mcfg.instruction or None, mcfg.padding_side)
    return {"text": b["input_ids"], "attention_mask": b["attention_mask"], "embed_mask": b["embed_mask"]}


def make_text_fn(model, env, batch_size, embed=None, tokenize=None):
    """texts -> (N, e) L2-normalised text features on the CPU. Frozen mode: embed(texts) -> (N, d),
    the frozen encoder's embeddings, then the adapter; lora mode: tokenize(texts), then encode_text."""
    @torch.no_grad()
    def text_fn(texts):
        model.eval()
        out = []
        with env.autocast():
            if model.text_mode == "frozen":
                emb = embed(list(texts))                                   # (N, d)
                for i in range(0, len(texts), batch_size):
                    out.append(model.encode_text(emb[i:i + batch_size].to(env.device)).float().cpu())
            else:
                for i in range(0, len(texts), batch_size):
                    b = {k: v.to(env.device) for k, v in tokenize(None, list(texts[i:i + batch_size])).items()}
                    out.append(model.encode_text(b["text"], b["attention_mask"], b["embed_mask"]).float().cpu())
        return torch.cat(out)                                              # (N, e)
    return text_fn


def load_clip_model(clip_dir, device="cpu", precision="fp32", cache=True):
    """(CLIPModel, text_fn) from what train_clip.py wrote to clip_dir (clip.json, model.safetensors).

    text_fn(list of str) -> (N, e) L2-normalised text features, on the CPU. Frozen mode: the frozen
    encoder's embeddings (through clip_dir/cache when cache=True, so the reports embedded in training
    cost nothing), then the adapter; lora mode: tokenised, then the encoder with its LoRA. The stage-1
    encoder must still be the one the model was trained with (checked by its encoder_id). The numbers of
    the training-time evaluation come back at the precision it ran at (clip.json: precision)."""
    from safetensors.torch import load_file
    with open(os.path.join(clip_dir, "clip.json")) as f:
        spec = json.load(f)
    text_dir = os.path.normpath(os.path.join(clip_dir, spec["text_dir"])) if spec["text_dir"] else None
    mcfg, encoder_id, load = text_source(spec["text_encoder"], text_dir, ModelConfig(**spec["model"]), spec["seed"])
    if encoder_id != spec["encoder_id"]:
        raise ValueError(f"the text encoder {text_dir or spec['text_encoder']!r} changed since the CLIP model in "
                         f"{clip_dir!r} was trained on it: retrain the CLIP model (train_clip.py)")
    env = Env(torch.device(device), precision=precision)
    vit = M.ViT(M.VisionConfig(**spec["vision"]))
    if spec["text_mode"] == "frozen":
        model = M.CLIPModel(vit, spec["embed_dim"], text_mode="frozen", text_dim=spec["text_dim"])
        embed = frozen_embedder(load, mcfg, env, spec["embed_batch_size"])
        if cache:
            embed = functools.partial(embedding_cache, embed, cache_dir=os.path.join(clip_dir, spec["cache_dir"]),
                                      encoder_id=encoder_id, batch_size=spec["embed_batch_size"])
        tokenize = None
    else:
        encoder, tokenizer = load(env.device)
        model = M.CLIPModel(vit, spec["embed_dim"], encoder, "lora", **spec["lora"])
        embed, tokenize = None, functools.partial(tokenized_text, tokenizer, mcfg, pad_id(encoder.llm.config))
    state = load_file(os.path.join(clip_dir, "model.safetensors"))
    if spec["text_mode"] == "frozen":
        embed = standardized(embed, state.pop("text_mean"), state.pop("text_std"))
    missing = sorted(set(trainable_state(model)) - set(state))
    if missing:
        raise ValueError(f"{clip_dir}/model.safetensors lacks trained weights: {missing[:5]}")
    model.load_state_dict(state, strict=False)
    model.to(env.device).eval()
    return model, make_text_fn(model, env, spec["embed_batch_size"], embed, tokenize)
