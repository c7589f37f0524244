"""Shared fixtures: tiny random Hugging Face checkpoints written by transformers (the reference),
and the real SmolLM2-135M GGUF loaded by both transformers and us (once per session)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def make_hf_checkpoint(folder, model_type="llama", shard=False, **extra):
    """Save a tiny random transformers model (and a tokenizer.json) to `folder`; return the model."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "mistral": transformers.MistralConfig}[model_type]
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "mistral": transformers.MistralForCausalLM}[model_type]
    torch.manual_seed(0)
    ref = cls(config_cls(**{**TINY, **extra})).eval()
    with torch.no_grad():  # random, not tiny, norm weights and biases so that mistakes show
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.1)
    ref.save_pretrained(folder, max_shard_size="100KB" if shard else "5GB")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(TINY["vocab_size"])}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(folder, "tokenizer.json"))
    return ref


@pytest.fixture(scope="session")
def smollm2_pair():
    """(our LLM, our tokenizer, transformers' model, transformers' tokenizer) from the real GGUF."""
    import model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = model.smollm2_gguf_path()
    folder, name = os.path.split(path)
    ours, tok = model.load_llm("smollm2")
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return ours, tok, ref, ref_tok
