"""train_text.py end to end on configs/tiny.yaml: losses fall, files are written, the saved encoder
reloads to the same embeddings, a crashed run resumes exactly, a NaN stops the run cleanly."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import data
import losses
import runtime
import train_text
from encoders import build_llm, load_text_encoder, pad_id

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def run(out_dir, *overrides):
    return train_text.main([TINY, f"out_dir={out_dir}", *overrides])


def logged(out_dir, stage):
    with open(os.path.join(out_dir, "text", stage, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tiny_end_to_end(tmp_path):
    encoder, tokenizer, results = run(tmp_path)
    for stage in ("mntp", "contrastive"):
        loss = [r["loss"] for r in logged(tmp_path, stage)]
        assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5, f"{stage} loss did not fall: {loss}"
        assert os.path.exists(tmp_path / "text" / stage / "adapter" / "adapter_model.safetensors")
    for name in ("encoder.json", "eval.json", "loss.png", "config.yaml"):
        assert os.path.exists(tmp_path / "text" / name), name
    assert set(results) == {"overlap", "baseline: TF-IDF", "before", "contrastive"}  # before and after training

    reloaded, tok2, _ = load_text_encoder(str(tmp_path / "text"))
    texts = ["FINDINGS: Small left pleural effusion. IMPRESSION: Small left effusion.", "No acute disease."]
    b = data.encode_batch(tokenizer, texts, 64, pad_id(encoder.llm.config))
    with torch.no_grad():
        before = encoder.eval()(b["input_ids"], b["attention_mask"], b["embed_mask"])
        after = reloaded(b["input_ids"], b["attention_mask"], b["embed_mask"])
    assert (before - after).abs().max() <= 1e-5


def test_crash_and_resume_is_exact(tmp_path, monkeypatch):
    """A run killed in the contrastive stage and resumed equals one uninterrupted run."""
    args = ["text.mntp.steps=6", "text.contrastive.steps=6", "train.ckpt_every=2", "text.eval_reports=8"]
    run(tmp_path / "straight", *args)

    calls, real = [0], losses.supcon_loss

    def crash_on_fourth_step(*a, **k):
        calls[0] += 1
        if calls[0] == 4:  # checkpoint at step 2 exists, step 3 done but not saved
            raise KeyboardInterrupt("simulated crash")
        return real(*a, **k)
    monkeypatch.setattr(losses, "supcon_loss", crash_on_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", *args)
    monkeypatch.setattr(losses, "supcon_loss", real)
    run(tmp_path / "resumed", *args)

    for stage in ("mntp", "contrastive"):
        a = {r["step"]: r["loss"] for r in logged(tmp_path / "straight", stage)}
        b = {r["step"]: r["loss"] for r in logged(tmp_path / "resumed", stage)}  # later lines win
        assert a == b, stage
        wa = load_file(str(tmp_path / "straight" / "text" / stage / "adapter" / "adapter_model.safetensors"))
        wb = load_file(str(tmp_path / "resumed" / "text" / stage / "adapter" / "adapter_model.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), stage


def test_nan_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    calls, real = [0], losses.mntp_loss

    def nan_at_step_seven(*a, **k):
        calls[0] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls[0] == 7 else loss
    monkeypatch.setattr(losses, "mntp_loss", nan_at_step_seven)
    with pytest.raises(runtime.NonFiniteLoss, match="non-finite loss at step 7"):
        run(tmp_path, "train.ckpt_every=5", "text.stages=[mntp]")
    ck = torch.load(tmp_path / "text" / "mntp" / "ckpt.pt", weights_only=False)
    assert ck["step"] == 5
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_bad_configs_fail_before_work(tmp_path):
    with pytest.raises(ValueError, match="must be a multiple of text.variants_per_report"):
        run(tmp_path, "text.contrastive.batch_size=7")
    with pytest.raises(ValueError, match="exceeds the model's limit 512"):
        run(tmp_path, "model.max_len=1000")
    with pytest.raises(ValueError, match="unknown text.stages"):
        run(tmp_path, "text.stages=[mlm]")
    for key in ("impression_negatives", "length_buckets"):
        with pytest.raises(ValueError, match=f"text.{key} must be at least 1"):
            run(tmp_path, f"text.{key}=0")
    with pytest.raises(ValueError, match="text.contrastive_lora_layers at least -1"):
        run(tmp_path, "text.contrastive_lora_layers=-2")


def test_grad_checkpointing_of_one_stage(tmp_path, monkeypatch):
    """text.contrastive.grad_checkpointing recomputes the blocks in the contrastive stage's backward only
    (counted at torch's checkpoint function, as model.py calls it); train.grad_checkpointing in both."""
    import model
    calls, real = [], model.checkpoint
    monkeypatch.setattr(model, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    short = ["text.mntp.steps=2", "text.contrastive.steps=2", "text.eval_reports=0", "text.contrastive.grad_checkpointing=true"]
    for stages, more, want in (("[mntp]", [], 0), ("[contrastive]", [], 2 * 2), ("[mntp]", ["train.grad_checkpointing=true"], 2 * 2)):
        calls.clear()
        run(tmp_path / f"{stages}{len(more)}", *short, f"text.stages={stages}", *more)
        assert (len(calls) >= want if want else not calls), (stages, more, len(calls))


@pytest.mark.parametrize("contrastive_layers, want", [(0, {0, 1}), (-1, {1})])
def test_each_stage_adapts_its_own_layers(tmp_path, contrastive_layers, want):
    """text.lora_layers=1 puts MNTP's adapter on the top layer of the two; text.contrastive_lora_layers
    gives the contrastive stage its own (0: every layer), or with -1 the same as MNTP. Read from the
    saved adapters' tensor names (PEFT's model.layers.<i>. ...), and every adapted layer was trained:
    its B matrices, zero at the start, have moved."""
    run(tmp_path, "text.mntp.steps=2", "text.contrastive.steps=2", "text.eval_reports=0", "text.lora_layers=1",
        f"text.contrastive_lora_layers={contrastive_layers}")
    for stage, layers in (("mntp", {1}), ("contrastive", want)):
        w = load_file(str(tmp_path / "text" / stage / "adapter" / "adapter_model.safetensors"))
        assert {int(k.split("layers.")[1].split(".")[0]) for k in w} == layers, stage
        assert all(v.abs().max() > 0 for k, v in w.items() if "lora_B" in k), stage


def test_full_fine_tuning_in_bf16_is_refused(tmp_path):
    """text.lora=false over bf16 weights would let AdamW update bf16 weights in place (steps below
    1/256 of a weight vanish): refused, naming both keys and the fix, before any training."""
    with pytest.raises(ValueError, match=r"text.lora=false .*model.dtype=bfloat16.* Set model.dtype=float32"):
        run(tmp_path, "text.lora=false", "model.dtype=bfloat16", "text.eval_reports=0")
    assert not os.path.exists(tmp_path / "text" / "mntp" / "log.jsonl")
    w = torch.ones(1000, dtype=torch.bfloat16)  # why: a typical step of lr 2e-4 on weights near 1 is lost
    assert torch.equal(w - 2e-4, w)


def test_small_config_smoke(tmp_path):
    """configs/small.yaml with a step limit: real SmolLM2 weights, real Open-I reports."""
    small = os.path.join(ROOT, "configs", "small.yaml")
    encoder, _, results = train_text.main([
        small, f"out_dir={tmp_path}", "text.mntp.steps=2", "text.contrastive.steps=2", "text.mntp.batch_size=2",
        "text.contrastive.batch_size=4", "text.eval_reports=6", "model.max_len=48", "train.log_every=1"])
    assert encoder.llm.config.num_hidden_layers == 30
    assert all(torch.isfinite(torch.tensor(r["loss"])) for s in ("mntp", "contrastive") for r in logged(tmp_path, s))
    assert os.path.exists(tmp_path / "text" / "encoder.json")


def test_init_from_an_earlier_run(tmp_path):
    """text.init: a contrastive run on top of another run's MNTP. Its encoder.json names that run in
    "init" and lists only its own stage, inside its own folder; the saved encoder reloads to the
    embeddings of the one in memory, which had the MNTP adapter merged in; a different base model is
    refused."""
    short = ["text.mntp.steps=3", "text.contrastive.steps=3", "text.eval_reports=0"]
    run(tmp_path / "a", *short, "text.stages=[mntp]")
    encoder, tokenizer, _ = run(tmp_path / "b", *short, "text.stages=[contrastive]", f"text.init={tmp_path / 'a' / 'text'}",
                                "model.pooling=latent_attention")
    spec = json.load(open(tmp_path / "b" / "text" / "encoder.json"))
    assert os.path.normpath(tmp_path / "b" / "text" / spec["init"]) == str(tmp_path / "a" / "text")
    assert [s["dir"] for s in spec["stages"]] == ["contrastive"]
    reloaded, _, mcfg = load_text_encoder(str(tmp_path / "b" / "text"))
    assert mcfg.pooling == "latent_attention"
    b = data.encode_batch(tokenizer, ["Small left pleural effusion.", "No acute disease."], 64,
                          pad_id(encoder.llm.config))
    with torch.no_grad():
        want = encoder.eval()(b["input_ids"], b["attention_mask"], b["embed_mask"])
        got = reloaded(b["input_ids"], b["attention_mask"], b["embed_mask"])
    assert (want - got).abs().max() <= 1e-5
    after_mntp = load_text_encoder(str(tmp_path / "a" / "text"))[0].llm
    raw = build_llm(mcfg, 0, "cpu")[0]  # the comparison above would fail without the MNTP stage:
    assert any(not torch.equal(p, q) for p, q in zip(raw.parameters(), after_mntp.parameters()))
    with pytest.raises(ValueError, match="model.random_init"):
        run(tmp_path / "c", *short, "text.stages=[contrastive]", f"text.init={tmp_path / 'a' / 'text'}",
            "model.random_init.hidden_size=32")


def test_stage_paths_in_encoder_json_stay_inside_the_run(tmp_path):
    """A stage entry of encoder.json that is absolute or climbs out of the run's folder is refused by
    load_text_encoder and by train_clip's text_source, naming encoder.json and the entry, even when
    the folder it points at holds a valid adapter."""
    import encoders
    run(tmp_path / "a", "text.mntp.steps=2", "text.eval_reports=0", "text.stages=[mntp]")
    spec = json.load(open(tmp_path / "a" / "text" / "encoder.json"))
    mntp = str(tmp_path / "a" / "text" / "mntp")
    for name in ("dir-absolute", "dir-climbs", "adapter-absolute", "adapter-climbs"):
        folder = tmp_path / name / "run" / "text"
        folder.mkdir(parents=True)
        stage = {"dir-absolute": {"dir": mntp, "adapter": "adapter"},
                 "dir-climbs": {"dir": os.path.relpath(mntp, folder), "adapter": "adapter"},  # ../../../a/text/mntp
                 "adapter-absolute": {"dir": "mntp", "adapter": os.path.join(mntp, "adapter")},
                 "adapter-climbs": {"dir": "mntp", "adapter": os.path.relpath(mntp, folder / "mntp") + "/adapter"}}[name]
        json.dump(spec | {"stages": [stage]}, open(folder / "encoder.json", "w"))
        key = name.split("-")[0]
        for load in (lambda: load_text_encoder(str(folder)),
                     lambda: encoders.text_source("trained", str(folder), spec["model"], 0)):
            with pytest.raises(ValueError, match=rf"encoder.json: stages\[0\]\.{key} = .* not a path inside"):
                load()
    load_text_encoder(str(tmp_path / "a" / "text"))  # the run itself loads


def _lora_encoder():
    """A tiny random LLM with LoRA on every layer, adapters given values (B = 0 would leave A without
    gradient), mean-pooled: the same weights in every process."""
    import model as M
    llm = build_llm(runtime.load_config(TINY, []).model, 0, "cpu")[0]
    M.add_lora(llm, M.STAGE1_TARGETS, 4, 8, 0.0)
    for n, p in llm.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
    return llm, M.TextEncoder(llm, "mean")


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_length_buckets_equal_one_padded_pass(padding_side, openi_sample, smol_tok):
    """embed_in_buckets: the embeddings and the LoRA gradients of a contrastive batch equal those of one
    padded forward pass over the whole batch (padding masked, positions of real tokens only), in the
    batch's row order, while the buckets hold fewer padded tokens."""
    import model as M
    llm, encoder = _lora_encoder()
    batches = data.ContrastiveBatches(openi_sample[:32], smol_tok, pad_id(llm.config), 8, 2, 96,
                                      hard_negative_share=1.0, summarize_share=1.0, padding_side=padding_side,
                                      impression_negatives=3, seed=1)
    batch = batches[0]
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() * 2 < lengths.max()  # reports and short impressions: something to save

    def run_with(embed):
        llm.zero_grad()
        e = embed()
        (e * torch.linspace(-1, 1, e.numel()).view_as(e)).sum().backward()
        return e.detach(), [p.grad.clone() for p in llm.parameters() if p.requires_grad]
    want, want_grads = run_with(lambda: encoder(batch["input_ids"], batch["attention_mask"], batch["embed_mask"]))
    for buckets in (1, 3, len(lengths)):
        got, grads = run_with(lambda: M.embed_in_buckets(encoder, batch, buckets))
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
        assert all((g - w).abs().max() <= 1e-4 * w.abs().max() + 1e-7 for g, w in zip(grads, want_grads))
        assert sum(x[0].numel() for _, x in M.length_buckets(batch, buckets)) < batch["input_ids"].numel() or buckets == 1


def test_mntp_in_length_buckets_equals_one_padded_pass(openi_sample, smol_tok):
    """mntp_loss_in_buckets: the loss over length buckets is the mean over all masked tokens of one padded
    pass (losses.mntp_loss on the whole batch), and so is its gradient."""
    llm = _lora_encoder()[0]

    def run_with(loss):
        llm.zero_grad()
        value = loss()
        value.backward()
        return value.detach(), [p.grad.clone() for p in llm.parameters() if p.requires_grad]
    collator = data.MNTPCollator(smol_tok, 96, pad_id(llm.config), smol_tok.token_to_id("_"))
    b = collator([r.text() for r in openi_sample[:8]], seed=3)
    assert b["attention_mask"].sum(1).min() * 2 < b["attention_mask"].sum(1).max()
    mntp = lambda: losses.mntp_loss(llm(b["input_ids"], b["attention_mask"], causal=False), b["labels"], llm.lm_head)
    want, want_grads = run_with(mntp)
    got, grads = run_with(lambda: train_text.mntp_loss_in_buckets(llm, llm.lm_head, b, 3))
    assert abs(got.item() - want.item()) <= 1e-5 * want.item()
    assert all((g - w).abs().max() <= 1e-4 * w.abs().max() + 1e-7 for g, w in zip(grads, want_grads))


def _buckets_worker(rank, world, out, parts, buckets):
    import model as M
    llm, encoder = _lora_encoder()
    net = torch.nn.parallel.DistributedDataParallel(encoder)
    loss = train_text.contrastive_loss(M.embed_in_buckets(net, parts[rank], buckets), parts[rank], 0.05)
    loss.backward()
    if rank == 0:
        torch.save([p.grad for p in llm.parameters() if p.requires_grad], out)


def test_length_buckets_under_two_processes_equal_one_padded_pass(tmp_path, openi_sample, smol_tok):
    """Under DDP, several forward passes (the length buckets) before one backward: the gradients of 2 gloo
    processes, each embedding its half of a contrastive batch in 3 buckets, equal those of one process
    running the whole batch in one padded pass."""
    import gloo
    import model as M
    batches = data.ContrastiveBatches(openi_sample[:32], smol_tok, 0, 8, 2, 96, hard_negative_share=1.0,
                                      summarize_share=1.0, impression_negatives=3, seed=1)
    rows = batches.rows(0)
    parts = []
    for half in (rows[:len(rows) // 2], rows[len(rows) // 2:]):
        batches.rows = lambda index, half=half: half
        parts.append(batches[0])
    del batches.rows
    whole = batches[0]
    assert len(whole["input_ids"]) == len(rows)
    llm, encoder = _lora_encoder()
    train_text.contrastive_loss(M.embed_in_buckets(encoder, whole, 1), whole, 0.05).backward()
    want = [p.grad for p in llm.parameters() if p.requires_grad]
    gloo.spawn(_buckets_worker, 2, str(tmp_path / "grads.pt"), parts, 3)
    got = torch.load(tmp_path / "grads.pt")
    assert len(got) == len(want) and all(g is not None for g in got)
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-4 * w.abs().max() + 1e-7
