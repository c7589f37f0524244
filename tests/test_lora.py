"""LoRA in model.py: identity at init, merge equals unmerged, only adapters train, and the saved
adapter is PEFT's format both ways (peft is the reference)."""
import pytest
import torch
from conftest import TINY, make_hf_checkpoint

from model import LoRALinear, add_lora, count_parameters, merge_lora
from weights import load_adapter, load_llm, save_adapter


@pytest.fixture
def tiny(tmp_path):
    ref = make_hf_checkpoint(tmp_path / "base")
    return str(tmp_path / "base"), ref


def randomize_lora(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.1)


def test_fresh_adapter_is_identity_and_merge_matches(tiny):
    path, _ = tiny
    base, _ = load_llm(path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    with torch.no_grad():
        before = base.logits(ids)
        add_lora(base, r=4, alpha=8, dropout=0.0)
        assert all(isinstance(m.dropout, torch.nn.Identity) for m in base.modules() if isinstance(m, LoRALinear))
        assert torch.equal(base.logits(ids), before)
        randomize_lora(base)
        unmerged = base.logits(ids)
        assert (unmerged - before).abs().max() > 1e-3
        merge_lora(base)
        assert not any(isinstance(m, LoRALinear) for m in base.modules())
        assert (base.logits(ids) - unmerged).abs().max() <= 1e-5


def test_only_adapters_train(tiny):
    path, _ = tiny
    llm, _ = load_llm(path)
    add_lora(llm, r=4, alpha=8, dropout=0.1)
    n_lora = 2 * TINY["num_hidden_layers"] * 7   # A and B on seven projections per block
    trainable = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert len(trainable) == n_lora and all(".lora_" in n for n in trainable)
    randomize_lora(llm)
    llm.train()
    llm.logits(torch.randint(0, TINY["vocab_size"], (2, 8))).sum().backward()
    for n, p in llm.named_parameters():
        assert (p.grad is not None) == (".lora_" in n), n
    opt_params = [p for p in llm.parameters() if p.requires_grad]
    t, total = count_parameters(llm)
    assert t == sum(p.numel() for p in opt_params) and total > t


def test_adapter_stays_fp32_over_bf16_base_and_under_autocast(tiny):
    path, _ = tiny
    llm, _ = load_llm(path, dtype=torch.bfloat16)
    add_lora(llm, r=4, alpha=8, dropout=0.0)
    assert all(p.dtype == torch.float32 for n, p in llm.named_parameters() if ".lora_" in n)
    ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = llm(ids, causal=False)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in llm.parameters() if p.requires_grad)
    assert torch.isfinite(llm(ids).float()).all()  # no autocast: the bf16 base, the fp32 adapter


def test_gradient_checkpointing_gives_same_gradients(tiny):
    path, _ = tiny
    llm, _ = load_llm(path)
    add_lora(llm, r=4, alpha=8, dropout=0.0)
    randomize_lora(llm)
    llm.train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    grads = []
    for ckpt in (False, True):
        llm.zero_grad()
        llm.gradient_checkpointing = ckpt
        llm(ids, causal=False).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in llm.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


@pytest.mark.parametrize("layers", [None, 1])
def test_our_adapter_loads_in_peft_and_back(tiny, tmp_path, layers):
    """An adapter we save (on every layer, or the top one only: PEFT's layers_to_transform) gives
    PEFT's logits, and loads back into a fresh model of ours with the same logits."""
    from peft import PeftModel
    path, ref = tiny
    ours, _ = load_llm(path)
    add_lora(ours, r=4, alpha=8, dropout=0.0, layers=layers)
    randomize_lora(ours)
    save_adapter(ours, str(tmp_path / "adapter"), base_model=path)
    peft_model = PeftModel.from_pretrained(ref, str(tmp_path / "adapter")).eval()
    again, _ = load_llm(path)
    load_adapter(again, str(tmp_path / "adapter"))
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    with torch.no_grad():
        diff = (ours.logits(ids) - peft_model(ids).logits).abs().max().item()
        assert torch.equal(again.logits(ids), ours.logits(ids))
    assert diff <= 1e-4, diff
    n_adapted = sum(1 for n, _ in peft_model.named_modules() if n.endswith("q_proj.lora_A"))
    assert n_adapted == (layers or TINY["num_hidden_layers"])


def test_peft_adapter_loads_in_ours(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    path, ref = tiny
    peft_model = get_peft_model(ref, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0,
                                                target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours, _ = load_llm(path)
    load_adapter(ours, str(tmp_path / "peft"))
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    peft_model.eval()
    with torch.no_grad():
        diff = (ours.logits(ids) - peft_model(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_adapter_errors(tiny, tmp_path):
    path, _ = tiny
    ours, _ = load_llm(path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(ours, str(tmp_path / "none"))
    with pytest.raises(ValueError, match="no nn.Linear named"):
        add_lora(ours, targets=("qkv",))


@pytest.fixture
def deep(tmp_path):
    """A four-layer tiny checkpoint: room for a frozen prefix below the adapted top layers."""
    ref = make_hf_checkpoint(tmp_path / "deep", num_hidden_layers=4)
    return str(tmp_path / "deep"), ref


def test_top_layers_wrap_exactly_those(deep):
    path, _ = deep
    llm, _ = load_llm(path)
    add_lora(llm, r=4, alpha=8, dropout=0.0, layers=2)
    wrapped = {n for n, m in llm.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {f"model.layers.{i}.{part}.{t}" for i in (2, 3) for part, names in
                       (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
                       for t in names}
    assert llm.lora_config["layers_to_transform"] == [2, 3] and llm.first_trainable_layer() == 2
    assert add_lora(load_llm(path)[0], layers=0).lora_config["layers_to_transform"] is None
    with pytest.raises(ValueError, match="top 5 layers"):
        add_lora(load_llm(path)[0], layers=5)


def test_frozen_prefix_runs_without_grad_with_same_loss_and_gradients(deep):
    """The layers below the adapters run under no_grad: nothing saved for backward there, and
    the same loss and LoRA gradients as a forward that keeps the graph everywhere."""
    path, _ = deep
    llm, _ = load_llm(path)
    add_lora(llm, r=4, alpha=8, dropout=0.0, layers=1)
    randomize_lora(llm)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the masked SDPA path
    lora = [p for n, p in llm.named_parameters() if ".lora_" in n]
    runs = []
    for force_grad in (False, True):  # a trainable embedding puts every layer in the graph
        llm.model.embed_tokens.weight.requires_grad_(force_grad)
        assert llm.first_trainable_layer() == (0 if force_grad else 3)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = llm(ids, mask, causal=False).pow(2).mean()
        grads = torch.autograd.grad(loss, lora)
        runs.append((loss.detach(), grads, sum(saved)))
    (loss_a, grads_a, saved_a), (loss_b, grads_b, saved_b) = runs
    assert torch.equal(loss_a, loss_b)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(grads_a, grads_b))
    assert saved_a < saved_b / 2, (saved_a, saved_b)


def test_top_layers_match_peft_layers_to_transform(deep):
    """peft's LoraConfig(layers_to_transform=...) on the transformers model, with our adapter
    weights: the same adapted modules (state_dict keys) and the same logits."""
    from peft import LoraConfig, get_peft_model
    path, ref = deep
    ours, _ = load_llm(path)
    add_lora(ours, r=4, alpha=8, dropout=0.0, layers=2)
    randomize_lora(ours)
    c = ours.lora_config
    peft_model = get_peft_model(ref, LoraConfig(r=c["r"], lora_alpha=c["lora_alpha"], lora_dropout=0.0,
                                                target_modules=c["target_modules"],
                                                layers_to_transform=c["layers_to_transform"])).eval()
    peft_lora = {k.removeprefix("base_model.model.").replace(".default", ""): v
                 for k, v in peft_model.state_dict().items() if ".lora_" in k}
    ours_lora = {k: v for k, v in ours.state_dict().items() if ".lora_" in k}
    assert set(peft_lora) == set(ours_lora)
    peft_model.load_state_dict({"base_model.model." + k.replace(".weight", ".default.weight"): v
                                for k, v in ours_lora.items()}, strict=False)
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    with torch.no_grad():
        diff = (ours.logits(ids, causal=True) - peft_model(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff
