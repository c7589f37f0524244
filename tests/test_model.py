"""model.py against transformers: logits parity on tiny random checkpoints and on the real
SmolLM2-135M GGUF, tokenizer ids, bidirectionality, pooling, and strict loading errors."""
import json
import os

import pytest
import torch
from conftest import TINY, make_hf_checkpoint

import model
from model import TextEncoder
from weights import load_llm
from reports import openi_archive_path, read_openi


CASES = {
    "llama": dict(model_type="llama"),
    "llama_tied_bias": dict(model_type="llama", tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "llama3_rope_scaling": dict(model_type="llama", rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "qwen2": dict(model_type="qwen2"),
    "mistral_sharded": dict(model_type="mistral", shard=True, sliding_window=8),
}


@pytest.mark.parametrize("case", CASES)
def test_causal_logits_match_transformers(tmp_path, case):
    kwargs = dict(CASES[case])
    ref = make_hf_checkpoint(tmp_path, **kwargs)
    if kwargs.get("shard"):
        assert os.path.exists(tmp_path / "model.safetensors.index.json")
    ours, _ = load_llm(str(tmp_path))
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (2, 24))  # longer than the Mistral window
    with torch.no_grad():
        diff = (ours.logits(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"{case}: max abs logit diff {diff}"


def test_padded_batch_matches_unpadded(tmp_path):
    """Left padding with a mask gives the same real-token logits as no padding (causal mode)."""
    make_hf_checkpoint(tmp_path)
    ours, _ = load_llm(str(tmp_path))
    ids = torch.randint(1, TINY["vocab_size"], (1, 10))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
    with torch.no_grad():
        assert torch.allclose(ours.logits(ids), ours.logits(padded, mask)[:, 4:], atol=1e-5)


def test_bidirectional_switch(tmp_path):
    make_hf_checkpoint(tmp_path)
    ours, _ = load_llm(str(tmp_path))
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % TINY["vocab_size"]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        for m in (None, mask):  # with and without an explicit mask (different SDPA paths)
            first_causal = ours(ids, m, causal=True)[0, 0] - ours(changed, m, causal=True)[0, 0]
            first_bidir = ours(ids, m, causal=False)[0, 0] - ours(changed, m, causal=False)[0, 0]
            assert first_causal.abs().max() == 0
            assert first_bidir.abs().max() > 1e-3


@pytest.mark.parametrize("pooling", model.POOLINGS)
def test_pooling_is_padding_side_invariant_and_skips_instruction(tmp_path, pooling):
    make_hf_checkpoint(tmp_path)
    llm, _ = load_llm(str(tmp_path))
    torch.manual_seed(0)
    enc = TextEncoder(llm, pooling=pooling, num_latents=16).eval()
    lengths, instr = [9, 5, 7], 3   # each sequence: 3 instruction tokens, then the report
    T = max(lengths)
    seqs = [torch.randint(1, TINY["vocab_size"], (n,)) for n in lengths]

    def batch(left):
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        att, emb = torch.zeros_like(ids), torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            sl = slice(T - len(s), T) if left else slice(0, len(s))
            ids[i, sl], att[i, sl] = s, 1
            emb[i, sl] = torch.tensor([0] * instr + [1] * (len(s) - instr))
        return ids, att, emb

    with torch.no_grad():
        left, right = enc(*batch(True)), enc(*batch(False))
        assert (left - right).abs().max() <= 1e-5
        # the instruction tokens are seen by the report tokens but not pooled: pooling the report
        # positions by hand equals the encoder output
        ids, att, emb = batch(False)
        h = llm(ids, att, causal=False)
        if enc.pooler is not None:
            h = enc.pooler(h)
        i = 0
        report = h[i, instr:lengths[i]]
        expected = {"mean": report.mean(0), "latent_attention": report.mean(0), "last_token": report[-1],
                    "weighted_mean": (report * torch.arange(1, len(report) + 1)[:, None]).sum(0)
                    / torch.arange(1, len(report) + 1).sum()}[pooling]
        assert torch.allclose(right[i], expected, atol=1e-5)


def test_real_gguf_logits_match_transformers(smollm2_pair):
    ours, tok, ref, ref_tok = smollm2_pair
    text = ("FINDINGS: The heart is normal in size. The mediastinum is unremarkable. There is a small "
            "left pleural effusion. No pneumothorax. IMPRESSION: Small left pleural effusion.")
    ids = torch.tensor([tok.encode(text).ids])
    assert ids.tolist()[0] == ref_tok(text).input_ids
    with torch.no_grad():
        diff = (ours.logits(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-3, diff


def test_tokenizer_ids_match_transformers_on_real_reports(smollm2_pair):
    import random
    _, tok, _, ref_tok = smollm2_pair
    reports = read_openi(openi_archive_path())
    sentences = [s.strip() + "." for r in reports for s in (r.findings + " " + r.impression).split(".") if s.strip()]
    sentences = random.Random(0).sample(sentences, 300)
    sentences += ["Ünïcödé — 12.5 mm × 3cm,  two  spaces\tand tab", "   leading", "trailing   ",
                  "<|im_start|>user\nhi<|im_end|>", "1234567 99.9% (L>R)", "日本語のテキスト 😀"]
    for s in sentences:
        assert tok.encode(s).ids == ref_tok(s).input_ids, s


def test_config_fields_read_from_gguf(smollm2_pair):
    ours = smollm2_pair[0]
    c = ours.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.rope_theta, c.vocab_size, c.tie_word_embeddings) == \
        (30, 576, 9, 3, 1536, 100000.0, 49152, True)


# --- strict loading: every bad input names its problem --------------------------------------

def test_missing_path_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_llm(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llm(str(tmp_path))
    make_hf_checkpoint(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_llm(str(tmp_path))


def test_truncated_safetensors(tmp_path):
    make_hf_checkpoint(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_llm(str(tmp_path))


def _edit_checkpoint(folder, edit):
    from safetensors.torch import load_file, save_file
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor_and_wrong_shape(tmp_path):
    make_hf_checkpoint(tmp_path)
    _edit_checkpoint(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing: \['model.layers.1.mlp.up_proj.weight'\]"):
        load_llm(str(tmp_path))
    make_hf_checkpoint(tmp_path)
    _edit_checkpoint(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(3),
                                                   "model.extra.weight": torch.ones(1)}))
    with pytest.raises(ValueError, match=r"wrong shape: \['model.norm.weight: checkpoint \(3,\)") as e:
        load_llm(str(tmp_path))
    assert "unexpected: ['model.extra.weight']" in str(e.value)


def test_unsupported_model_type(tmp_path):
    make_hf_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'; supported: llama, mistral, qwen2"):
        load_llm(str(tmp_path))


def test_rope_theta_under_rope_parameters(tmp_path):
    """Newer configs keep rope_theta under rope_parameters; older ones at the top level."""
    a = model.LlamaConfig.from_hf({**TINY, "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}})
    b = model.LlamaConfig.from_hf({**TINY, "rope_theta": 1234.0})
    assert a.rope_theta == b.rope_theta == 1234.0 and a.rope_scaling is None
