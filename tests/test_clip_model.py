"""Stage 2 in model.py: the ViT against transformers' CLIPVisionModel (same weights, pooled output,
also at another image size), 1-channel loading, strict loader errors, the dual-tower CLIPModel in
both text modes, and the frozen-embedding cache."""
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import model
from losses import clip_loss
from encoders import embedding_cache
from model import CLIPModel, TextEncoder, ViT, VisionConfig
from weights import load_clip_vision

TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4)


def make_clip_checkpoint(folder, full=False, **extra):
    """Save a tiny random transformers CLIPVisionModel (or full CLIPModel) to `folder`; return the
    vision reference, with eager attention so it shares no kernel choice with us."""
    import transformers
    torch.manual_seed(0)
    vision = {**TINY_VISION, **extra}
    if full:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                    vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        ref = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    else:
        ref = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision))
    with torch.no_grad():  # random norms and biases, so that a swapped or missing one shows
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.1)
    ref.save_pretrained(folder)
    ref = ref.vision_model if full else ref
    ref.config._attn_implementation = "eager"
    return ref.eval()


@pytest.mark.parametrize("case", ["vision_quick_gelu", "vision_gelu", "full_clip"])
def test_vit_matches_transformers(tmp_path, case):
    ref = make_clip_checkpoint(tmp_path, full=case == "full_clip", hidden_act="gelu" if case == "vision_gelu" else "quick_gelu")
    ours = load_clip_vision(str(tmp_path)).eval()
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        diff = (ours(images) - ref(pixel_values=images).pooler_output).abs().max().item()
    assert diff <= 1e-4, f"{case}: max abs diff {diff}"


@pytest.mark.parametrize("size", [(48, 48), (24, 40)])
def test_vit_position_interpolation_matches_transformers(tmp_path, size):
    """Another image size (also non-square): the same bicubic resize of the patch positions."""
    ref = make_clip_checkpoint(tmp_path)
    ours = load_clip_vision(str(tmp_path)).eval()
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = ref(pixel_values=images, interpolate_pos_encoding=True).pooler_output
        diff = (ours(images) - expected).abs().max().item()
    assert diff <= 1e-4, f"{size}: max abs diff {diff}"
    g = ours.embeddings.grid  # at the native grid the table is used as it is
    assert ours.embeddings.positions(g, g) is ours.embeddings.position_embedding.weight


def test_one_channel_equals_gray_replicated(tmp_path):
    make_clip_checkpoint(tmp_path)
    rgb, gray = load_clip_vision(str(tmp_path)), load_clip_vision(str(tmp_path), channels=1)
    assert gray.config.channels == 1 and gray.embeddings.patch_embedding.weight.shape[1] == 1
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(gray(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-5)


def test_loader_errors(tmp_path):
    make_clip_checkpoint(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "config.json").write_text((tmp_path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_clip_vision(str(only_config))
    save_file({k: v for k, v in state.items() if "layers.1.mlp.fc1.weight" not in k}, weights)
    with pytest.raises(ValueError, match=r"missing: \['encoder.layers.1.mlp.fc1.weight'\]"):
        load_clip_vision(str(tmp_path))
    save_file({**state, "embeddings.class_embedding": torch.zeros(7), "extra.weight": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match=r"unexpected: \['extra.weight'\].*wrong shape: \['embeddings.class_embedding"):
        load_clip_vision(str(tmp_path))
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_clip_vision(str(tmp_path))


def test_vision_config_presets_and_hf_defaults():
    assert VisionConfig.preset("vit-l/14", image_size=448).patch_size == 14
    with pytest.raises(ValueError, match="vit-b/16"):
        VisionConfig.preset("vit-h/14")
    assert VisionConfig.from_hf({}).patch_size == 32  # transformers' default is ViT-B/32, not ours
    with pytest.raises(ValueError, match="activation"):
        VisionConfig(activation="relu")


def tiny_text_encoder(pooling="mean"):
    cfg = model.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    return TextEncoder(model.LLM(cfg), pooling, num_latents=8)


def tiny_clip(text_mode="lora", **kwargs):
    torch.manual_seed(0)
    vit = ViT(VisionConfig.preset("tiny", channels=1))
    if text_mode == "lora":
        return CLIPModel(vit, 16, tiny_text_encoder(kwargs.pop("pooling", "mean")), "lora", **kwargs)
    return CLIPModel(vit, 16, text_mode="frozen", text_dim=64)


def batch(b=4, T=10):
    torch.manual_seed(2)
    ids, mask = torch.randint(0, 128, (b, T)), torch.ones(b, T, dtype=torch.long)
    mask[0, :3] = 0  # one left-padded row
    return torch.randn(b, 1, 32, 32), ids, mask


@pytest.mark.parametrize("text_mode", ["lora", "frozen"])
def test_clip_features_normalised_and_logit_scale(text_mode):
    clip = tiny_clip(text_mode)
    images, ids, mask = batch()
    text = ids if text_mode == "lora" else torch.randn(4, 64)
    image_features, text_features, scale = clip(images, text, mask)
    assert image_features.shape == text_features.shape == (4, 16)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(text_features.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert math.isclose(clip.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert math.isclose(scale.item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        clip.logit_scale.fill_(9.0)
    clip.clamp_logit_scale()
    assert math.isclose(clip.logit_scale.item(), math.log(100), rel_tol=1e-6)


@pytest.mark.parametrize("pooling,train_pooler", [("mean", False), ("latent_attention", False), ("latent_attention", True)])
def test_lora_mode_trains_only_lora_heads_and_vit(pooling, train_pooler):
    clip = tiny_clip("lora", pooling=pooling, train_pooler=train_pooler)
    trainable = {n for n, p in clip.named_parameters() if p.requires_grad}
    for name in trainable:
        assert (name.startswith(("vision_model.", "visual_projection.", "text_projection.", "logit_scale"))
                or ".lora_" in name or (train_pooler and name.startswith("text_encoder.pooler."))), name
    llm = clip.text_encoder.llm
    assert not any(p.requires_grad for n, p in llm.named_parameters() if ".lora_" not in n)
    assert sum(".lora_A" in n for n in trainable) == 4 * 2  # q, k, v, o in both layers
    assert all(p.requires_grad for p in clip.vision_model.parameters())
    pooler_trainable = any(n.startswith("text_encoder.pooler.") for n in trainable)
    assert pooler_trainable == train_pooler


def test_frozen_mode_needs_no_llm():
    clip = tiny_clip("frozen")
    assert not any("text_encoder" in n for n, _ in clip.named_parameters())
    assert clip.encode_text(torch.randn(3, 64)).shape == (3, 16)


@pytest.mark.parametrize("text_mode", ["lora", "frozen"])
def test_training_step_decreases_clip_loss(text_mode):
    clip = tiny_clip(text_mode)
    images, ids, mask = batch()
    text = ids if text_mode == "lora" else torch.randn(4, 64)
    frozen_before = clip.text_encoder.llm.model.layers[0].self_attn.q_proj.weight.clone() if text_mode == "lora" else None
    opt = torch.optim.AdamW([p for p in clip.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        loss = clip_loss(*clip(images, text, mask))
        opt.zero_grad()
        loss.backward()
        opt.step()
        clip.clamp_logit_scale()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    if text_mode == "lora":
        assert torch.equal(clip.text_encoder.llm.model.layers[0].self_attn.q_proj.weight, frozen_before)


def test_embedding_cache_built_reused_rebuilt(tmp_path):
    calls = []

    def encoder_fn(texts):  # a deterministic stand-in for the frozen encoder
        calls.append(list(texts))
        return torch.stack([torch.tensor([len(t), sum(map(ord, t)) % 97, ord(t[0])], dtype=torch.float32) for t in texts])

    texts = ["no acute findings", "small left effusion", "no acute findings", "cardiomegaly", "clear lungs"]
    first = embedding_cache(encoder_fn, texts, str(tmp_path), "enc-v1", batch_size=2)
    assert first.shape == (5, 3) and torch.equal(first, encoder_fn(texts))
    assert sum(len(c) for c in calls[:-1]) == 4  # each distinct text once, in batches of 2
    calls.clear()
    again = embedding_cache(encoder_fn, texts, str(tmp_path), "enc-v1")
    assert calls == [] and torch.equal(again, first)  # reused: the encoder is not called

    edited = texts[:3] + ["mild cardiomegaly"] + texts[4:]
    out = embedding_cache(encoder_fn, edited, str(tmp_path), "enc-v1")
    assert calls == [["mild cardiomegaly"]] and torch.equal(out, encoder_fn(edited))
    calls.clear()
    embedding_cache(encoder_fn, texts, str(tmp_path), "enc-v2")  # a new encoder: everything again
    assert sum(len(c) for c in calls) == 4
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) == 2
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # written atomically
