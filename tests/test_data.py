"""Tests of data.py: reports for a config (without the val / test reports seen in training), tokens
and instruction encoding, MNTP masking, contrastive batches, image loading, transforms and the CLIP
datasets."""
import collections
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from reports import Report, normalize_for_match, normalize_report
from synthetic import synth_study

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


# ---------------------------------------------------------------------------------------------
# Reports for a config
# ---------------------------------------------------------------------------------------------

def test_load_reports_drops_val_and_test_reports_seen_in_training(tmp_path):
    """A val / test report whose normalised text occurs in training is dropped, and counted."""
    import json
    from reports import split_of
    from runtime import load_config
    ids = {s: [str(i) for i in range(500) if split_of(str(i)) == s][:2] for s in ("train", "val", "test")}
    texts = {ids["train"][0]: "FINDINGS: Heart size normal. IMPRESSION: No acute disease.",
             ids["train"][1]: "FINDINGS: Small left effusion. IMPRESSION: Effusion.",
             ids["test"][0]: "FINDINGS: heart  size NORMAL IMPRESSION: No acute disease",  # the same, normalised
             ids["test"][1]: "FINDINGS: Small left effusion. IMPRESSION: Small effusion.",
             ids["val"][0]: "FINDINGS: Small left effusion. IMPRESSION: Effusion.",
             ids["val"][1]: "IMPRESSION: No acute disease."}
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"study_id": i, "report": t}) + "\n" for i, t in texts.items()))
    cfg = load_config(str(CONFIGS / "tiny.yaml"), ["data.source=pairs", f"data.path={path}"])
    splits = data.load_reports(cfg)
    assert [r.study_id for r in splits["train"]] == ids["train"]
    assert [r.study_id for r in splits["test"]] == ids["test"][1:]
    assert [r.study_id for r in splits["val"]] == ids["val"][1:]
    assert splits["overlap"] == {"val": {"dropped": 1, "of": 2}, "test": {"dropped": 1, "of": 2}}


def test_no_open_i_test_report_occurs_in_training():
    from runtime import load_config
    splits = data.load_reports(load_config(str(CONFIGS / "small.yaml"), ["data.source=openi"]))
    train = {normalize_for_match(r.text()) for r in splits["train"]}
    pairs = {(normalize_for_match(r.findings), normalize_for_match(r.impression)) for r in splits["train"]}
    for split in ("val", "test"):
        assert splits[split] and not any(normalize_for_match(r.text()) in train for r in splits[split])
        assert not any((normalize_for_match(r.findings), normalize_for_match(r.impression)) in pairs
                       for r in splits[split] if r.findings and r.impression)
        assert splits["overlap"][split]["dropped"] > 0  # there was overlap to drop (95 of 379 test reports)
        assert len(splits[split]) == splits["overlap"][split]["of"] - splits["overlap"][split]["dropped"]


# ---------------------------------------------------------------------------------------------
# Batch builders
# ---------------------------------------------------------------------------------------------


def test_encode_batch_padding_and_embed_mask(tiny_tok):
    texts = ["the heart is normal .", "no pleural effusion"]
    right = data.encode_batch(tiny_tok, texts, 32, pad_id=0)
    assert right["input_ids"].tolist()[1][0] == 1 and right["input_ids"].dtype == torch.long
    assert torch.equal(right["embed_mask"], right["attention_mask"])  # no instruction: everything is report
    assert right["attention_mask"].tolist() == [[1] * 7, [1] * 5 + [0, 0]]
    left = data.encode_batch(tiny_tok, texts, 32, pad_id=0, padding_side="left")
    assert left["attention_mask"].tolist() == [[1] * 7, [0, 0] + [1] * 5]
    assert left["input_ids"][1, 2:].tolist() == right["input_ids"][1, :5].tolist()
    inst = data.encode_batch(tiny_tok, texts, 32, pad_id=0, instruction="retrieve this report",
                             padding_side="left")
    ids, emb = inst["input_ids"][1], inst["embed_mask"][1]
    # LLM2Vec's separator only marks where the report starts: it is never an input token
    word = [tiny_tok.token_to_id(w) for w in ("retrieve", "this", "report", "no", "pleural", "effusion")]
    assert ids[inst["attention_mask"][1].bool()].tolist() == [1] + word + [2]
    assert tiny_tok.token_to_id("!@#$%^&*()") not in inst["input_ids"]
    assert tiny_tok.decode(ids[emb.bool()].tolist(), skip_special_tokens=True) == "no pleural effusion"
    assert emb.sum() == 4  # the report's 3 tokens and </s>; <s>, instruction and padding are 0
    assert (inst["embed_mask"] <= inst["attention_mask"]).all()
    per_text = data.encode_batch(tiny_tok, texts, 32, 0, instruction=[None, "summarize"])
    assert per_text["embed_mask"][0].sum() == 7 and per_text["embed_mask"][1].sum() == 4
    cut = data.encode_batch(tiny_tok, texts, 8, 0, instruction="retrieve this report")
    assert cut["input_ids"].shape[1] == 8 and cut["input_ids"][0, -1] == 2  # the report is cut, never </s>
    with pytest.raises(ValueError):
        data.encode_batch(tiny_tok, texts, 4, 0, instruction="retrieve this report")


def test_encode_batch_real_tokenizer_boundary_is_exact(smol_tok):
    texts = ["No PTX. Small L pl eff.", "FINDINGS: The heart is mildly enlarged."]
    b = data.encode_batch(smol_tok, texts, 64, pad_id=2, instruction="Retrieve the matching chest X-ray report",
                          padding_side="left")
    for i, t in enumerate(texts):
        assert smol_tok.decode(b["input_ids"][i][b["embed_mask"][i].bool()].tolist()) == t
        prefix = b["input_ids"][i][b["attention_mask"][i].bool() & ~b["embed_mask"][i].bool()].tolist()
        assert smol_tok.decode(prefix) == "Retrieve the matching chest X-ray report"  # no separator
        assert "!@#$%^&*()" not in smol_tok.decode(b["input_ids"][i].tolist())
    assert smol_tok.decode([smol_tok.token_to_id("_")]) == "_"  # LLM2Vec's mask token is one token here


def _mntp_texts(n=400, seed=0):
    rng = random.Random(seed)
    words = "the heart is normal mildly enlarged no pleural effusion pneumothorax small left right lungs clear".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(n)]


def test_mntp_masking_rates_and_labels(tiny_tok):
    texts = _mntp_texts()
    collate = data.MNTPCollator(tiny_tok, max_len=24, pad_id=0, mask_id=3, mask_prob=0.2, seed=0)
    b = collate(texts)
    ids, att, labels = b["input_ids"], b["attention_mask"], b["labels"]
    clean = data.encode_batch(tiny_tok, texts, 24, 0)["input_ids"]  # the same tokens, unmasked
    assert ids.shape == labels.shape == att.shape == clean.shape and ids.dtype == labels.dtype == torch.long
    masked = labels != -100
    specials = (clean == 1) | (clean == 2) | (att == 0)
    assert not (masked & specials).any() and not masked[:, 0].any()  # no BOS/EOS/pad, never position 0
    eligible = (~specials).sum() - (~specials[:, 0]).sum()
    assert abs(masked.sum() / eligible - 0.2) < 0.02
    assert torch.equal(labels[masked], clean[masked])  # labels: the original token, only where masked
    assert torch.equal(ids[~masked], clean[~masked])
    as_mask = (ids[masked] == 3).float().mean()
    kept = (ids[masked] == clean[masked]).float().mean()
    assert abs(as_mask - 0.8) < 0.04 and abs(kept - 0.1) < 0.03 and abs(1 - as_mask - kept - 0.1) < 0.03


def test_mntp_deterministic_and_with_workers(tiny_tok):
    texts = _mntp_texts(64, seed=1)
    collate = data.MNTPCollator(tiny_tok, max_len=24, pad_id=0, mask_id=3, seed=7)
    a, b = collate(texts[:16]), collate(texts[:16])
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = data.MNTPCollator(tiny_tok, max_len=24, pad_id=0, mask_id=3, seed=8)(texts[:16])
    assert not torch.equal(a["labels"], other["labels"])
    collate.set_epoch(1)
    assert not torch.equal(collate(texts[:16])["labels"], a["labels"])  # a new epoch draws new masks
    collate.set_epoch(0)
    with_seed = collate(texts[:16], seed=3)  # an explicit per-batch seed (e.g. from the batch index)
    assert torch.equal(with_seed["labels"], collate(texts[:16], seed=3)["labels"])
    assert not torch.equal(with_seed["labels"], collate(texts[:16], seed=4)["labels"])
    loader = lambda w: [x["labels"] for x in torch.utils.data.DataLoader(texts, batch_size=16, collate_fn=collate,
                                                                          num_workers=w)]
    assert all(torch.equal(x, y) for x, y in zip(loader(0), loader(2)))
    reports = [Report("a", findings="the heart is normal ."), Report("b", impression="no pleural effusion")]
    assert collate(reports)["input_ids"].shape[0] == 2


def test_mntp_real_tokenizer(smol_tok):
    mask_id = smol_tok.token_to_id("_")
    b = data.MNTPCollator(smol_tok, max_len=32, pad_id=2, mask_id=mask_id)(_mntp_texts(32))
    assert b["input_ids"].shape[1] <= 32 and (b["labels"] != -100).any()
    assert ((b["input_ids"] == mask_id) <= ((b["labels"] != -100) | (b["labels"] == mask_id))).all()


def test_group_ids_for():
    texts = ["No acute disease.", "IMPRESSION: no acute disease", "Small effusion.", "No PTX.", "Small effusion"]
    assert data.group_ids_for(texts).tolist() == [0, 0, 1, 2, 1]
    assert data.group_ids_for(texts, groups=[0, 1, 1, 2, 3]).tolist() == [0, 0, 0, 1, 0]  # transitive
    assert data.group_ids_for(["a", "b"], groups=[5, 5]).dtype == torch.long
    # keys are hashes, not counts: the same text or source gets the same key in any batch (any process)
    a, b = data.group_keys(texts[:3], [7, 8, 9]), data.group_keys(["Small effusion", "no acute disease."], [9, 1])
    assert a.shape == (3, 2) and a.dtype == torch.long and data.group_keys(texts).shape == (5, 1)
    assert a[2, 0] == b[0, 0] and a[0, 0] == b[1, 0] and a[2, 1] == b[0, 1] and a[0, 0] != a[2, 0]
    merged = data.groups_from_keys(torch.cat([a, b])).tolist()  # rows of two batches, merged as one
    assert merged == data.group_ids_for(texts[:3] + ["Small effusion", "no acute disease."], [7, 8, 9, 9, 1]).tolist()
    assert merged == [0, 0, 1, 1, 0]


def test_contrastive_batches(openi_sample, tiny_tok):
    reports = openi_sample[:64]
    batches = data.ContrastiveBatches(reports, tiny_tok, pad_id=0, batch_size=16, k=2, max_len=64,
                                      instruction="represent this report", summarize_instruction="summarize",
                                      hard_negative_share=1.0, summarize_share=1.0, seed=0)
    assert len(batches) == 8
    b, rows = batches[0], batches.rows(0)
    n = len(rows)
    assert b["input_ids"].shape[0] == b["group_keys"].shape[0] == b["is_hard_negative"].shape[0] == n
    assert b["is_hard_negative"].dtype == torch.bool and b["is_hard_negative"].sum() == sum(r[3] for r in rows)
    hard_sources = [r[2] for r in rows if r[3]]
    assert sum(s >= -len(reports) for s in hard_sources) == 8  # an error-injected copy of each report
    assert any(s < -len(reports) for s in hard_sources)  # and of the impressions of summarize pairs
    assert (b["attention_mask"][:, -1] == 1).all()  # left padding by default
    assert (b["embed_mask"] <= b["attention_mask"]).all() and (b["embed_mask"].sum(1) < b["attention_mask"].sum(1)).all()
    g = data.groups_from_keys(b["group_keys"])
    assert g.tolist() == data.group_ids_for([r[0] for r in rows], [r[2] for r in rows]).tolist()
    for i, (text, inst, source, hard) in enumerate(rows):
        same_report = [j for j, r in enumerate(rows) if r[2] == source]
        assert (g[same_report] == g[i]).all()
        if hard:
            # its own group, shared only with an identical hard negative of another report (two normal
            # impressions can turn into the same wrong one)
            assert all(rows[j][3] for j in (g == g[i]).nonzero().flatten()) and rows[i - 1][2] == -1 - source
        key = normalize_for_match(text)
        assert all(g[j] == g[i] for j, r in enumerate(rows) if normalize_for_match(r[0]) == key)
    sources = [r[2] for r in rows if 0 <= r[2] < len(reports)]
    assert len(set(sources)) == 8 and all(sources.count(s) <= 2 for s in sources)
    assert any(r[1] == "summarize" for r in rows)
    assert [(r[0], r[2]) for r in rows] == [(r[0], r[2]) for r in batches.rows(0)]  # deterministic
    loader = lambda w: list(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=w))[:3]
    for x, y in zip(loader(0), loader(2)):
        assert all(torch.equal(x[k], y[k]) for k in x)
    batches.set_epoch(1)
    assert batches.rows(0) != rows
    right = data.ContrastiveBatches(reports, tiny_tok, 0, batch_size=8, k=2, padding_side="right")
    assert (right[0]["attention_mask"][:, 0] == 1).all()


def test_several_impression_negatives(openi_sample, tiny_tok):
    """impression_negatives=3: each findings -> impression pair brings up to three wrong impressions, all
    different, each differing from the true one, in the pair's own group of hard negatives; the rows
    of the reports themselves are those of impression_negatives=1 (up to the random draws after them)."""
    reports = openi_sample[:64]
    make = lambda n: data.ContrastiveBatches(reports, tiny_tok, 0, batch_size=16, k=2, max_len=64,
                                             hard_negative_share=1.0, summarize_share=1.0, seed=0,
                                             impression_negatives=n)
    counts = []
    for i in range(4):
        rows, one = make(3).rows(i), make(1).rows(i)
        assert rows[:3] == one[:3]  # the first report's variants and hard negative are drawn alike
        for pair in {r[2] for r in rows if r[2] >= len(reports)}:
            impression = next(r[0] for r in rows if r[2] == pair and r[1] is None and not r[3]
                              and r[0] == normalize_report(reports[pair - len(reports)].impression))
            wrong = [r[0] for r in rows if r[2] == -1 - pair]
            assert all(r[3] for r in rows if r[2] == -1 - pair)
            assert len(set(wrong)) == len(wrong) <= 3 and impression not in wrong
            counts.append(len(wrong))
    assert max(counts) == 3 and sum(counts) > 1.5 * len(counts)


def test_rewritten_sentence_rows(openi_sample, tiny_tok):
    """sentence_share=1: most reports add a sentence of theirs rewritten (abbreviated or reworded), the
    sentence, and a hard negative: the sentence with words replaced that the rewrite does not contain, so
    that the rewrite's own words match sentence and copy alike."""
    reports = openi_sample[:64]
    batches = data.ContrastiveBatches(reports, tiny_tok, 0, batch_size=16, k=2, max_len=64, seed=0,
                                      sentence_share=1.0)
    words = lambda text: collections.Counter(re.findall(r"[a-z0-9]+", text.lower()))  # a multiset
    n_reports = n_triples = 0
    for i in range(3):
        rows = batches.rows(i)
        n_reports += len({r[2] for r in rows if 0 <= r[2] < len(reports)})
        for source in {r[2] for r in rows if r[2] >= 2 * len(reports)}:
            (rewrite, *_), (sentence, *_) = [r for r in rows if r[2] == source]
            (copy, _, _, hard), = [r for r in rows if r[2] == -1 - source]
            report = normalize_report(reports[source - 2 * len(reports)].text())
            assert hard and sentence in report and rewrite != sentence and copy != sentence
            removed, added = words(sentence) - words(copy), words(copy) - words(sentence)
            assert removed and added and not set(removed | added) & set(words(rewrite)), (sentence, rewrite, copy)
            n_triples += 1
    assert n_triples >= 0.6 * n_reports


# ---------------------------------------------------------------------------------------------
# Images and CLIP pairs
# ---------------------------------------------------------------------------------------------

def test_load_image_formats(tmp_path):
    a8 = np.arange(60 * 40, dtype=np.uint8).reshape(60, 40)
    Image.fromarray(a8).save(tmp_path / "g8.png")
    a16 = np.zeros((30, 50), dtype=np.uint16)
    a16[0, 0], a16[1, 1] = 65535, 32768
    Image.fromarray(a16).save(tmp_path / "g16.png")
    rgb = np.zeros((32, 48, 3), dtype=np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    g8, g16, c = (data.load_image(tmp_path / n) for n in ("g8.png", "g16.png", "c.jpg"))
    assert g8.dtype == g16.dtype == c.dtype == np.float32
    assert g8.shape == (60, 40) and np.allclose(g8, a8 / 255)
    assert g16.shape == (30, 50) and g16[0, 0] == 1.0 and abs(g16[1, 1] - 0.5) < 1e-4 and g16[2, 2] == 0
    assert c.shape == (32, 48) and abs(c.mean() - 200 * 0.587 / 255) < 0.02  # ITU-R 601 luma of pure green
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(OSError, match="bad.png"):
        data.load_image(tmp_path / "bad.png")


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    reports = []
    for i in range(5):
        Image.fromarray(synth_study(0, i, 48)[0]).save(tmp_path / f"{i}.png")
        reports.append(Report(f"s{i}", impression=f"report {i}", images=[str(tmp_path / f"{i}.png")]))
    (tmp_path / "1.png").write_bytes((tmp_path / "1.png").read_bytes()[:200])  # truncated
    reports[3].images = [str(tmp_path / "missing.png")]
    reports.append(Report("no-image", impression="text only"))
    transform = data.ImageTransform(32, train=True, channels=3, mean=(0.5, 0.4, 0.3), std=0.25)
    ds = data.ImageReportDataset(reports, transform)
    assert len(ds) == 5
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=data.collate_pairs)
    batches = list(loader)
    assert sum(b[3] for b in batches) == 2
    kept = torch.cat([b[2] for b in batches]).tolist()
    assert kept == [0, 2, 4] and sum(len(b[1]) for b in batches) == 3
    assert all(b[0].shape[1:] == (3, 32, 32) for b in batches if len(b[1]))
    assert data.collate_pairs([None, None])[3] == 2


def test_transform_shapes_and_determinism():
    img = np.random.default_rng(0).random((300, 200), dtype=np.float32)
    ev = data.ImageTransform(64, train=False)
    assert ev(img).shape == (1, 64, 64) and torch.equal(ev(img, key=1), ev(img, key=2))
    rgb = data.ImageTransform(64, train=False, channels=3, mean=(0.2, 0.4, 0.6), std=(0.5, 0.5, 0.5))
    const = rgb(np.full((80, 120), 0.6, np.float32))
    assert const.shape == (3, 64, 64) and torch.allclose(const[:, 10, 10], torch.tensor([0.8, 0.4, 0.0]), atol=1e-5)
    tr = data.ImageTransform(64, train=True, seed=1)
    assert tr(img, key=3, epoch=0).shape == (1, 64, 64)
    assert torch.equal(tr(img, key=3, epoch=0), tr(img, key=3, epoch=0))
    assert not torch.equal(tr(img, key=3, epoch=0), tr(img, key=3, epoch=1))
    assert not torch.equal(tr(img, key=3), data.ImageTransform(64, train=True, seed=2)(img, key=3))
    # 90-100 % of the area at aspect 3/4-4/3 keeps >= 82 % of the height: most of a vertical ramp survives
    ramp = np.add.outer(np.linspace(0, 1, 300), np.zeros(300)).astype(np.float32)
    spans = [float(t.max() - t.min()) for t in (tr(ramp, key=k) for k in range(20))]
    assert all(0.82 * 2 - 0.05 < s <= 2 for s in spans) and len(set(spans)) > 1  # std 0.5: range 0..1 -> 2
