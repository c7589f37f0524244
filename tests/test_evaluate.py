"""Tests for evaluate.py's metrics: chunked retrieval against a brute-force argsort (as open_clip
does), the text tasks on hand-computed cases, chance and oracle levels, AUROC against a pair
count."""
import json
import math
import random
import re
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate as ev
import cases
from encoders import embed_each_once
from phrasings import ZERO_SHOT_PROMPTS
from reports import Report
from results import write_results
from runtime import load_config
import variants
from weights import load_tokenizer


# ---------------------------------------------------------------------------------------------
# Independent references and fake encoders
# ---------------------------------------------------------------------------------------------

def brute_force_ranks(q, g, query_keys=None, gallery_keys=None):
    """Full Q x G matrix in float64, gallery merged by key (best member), ranked by argsort with
    ties broken against the query (its correct entry sorts after equal-scoring wrong ones)."""
    q = torch.nn.functional.normalize(torch.as_tensor(q).double(), dim=-1).numpy()
    g = torch.nn.functional.normalize(torch.as_tensor(g).double(), dim=-1).numpy()
    if query_keys is None:
        query_keys = gallery_keys = list(range(len(g)))
    scores = q @ g.T
    keys = sorted(set(gallery_keys))
    gk = np.array(gallery_keys)
    merged = np.stack([scores[:, gk == k].max(1) for k in keys], axis=1)  # (Q, K)
    ranks = []
    for i, key in enumerate(query_keys):
        correct = np.array([k == key for k in keys])
        order = np.lexsort((correct, -merged[i]))  # primary: score descending; ties: wrong first
        ranks.append(int(np.flatnonzero(correct[order])[0]) + 1)
    return np.array(ranks)


def sign_vectors(n, d, seed):
    """Entries +-1/sqrt(d) with d a power of 4: unit norm and dot products exact in fp32 and bf16,
    and only d + 1 distinct scores, so ties and duplicated vectors are everywhere."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n, d), generator=g) * 2 - 1).float() / d ** 0.5


def bag_of_words(all_texts):
    """A deterministic fake encoder whose cosine similarities are easy to compute by hand; the
    vocabulary is fixed up front so that separate embed calls live in the same space."""
    vocab = sorted({w for t in all_texts for w in t.split()})
    return lambda texts: torch.tensor([[t.split().count(w) for w in vocab] for t in texts],
                                      dtype=torch.float)


def lookup_embed(groups, d=32, seed=0):
    """Texts in the same group share one random vector; groups are independent (random encoder
    when every text is its own group, oracle when each query is grouped with its answer)."""
    table = torch.randn(len(groups), d, generator=torch.Generator().manual_seed(seed))
    where = {t: i for i, group in enumerate(groups) for t in group}
    return lambda texts: table[[where[t] for t in texts]]


# ---------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_ranks_match_brute_force_random(chunk_size):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(150, 16, generator=g), torch.randn(150, 16, generator=g)
    for q, gal in [(a, b), (b, a)]:  # both directions
        ranks = ev.retrieval_ranks(q, gal, chunk_size=chunk_size)
        np.testing.assert_array_equal(ranks.numpy(), brute_force_ranks(q, gal))


@pytest.mark.parametrize("d", [4, 16])
@pytest.mark.parametrize("chunk_size", [1, 13, 500])
def test_ranks_match_brute_force_with_ties(d, chunk_size):
    a, b = sign_vectors(120, d, seed=1), sign_vectors(120, d, seed=2)
    b[1::2] = b[::2]  # duplicated gallery vectors: every correct item ties with a wrong one
    for q, gal in [(a, b), (b, a)]:
        ranks = ev.retrieval_ranks(q, gal, chunk_size=chunk_size)
        np.testing.assert_array_equal(ranks.numpy(), brute_force_ranks(q, gal))


@pytest.mark.parametrize("chunk_size", [1, 32, 1000])
def test_ranks_match_brute_force_multi_positive(chunk_size):
    rng = np.random.default_rng(3)
    gallery_keys = [f"report {k}" for k in rng.integers(0, 25, 200)]  # ~8 items per key
    query_keys = [gallery_keys[i] for i in rng.integers(0, 200, 90)]
    q, gal = sign_vectors(90, 16, seed=4), sign_vectors(200, 16, seed=5)
    ranks = ev.retrieval_ranks(q, gal, query_keys, gallery_keys, chunk_size=chunk_size)
    expected = brute_force_ranks(q, gal, query_keys, gallery_keys)
    np.testing.assert_array_equal(ranks.numpy(), expected)
    # the other direction, with integer tensor keys; only items whose key the queries have
    codes = {k: i for i, k in enumerate(sorted(set(gallery_keys)))}
    keep = [i for i, k in enumerate(gallery_keys) if k in set(query_keys)]
    gk = torch.tensor([codes[gallery_keys[i]] for i in keep])
    qk = torch.tensor([codes[k] for k in query_keys])
    ranks = ev.retrieval_ranks(gal[keep], q, gk, qk, chunk_size=chunk_size)
    expected = brute_force_ranks(gal[keep], q, gk.tolist(), qk.tolist())
    np.testing.assert_array_equal(ranks.numpy(), expected)


def test_bf16_equals_fp32_when_scores_are_exact():
    q, gal = sign_vectors(100, 16, seed=6), sign_vectors(100, 16, seed=7)
    keys = [i % 10 for i in range(100)]
    for kw in [{}, {"query_keys": keys, "gallery_keys": keys}]:
        assert torch.equal(ev.retrieval_ranks(q, gal, bf16=True, chunk_size=9, **kw),
                           ev.retrieval_ranks(q, gal, **kw))


def test_summary_by_hand_and_output_fields():
    out = ev.summarize_ranks(torch.tensor([1, 2, 3, 10]), ks=(1, 5))
    assert out == {"R@1": 25.0, "R@5": 75.0, "mean_rank": 4.0, "median_rank": 2.5, "n_queries": 4}
    e = torch.eye(5)
    assert ev.retrieval_metrics(e, e)["multi_positive"] == "one_to_one"
    keys = list("aabbc")
    assert ev.retrieval_metrics(e, e, keys, keys)["multi_positive"] == "merged_by_key"


def test_ties_count_against_the_model():
    same = torch.ones(50, 8)  # a collapsed encoder: every score ties
    out = ev.retrieval_metrics(same, same)
    assert out["R@10"] == 0 and out["mean_rank"] == 50


def test_chance_and_oracle_retrieval():
    g = torch.Generator().manual_seed(8)
    q, gal = torch.randn(2000, 64, generator=g), torch.randn(2000, 64, generator=g)
    chance = ev.retrieval_metrics(q, gal, ks=(100,))
    assert abs(chance["R@100"] - 5.0) < 1.5  # k / N = 5 %, binomial sd 0.5 %
    assert abs(chance["mean_rank"] - 1000.5) < 60
    assert ev.retrieval_metrics(q, q + 1e-3 * gal, ks=(1,))["R@1"] == 100.0


def test_image_text_retrieval_both_directions():
    images, texts = sign_vectors(60, 16, seed=9), sign_vectors(60, 16, seed=10)
    keys = [f"k{i % 20}" for i in range(60)]
    out = ev.image_text_retrieval(images, texts, keys, ks=(1, 5))
    for direction, (q, gal) in {"image_to_text": (images, texts),
                                "text_to_image": (texts, images)}.items():
        ranks = brute_force_ranks(q, gal, keys, keys)
        assert out[direction]["R@5"] == pytest.approx(100 * np.mean(ranks <= 5))
        assert out[direction]["mean_rank"] == pytest.approx(ranks.mean())


def test_bad_inputs_are_named():
    e = torch.eye(4)
    with pytest.raises(ValueError, match="no gallery item"):
        ev.retrieval_ranks(e, e, ["a", "b", "c", "z"], ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="NaN"):
        ev.retrieval_ranks(e * float("nan"), e)
    with pytest.raises(ValueError, match="as many queries"):
        ev.retrieval_ranks(e[:3], e)


def test_large_gallery_with_small_chunks_matches_sampled_brute_force():
    n, d = 20_000, 64  # the full matrix would be 1.6 GB; a chunk of 384 queries needs ~40 MB
    q, gal = sign_vectors(n, d, seed=11), sign_vectors(n, d, seed=12)
    gal[n // 2:] = q[n // 2:]  # half the queries find an exact copy of themselves
    ranks = ev.retrieval_ranks(q, gal, chunk_size=384)
    sample = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:40]
    scores = q[sample].double() @ gal.double().T  # (40, G), exact for sign vectors
    expected = (scores >= scores[torch.arange(40), sample][:, None]).sum(1)
    assert torch.equal(ranks[sample], expected)
    assert (ranks[n // 2:] == 1).float().mean() > 0.99


def test_topk_retrieve_matches_full_matrix():
    g = torch.Generator().manual_seed(13)
    q, gal = torch.randn(40, 8, generator=g), torch.randn(70, 8, generator=g)
    scores, idx = ev.topk_retrieve(q, gal, k=5, chunk_size=6)
    full = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(gal, dim=1).T
    assert torch.equal(idx, full.topk(5, dim=1).indices)
    torch.testing.assert_close(scores, full.topk(5, dim=1).values)


# ---------------------------------------------------------------------------------------------
# AUROC, bootstrap, zero-shot
# ---------------------------------------------------------------------------------------------

def test_auroc_equals_pair_count_with_ties():
    rng = np.random.default_rng(14)
    for _ in range(5):
        scores = rng.integers(0, 6, 300) / 5  # few distinct values: many ties
        labels = rng.random(300) < 0.3
        pos, neg = scores[labels], scores[~labels]
        pairs = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
        assert ev.auroc(scores, labels) == pytest.approx(pairs / (len(pos) * len(neg)))
    assert ev.auroc(torch.tensor([0.1, 0.9]), torch.tensor([0, 1])) == 1.0
    assert np.isnan(ev.auroc([0.1, 0.2], [1, 1]))


def test_bootstrap_ci_is_deterministic_and_contains_estimate():
    rng = np.random.default_rng(15)
    labels = rng.random(400) < 0.4
    scores = labels + rng.normal(0, 1, 400)
    ci = ev.bootstrap_ci(ev.auroc, scores, labels, n=300, seed=0)
    assert ci == ev.bootstrap_ci(ev.auroc, scores, labels, n=300, seed=0)
    assert ci != ev.bootstrap_ci(ev.auroc, scores, labels, n=300, seed=1)
    assert ci[0] < ev.auroc(scores, labels) < ci[1]


def test_zero_shot_classify():
    # label 0 is decided by the first coordinate, label 1 is noise, label 2 has only positives
    image = torch.tensor([[1.0, 0.2], [0.9, -0.3], [-0.8, 0.5], [-1.0, -0.1], [0.3, 1.0]])
    pos, neg = torch.tensor([[1.0, 0], [0, 1], [1, 0]]), torch.tensor([[-1.0, 0], [0, -1], [-1, 0]])
    labels = np.array([[1, 1, 1], [1, 0, 1], [0, 1, -1], [0, 0, 1], [-1, 0, 1]])  # -1: uncertain
    out = ev.zero_shot_classify(image, pos, neg, labels, names=["a", "b", "c"], n_boot=50)
    a, b, c = out["per_label"]["a"], out["per_label"]["b"], out["per_label"]["c"]
    assert a["auroc"] == 1.0 and (a["n_pos"], a["n_neg"]) == (2, 2)
    # label b, margins ~ second coordinate: positives 0.2, 0.5; negatives -0.3, -0.1, 1.0
    assert b["auroc"] == pytest.approx(4 / 6)
    assert c["auroc"] is None and c["skipped"] == "only one class present"
    assert out["n_labels_evaluated"] == 2 and out["mean_auroc"] == pytest.approx((1 + 4 / 6) / 2)
    assert len(ZERO_SHOT_PROMPTS) == 14


# ---------------------------------------------------------------------------------------------
# Report-understanding tasks
# ---------------------------------------------------------------------------------------------

def test_text_retrieval_by_hand():
    answers = ["left effusion", "right effusion", "no pneumothorax"]
    queries = ["left effusion small",  # cos .82 with its answer, .41 with the next: rank 1
               "effusion",             # ties .71 with "left effusion": rank 2
               "pneumothorax left"]    # ties .5 with "left effusion": rank 2
    embed = bag_of_words(answers + queries)
    out = ev.text_retrieval_task(embed, queries, answers, ks=(1, 5))
    assert out["R@1"] == pytest.approx(100 / 3) and out["R@5"] == 100
    assert out["mean_rank"] == pytest.approx(5 / 3) and out["median_rank"] == 2


def test_text_retrieval_merges_identical_answers():
    # "a b" appears twice: as a correct answer it is one entry, as a wrong one it costs one place
    answers, queries = ["a b", "a b", "a c"], ["a b", "a b", "a"]
    out = ev.text_retrieval_task(bag_of_words(answers), queries, answers, ks=(1,))
    assert out["R@1"] == pytest.approx(200 / 3) and out["mean_rank"] == pytest.approx(4 / 3)
    # with keys, two different answers are one entry: query 1 no longer loses to answer 0
    answers = ["left effusion", "effusion left small", "no pneumothorax"]
    queries = ["left effusion", "left effusion effusion", "pneumothorax"]
    embed = bag_of_words(answers + queries)
    assert ev.text_retrieval_task(embed, queries, answers, ks=(1,))["R@1"] == pytest.approx(200 / 3)
    assert ev.text_retrieval_task(embed, queries, answers, keys="eep", ks=(1,))["R@1"] == 100


def brute_force_multi_positive_ranks(q, g, correct):
    """Rank of each query's best correct item, by loops over a float64 score matrix: 1 + the number
    of wrong items scoring at least as high (ties against the model). correct: sets of indices."""
    q = torch.nn.functional.normalize(torch.as_tensor(q).double(), dim=-1).numpy()
    g = torch.nn.functional.normalize(torch.as_tensor(g).double(), dim=-1).numpy()
    ranks = []
    for i, hits in enumerate(correct):
        scores = [float(q[i] @ g[j]) for j in range(len(g))]
        best = max(scores[j] for j in hits)
        ranks.append(1 + sum(1 for j in range(len(g)) if j not in hits and scores[j] >= best))
    return np.array(ranks)


@pytest.mark.parametrize("chunk_size", [1, 16, 1000])
def test_multi_positive_ranks_match_brute_force(chunk_size):
    rng = np.random.default_rng(8)
    n_q, n_g, n_classes = 60, 90, 30
    gallery_class = torch.tensor(rng.integers(0, n_classes, n_g))
    hit_class = torch.tensor(rng.random((n_q, n_classes)) < 0.08)
    hit_class[torch.arange(n_q), gallery_class[rng.integers(0, n_g, n_q)]] = True  # at least one hit each
    q, g = sign_vectors(n_q, 16, seed=9), sign_vectors(n_g, 16, seed=10)  # many ties
    ranks = ev.multi_positive_ranks(q, g, hit_class, gallery_class, chunk_size=chunk_size)
    correct = [{j for j in range(n_g) if hit_class[i, gallery_class[j]]} for i in range(n_q)]
    np.testing.assert_array_equal(ranks.numpy(), brute_force_multi_positive_ranks(q, g, correct))
    # one hit per query: the same ranks as retrieval_ranks with keys
    one = torch.zeros(n_q, n_g, dtype=torch.bool)
    own = torch.tensor(rng.integers(0, n_g, n_q))
    one[torch.arange(n_q), own] = True
    np.testing.assert_array_equal(ev.multi_positive_ranks(q, g, one, torch.arange(n_g), chunk_size).numpy(),
                                  ev.retrieval_ranks(q, g, own.tolist(), list(range(n_g))).numpy())
    with pytest.raises(ValueError, match="at least one correct"):
        ev.multi_positive_ranks(q, g, torch.zeros(n_q, n_classes, dtype=torch.bool), gallery_class)


def test_text_retrieval_counts_every_equally_correct_answer():
    """Identical queries share their answers, other_keys add answers, and chance follows the hits."""
    answers = ["no acute disease heart normal", "no acute disease lungs clear", "left effusion",
               "right effusion"]
    queries = ["no acute disease", "no acute disease", "left effusion", "effusion right"]
    embed = bag_of_words(answers + queries)
    # queries 0 and 1 are one text: without pooling they would tie their two answers (cos .77 each),
    # and ties count against: rank 2 each. Pooled, either answer is a hit.
    out = ev.text_retrieval_task(embed, queries, answers, ks=(1, 2), query_keys=["a", "b", "c", "d"])
    assert out["R@1"] == 50 and out["multi_answer_queries"] == 0
    out = ev.text_retrieval_task(embed, queries, answers, ks=(1, 2))  # query text is the query key
    assert out["R@1"] == 100 and out["multi_answer_queries"] == 2 and out["gallery_entries"] == 4
    # chance R@1: hits / entries = 2/4, 2/4, 1/4, 1/4; R@2: 1 - C(4-h, 2) / C(4, 2) = 5/6, 5/6, 1/2, 1/2
    assert out["chance"]["R@1"] == pytest.approx(100 * 1.5 / 4)
    assert out["chance"]["R@2"] == pytest.approx(100 * (5 / 6 + 5 / 6 + 1 / 2 + 1 / 2) / 4)
    # other_keys: "effusion right" also accepts "left effusion" (rank 1 by then); unknown keys ignored
    queries[3] = "left effusion right"  # ties .82 between answers 2 and 3: rank 2 alone
    plain = ev.text_retrieval_task(embed, queries, answers, ks=(1,), query_keys="abcd")
    widened = ev.text_retrieval_task(embed, queries, answers, ks=(1,), query_keys="abcd",
                                     other_keys=[[], [], [], ["left effusion", "not an answer"]])
    assert plain["R@1"] == 25 and widened["R@1"] == 50 and widened["multi_answer_queries"] == 1


def test_summarisation_label_level_by_hand():
    """A retrieved impression is a label-level hit when its positive findings equal the true one's."""
    cases_ = [{"query": "effusion left", "answer": "left effusion"},            # exact answer: rank 1
              {"query": "normal heart", "answer": "no acute disease"},          # retrieves "heart normal":
              {"query": "heart normal lungs", "answer": "heart normal"},        # both normal, a hit
              {"query": "big heart", "answer": "cardiomegaly"}]                 # retrieves "heart normal": miss
    findings = {"left effusion": ["Effusion"], "no acute disease": [], "heart normal": [],
                "cardiomegaly": ["Cardiomegaly"]}
    embed = bag_of_words([t for c in cases_ for t in c.values()])
    out = ev.evaluate_text_tasks(embed, {"summarisation": cases_}, label_fn=lambda t: findings[t])
    # text level: query 0 rank 1; query 1 cos("normal heart", "heart normal") = 1 beats its answer (0);
    # query 2 rank 1; query 3: "heart normal" scores .5, "cardiomegaly" 0: a miss
    assert out["summarisation"]["R@1"] == 50
    assert out["summarisation_label"]["R@1"] == 75
    # chance at the label level: query 1's and 2's hits are the two normal impressions of four
    assert out["summarisation_label"]["chance"]["R@1"] == pytest.approx(100 * (1 + 2 + 2 + 1) / 16)


def test_error_discrimination_by_hand():
    cases = [
        {"findings": "left pleural effusion", "impression": "left effusion",  # cos .82 vs .41s
         "wrong": ["right effusion", "no effusion", "left pneumothorax"],
         "kinds": ["laterality", "false_negation", "false_finding"]},
        {"findings": "right effusion", "impression": "small right effusion",  # cos .82 loses to 1.0
         "wrong": ["left effusion", "right effusion", "no pneumothorax"],
         "kinds": ["laterality", "severity", "false_negation"]},
    ]
    texts = [t for c in cases for t in [c["findings"], c["impression"], *c["wrong"]]]
    out = ev.error_discrimination(bag_of_words(texts), cases)
    assert out["top1_accuracy"] == 50 and out["chance"] == 25 and out["n_cases"] == 2
    assert out["pairwise_accuracy"] == pytest.approx(100 * 5 / 6)
    assert {k: v["pairwise_accuracy"] for k, v in out["per_kind"].items()} == {
        "laterality": 100, "false_negation": 100, "false_finding": 100, "severity": 0}
    assert out["per_kind"]["laterality"]["n"] == 2


def make_error_cases(n):
    return [{"findings": f"f{i}", "impression": f"t{i}", "wrong": [f"w{i}.{j}" for j in range(3)]}
            for i in range(n)]


def test_error_discrimination_chance_and_oracle():
    cases = make_error_cases(3000)
    texts = [t for c in cases for t in [c["findings"], c["impression"], *c["wrong"]]]
    random = ev.error_discrimination(lookup_embed([[t] for t in texts]), cases)
    assert abs(random["top1_accuracy"] - 25) < 3  # binomial sd 0.8 %
    assert random["per_kind"]["unspecified"]["n"] == 9000
    oracle_groups = [[c["findings"], c["impression"]] for c in cases] + \
                    [[w] for c in cases for w in c["wrong"]]
    assert ev.error_discrimination(lookup_embed(oracle_groups), cases)["top1_accuracy"] == 100


def test_text_retrieval_chance_and_oracle():
    queries, answers = [f"q{i}" for i in range(2000)], [f"a{i}" for i in range(2000)]
    random = ev.text_retrieval_task(lookup_embed([[t] for t in queries + answers]), queries,
                                    answers, ks=(100,))
    assert abs(random["R@100"] - 5.0) < 1.5
    oracle = lookup_embed([[q, a] for q, a in zip(queries, answers)])
    assert ev.text_retrieval_task(oracle, queries, answers, ks=(1,))["R@1"] == 100


def test_clinical_similarity_by_hand():
    def label_fn(text):  # CheXpert-style dict: 1 positive, -1 uncertain
        return {w.strip("?"): -1 if w.endswith("?") else 1 for w in text.split() if w != "normal"}
    retrieved = ["effusion edema", "normal", "edema", "effusion edema?"]
    true = ["effusion", "normal", "normal", "effusion"]
    # F1: 2*1/3, both "No Finding" -> 1, {edema} vs {No Finding} -> 0, uncertain ignored -> 1
    out = ev.clinical_similarity(retrieved, true, label_fn)
    assert out == {"label_f1": pytest.approx((2 / 3 + 1 + 0 + 1) / 4), "n": 4}
    out = ev.clinical_similarity(["a b"], ["a"], lambda t: t.split())  # a set of positive labels
    assert out["label_f1"] == pytest.approx(2 / 3)


def test_read_cases_jsonl(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"query": "No PTX.", "answer": "No pneumothorax."}\n\n'
                    '{"query": "Sm L eff.", "answer": "Small left effusion.", "key": "x"}\n')
    read = cases.read_cases_jsonl(good, "acronym")
    assert [c["answer"] for c in read] == ["No pneumothorax.", "Small left effusion."]
    bad = tmp_path / "bad.jsonl"
    for text, task, message in [
            ('{"query": "a", "answer": "b"}\n{"query": "c"}\n', "paraphrase",
             "line 2: missing key 'answer'"),
            ('{"query": "a", \n', "acronym", "line 1: not valid JSON"),
            ('["a", "b"]\n', "acronym", "line 1: expected a JSON object"),
            ('{"findings": "a", "impression": "b"}\n', "error", "missing key 'wrong'"),
            ('{"findings": "a", "impression": "b", "wrong": "c"}\n', "error", "non-empty list"),
            ('{"findings": "a", "impression": "b", "wrong": ["c"], "kinds": []}\n', "error",
             "one entry per"),
            ('{"query": "a", "answer": "b", "distractors": "c"}\n', "acronym", "line 1: 'distractors' must be a list"),
            ('{"query": "a", "answer": "b", "distractors": [1]}\n', "paraphrase", "'distractors' must be a list"),
            ('{"query": "a", "answer": "b"}\n', "acronyms", "unknown task")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            cases.read_cases_jsonl(bad, task)


def test_evaluate_text_tasks_from_files(tmp_path):
    path = tmp_path / "error.jsonl"
    path.write_text(json.dumps({"findings": "left effusion", "impression": "left effusion",
                                "wrong": ["right effusion"]}) + "\n")
    built = {"error": cases.read_cases_jsonl(path, "error"),
             "summarisation": [{"query": "left effusion", "answer": "effusion", "key": "e"},
                               {"query": "no effusion", "answer": "Effusion", "key": "e"}]}
    embed = bag_of_words(["left effusion right no Effusion"])
    out = ev.evaluate_text_tasks(embed, built)
    assert out["error"]["top1_accuracy"] == 100 and out["error"]["chance"] == 50
    assert out["summarisation"]["R@1"] == 100 and out["summarisation"]["n_queries"] == 2


# ---------------------------------------------------------------------------------------------
# Case builders: against a fake data module with data.py's documented interface, and against the
# real data.py once its helpers exist
# ---------------------------------------------------------------------------------------------

def fake_rules():
    """Stand-ins for variants.py's rules, to check build_text_cases against its documented interface."""
    rules = types.SimpleNamespace()
    rules.ERROR_KINDS = ["laterality", "severity", "false_negation", "false_finding", "measurement", "device"]
    rules.normalize_for_match = lambda text: " ".join(text.lower().replace(".", "").split())

    def make_variants(report, rng, family="train"):
        assert family == "eval"  # cases never use the rules of stage 1's training variants
        return {"abbreviated": report.text().replace("pneumothorax", "PTX"),
                "expanded": report.text(), "shuffled": report.impression + " " + report.findings}

    def error_impressions(impression, rng, n=3, family="eval", counts=None, findings=None):
        assert family == "eval" and findings  # only errors the case's findings contradict
        kinds = ["laterality", "severity", "false_negation", "false_finding"][:n]
        return [f"{impression} ({kind} {rng.random():.3f})" for kind in kinds], kinds, ["Pleural Effusion"] * n

    def near_duplicates(answer, query, rng, weights, counts, n=3):
        assert isinstance(weights, dict) and isinstance(counts, dict)
        return [answer.replace("pneumothorax", "pneumonia")] if "pneumothorax" in answer else []

    rules.make_variants, rules.error_impressions, rules.near_duplicates = make_variants, error_impressions, near_duplicates
    return rules


def check_cases(built, rules):
    assert set(built) == {"acronym", "paraphrase", "summarisation", "error"}
    for task in ["acronym", "paraphrase", "summarisation"]:
        for c in built[task]:
            assert c["key"] == rules.normalize_for_match(c["answer"]) and c["query"] != c["answer"]
            assert task == "summarisation" or c["distractors"]
    for c in built["error"]:
        normalized = {rules.normalize_for_match(t) for t in [c["impression"], *c["wrong"]]}
        assert len(c["wrong"]) == 3 and len(normalized) == 4
        assert len(c["kinds"]) == 3 and set(c["kinds"]) <= set(rules.ERROR_KINDS)


class FakeReport:
    def __init__(self, study_id, findings, impression):
        self.study_id, self.findings, self.impression = study_id, findings, impression

    def text(self):
        return f"FINDINGS: {self.findings} IMPRESSION: {self.impression}"


@pytest.mark.parametrize("rng", [np.random.default_rng(0), random.Random(0)])
def test_build_text_cases_with_documented_interface(monkeypatch, rng):
    rules = fake_rules()
    for name in ("normalize_for_match", "make_variants", "error_impressions", "near_duplicates"):
        monkeypatch.setattr(cases, name, getattr(rules, name))
    reports = [FakeReport(str(i), f"Small left effusion {i}. No pneumothorax.",
                          f"Small left effusion {i}.") for i in range(12)]
    reports.append(FakeReport("x", "", "No acute process."))
    dropped = {}
    built = cases.build_text_cases(reports, rng, dropped=dropped)
    check_cases(built, rules)
    assert all(len(set(c["kinds"])) == 3 for c in built["error"])
    # "x" has nothing to abbreviate, no findings to summarise, and no near-duplicate: no paraphrase either
    assert {task: len(cs) for task, cs in built.items()} == {
        "acronym": 12, "paraphrase": 12, "summarisation": 12, "error": 12}
    assert dropped == {"paraphrase": 1}
    assert len(cases.build_text_cases(reports[:12], rng, n=5)["summarisation"]) == 5
    assert ev.report_keys(["No  PTX.", "no ptx"]) == ["no ptx", "no ptx"]
    texts = " ".join(t for cs in built.values() for c in cs for t in c.values()
                     if isinstance(t, str))
    results = ev.evaluate_text_tasks(bag_of_words([texts]), built)
    assert set(results) == set(built) | {"summarisation_label"}


def test_build_text_cases_with_the_real_rules():
    findings = "Small left pleural effusion. No pneumothorax. Heart size is normal."
    reports = [Report(study_id=str(i), findings=findings, impression="Small left pleural effusion.")
               for i in range(5)]
    built = cases.build_text_cases(reports, np.random.default_rng(0))
    check_cases(built, variants)
    # nothing here is abbreviated, so make_variants has no "expanded" variant: the report itself
    # is the expanded answer of its abbreviated rewrite
    assert [c["answer"] for c in built["acronym"]] == [r.text() for r in reports]


# ---------------------------------------------------------------------------------------------
# Baselines: TF-IDF against a brute-force implementation, the others by hand
# ---------------------------------------------------------------------------------------------

def brute_force_tfidf(text, train):
    """{word: weight}: counts x (ln((1 + N) / (1 + df)) + 1) over the words of the training texts,
    L2-normalised; written with loops and Counter, independently of tfidf_embed."""
    words = lambda t: [w for w in re.split(r"[^a-z0-9]+", t.lower()) if w]
    counts, vec = Counter(words(text)), {}
    for w, c in counts.items():
        df = sum(1 for t in train if w in words(t))
        if df:
            vec[w] = c * (math.log((1 + len(train)) / (1 + df)) + 1)
    norm = math.sqrt(sum(v * v for v in vec.values()))
    return {w: v / norm for w, v in vec.items()} if norm else {}


def test_tfidf_baseline_equals_brute_force():
    train = ["No pneumothorax. Small left effusion.", "Heart size normal; no effusion.",
             "Left lower lobe opacity, no effusion.", "No acute disease."]
    gallery = ["Small LEFT effusion", "no pneumothorax, heart normal", "opacity opacity left", "unseen words"]
    queries = ["left effusion", "normal heart size", "lobe opacity", "pneumothorax pneumothorax no"]
    embed = ev.tfidf_embed(train)
    cosine = lambda a, b: sum(v * b.get(w, 0.0) for w, v in a.items())
    want = np.array([[cosine(brute_force_tfidf(q, train), brute_force_tfidf(g, train)) for g in gallery]
                     for q in queries])
    np.testing.assert_allclose((embed(queries) @ embed(gallery).T).numpy(), want, atol=1e-6)
    # the metric code scores it like any encoder: ranks from the brute-force scores (ties against)
    ranks = [1 + sum(want[i, j] >= want[i, i] for j in range(len(gallery)) if j != i) for i in range(len(queries))]
    out = ev.text_retrieval_task(embed, queries, gallery, ks=(1, 2))
    assert out["R@1"] == pytest.approx(100 * np.mean([r == 1 for r in ranks]))
    assert out["mean_rank"] == pytest.approx(np.mean(ranks))


def test_pick_baselines_by_hand():
    cases_ = [{"findings": "f", "impression": "abc", "wrong": ["abcd", "ab", "abcde"],
               "kinds": ["device", "laterality", "device"]},
              {"findings": "f", "impression": "ab", "wrong": ["abc", "abcd", "xy"],
               "kinds": ["device", "device", "laterality"]},
              {"findings": "f", "impression": "abcdef", "wrong": ["a", "b", "c"]}]
    shortest, longest = (ev.pick_baseline(cases_, ev.PICK_RULES[r]) for r in ("shortest", "longest"))
    # shortest: case 1 "ab" is shorter (0); case 2 ties "xy" at the top (1/2); case 3 longest (0)
    assert shortest["top1_accuracy"] == pytest.approx(100 / 6) and longest["top1_accuracy"] == pytest.approx(100 / 3)
    # pairs: shortest wins 2 + 2.5 + 0 of 9, longest 1 + 0.5 + 3 of 9
    assert shortest["pairwise_accuracy"] == pytest.approx(50) and longest["pairwise_accuracy"] == pytest.approx(50)
    assert shortest["per_kind"]["laterality"] == {"pairwise_accuracy": pytest.approx(25), "n": 2}
    assert shortest["per_kind"]["unspecified"]["pairwise_accuracy"] == 0 and shortest["chance"] == 25
    # fewest findings: the normal true impression against three abnormal ones wins; against a wrong
    # one that is normal too it ties (half), and a true abnormal one loses to a normal wrong one
    normal, effusion, both = "No acute disease.", "Small left pleural effusion.", "Cardiomegaly and effusion."
    fewest = ev.pick_baseline([{"impression": normal, "wrong": [effusion, both, effusion]},
                               {"impression": normal, "wrong": ["Lungs are clear.", effusion, both]},
                               {"impression": effusion, "wrong": [normal, both, both]}], ev.PICK_RULES["fewest findings"])
    assert fewest["top1_accuracy"] == pytest.approx(100 * (1 + 1 / 2 + 0) / 3)


def test_majority_baseline_by_hand():
    label_fn = lambda t: [] if t == "normal" else t.split()  # a set of positive findings
    train = ["normal", "effusion", "normal", "edema effusion", "normal", ""]
    summ = [{"query": "q", "answer": a} for a in ["normal", "effusion", "edema effusion"]]
    out = ev.majority_baseline(train, {"summarisation": summ}, label_fn)
    assert out["clinical"]["answer"] == ["No Finding"]
    assert out["clinical"]["label_f1"] == pytest.approx(1 / 3) and out["clinical"]["n"] == 3
    assert out["summarisation_label"]["R@1"] == pytest.approx(100 / 3)
    train = ["effusion", "effusion edema", "edema effusion", "normal"]  # {edema, effusion} twice
    out = ev.majority_baseline(train, {"summarisation": summ}, label_fn)
    assert out["clinical"]["answer"] == ["edema", "effusion"]
    assert out["clinical"]["label_f1"] == pytest.approx((0 + 2 / 3 + 1) / 3)


def test_case_files_round_trip(tmp_path, monkeypatch):
    rules = fake_rules()
    for name in ("make_variants", "error_impressions", "near_duplicates"):
        monkeypatch.setattr(cases, name, getattr(rules, name))
    reports = [FakeReport(str(i), f"Left effusion {i}, 5 × 3 cm. No pneumothorax.", f"Effusion {i}.")
               for i in range(6)]
    built = cases.build_text_cases(reports, random.Random(0))
    built["acronym"].append({"query": "Sm L PEx — “quoted”", "answer": "Small left pleural effusion."})
    paths = cases.write_cases_jsonl(built, tmp_path / "cases")
    assert set(paths) == set(built) and all(p.endswith(f"{t}.jsonl") for t, p in paths.items())
    read = {task: cases.read_cases_jsonl(path, task) for task, path in paths.items()}
    assert read == built
    embed = bag_of_words([" ".join(t for cs in built.values() for c in cs for t in c.values() if isinstance(t, str))])
    assert ev.evaluate_text_tasks(embed, read) == ev.evaluate_text_tasks(embed, built)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

def test_write_results(tmp_path):
    results = {"raw": {"image_to_text": {"R@1": 12.3456, "multi_positive": "merged_by_key"},
                       "zero_shot": {"mean_auroc": None}},
               "trained": {"image_to_text": {"R@1": 61.1}, "error": {"n_cases": 200}}}
    json_path, md_path = write_results(results, tmp_path / "out", "small")
    assert json.loads(json_path.read_text()) == results
    assert md_path.read_text().splitlines() == [
        "| model | image_to_text/R@1 | image_to_text/multi_positive | zero_shot/mean_auroc"
        " | error/n_cases |",
        "|---|---|---|---|---|",
        "| raw | 12.35 | merged_by_key | - | - |",
        "| trained | 61.1 | - | - | 200 |"]


# ---------------------------------------------------------------------------------------------
# The command, on what train_text.py and train_clip.py write for configs/tiny.yaml
# ---------------------------------------------------------------------------------------------

TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")
# just enough training to write every file the command reads; the numbers are not the point
QUICK_TEXT = ["text.stages=[contrastive]", "text.contrastive.steps=2", "text.eval_reports=4"]
QUICK_CLIP = ["clip.optim.steps=3", "clip.train_n=32", "clip.val_n=16", "clip.test_n=24",
              "clip.optim.batch_size=8"]


@pytest.fixture(scope="module", autouse=True)
def tokenizer_parsed_once():
    """Rebuilding SmolLM2's tokenizer from its GGUF costs ~3 s of CPU, and every model load below
    does it; the tokenizer is never modified, so the module shares one."""
    import functools
    import encoders
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(encoders, "load_tokenizer", functools.lru_cache(maxsize=None)(load_tokenizer))
        yield


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """out_dir of a tiny stage-1 run, and of stage 2 when train_clip.py exists (else a skip reason)."""
    import train_text
    out = tmp_path_factory.mktemp("tiny")
    train_text.main([TINY, f"out_dir={out}", *QUICK_TEXT])
    try:
        import train_clip
    except ImportError as e:
        return out, f"train_clip.py cannot be imported ({e}): the image side is untested"
    train_clip.main([TINY, f"out_dir={out}", *QUICK_TEXT, *QUICK_CLIP])
    return out, None


def test_command_writes_tables_and_pictures(tiny_run):
    out, clip_skip = tiny_run
    results = ev.main([TINY, f"out_dir={out}", *QUICK_CLIP, "eval.n_boot=20"])
    files = {p.name for p in (out / "eval").iterdir()}
    assert {"results.json", "results.md", "retrieval.html", "retrieval_raw.png",
            "retrieval_trained.png"} <= files
    assert json.loads((out / "eval" / "results.json").read_text())["text"] == results["text"]
    table = (out / "eval" / "results.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    assert rows.count("raw") == 2 and rows.count("trained") == 2  # the headline and error-kind tables
    for name in ("raw", "trained"):
        r = results["text"]["models"][name]
        assert {"acronym", "paraphrase", "summarisation", "summarisation_label", "error", "clinical"} <= set(r)
        assert 0 <= r["clinical"]["label_f1"] <= 1 and r["error"]["n_cases"] > 0
    # the baselines are rows of both tables, beside the encoders, and in results.json
    baselines = results["text"]["baselines"]
    assert set(baselines) == {"baseline: TF-IDF", "baseline: shortest", "baseline: longest",
                              "baseline: fewest findings", "baseline: majority", "chance", "chance among copies"}
    # among the copies of each answer: 1 / (1 + copies), from the cases written out
    for task in ("acronym", "paraphrase"):
        written = [json.loads(line) for line in (out / "eval" / "cases" / f"{task}.jsonl").open()]
        expected = 100 * sum(1 / (1 + len(c["distractors"])) for c in written) / len(written)
        assert baselines["chance among copies"][task]["R@1"] == pytest.approx(expected)
    assert rows.count("baseline: TF-IDF") == 2 and rows.count("baseline: shortest") == 2
    assert rows.count("baseline: majority") == 1 and rows.count("chance") == 1
    assert baselines["chance"]["error"]["top1_accuracy"] == pytest.approx(25)
    n = results["text"]["cases"]["summarisation"]["n"]
    assert 100 / n <= baselines["chance"]["summarisation"]["R@1"] <= 100  # at least one entry in n is a hit
    assert baselines["baseline: TF-IDF"]["acronym"]["n_queries"] == results["text"]["cases"]["acronym"]["n"]
    # the test reports that occur in training were dropped, and the count is written
    overlap = results["text"]["overlap"]["test"]
    assert 0 < overlap["dropped"] < overlap["of"] and f"{overlap['dropped']} of {overlap['of']}" in table
    html = (out / "eval" / "retrieval.html").read_text()
    n_examples = load_config(TINY).eval.n_examples
    assert html.count("<tr>") >= 2 * n_examples  # the sampled queries of both models
    from PIL import Image
    with Image.open(out / "eval" / "retrieval_trained.png") as im:
        assert im.size[0] > 1000 and im.size[1] > 8 * 150
    if clip_skip:
        pytest.skip(clip_skip)
    # the image side: a picture per test style, and the same numbers as train_clip.py's own
    # evaluation of the test split (a separate code path: evaluate_split)
    clip, styles = results["clip"], load_config(TINY).data.test_styles
    assert {f"retrieval_clip_{s}.png" for s in styles} <= files and "data:image/png;base64," in html
    own = json.loads((out / "clip" / "eval.json").read_text())
    for style in styles:
        for direction in ("image_to_text", "text_to_image"):
            for metric in ("R@1", "R@5", "R@10", "mean_rank"):
                assert clip["styles"][style][direction][metric] == pytest.approx(
                    own[f"test/{style}"][direction][metric]), (style, direction, metric)
        assert clip["styles"][style]["image_to_text"]["multi_positive"] == "merged_by_key"
    assert len(clip["zero_shot"]["per_label"]) == 14 and "Multi-positive (text)" in table


def test_command_reads_case_files_and_compares_checkpoints(tiny_run, tmp_path):
    """Prepared cases, whose results follow from the texts alone: a query equal to its answer has
    cosine 1; a wrong impression equal to the true one ties it, and ties count as losses."""
    out, _ = tiny_run
    files = {
        # the key makes "Cardiomegaly." the same gallery entry as "Small left effusion." (its first
        # answer): query 2 finds it at rank 1, but its labels differ from the true answer's
        "summarisation": [{"query": "Small left effusion.", "answer": "Small left effusion.", "key": "a"},
                          {"query": "Small left effusion.", "answer": "Cardiomegaly.", "key": "a"},
                          {"query": "No pneumothorax.", "answer": "No pneumothorax."}],
        "error": [{"findings": "Left effusion.", "impression": "Left effusion.",
                   "wrong": ["Right effusion.", "No effusion.", "Left pneumothorax."],
                   "kinds": ["laterality", "false_negation", "false_finding"]},
                  {"findings": "Clear lungs.", "impression": "Clear lungs.",
                   "wrong": ["Clear lungs.", "Edema.", "Consolidation."]}],
        "acronym": [{"query": "No PTX.", "answer": "No PTX."}, {"query": "CHF.", "answer": "CHF."}],
        "paraphrase": [{"query": "Lungs are clear.", "answer": "Lungs are clear."},
                       {"query": "Heart is normal.", "answer": "Heart is normal."}]}
    overrides = []
    for task, task_cases in files.items():
        path = tmp_path / f"{task}.jsonl"
        path.write_text("".join(json.dumps(c) + "\n" for c in task_cases))
        overrides.append(f"eval.cases.{task}={path}")
    # two checkpoints in one call: a raw model and a run given by its folder
    models = f"eval.models=[raw_bidirectional,{out / 'text'}]"
    results = ev.main([TINY, f"out_dir={tmp_path / 'run'}", models, *overrides])
    assert "skipped" in results["clip"]  # this out_dir has no clip/
    assert results["text"]["cases"]["error"] == {"n": 2, "from": str(tmp_path / "error.jsonl")}
    for name in ("raw_bidirectional", str(out / "text")):
        r = results["text"]["models"][name]
        assert r["error"]["top1_accuracy"] == 50 and r["error"]["chance"] == 25
        assert r["error"]["per_kind"]["laterality"] == {"pairwise_accuracy": 100, "n": 1}
        assert r["acronym"]["R@1"] == 100 and r["paraphrase"]["R@1"] == 100
        assert r["summarisation"]["R@1"] == 100 and r["summarisation"]["n_queries"] == 3
        # label F1 of each top-1 report against the true answer: {Pleural Effusion} both (1),
        # {Pleural Effusion} vs {Cardiomegaly} (0), {No Finding} both (1)
        # chance, a random gallery entry of the two ({Pleural Effusion}, {No Finding}): 1/2, 0, 1/2
        assert r["clinical"] == {"label_f1": pytest.approx(2 / 3), "n": 3, "chance": pytest.approx(1 / 3)}
    table = (tmp_path / "run" / "eval" / "results.md").read_text()
    assert f"| {out / 'text'} |" in table and "| raw_bidirectional |" in table


def test_command_writes_the_cases_it_used(tiny_run, tmp_path):
    """out_dir/eval/cases/{task}.jsonl: read back as eval.cases, they give the same numbers."""
    out, _ = tiny_run
    first = ev.main([TINY, f"out_dir={tmp_path / 'a'}", "eval.models=[raw]"])
    folder = tmp_path / "a" / "eval" / "cases"
    assert {p.name for p in folder.iterdir()} == {f"{task}.jsonl" for task in cases.CASE_KEYS}
    for task in cases.CASE_KEYS:
        assert len(cases.read_cases_jsonl(folder / f"{task}.jsonl", task)) == first["text"]["cases"][task]["n"] > 0
    files = [f"eval.cases.{task}={folder / f'{task}.jsonl'}" for task in cases.CASE_KEYS]
    again = ev.main([TINY, f"out_dir={tmp_path / 'b'}", "eval.models=[raw]", *files])
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert drop(again["text"]["models"]["raw"]) == drop(first["text"]["models"]["raw"])
    assert again["text"]["baselines"] == first["text"]["baselines"]


def test_command_names_bad_settings(tmp_path):
    with pytest.raises(FileNotFoundError, match="'nonsense'"):
        ev.main([TINY, f"out_dir={tmp_path}", "eval.models=[raw,nonsense]"])
    with pytest.raises(FileNotFoundError, match="run train_text.py"):
        ev.main([TINY, f"out_dir={tmp_path}"])  # "trained", but nothing trained here
    with pytest.raises(ValueError, match="unknown task 'summary'"):
        ev.main([TINY, f"out_dir={tmp_path}", "eval.models=[raw]", f"eval.cases.summary={TINY}"])
    with pytest.raises(ValueError, match="eval.merge"):
        ev.main([TINY, f"out_dir={tmp_path}", "eval.models=[raw]", "eval.merge=fuzzy"])


def test_embed_each_once_equals_plain_embed():
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return torch.tensor([[len(t), t.count("a")] for t in texts], dtype=torch.float)
    cached = embed_each_once(embed, "test", batch_size=2)
    texts = ["bbb", "a", "aa", "a", "bbb"]
    assert torch.equal(cached(texts), embed(texts))
    assert calls[:-1] == [["a", "aa"], ["bbb"]]  # each distinct text once, shortest first
    assert torch.equal(cached(["aa", "a"]), embed(["aa", "a"])) and len(calls) == 4  # all cached
