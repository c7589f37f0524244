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


def test_our_adapter_loads_in_peft(tiny, tmp_path):
    from peft import PeftModel
    path, ref = tiny
    ours, _ = load_llm(path)
    add_lora(ours, r=4, alpha=8, dropout=0.0)
    randomize_lora(ours)
    save_adapter(ours, str(tmp_path / "adapter"), base_model=path)
    peft_model = PeftModel.from_pretrained(ref, str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    with torch.no_grad():
        diff = (ours.logits(ids) - peft_model(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


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
