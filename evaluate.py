"""Evaluation: the metrics behind every number in the paper's evaluation table (PAPER.md,
"Evaluation"), usable from the training scripts, and the `evaluate.py` command.

- Retrieval (image -> report, report -> image, and the text tasks): Recall@k, mean and median rank.
  Similarities are computed a chunk of queries at a time: the extra memory is a normalised copy
  of the embeddings plus about 9 bytes x chunk_size x gallery size (230 MB at the default chunk
  and 100,000 reports), never the 40 GB Q x G matrix of a 100,000 x 100,000 evaluation. As in
  open_clip, the tests check the chunked ranks against a brute-force argsort.
- Report understanding (Ko et al. 2025, sec. "Evaluation"): acronym, paraphrase and summarisation
  retrieval, error discrimination, clinical similarity. They take `embed(texts) -> (N, d)` and
  plain strings, so they run on any encoder, or on a fake one in the tests.
- Zero-shot classification as in CheXzero (Tiu et al. 2022): a positive and a negative prompt per
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
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# Retrieval
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
        # >= counts the query's own entry (the "1 +") and every wrong entry that ties or beats it
        ranks.append((scores >= own[:, None]).sum(1).cpu())
    return torch.cat(ranks)


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
    import data
    keys = [data.normalize_for_match(t) for t in texts]
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
# AUROC, bootstrap, zero-shot classification
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


# The 14 CheXpert observations, each with a (positive, negative) prompt worded like a report
# sentence, since the text encoder was trained on reports rather than on "a photo of" captions.
ZERO_SHOT_PROMPTS = {
    "No Finding": ("No acute cardiopulmonary abnormality.", "There are acute abnormal findings."),
    "Enlarged Cardiomediastinum": ("The cardiomediastinal silhouette is enlarged.",
                                   "The cardiomediastinal silhouette is normal."),
    "Cardiomegaly": ("The heart is enlarged.", "The heart size is normal."),
    "Lung Opacity": ("There is an opacity in the lung.", "The lungs are clear."),
    "Lung Lesion": ("There is a lung nodule or mass.", "There is no lung nodule or mass."),
    "Edema": ("There is pulmonary edema.", "There is no pulmonary edema."),
    "Consolidation": ("There is focal consolidation.", "There is no focal consolidation."),
    "Pneumonia": ("Findings are concerning for pneumonia.", "There is no evidence of pneumonia."),
    "Atelectasis": ("There is atelectasis.", "There is no atelectasis."),
    "Pneumothorax": ("There is a pneumothorax.", "There is no pneumothorax."),
    "Pleural Effusion": ("There is a pleural effusion.", "There is no pleural effusion."),
    "Pleural Other": ("There is pleural thickening.", "There is no pleural abnormality."),
    "Fracture": ("There is a rib fracture.", "There is no acute fracture."),
    "Support Devices": ("Support lines and tubes are in place.", "There are no lines or tubes."),
}


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

def text_retrieval_task(embed, queries, answers, keys=None, ks=(1, 5)):
    """Query i -> the gallery of all answers; correct: answer i and every answer with its key.
    keys default to the answer text itself, so exact duplicates, which no encoder can tell
    apart, are merged; the builder passes normalised text instead."""
    if len(queries) != len(answers):
        raise ValueError(f"{len(queries)} queries but {len(answers)} answers")
    keys = list(answers) if keys is None else list(keys)
    first = {}  # key -> index of the first answer with that key: one gallery entry per key
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    gallery = [answers[i] for i in first.values()]
    return retrieval_metrics(embed(list(queries)), embed(gallery), keys, list(first), ks=ks)


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
    case_of = torch.repeat_interleave(torch.arange(len(cases)), n_wrong)  # (W,) case of each wrong
    true_sim = (findings * true).sum(1)  # (N,)
    beats = true_sim[case_of] > (findings[case_of] * wrong).sum(1)  # (W,) ties count as a loss
    losses = torch.zeros(len(cases)).index_add_(0, case_of, (~beats).float())
    kinds = [k for c in cases for k in c.get("kinds", ["unspecified"] * len(c["wrong"]))]
    per_kind = {}
    for kind in dict.fromkeys(kinds):
        mask = torch.tensor([k == kind for k in kinds])
        per_kind[kind] = {"pairwise_accuracy": 100 * beats[mask].float().mean().item(),
                          "n": int(mask.sum())}
    return {"top1_accuracy": 100 * (losses == 0).float().mean().item(),
            "chance": 100 * (1 / (1 + n_wrong.double())).mean().item(),
            "pairwise_accuracy": 100 * beats.float().mean().item(),
            "n_cases": len(cases), "per_kind": per_kind}


def _positive_findings(labels):
    found = {k for k, v in labels.items() if v == 1} if isinstance(labels, dict) else set(labels)
    return found or {"No Finding"}  # two normal reports agree (F1 = 1) instead of 0/0


def clinical_similarity(retrieved_texts, true_texts, label_fn):
    """Mean label F1 between the labeler's positive findings of each top-1 retrieved report and
    of the true report (the project's stand-in for RadGraph F1). label_fn(text) returns
    {label: value} (positive where value == 1, CheXpert style) or an iterable of positive labels."""
    f1 = []
    for retrieved, true in zip(retrieved_texts, true_texts, strict=True):
        a, b = _positive_findings(label_fn(retrieved)), _positive_findings(label_fn(true))
        f1.append(2 * len(a & b) / (len(a) + len(b)))
    return {"label_f1": float(np.mean(f1)), "n": len(f1)}


RETRIEVAL_TASKS = ("acronym", "paraphrase", "summarisation")
CASE_KEYS = {**{t: ("query", "answer") for t in RETRIEVAL_TASKS},
             "error": ("findings", "impression", "wrong")}
# variants that restyle a report; "abbreviated" and "expanded" are the acronym task's
PARAPHRASE_STYLES = ("shuffled", "omit_normal", "partitioned", "impression_only")


def _error_impressions(impression, rng, data, n=3):
    """n impressions with one injected error each, of different kinds where enough kinds apply."""
    kinds = list(data.ERROR_KINDS)
    rng.shuffle(kinds)
    seen, wrong, used = {data.normalize_for_match(impression)}, [], []
    for kind in kinds + kinds:  # the second pass repeats kinds when fewer than n apply
        text = data.inject_error(impression, kind, rng)
        if text and data.normalize_for_match(text) not in seen:
            seen.add(data.normalize_for_match(text))
            wrong.append(text)
            used.append(kind)
            if len(wrong) == n:
                return wrong, used
    return None


def build_text_cases(reports, rng, n=None):
    """Cases for every text task from data.Report objects (real or synthetic), using data.py's
    variants and errors. rng: the generator data.make_variants takes (numpy's or random.Random:
    only shuffle and choice are used here). Returns
    {task: [case, ...]} in the same format as read_cases_jsonl; retrieval cases carry a "key"
    (the normalised answer) so that identical answers are merged."""
    import data
    reports = list(reports)
    if n is not None and n < len(reports):
        rng.shuffle(reports)
        reports = reports[:n]
    case = lambda q, a: {"query": q, "answer": a, "key": data.normalize_for_match(a)}
    cases = {task: [] for task in CASE_KEYS}
    for report in reports:
        variants = data.make_variants(report, rng)
        if variants.get("abbreviated") and variants.get("expanded") \
                and variants["abbreviated"] != variants["expanded"]:  # else nothing to understand
            cases["acronym"].append(case(variants["abbreviated"], variants["expanded"]))
        styles = [s for s in PARAPHRASE_STYLES if variants.get(s) and variants[s] != report.text()]
        if styles:
            cases["paraphrase"].append(case(variants[rng.choice(styles)], report.text()))
        if report.findings and report.impression:
            cases["summarisation"].append(case(report.findings, report.impression))
            errors = _error_impressions(report.impression, rng, data)
            if errors:
                cases["error"].append({"findings": report.findings, "impression": report.impression,
                                       "wrong": errors[0], "kinds": errors[1]})
    return cases


def read_cases_jsonl(path, task):
    """Prepared cases for one task, one JSON object a line: {"query", "answer", optional "key"}
    for the retrieval tasks, {"findings", "impression", "wrong": [...], optional "kinds"} for
    "error". Malformed input raises ValueError naming the line."""
    if task not in CASE_KEYS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(CASE_KEYS)}")
    cases = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                c = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(c, dict):
                raise ValueError(f"{where}: expected a JSON object")
            for key in CASE_KEYS[task]:
                if key not in c:
                    raise ValueError(f"{where}: missing key {key!r} "
                                     f"(a {task} case needs {', '.join(CASE_KEYS[task])})")
            if task == "error" and not (isinstance(c["wrong"], list) and c["wrong"]):
                raise ValueError(f"{where}: 'wrong' must be a non-empty list of impressions")
            if task == "error" and len(c.get("kinds", c["wrong"])) != len(c["wrong"]):
                raise ValueError(f"{where}: 'kinds' needs one entry per wrong impression")
            cases.append(c)
    return cases


def evaluate_text_tasks(embed, cases):
    """Run every task in {task: [case, ...]} (from build_text_cases or read_cases_jsonl)."""
    results = {}
    for task, cs in cases.items():
        if not cs:  # e.g. a source without FINDINGS sections has no summarisation cases
            continue
        if task == "error":
            results[task] = error_discrimination(embed, cs)
        else:
            results[task] = text_retrieval_task(embed, [c["query"] for c in cs],
                                                [c["answer"] for c in cs],
                                                [c.get("key", c["answer"]) for c in cs])
    return results


# ---------------------------------------------------------------------------------------------
# Results: JSON and a Markdown table
# ---------------------------------------------------------------------------------------------

def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        out |= _flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + str(k): v}
    return out


def _cell(v):
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")


def results_table(rows):
    """Markdown table, a row per model, a column per (flattened: "image_to_text/R@5") metric."""
    rows = {model: _flatten(metrics) for model, metrics in rows.items()}
    columns = list(dict.fromkeys(c for metrics in rows.values() for c in metrics))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {model} | " + " | ".join(_cell(m.get(c)) for c in columns) + " |"
              for model, m in rows.items()]
    return "\n".join(lines) + "\n"


def write_results(results, out_dir, name):
    """Write {model: metrics} as out_dir/name.json and out_dir/name.md; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(results_table(results))
    return json_path, md_path


# --- command ---
