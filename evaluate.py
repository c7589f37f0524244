"""Evaluation: the metrics behind every number in the paper's evaluation table (Ko et al.
2025, arXiv 2509.15234, sec. 3), usable from the training scripts, and the `evaluate.py` command.

- Retrieval (image -> report, report -> image, and the text tasks): Recall@k, mean and median rank.
  Similarities are computed a chunk of queries at a time: the extra memory is a normalised copy
  of the embeddings plus about 9 bytes x chunk_size x gallery size (230 MB at the default chunk
  and 100,000 reports), never the 40 GB Q x G matrix of a 100,000 x 100,000 evaluation. As in
  open_clip, the tests check the chunked ranks against a brute-force argsort.
- Report understanding (Ko et al. 2025, sec. 3; the cases: cases.py): acronym, paraphrase and summarisation
  retrieval (multi-positive: every equally correct answer is a hit; summarisation also at the label
  level), error discrimination, clinical similarity. They take `embed(texts) -> (N, d)` and plain
  strings, so they run on any encoder, or on a fake one in the tests.
- Baselines on the same cases, so that a table shows whether an encoder beats a bag of words:
  TF-IDF (an embed function like any encoder's), pick-shortest / -longest / -fewest findings, the majority answer,
  chance.
- Zero-shot classification as in CheXzero (Tiu et al. 2022, Nat. Biomed. Eng.): a positive and a negative prompt per
  observation, AUROC per label with bootstrap 95 % confidence intervals.

Conventions used throughout:
- Embeddings are L2-normalised here, so every score is a cosine similarity.
- Ties count against the model: the rank of a query is 1 + the number of wrong gallery entries
  scoring >= its best correct one. A collapsed encoder (all embeddings equal) then gets the worst
  rank instead of a perfect one.
- Gallery items that share a key (e.g. identical normalised reports) are merged into one entry,
  scored by its best member, as the CXR retrieval literature does; a wrong report that appears
  500 times in the gallery then costs one place, not 500.

Run: python evaluate.py configs/small.yaml   (see the command at the bottom)
"""
import functools
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from cases import CASE_KEYS, cases_for_config, write_cases_jsonl
from encoders import RAW_ENCODERS, embed_each_once, load_clip_model, make_embed, text_dir_of, text_source
from reports import idf_weights, label_report, normalize_for_match, positive_findings, word_tokens
from phrasings import ZERO_SHOT_PROMPTS
from results import contact_sheet, eval_markdown, retrieval_html, slug
from runtime import Env, atomic_write, load_config, setup, write_text
from synthetic import SyntheticStudies


# ---------------------------------------------------------------------------------------------
# Retrieval: ranks and Recall@k, a chunk of queries at a time
# ---------------------------------------------------------------------------------------------

def _normalize(x):
    x = torch.as_tensor(x).float()
    if not torch.isfinite(x).all():  # NaN scores compare False, which would rank a query first
        raise ValueError("embeddings contain NaN or inf")
    return F.normalize(x, dim=-1)


def _key_ids(query_keys, gallery_keys):
    """Map any hashable keys (strings, ints, tensors) to dense ids; every query needs a match."""
    tolist = lambda k: k.tolist() if hasattr(k, "tolist") else list(k)
    index = {}
    gallery_ids = [index.setdefault(k, len(index)) for k in tolist(gallery_keys)]
    query_ids = []
    for i, k in enumerate(tolist(query_keys)):
        if k not in index:
            raise ValueError(f"query {i} has key {k!r}, which no gallery item has")
        query_ids.append(index[k])
    return torch.tensor(query_ids), torch.tensor(gallery_ids), len(index)


def retrieval_ranks(query_emb, gallery_emb, query_keys=None, gallery_keys=None,
                    chunk_size=256, bf16=False):
    """1-indexed rank of each query's correct gallery entry, (Q,) long tensor on the CPU.

    Without keys, query i matches gallery item i (one-to-one, Q == G). With keys, query i matches
    every gallery item whose key equals query_keys[i], and items sharing a key are merged (see the
    module docstring). bf16=True does the matmul in bfloat16 (faster on GPUs); its scores carry
    ~3 significant digits, so near-equal scores become ties, which count against the model.
    """
    q, g = _normalize(query_emb), _normalize(gallery_emb)
    if (query_keys is None) != (gallery_keys is None):
        raise ValueError("give both query_keys and gallery_keys, or neither")
    if query_keys is None and len(q) != len(g):
        raise ValueError(f"one-to-one retrieval needs as many queries as gallery items, "
                         f"got {len(q)} and {len(g)}")
    if query_keys is not None:
        query_ids, gallery_ids, n_keys = _key_ids(query_keys, gallery_keys)
        query_ids, gallery_ids = query_ids.to(g.device), gallery_ids.to(g.device)
    g = g.bfloat16() if bf16 else g
    ranks = []
    for start in range(0, len(q), chunk_size):
        scores = (q[start:start + chunk_size].to(g) @ g.T).float()  # (c, G)
        if query_keys is None:
            own = scores.diagonal(offset=start)  # query start+i <-> gallery start+i
        else:
            # (c, K): each key scores as its best item; the expanded index is a view, not (c, G)
            index = gallery_ids.expand(len(scores), -1)
            scores = torch.full((len(scores), n_keys), -torch.inf, device=g.device) \
                .scatter_reduce_(1, index, scores, "amax")
            own = scores.gather(1, query_ids[start:start + chunk_size, None])[:, 0]
        # >= counts the query's own entry (the "1 +") and every wrong entry that ties or beats it;
        # an int32 sum, since a plain sum of the (c, G) mask first copies it to int64 (8 bytes each)
        ranks.append((scores >= own[:, None]).sum(1, dtype=torch.int32).cpu())
    return torch.cat(ranks).long()


def summarize_ranks(ranks, ks=(1, 5, 10)):
    """Recall@k in %, mean and median rank (1 is best), number of queries."""
    r = torch.as_tensor(ranks).double()
    out = {f"R@{k}": 100 * (r <= k).double().mean().item() for k in ks}
    return out | {"mean_rank": r.mean().item(), "median_rank": float(np.median(r.numpy())),
                  "n_queries": len(r)}


def retrieval_metrics(query_emb, gallery_emb, query_keys=None, gallery_keys=None, ks=(1, 5, 10),
                      chunk_size=256, bf16=False):
    """Retrieval metrics of query -> gallery; arguments as in retrieval_ranks."""
    ranks = retrieval_ranks(query_emb, gallery_emb, query_keys, gallery_keys, chunk_size, bf16)
    multi_positive = "one_to_one" if query_keys is None else "merged_by_key"
    return summarize_ranks(ranks, ks) | {"multi_positive": multi_positive}


def image_text_retrieval(image_emb, text_emb, text_keys=None, ks=(1, 5, 10), **kwargs):
    """Both directions for paired (image i, report i). text_keys (e.g. from report_keys) merge
    identical reports: an image's hits are all reports equal to its own, and a report's hits are
    all images whose report equals it."""
    keys = (text_keys, text_keys)
    return {"image_to_text": retrieval_metrics(image_emb, text_emb, *keys, ks=ks, **kwargs),
            "text_to_image": retrieval_metrics(text_emb, image_emb, *keys, ks=ks, **kwargs)}


def report_keys(texts, labels=None):
    """Merge keys: the normalised report text, optionally with its labels (stricter merging)."""
    keys = [normalize_for_match(t) for t in texts]
    if labels is None:
        return keys
    return [(k, json.dumps(l, sort_keys=True)) for k, l in zip(keys, labels, strict=True)]


def topk_retrieve(query_emb, gallery_emb, k=5, chunk_size=256):
    """Top-k gallery items per query, chunked like retrieval_ranks: (scores, indices), (Q, k)."""
    q, g = _normalize(query_emb), _normalize(gallery_emb)
    top = [(q[s:s + chunk_size].to(g) @ g.T).topk(min(k, len(g)), dim=1)
           for s in range(0, len(q), chunk_size)]
    return torch.cat([t.values for t in top]).cpu(), torch.cat([t.indices for t in top]).cpu()


# ---------------------------------------------------------------------------------------------
# Zero-shot classification: AUROC with bootstrap confidence intervals
# ---------------------------------------------------------------------------------------------

def _np(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def auroc(scores, labels):
    """Exact AUROC = P(score of a positive > score of a negative), ties counted half
    (Mann-Whitney U from mid-ranks). NaN when only one class is present."""
    s, y = _np(scores).astype(float).ravel(), _np(labels).astype(bool).ravel()
    n_pos, n_neg = y.sum(), (~y).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2  # tied scores share their average rank
    u = mid_rank[inverse.ravel()][y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def bootstrap_ci(fn, *arrays, n=1000, seed=0, alpha=0.05):
    """Percentile bootstrap (1 - alpha) CI of fn(*arrays), resampling rows of all arrays together.
    Resamples where fn is NaN (e.g. AUROC with one class drawn) are dropped."""
    arrays, rng, stats = [_np(a) for a in arrays], np.random.default_rng(seed), []
    for _ in range(n):
        idx = rng.integers(0, len(arrays[0]), len(arrays[0]))
        stats.append(fn(*(a[idx] for a in arrays)))
    stats = np.array(stats, dtype=float)
    stats = stats[~np.isnan(stats)]
    if len(stats) == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def zero_shot_classify(image_emb, pos_text_emb, neg_text_emb, labels,
                       names=tuple(ZERO_SHOT_PROMPTS), n_boot=1000, seed=0):
    """CheXzero zero-shot AUROC. image_emb (N, d); pos/neg_text_emb (L, d), one prompt pair per
    label; labels (N, L): 1 positive, 0 negative, anything else (-1 uncertain, NaN) ignored.

    The probability is a softmax over the pair of similarities, softmax([s+, s-] * scale)[0] =
    sigmoid(scale * (s+ - s-)). AUROC only depends on the order of the scores, so it is computed
    on s+ - s- directly: no temperature can change it, and a probability would saturate to tied
    1.0s for large logit scales.
    """
    img = _normalize(image_emb)
    margin = _np(img @ _normalize(pos_text_emb).T - img @ _normalize(neg_text_emb).T)  # (N, L)
    labels = _np(labels).astype(float)
    per_label = {}
    for j, name in enumerate(names):
        known = (labels[:, j] == 0) | (labels[:, j] == 1)
        s, y = margin[known, j], labels[known, j]
        n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
        if n_pos == 0 or n_neg == 0:
            per_label[name] = {"auroc": None, "n_pos": n_pos, "n_neg": n_neg,
                               "skipped": "only one class present"}
            continue
        low, high = bootstrap_ci(auroc, s, y, n=n_boot, seed=seed)
        per_label[name] = {"auroc": auroc(s, y), "ci_low": low, "ci_high": high,
                           "n_pos": n_pos, "n_neg": n_neg}
    evaluated = [v["auroc"] for v in per_label.values() if v["auroc"] is not None]
    return {"mean_auroc": float(np.mean(evaluated)) if evaluated else None,
            "n_labels_evaluated": len(evaluated), "per_label": per_label}


# ---------------------------------------------------------------------------------------------
# Report understanding: metrics on `embed(texts) -> (N, d)` and plain strings
# ---------------------------------------------------------------------------------------------

def multi_positive_ranks(query_emb, gallery_emb, hit_class, gallery_class, chunk_size=256):
    """1-indexed rank of each query's best correct gallery item, (Q,) long tensor, when a query can have
    several: item j is correct for query i when hit_class[i, gallery_class[j]] ((Q, C) bool, and one
    class id in 0..C-1 per item). As in retrieval_ranks, ties count against the model: 1 + the number
    of wrong items scoring >= the best correct one. The text tasks use it; their galleries are small."""
    q, g = _normalize(query_emb), _normalize(gallery_emb)
    hit_class = torch.as_tensor(hit_class, dtype=torch.bool).to(g.device)
    gallery_class = torch.as_tensor(gallery_class).to(g.device)
    if not hit_class[:, gallery_class].any(1).all():
        raise ValueError("every query needs at least one correct gallery item")
    ranks = []
    for start in range(0, len(q), chunk_size):
        scores = q[start:start + chunk_size] @ g.T                     # (c, G)
        hit = hit_class[start:start + chunk_size][:, gallery_class]     # (c, G)
        best = scores.masked_fill(~hit, -torch.inf).amax(1, keepdim=True)
        ranks.append(1 + ((scores >= best) & ~hit).sum(1).cpu())
    return torch.cat(ranks).long()


def text_retrieval_task(embed, queries, answers, keys=None, ks=(1, 5), query_keys=None, other_keys=None,
                        match=None, distractors=((), ())):
    """Query i -> the gallery of all answers, one entry per key. keys default to the answer text itself,
    so exact duplicates, which no encoder can tell apart, are merged; the builder passes normalised text.

    Multi-positive: query i's hits are its answer's entry, the entries of other_keys[i] (other answers
    that are correct too; keys no answer has are ignored), and the entries of every query with the same
    query key (default: the query text; evaluate_text_tasks passes normalised text), since no encoder
    can tell identical queries apart either. match(answer) -> hashable widens every hit to all entries
    with the same match (the label level of summarisation: an impression with the same findings).
    distractors: (texts, keys) of gallery entries that answer no query (the near-duplicates of cases.py);
    one with the key of an answer is that answer's entry.
    Adds chance (R@k of a random ranking, ~k x hits / gallery entries), gallery_entries, and
    multi_answer_queries: the queries with more than one correct entry."""
    if len(queries) != len(answers):
        raise ValueError(f"{len(queries)} queries but {len(answers)} answers")
    keys = list(answers) if keys is None else list(keys)
    query_keys = list(queries) if query_keys is None else list(query_keys)
    texts = list(answers) + list(distractors[0])
    first = {}  # key -> index of the first text with that key: one gallery entry per key
    for i, k in enumerate(keys + list(distractors[1])):
        first.setdefault(k, i)
    gallery, entry = [texts[i] for i in first.values()], {k: j for j, k in enumerate(first)}
    classes = {}  # an entry's class: its key, or its match; a query's hits are whole classes
    gallery_class = torch.tensor([classes.setdefault(k if match is None else match(texts[i]), len(classes))
                                  for k, i in first.items()])
    correct = {}  # query key -> gallery entries of its answers
    for i, (query_key, key) in enumerate(zip(query_keys, keys)):
        more = other_keys[i] if other_keys is not None else []
        correct.setdefault(query_key, set()).update(entry[k] for k in [key, *more] if k in entry)
    hit_class = torch.zeros(len(queries), len(classes), dtype=torch.bool)
    for i, query_key in enumerate(query_keys):
        hit_class[i, gallery_class[sorted(correct[query_key])]] = True
    ranks = multi_positive_ranks(embed(list(queries)), embed(gallery), hit_class, gallery_class)
    n_hits = (hit_class.long() @ torch.bincount(gallery_class, minlength=len(classes))).tolist()  # (Q,)
    n = len(gallery)  # a random ranking misses all h hits in its top k with probability C(n-h, k) / C(n, k)
    chance = {f"R@{k}": 100 * float(np.mean([1 - math.comb(n - h, min(k, n)) / math.comb(n, min(k, n))
                                              for h in n_hits])) for k in ks}
    return summarize_ranks(ranks, ks) | {"multi_positive": "merged_by_key", "chance": chance,
                                         "gallery_entries": n,
                                         "multi_answer_queries": sum(h > 1 for h in n_hits)}


def _error_scores(cases, true_sim, wrong_sim, ties="loss"):
    """The error-discrimination metrics from the score of each case's true impression (N,) and of each
    wrong one (W,), in case order. ties="loss": a tie counts against (encoders; see the module
    docstring); "random": broken at random, the expected accuracy of a picker that has no preference."""
    n_wrong = torch.tensor([len(c["wrong"]) for c in cases])
    case_of = torch.repeat_interleave(torch.arange(len(cases)), n_wrong)  # (W,) case of each wrong
    beats = (true_sim[case_of] > wrong_sim).double()  # (W,)
    tied = (true_sim[case_of] == wrong_sim).double()
    per_case = lambda x: torch.zeros(len(cases), dtype=torch.float64).index_add_(0, case_of, x)
    beaten, n_tied = per_case(1 - beats - tied), per_case(tied)  # wrong ones above / level with the true one
    if ties == "random":  # the true one is picked from the n_tied + 1 at the top; a tied pair is half a win
        top1, pair = (beaten == 0) / (1 + n_tied), beats + tied / 2
    else:
        top1, pair = ((beaten + n_tied) == 0).double(), beats
    kinds = [k for c in cases for k in c.get("kinds", ["unspecified"] * len(c["wrong"]))]
    per_kind = {}
    for kind in dict.fromkeys(kinds):
        mask = torch.tensor([k == kind for k in kinds])
        per_kind[kind] = {"pairwise_accuracy": 100 * pair[mask].mean().item(), "n": int(mask.sum())}
    return {"top1_accuracy": 100 * top1.mean().item(),
            "chance": 100 * (1 / (1 + n_wrong.double())).mean().item(),
            "pairwise_accuracy": 100 * pair.mean().item(),
            "n_cases": len(cases), "per_kind": per_kind}


def error_discrimination(embed, cases):
    """Findings -> {true impression, wrong impressions}; a case is
    {"findings", "impression", "wrong": [...], optional "kinds": [one per wrong]}.

    top1_accuracy: % of cases where the true impression scores strictly above every wrong one
    (chance 25 % with three wrong). per_kind: pairwise accuracy, the % of (case, wrong impression
    of that kind) pairs where the true impression scores strictly higher (chance 50 %), which says
    which error kinds the encoder cannot see.
    """
    n_wrong = torch.tensor([len(c["wrong"]) for c in cases])
    findings = _normalize(embed([c["findings"] for c in cases])).cpu()
    true = _normalize(embed([c["impression"] for c in cases])).cpu()
    wrong = _normalize(embed([w for c in cases for w in c["wrong"]])).cpu()
    case_of = torch.repeat_interleave(torch.arange(len(cases)), n_wrong)
    return _error_scores(cases, (findings * true).sum(1), (findings[case_of] * wrong).sum(1))


def _positive_findings(labels):
    found = {k for k, v in labels.items() if v == 1} if isinstance(labels, dict) else set(labels)
    return frozenset(found or {"No Finding"})  # two normal reports agree (F1 = 1) instead of 0/0


def _label_f1(a, b):
    return 2 * len(a & b) / (len(a) + len(b))


def clinical_similarity(retrieved_texts, true_texts, label_fn):
    """Mean label F1 between the labeler's positive findings of each top-1 retrieved report and
    of the true report (the project's stand-in for RadGraph F1). label_fn(text) returns
    {label: value} (positive where value == 1, CheXpert style) or an iterable of positive labels."""
    f1 = [_label_f1(_positive_findings(label_fn(retrieved)), _positive_findings(label_fn(true)))
          for retrieved, true in zip(retrieved_texts, true_texts, strict=True)]
    return {"label_f1": float(np.mean(f1)), "n": len(f1)}


def evaluate_text_tasks(embed, cases, label_fn=label_report):
    """Run every task in {task: [case, ...]} (from build_text_cases or read_cases_jsonl). Queries
    with the same normalised text share their answers (text_retrieval_task). Summarisation is also
    scored at the label level ("summarisation_label"): a hit is any impression with the true one's
    positive findings (label_fn), since many impressions are one of a few normal phrasings."""
    results = {}
    for task, cs in cases.items():
        if not cs:  # e.g. a source without FINDINGS sections has no summarisation cases
            continue
        if task == "error":
            results[task] = error_discrimination(embed, cs)
            continue
        args = (embed, [c["query"] for c in cs], [c["answer"] for c in cs],
                [c.get("key", c["answer"]) for c in cs])
        near = [(d, normalize_for_match(d) if "key" in c else d) for c in cs for d in c.get("distractors", [])]
        kwargs = dict(query_keys=[normalize_for_match(c["query"]) for c in cs],
                      other_keys=[c.get("other_keys", []) for c in cs], distractors=tuple(zip(*near)) or ((), ()))
        results[task] = text_retrieval_task(*args, **kwargs)
        if near:  # R@1 of a reader that finds the answer's copies but cannot tell which is the answer
            results[task]["chance_among_copies"] = 100 * float(np.mean([1 / (1 + len(c.get("distractors", [])))
                                                                        for c in cs]))
        if task == "summarisation":
            findings = functools.lru_cache(maxsize=None)(lambda text: _positive_findings(label_fn(text)))
            results["summarisation_label"] = text_retrieval_task(*args, **kwargs, match=findings)
    return results


# ---------------------------------------------------------------------------------------------
# Baselines: what a bag of words, the length of a text, or a constant answer scores on the same cases
# ---------------------------------------------------------------------------------------------

def tfidf_embed(train_texts, max_vocab=10000):
    """A bag-of-words baseline as an embed(texts) -> (N, V) function, fitted on the training reports:
    raw counts of the lowercased word tokens times the smoothed idf ln((1 + N) / (1 + df)) + 1 (as
    scikit-learn's default), L2-normalised. The vocabulary: the max_vocab words in the most training
    reports; other words are ignored. An encoder that does not beat it has learnt little beyond
    shared words."""
    weights = idf_weights(train_texts, max_vocab)
    vocab, idf = {w: i for i, w in enumerate(weights)}, torch.tensor(list(weights.values()))

    def embed(texts):
        counts = torch.zeros(len(texts), len(vocab))
        for i, text in enumerate(texts):
            for w, c in Counter(w for w in word_tokens(text) if w in vocab).items():
                counts[i, vocab[w]] = c
        return F.normalize(counts * idf, dim=-1)
    return embed


def pick_baseline(cases, score):
    """Error discrimination by a rule that does not read the findings: pick the impression with the
    highest score(text), ties broken at random. Far above chance, the cases reward that rule rather
    than reading (e.g. an error appended as a sentence: pick-shortest wins)."""
    true = torch.tensor([score(c["impression"]) for c in cases], dtype=torch.float64)
    wrong = torch.tensor([score(w) for c in cases for w in c["wrong"]], dtype=torch.float64)
    return _error_scores(cases, true, wrong, ties="random")


PICK_RULES = {"shortest": lambda text: -len(text), "longest": len,  # the rules an error set must defeat
              "fewest findings": lambda text: -len(positive_findings(text))}


def majority_baseline(train_impressions, cases, label_fn=label_report, max_reports=5000):
    """A constant answer: the most common set of positive findings among the training impressions (about
    max_reports of them, evenly spaced; on Open-I: No Finding). Scores clinical label F1 against each
    summarisation answer, and summarisation label R@1 as a system that always retrieves an impression
    with those findings."""
    step = max(1, len(train_impressions) // max_reports)
    sets = Counter(_positive_findings(label_fn(t)) for t in train_impressions[::step] if t)
    if not sets or not cases["summarisation"]:
        return {}
    answer = min(sets, key=lambda s: (-sets[s], sorted(s)))
    truth = [_positive_findings(label_fn(c["answer"])) for c in cases["summarisation"]]
    return {"summarisation_label": {"R@1": 100 * float(np.mean([t == answer for t in truth]))},
            "clinical": {"label_f1": float(np.mean([_label_f1(answer, t) for t in truth])), "n": len(truth),
                         "answer": sorted(answer)}}


# ---------------------------------------------------------------------------------------------
# The CLIP model: image features and retrieval on a split (train_clip.py calls these too)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def image_features(model, dataset, batch_size=64, precision="fp32"):
    """(N, e) L2-normalised image features of the readable items of `dataset`, and their indices (N,).
    Items as synthetic.SyntheticStudies / data.ImageReportDataset give them ((image, text, index), None if
    unreadable); give the dataset the evaluation transform (data.ImageTransform(train=False))."""
    env = Env(next(model.parameters()).device, precision=precision)
    model.eval()
    features, kept = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="embedding images", leave=False):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images, _, indices, _ = data.collate_pairs(items)
        if len(indices):
            with env.autocast():
                features.append(model.encode_image(images.to(env.device)).float().cpu())
            kept.append(indices)
    return torch.cat(features), torch.cat(kept)


def evaluate_split(model, text_fn, dataset, texts_by_style, precision, batch_size=64):
    """{style: metrics}: image <-> report retrieval on one split, the images embedded once, the reports
    in each style. Identical reports merge into one gallery entry; chance R@k = k / distinct reports."""
    image_f, kept = image_features(model, dataset, batch_size, precision)
    results = {}
    for style, texts in texts_by_style.items():
        texts = [texts[i] for i in kept.tolist()]
        keys = report_keys(texts)
        r = image_text_retrieval(image_f, text_fn(texts), keys)
        short = lambda m: {k: m[k] for k in ("R@1", "R@5", "R@10", "mean_rank")}
        n = len(set(keys))
        chance = {f"R@{k}": 100 * min(1, k / n) for k in (1, 5, 10)} | {"mean_rank": (n + 1) / 2}
        results[style] = dict(image_to_text=short(r["image_to_text"]), text_to_image=short(r["text_to_image"]),
                              reports=n, chance=chance, unreadable=len(dataset) - len(kept))
    return results


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
# 1. every text encoder in eval.models on the report tasks above, built from the TEST split of
#    data.source (real Open-I by default), or read from the eval.cases files;
# 2. when train_clip.py has saved out_dir/clip, the CLIP model on synthetic test studies: image <->
#    report retrieval in each data.test_styles style and zero-shot AUROC per CheXpert label.
# The baselines are rows of the same tables. It writes out_dir/eval/: cases/{task}.jsonl (the cases,
# in the format eval.cases reads), results.json (everything), results.md (the tables, also printed),
# and pictures of what was retrieved: retrieval.html (self-contained) and a PNG contact sheet per model.


MERGE_NOTES = {  # eval.merge: which reports count as a hit in image <-> report retrieval
    "text": "identical normalised reports are one gallery entry, a hit for every image whose report "
            "it is (report_keys)",
    "text+labels": "reports with identical normalised text and identical labels are one entry",
    "none": "only an image's own report is a hit; identical reports are not merged"}


def check_eval_config(cfg):
    """Fail before anything slow runs, naming the bad entry."""
    e = cfg.eval
    for name in e.models:
        path = text_dir_of(name, cfg)
        if name not in RAW_ENCODERS and not os.path.exists(os.path.join(path, "encoder.json")):
            hint = "run train_text.py with this config first" if name == "trained" else \
                f"not one of {', '.join(RAW_ENCODERS)}, trained, or a folder with encoder.json"
            raise FileNotFoundError(f"eval.models entry {name!r}: {os.path.join(path, 'encoder.json')!r} "
                                    f"not found ({hint})")
    for task, path in e.cases.items():
        if task not in CASE_KEYS:
            raise ValueError(f"eval.cases: unknown task {task!r}; valid: {', '.join(CASE_KEYS)}")
        if not os.path.exists(path):
            raise FileNotFoundError(f"eval.cases.{task}: {path!r} not found")
    if e.merge not in MERGE_NOTES:
        raise ValueError(f"eval.merge must be one of {', '.join(MERGE_NOTES)}, got {e.merge!r}")


def merged_gallery(answers, keys):
    """One gallery entry per key (its first answer), as text_retrieval_task ranks them."""
    first = {}
    for answer, key in zip(answers, keys):
        first.setdefault(key, answer)
    return list(first.values()), list(first)


def evaluate_text_model(embed, cases, examples, k=5):
    """All text tasks; clinical similarity of each summarisation query's top-1 impression; and the
    top-k of the sampled summarisation queries in `examples`, for the pictures."""
    label = functools.lru_cache(maxsize=None)(label_report)  # gallery reports recur
    results = evaluate_text_tasks(embed, cases, label)
    summ, rows = cases["summarisation"], []
    if summ:
        answers = [c["answer"] for c in summ]
        gallery, keys = merged_gallery(answers, [c.get("key", c["answer"]) for c in summ])
        scores, idx = topk_retrieve(embed([c["query"] for c in summ]), embed(gallery), k)
        results["clinical"] = clinical_similarity([gallery[i] for i in idx[:, 0]], answers, label)
        # chance: the mean F1 of a gallery entry drawn at random, counted per set of findings
        in_gallery = Counter(_positive_findings(label(t)) for t in gallery)
        results["clinical"]["chance"] = float(np.mean([
            sum(n * _label_f1(s, _positive_findings(label(a))) for s, n in in_gallery.items()) / len(gallery)
            for a in answers]))
        for q in examples:
            key = summ[q].get("key", summ[q]["answer"])
            rows.append({"query": summ[q]["query"], "truth": summ[q]["answer"],
                         "hits": [(gallery[j], s, keys[j] == key)
                                  for s, j in zip(scores[q].tolist(), idx[q].tolist())]})
    return results, rows


def evaluate_baselines(cases, train_reports, batch_size):
    """The rows an encoder must beat, on the same cases: TF-IDF fitted on the training reports (every
    task), pick-shortest, pick-longest and pick-fewest-findings (error discrimination), the majority
    answer (clinical label F1), and chance (from the cases alone)."""
    tfidf, _ = evaluate_text_model(embed_each_once(tfidf_embed([r.text() for r in train_reports]), "TF-IDF",
                                                batch_size), cases, [])
    rows = {"baseline: TF-IDF": tfidf}
    for name, score in PICK_RULES.items() if cases["error"] else ():
        rows[f"baseline: {name}"] = {"error": pick_baseline(cases["error"], score)}
    rows["baseline: majority"] = majority_baseline([r.impression for r in train_reports], cases)
    chance = {task: {metric: r["chance"][metric] for metric in r["chance"]}
              for task, r in tfidf.items() if isinstance(r.get("chance"), dict)}
    if "error" in tfidf:
        chance["error"] = {"top1_accuracy": tfidf["error"]["chance"], "pairwise_accuracy": 50.0}
    if "clinical" in tfidf:
        chance["clinical"] = {"label_f1": tfidf["clinical"]["chance"]}
    among = {task: {"R@1": r["chance_among_copies"]} for task, r in tfidf.items() if "chance_among_copies" in r}
    return rows | {"chance": chance} | ({"chance among copies": among} if among else {})


def evaluate_clip(cfg, env, clip_dir):
    """Image <-> report retrieval per test style and zero-shot AUROC per label on train_clip.py's
    synthetic test studies (clip.test_n; the same images in every style, only the reports change);
    plus the top-5 of sampled image queries per style, for the pictures."""
    e = cfg.eval
    clip_model, text_fn = load_clip_model(clip_dir, env.device, env.precision)
    with open(os.path.join(clip_dir, "clip.json")) as f:
        spec = json.load(f)
    image = spec["image"]  # the size and normalisation the image tower was trained with
    studies = SyntheticStudies(cfg.clip.test_n, cfg.seed, image["size"], cfg.data.test_styles, "test",
                                    data.ImageTransform(**image), os.path.join(clip_dir, spec["cache_dir"]))
    image_emb, kept = image_features(clip_model, studies, precision=env.precision)  # (N, e)
    kept = kept.tolist()
    labels = [studies.labels(i)["chexpert"] for i in kept]
    out = {"studies": len(kept), "merge": e.merge, "merge_note": MERGE_NOTES[e.merge], "styles": {}}
    pick = np.random.default_rng(cfg.seed).choice(len(kept), min(e.n_examples, len(kept)), replace=False)
    examples = {}
    for style in cfg.data.test_styles:
        texts = [studies.report(i, style).text() for i in kept]
        text_emb = text_fn(texts)  # (N, e)
        keys = None if e.merge == "none" else report_keys(texts, labels if e.merge == "text+labels" else None)
        out["styles"][style] = image_text_retrieval(image_emb, text_emb, keys, ks=(1, 5, 10))
        keys = keys or list(range(len(texts)))  # merge none: every report is its own entry
        out["styles"][style]["gallery_entries"] = len(set(keys))  # chance R@k = k / this
        gallery, gallery_keys = merged_gallery(range(len(texts)), keys)  # indices into texts
        scores, idx = topk_retrieve(image_emb[pick], text_emb[gallery], 5)
        examples[style] = [{"image": studies.image(kept[q]), "truth": texts[q],
                            "hits": [(texts[gallery[j]], s, gallery_keys[j] == keys[q])
                                     for s, j in zip(scores[r].tolist(), idx[r].tolist())]}
                           for r, q in enumerate(pick.tolist())]
    pos, neg = (text_fn([pair[side] for pair in ZERO_SHOT_PROMPTS.values()]) for side in (0, 1))
    truth = np.array([[l[name] for name in ZERO_SHOT_PROMPTS] for l in labels])  # (N, 14)
    out["zero_shot"] = zero_shot_classify(image_emb, pos, neg, truth, n_boot=e.n_boot, seed=cfg.seed)
    return out, examples


def main(argv):
    cfg = load_config(argv[0], argv[1:])
    env, e = setup(cfg), cfg.eval
    check_eval_config(cfg)
    out_dir = Path(cfg.out_dir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. text encoders: the same cases and the same sampled queries for every model, and the baselines
    reports = data.load_reports(cfg)
    cases, sources = cases_for_config(cfg, reports)
    print(f"cases written to {out_dir / 'cases'}/:", ", ".join(write_cases_jsonl(cases, out_dir / "cases")))
    n_summ = len(cases["summarisation"])
    examples = sorted(np.random.default_rng(cfg.seed).choice(n_summ, min(e.n_examples, n_summ),
                                                              replace=False).tolist())
    text, sections = {}, []  # sections: (file name, title, rows) of the pictures
    for name in e.models:
        t0 = time.perf_counter()
        kind = name if name in RAW_ENCODERS else "trained"  # raw: causal, as pre-trained (the paper's baseline)
        mcfg, _, load = text_source(kind, text_dir_of(name, cfg), cfg.model, cfg.seed)
        encoder, tokenizer = load(env.device)
        embed = embed_each_once(make_embed(encoder, tokenizer, mcfg, env.precision, e.batch_size),
                             name, e.batch_size)
        text[name], rows = evaluate_text_model(embed, cases, examples)
        text[name]["seconds"] = time.perf_counter() - t0
        sections.append((name, f"{name}: summarisation, FINDINGS -> top-5 of all IMPRESSIONS", rows))
        del encoder, embed
    results = {"text": {"cases": {t: {"n": len(cs), "from": sources[t]} for t, cs in cases.items()},
                        "overlap": reports["overlap"], "models": text,
                        "baselines": evaluate_baselines(cases, reports["train"], e.batch_size)}}

    # 2. the CLIP model, once train_clip.py has saved it
    clip_dir = os.path.join(cfg.out_dir, "clip")
    if os.path.exists(os.path.join(clip_dir, "clip.json")):
        results["clip"], clip_examples = evaluate_clip(cfg, env, clip_dir)
        sections += [(f"clip_{style}", f"CLIP, {style} reports: image -> top-5 reports", rows)
                     for style, rows in clip_examples.items()]
    else:
        results["clip"] = {"skipped": f"{clip_dir}/clip.json not found: run train_clip.py with this config"}
    results["config"] = asdict(cfg)

    table = eval_markdown(results, e.n_boot)
    write_text(str(out_dir / "results.json"), json.dumps(results, indent=2) + "\n")
    write_text(str(out_dir / "results.md"), table)
    note = ("Sampled queries and their top-5; green = correct. Identical normalised reports are one "
            "entry (image side: as eval.merge says), so a correct hit can be another study's report "
            "with the same text.")
    write_text(str(out_dir / "retrieval.html"), retrieval_html(sections, note))
    for name, title, rows in sections:
        sheet = contact_sheet(title, rows)
        atomic_write(str(out_dir / f"retrieval_{slug(name)}.png"), lambda p: sheet.save(p, format="PNG"))
    print(table)
    print(f"written to {out_dir}/: results.json, results.md, retrieval.html, "
          + ", ".join(f"retrieval_{slug(name)}.png" for name, _, _ in sections))
    return results


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python evaluate.py CONFIG.yaml [key=value ...]")
    main(sys.argv[1:])
