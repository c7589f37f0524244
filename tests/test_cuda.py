"""The CUDA code path: run where a GPU is present, skipped elsewhere (CI has none). The same tiny
random models as the CPU tests, on the GPU, checked against the CPU and against transformers; and
configs/gpu.yaml, whose validity is checked everywhere."""
import os

import pytest
import torch

import encoders
import train_clip
import train_text
from conftest import TINY, make_hf_checkpoint
from runtime import check, load_config
from weights import load_llm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "tiny.yaml")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_gpu_config_is_valid_and_paper_like():
    cfg = load_config(os.path.join(ROOT, "configs", "gpu.yaml"))
    check(cfg)
    assert cfg.train.device == "cuda" and cfg.train.precision == "bf16" and cfg.model.max_len == 512
    assert cfg.text.contrastive.batch_size >= 48 and cfg.text.mntp.steps + cfg.text.contrastive.steps >= 2000


@cuda
def test_logits_on_gpu_match_transformers_and_cpu(tmp_path):
    ref = make_hf_checkpoint(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    cpu, _ = load_llm(str(tmp_path))
    gpu, _ = load_llm(str(tmp_path), device="cuda")
    with torch.no_grad():
        expected = ref(ids).logits
        for causal in (True, False):
            torch.testing.assert_close(gpu.logits(ids.cuda(), causal=causal).cpu(), cpu.logits(ids, causal=causal),
                                       rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gpu.logits(ids.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = gpu.logits(ids.cuda()).float().cpu()
    assert (low - expected).abs().max() < 0.1 * expected.abs().max()  # bf16: close, not equal


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_text_on_gpu_and_reload_on_cpu(tmp_path, precision):
    """Both stages on the GPU (fp16 goes through the GradScaler); the saved encoder gives the same
    embeddings on the CPU as on the GPU."""
    overrides = [f"out_dir={tmp_path}", "train.device=cuda", f"train.precision={precision}",
                 "text.mntp.steps=4", "text.contrastive.steps=4", "text.eval_reports=10"]
    train_text.main([TINY_YAML, *overrides])
    texts = ["FINDINGS: Small left pleural effusion. IMPRESSION: Small left effusion.", "No acute disease."]
    on = {}
    for device in ("cpu", "cuda"):
        encoder, tokenizer, mcfg = encoders.load_text_encoder(str(tmp_path / "text"), device)
        on[device] = encoders.embed_texts(encoder, tokenizer, texts, mcfg)
    assert torch.isfinite(on["cuda"]).all()
    torch.testing.assert_close(on["cuda"], on["cpu"], rtol=1e-3, atol=1e-3)


@cuda
def test_train_clip_on_gpu(tmp_path):
    train_text.main([TINY_YAML, f"out_dir={tmp_path}", "train.device=cuda", "text.mntp.steps=2",
                     "text.contrastive.steps=2", "text.eval_reports=10"])
    _, results = train_clip.main([TINY_YAML, f"out_dir={tmp_path}", "train.device=cuda", "train.precision=bf16",
                               "clip.optim.steps=20", "clip.train_n=200", "clip.val_n=50", "clip.test_n=50"])
    r = results["test/mimic"]["image_to_text"]
    assert 0 <= r["R@10"] <= 100 and r["mean_rank"] >= 1
