"""runtime.train_loop's promises: AdamW's usual weight-decay groups; a random stream per rank, each saved
and restored; checkpoints read without unpickling objects and refused when the config differs; only
good checkpoints written, a diverged or collapsed run named as such; a resumed run logs each step once;
one run per folder; no temporary files left by a killed save; N processes see one process's batches."""
import functools
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import data
import gloo
import encoders
import losses
import model as M
import runtime
from weights import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
CPU = runtime.Env(torch.device("cpu"))


# ---- a toy run of train_loop: a small regression with dropout, in seconds ----

class ToyBatches(torch.utils.data.Dataset):
    """Batch i of an epoch: b rows of a fixed regression problem, in an order seeded by the epoch."""

    def __init__(self, n=24, b=4):
        g = torch.Generator().manual_seed(0)
        self.x, self.n, self.b = torch.randn(n, 4, generator=g), n, b
        self.y = self.x @ torch.randn(4, 1, generator=g)
        self.set_epoch(0)

    def set_epoch(self, epoch):
        self.epoch, self.order = epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch))

    def __len__(self):
        return self.n // self.b

    def __getitem__(self, i):
        rows = self.order[i * self.b:(i + 1) * self.b]
        return {"x": self.x[rows], "y": self.y[rows]}


class Toy(torch.nn.Module):
    """Two layers with dropout between them, drawn from the global RNG as nn.Dropout draws; the masks
    are kept (one per forward pass) so that tests can compare them."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.masks = torch.nn.Linear(4, 16), torch.nn.Linear(16, 1), []

    def forward(self, x):
        keep = torch.nn.functional.dropout(torch.ones(len(x), 16), 0.5, self.training) > 0
        self.masks.append(keep)
        return self.fc2(torch.relu(self.fc1(x)) * keep * 2)


def toy_config(out_dir, **stage):
    cfg = runtime.Config(out_dir=str(out_dir))
    cfg.train.precision, cfg.train.log_every, cfg.train.ckpt_every = "fp32", 1, 2
    for key, value in (dict(steps=6, lr=1e-2, warmup_steps=1, batch_size=4) | stage).items():
        setattr(cfg.text.mntp, key, value)
    return cfg


def run_toy(run_dir, cfg, env=CPU, crash_before=None):
    """Train a Toy (seeded as the scripts seed their models); crash_before=k: a crash at the start of
    forward pass k + 1, i.e. after k steps. Returns the model."""
    torch.manual_seed(0)
    model = Toy()

    def loss_fn(net, b):
        if len(model.masks) == crash_before:
            raise KeyboardInterrupt("simulated crash")
        return ((net(b["x"]) - b["y"]) ** 2).mean(), len(b["x"])
    try:
        runtime.train_loop("toy", model, loss_fn, runtime.EndlessBatches(ToyBatches(), env), cfg.text.mntp, cfg, env,
                           str(run_dir))
    except KeyboardInterrupt:
        pass
    return model


def logged(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]



# ---- 4. weight decay ----

def test_weight_decay_groups_hold_the_expected_names(tmp_path):
    # LoRA on a tiny LLM (A and B are matrices: decayed) with NV-Embed's latent-attention pooler
    llm = M.LLM(M.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    M.add_lora(llm, M.STAGE1_TARGETS, 4, 8, 0.0)
    enc = M.TextEncoder(llm, "latent_attention", 4)
    enc.pooler.requires_grad_(True)
    lora = {f"llm.model.layers.0.{m}.lora_{ab}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") for ab in "AB"}
    decay, no_decay = runtime.weight_decay_groups(enc)
    assert set(decay) == lora | {"pooler.attn.in_proj_weight", "pooler.attn.out_proj.weight", "pooler.mlp.0.weight",
                                 "pooler.mlp.2.weight"}
    assert set(no_decay) == {"pooler.latents", "pooler.attn.in_proj_bias", "pooler.attn.out_proj.bias",
                             "pooler.mlp.0.bias", "pooler.mlp.2.bias"} | \
        {f"pooler.{n}.{w}" for n in ("norm_q", "norm_kv", "norm_mlp") for w in ("weight", "bias")}

    # full fine-tuning: the (tied) token embeddings and the RMSNorm weights keep their size
    M.merge_lora(llm)
    llm.requires_grad_(True)
    decay, no_decay = runtime.weight_decay_groups(llm)
    assert set(decay) == {f"model.layers.0.{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj",
                          "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(no_decay) == {"model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                             "model.layers.0.post_attention_layernorm.weight", "model.norm.weight"}

    # CLIP with the frozen text tower: logit scale, class and position embeddings, norms and biases
    clip = M.CLIPModel(M.ViT(M.VisionConfig.preset("tiny")), 8, text_mode="frozen", text_dim=16)
    layers = [f"vision_model.encoder.layers.{i}." for i in range(2)]
    decay, no_decay = runtime.weight_decay_groups(clip)
    assert set(decay) == {"vision_model.embeddings.patch_embedding.weight", "visual_projection.weight",
                          "text_projection.1.weight", "text_projection.3.weight"} | \
        {f"{l}{m}.weight" for l in layers for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                    "self_attn.out_proj", "mlp.fc1", "mlp.fc2")}
    assert set(no_decay) == {"logit_scale", "vision_model.embeddings.class_embedding",
                             "vision_model.embeddings.position_embedding.weight", "text_projection.0.weight",
                             "text_projection.0.bias", "text_projection.1.bias", "text_projection.3.bias"} | \
        {f"vision_model.{n}.{w}" for n in ("pre_layrnorm", "post_layernorm") for w in ("weight", "bias")} | \
        {f"{l}{m}.bias" for l in layers for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                  "self_attn.out_proj", "mlp.fc1", "mlp.fc2")} | \
        {f"{l}{n}.{w}" for l in layers for n in ("layer_norm1", "layer_norm2") for w in ("weight", "bias")}

    # and train_loop uses them: with a zero gradient AdamW's step is decay alone, p <- p (1 - lr wd)
    lr, wd = 0.1, 0.5
    cfg = toy_config(tmp_path, steps=1, lr=lr, warmup_steps=0, weight_decay=wd)
    before = {n: p.detach().clone() for n, p in clip.named_parameters()}
    zero = lambda net, b: (sum((p * 0).sum() for p in net.parameters()), 1)
    runtime.train_loop("decay", clip, zero, runtime.EndlessBatches(ToyBatches(), CPU), cfg.text.mntp, cfg, CPU,
                       str(tmp_path))
    for n, p in clip.named_parameters():
        want = before[n] * (1 - lr * wd) if n in decay else before[n]
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-7, msg=n)


# ---- 5. a random stream per rank, saved and restored per rank ----

def _rng_worker(rank, world, run_dir, crash_before, result):
    env = runtime.Env(torch.device("cpu"), rank, world)
    model = run_toy(run_dir, toy_config(run_dir), env, crash_before)
    torch.save(dict(masks=model.masks, weights=model.state_dict()), f"{result}.{rank}")


def test_two_processes_draw_their_own_dropout_and_resume_exactly(tmp_path):
    def spawn(run_dir, crash_before, name):
        gloo.spawn(_rng_worker, 2, str(run_dir), crash_before, str(tmp_path / name))
        return [torch.load(tmp_path / f"{name}.{r}") for r in range(2)]
    straight = spawn(tmp_path / "straight", None, "straight")
    # the ranks' masks differ (they would for the rows of one process's batch too)
    assert all(not torch.equal(a, b) for a, b in zip(straight[0]["masks"], straight[1]["masks"]))
    # crash after 4 of 6 steps: the checkpoint of step 2 is on disk (step 4's waits for step 5)
    spawn(tmp_path / "resumed", 4, "crashed")
    resumed = spawn(tmp_path / "resumed", None, "resumed")
    for rank in range(2):
        assert len(resumed[rank]["masks"]) == 4  # steps 3-6
        assert all(torch.equal(a, b) for a, b in zip(resumed[rank]["masks"], straight[rank]["masks"][2:])), rank
        assert all(torch.equal(resumed[rank]["weights"][k], v) for k, v in straight[rank]["weights"].items())
    without_speed = lambda run: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in logged(tmp_path / run)]
    assert without_speed("resumed") == without_speed("straight")  # each step once, the same losses


# ---- 7. checkpoints hold tensors and plain values, and are read as such ----

class RunsCode:
    """Unpickling this calls os.mkdir(marker): what a crafted ckpt.pt could do with any command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_checkpoint_with_an_object_is_refused_and_never_runs(tmp_path):
    cfg = toy_config(tmp_path)
    run_toy(tmp_path / "run", cfg)
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)  # ours read as tensors and plain values
    marker = tmp_path / "payload-ran"
    ck["step"] = 2
    ck["note"] = RunsCode(str(marker))
    torch.save(ck, tmp_path / "run" / "ckpt.pt")
    refused = r"cannot resume from .*run/ckpt\.pt: it is not a checkpoint .*train\.resume=none"
    with pytest.raises(ValueError, match=refused):
        run_toy(tmp_path / "run", cfg)
    assert not marker.exists()


# ---- 9. resuming with another config ----

@pytest.fixture(scope="module")
def tokenizer_read_once():
    """tiny.yaml's tokenizer is SmolLM2's, parsed from the 93 MB GGUF in seconds: once per file is enough."""
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(encoders, "load_tokenizer", functools.lru_cache(load_tokenizer))
        yield


def tiny(out_dir, *overrides):
    import train_text
    return train_text.main([TINY, f"out_dir={out_dir}", "text.stages=[mntp]", "text.eval_reports=0", *overrides])


def test_resume_with_another_lora_rank_is_refused(tmp_path, tokenizer_read_once):
    tiny(tmp_path, "text.mntp.steps=2")
    ckpt = tmp_path / "text" / "mntp" / "ckpt.pt"
    with pytest.raises(ValueError, match=rf"cannot resume from {ckpt}: it was written with another config:\n"
                                         r"  text.lora_r: 16 in the checkpoint, 8 now\n.*train\.resume=none"):
        tiny(tmp_path, "text.mntp.steps=2", "text.lora_r=8")
    tiny(tmp_path, "text.mntp.steps=2", "text.lora_r=8", "train.resume=none")  # starting over works
    assert torch.load(ckpt, weights_only=True)["config"]["text.lora_r"] == 8


# ---- 10. only good checkpoints; divergence and collapse named ----

def crash_mntp_at(monkeypatch, call):
    calls, real = [0], losses.mntp_loss

    def crash(*a, **k):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt("simulated crash")
        return real(*a, **k)
    monkeypatch.setattr(losses, "mntp_loss", crash)
    return real


def test_divergence_names_a_checkpoint_that_resumes(tmp_path, monkeypatch, tokenizer_read_once):
    """lr=1e20 from a good state: the first update blows the weights up, the next loss is NaN. The
    checkpoint named must be one whose weights still train: resuming from it with the usual lr works."""
    args = ["text.mntp.steps=8", "train.ckpt_every=1"]
    real = crash_mntp_at(monkeypatch, 4)  # steps 1-3 at the usual lr, then a crash: step 2's checkpoint
    with pytest.raises(KeyboardInterrupt):
        tiny(tmp_path, *args)
    monkeypatch.setattr(losses, "mntp_loss", real)
    ckpt = tmp_path / "text" / "mntp" / "ckpt.pt"
    with pytest.raises(runtime.NonFiniteLoss, match=f"last good checkpoint: {ckpt}") as diverged:
        tiny(tmp_path, *args, "text.mntp.lr=1e20")
    tiny(tmp_path, *args)  # resumes from it at the usual lr
    log = logged(tmp_path / "text" / "mntp")
    assert [r["step"] for r in log] == list(range(1, 9))
    assert all(abs(r["loss"]) < 100 for r in log)  # finite and not diverged (ln V = 10.8)
    assert "non-finite loss at step 4" in str(diverged.value) and "(step 2)" in str(diverged.value)


def test_overflowing_update_is_named(tmp_path, tokenizer_read_once):
    """lr=1e38: AdamW's first step size lr / (1 - 0.9) is beyond float32."""
    with pytest.raises(runtime.NonFiniteLoss, match="update overflowed at step 1 .*no checkpoint was written"):
        tiny(tmp_path, "text.mntp.steps=4", "train.ckpt_every=1", "text.mntp.lr=1e38")
    assert not (tmp_path / "text" / "mntp" / "ckpt.pt").exists()


def test_collapsed_run_is_warned_about(tmp_path, capsys, tokenizer_read_once):
    """lr=1e6: one update saturates the model; the gradient is exactly 0 from then on."""
    tiny(tmp_path, "text.mntp.steps=10", "text.mntp.lr=1e6")
    zero = [r["step"] for r in logged(tmp_path / "text" / "mntp") if r["grad_norm"] == 0]
    assert zero[:5] == list(range(zero[0], zero[0] + 5))  # the reference: 5 zero norms in a row
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: mntp")]
    assert len(warnings) == 1 and f"steps {zero[0]}-{zero[0] + 4}" in warnings[0] and "collapsed" in warnings[0]


# ---- 11. a resumed run logs each step once ----

def test_resumed_log_has_each_step_once(tmp_path):
    run_toy(tmp_path / "straight", toy_config(tmp_path))
    run_toy(tmp_path / "resumed", toy_config(tmp_path), crash_before=3)  # steps 1-3 logged, checkpoint 2
    assert [r["step"] for r in logged(tmp_path / "resumed")] == [1, 2, 3]
    run_toy(tmp_path / "resumed", toy_config(tmp_path))
    a, b = logged(tmp_path / "straight"), logged(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


# ---- 12. one run per folder; no temporary files left behind ----

def test_second_run_on_a_folder_is_refused(tmp_path):
    code = "import sys, time, runtime; runtime.lock_folder(sys.argv[1]); print('locked', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"{tmp_path} is in use by another run \(process {holder.pid}\)"):
            run_toy(tmp_path, toy_config(tmp_path))
        assert not (tmp_path / "log.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    run_toy(tmp_path, toy_config(tmp_path))  # the lock went with its process
    assert [r["step"] for r in logged(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_killed_save_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    code = ("import sys, time, runtime\n"
            "def slow(p):\n    open(p, 'wb').write(b'half a checkpoint')\n    print('writing', flush=True)\n"
            "    time.sleep(120)\n"
            "runtime.atomic_write(sys.argv[1], slow)\n")
    writer = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    orphan = tmp_path / f"ckpt.pt.tmp{writer.pid}"
    assert orphan.exists()  # what kill -9 leaves
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    busy = tmp_path / f"ckpt.pt.tmp{alive.pid}"  # a save in progress in a live process
    busy.write_bytes(b"")
    try:
        runtime.save_checkpoint(str(path), {"step": 1})
        assert not orphan.exists() and busy.exists()
    finally:
        alive.kill()
        alive.wait()
    assert torch.load(path, weights_only=True) == {"step": 1}
    with pytest.raises(ZeroDivisionError):  # a failed write removes its own temporary file
        runtime.atomic_write(str(path), lambda p: (open(p, "w").write("x"), 1 / 0))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # and the other process's file went once it had died


# ---- 13. N processes with batch b see one process's batches with batch N·b ----

class Text:
    def __init__(self, i):
        self.i = i

    def text(self):
        return str(self.i)


class Studies(list):
    """PairBatches' view of a study list: item j is (image, report text, j)."""
    epoch = 0


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_together_see_one_process_batches_across_epochs(world):
    """Rank-major concatenation of the ranks' batches at each step == the single process's batch, for
    MNTPBatches (stub collator: the texts) and PairBatches, over 4+ epochs where len % world != 0."""
    n, b = 50, 3  # len at batch b: 16 (16 % 2 = 16 % 3 = 1); one process at batch N·b: 8 or 5 per epoch
    mntp = lambda batch_size: data.MNTPBatches([Text(i) for i in range(n)], lambda texts, seed: texts, batch_size, 0)
    studies = Studies((torch.zeros(1, 2, 2), str(j), j) for j in range(n))
    pairs = lambda batch_size: data.PairBatches(studies, lambda idx, texts: {"idx": idx.tolist()}, batch_size, 0)
    for make, rows in ((mntp, lambda x: [int(t) for t in x]), (pairs, lambda x: x["idx"])):
        one = runtime.EndlessBatches(make(world * b), CPU)
        ranks = [runtime.EndlessBatches(make(b), runtime.Env(torch.device("cpu"), r, world)) for r in range(world)]
        steps = 4 * len(one.batches) + 1
        for step in range(steps):
            together = [j for rank in ranks for j in rows(rank[step])]
            assert together == rows(one[step]), (world, step)
            assert len(set(together)) == world * b
        assert one.batches.epoch == 4
