"""The cases of the report-understanding tasks (Ko et al. 2025, arXiv 2509.15234, sec. 3): built from
held-out reports with variants.py's rewrites and errors, or read from JSONL files you prepared;
evaluate.py scores those of cases_for_config (built from the test split, or your eval.cases files) and
writes the cases it used back out (write_cases_jsonl).

- acronym: an abbreviated report -> its expanded text (Recall@k over all expanded texts and their copies);
- paraphrase: a reordered or partitioned and reworded report -> the report (the same gallery);
- summarisation: findings -> the impression;
- error: findings -> {the true impression, three impressions with one injected error each}.

The rewrites and error wordings are variants.py's held-out 'eval' family (reports.rule_family): stage 1
trains on the 'train' abbreviations, wordings and error wordings only, so acronym and paraphrase grade
understanding, not the inversion of rules seen in training. Their galleries hold, beside every answer, up
to three wrong copies of it changed only where the query was rewritten (near_duplicates: 'No focal
consol.' -> 'No focal consolidation.' beside 'No focal atelectasis.'): the words the query shares with
its answer find the copies, and only reading the abbreviation or the reworded phrase finds the answer
among them. A bag of words scores about 1 / (1 + copies) there ("chance_among_copies"); reports that
allow no such copy are left out. Wrong impressions are edited in place and keep the true one's length, and
the findings contradict each of them (variants.contradicted: 'Cardiomegaly' -> 'Mild cardiomegaly' beside
'The heart is enlarged' is no error a reader of the findings can find). For abnormal impressions they
remove or change findings before adding one (at least one does), and normal impressions (whose errors can
only add a finding) make at most NORMAL_SHARE of the cases, so that neither length nor the number of
findings tells the true impression apart. Read every task beside its baseline rows all the same.
"""
import json
import math
import os
import random
from collections import Counter

from reports import idf_weights, normalize_for_match, normalize_report, positive_findings, word_tokens
from runtime import atomic_write
from variants import changed_words, error_impressions, make_variants, reword, unseen_edits

RETRIEVAL_TASKS = ("acronym", "paraphrase", "summarisation")
CASE_KEYS = {**{t: ("query", "answer") for t in RETRIEVAL_TASKS},
             "error": ("findings", "impression", "wrong")}
# variants that restyle a report without leaving anything out ("abbreviated" and "expanded" are the acronym
# task's); a paraphrase query is reworded on top by the eval family's wording rules. ("impression only" and
# "omit normal" queries are not used: they fit many reports, and a copy of the answer changed where the query
# is silent would be as right as the answer.)
PARAPHRASE_STYLES = ("shuffled", "partitioned", "paraphrased")
REWORDINGS = 3  # rewordings tried per style, for one whose rewritten words allow a near-duplicate
DISTRACTORS = 3  # near-duplicates of each acronym / paraphrase answer added to the gallery
FAMILY = "eval"  # the rules of the cases: never those that make stage 1's training variants
NORMAL_SHARE = 0.2  # the most of the error cases that normal impressions may make (their errors all add a finding)


def build_text_cases(reports, rng, n=None, dropped=None, weights=None):
    """Cases for every text task from reports.Report objects (real or synthetic), with variants.py's
    rewrites and errors of the 'eval' family. rng: the generator make_variants takes (numpy's or
    random.Random: only shuffle and choice are used here). Returns {task: [case, ...]} in the format
    of read_cases_jsonl: retrieval cases carry a "key" (the normalised answer) so that identical
    answers are merged; acronym and paraphrase cases their "distractors" (near_duplicates), paraphrase
    cases their "style" and the wording "rules" used, error cases the "kinds" of their wrong impressions
    and the observation each "changed". dropped, a dict, receives per task the number of reports left
    out because no near-duplicate could be made (nothing in the query a bag of words cannot match).
    weights: {word: idf} that near_duplicates balances by (evaluate.py: the training reports', as its
    TF-IDF baseline); default: those of these reports."""
    reports = list(reports)
    if n is not None and n < len(reports):
        rng.shuffle(reports)
        reports = reports[:n]
    dropped = {} if dropped is None else dropped
    weights = weights or idf_weights([r.text() for r in reports])
    near_counts = {"acronym": {}, "paraphrase": {}}  # how near_duplicates balanced each task so far
    case = lambda q, a: {"query": q, "answer": a, "key": normalize_for_match(a)}
    cases = {task: [] for task in CASE_KEYS}
    with_pair = [r for r in reports if r.findings and r.impression]
    counts = {}  # kinds (and lengths) of the wrong impressions so far, which error_impressions balances
    error_rng = random.Random(rng.random())  # a stream of their own: the error cases change none of the others
    for report in reports:
        variants = make_variants(report, rng, family=FAMILY)
        # make_variants leaves out "expanded" when it equals the report (no abbreviations to expand)
        expanded = normalize_report(variants.get("expanded") or report.text())
        if variants.get("abbreviated") and normalize_for_match(variants["abbreviated"]) != normalize_for_match(expanded):
            near = near_duplicates(expanded, variants["abbreviated"], rng, weights, near_counts["acronym"])
            if near:
                cases["acronym"].append(case(variants["abbreviated"], expanded) | {"distractors": near})
            else:
                dropped["acronym"] = dropped.get("acronym", 0) + 1
        # a restyled report reworded on top ("paraphrased": the report itself), recording the rules used
        text = normalize_report(report.text())
        styles = [s for s in PARAPHRASE_STYLES if variants.get(s) and variants[s] != text]
        rng.shuffle(styles)
        for style in [s for s in styles for _ in range(REWORDINGS)]:
            query, rules = reword(text if style == "paraphrased" else variants[style], rng, FAMILY, share=1.0)
            near = near_duplicates(text, query, rng, weights, near_counts["paraphrase"]) if rules else []
            if near:
                cases["paraphrase"].append(case(query, text) | {"style": style, "rules": rules, "distractors": near})
                break
        else:
            dropped["paraphrase"] = dropped.get("paraphrase", 0) + 1
        if report.findings and report.impression:
            cases["summarisation"].append(case(report.findings, report.impression))
    made = {False: 0, True: 0}  # error cases of abnormal | normal impressions; abnormal ones first, which cap the rest
    for normal, report in sorted(((not positive_findings(r.impression), r) for r in with_pair), key=lambda p: p[0]):
        if normal and made[True] + 1 > NORMAL_SHARE / (1 - NORMAL_SHARE) * made[False]:
            break
        errors = error_impressions(report.impression, error_rng, n=3, family=FAMILY, counts=counts,
                                   findings=report.findings)
        if errors:
            made[normal] += 1
            cases["error"].append({"findings": report.findings, "impression": report.impression,
                                   "wrong": errors[0], "kinds": errors[1], "changed": errors[2]})
    return cases


def near_duplicates(answer, query, rng, weights, counts, n=DISTRACTORS):
    """Up to n wrong copies of the answer that differ from it only in words the query does not contain
    (variants.unseen_edits, 'eval' family: a term swapped for another of its kind, or one error). A bag of words
    then scores the answer and its copies by their norms alone, so the copies are balanced by that too:
    weights ({word: idf}, reports.idf_weights) give each text's norm, and counts (shared across a case set:
    (m, k) -> cases with m copies of which k are lighter than the answer) spread k evenly, so that "pick
    the copy with the commonest words" finds the answer 1 / (m + 1) of the time; while it is ahead of that
    on the set, a case must have a lighter copy, or it gets none. Among the copies that fit, other changed
    words and other kinds come first. [] when none can be made."""
    norm = lambda text: math.sqrt(sum((c * weights.get(w, 0.0)) ** 2 for w, c in Counter(word_tokens(text)).items()))
    options = unseen_edits(answer, query, rng, FAMILY, n_errors=4 * n)
    rng.shuffle(options)
    limit = norm(answer)  # a copy at most this heavy is ranked at or above the answer: a tie is lost
    unique = {normalize_for_match(c): (c, kind, norm(c) <= limit, changed_words(answer, c)) for c, kind in options}
    options = [o for key, o in unique.items() if key != normalize_for_match(answer)]
    ahead = counts.get("ahead", 0.0)  # how far above chance "commonest words" is on the cases so far
    for m in range(min(n, len(options)), 0, -1):
        for k in sorted(range(ahead > 0, m + 1), key=lambda k: (counts.get((m, k), 0), rng.random())):
            left, picked, used, kinds = {True: k, False: m - k}, [], set(), Counter()
            rest = list(options)
            while rest and len(picked) < m:  # other words and other kinds first: three edits, not three sizes of one
                option = min(rest, key=lambda o: (o[3] in used, kinds[o[1]]))
                rest.remove(option)
                copy, kind, lighter, changed = option
                if left[lighter]:
                    left[lighter] -= 1
                    picked.append(copy)
                    used.add(changed)
                    kinds[kind] += 1
            if len(picked) == m:
                counts[m, k] = counts.get((m, k), 0) + 1
                counts["ahead"] = ahead + (k == 0) - 1 / (m + 1)
                return picked
    return []


def cases_for_config(cfg, reports):
    """{task: [case]} from the test split of data.source (eval.max_reports of them, 0 = all; reports:
    data.load_reports), each task replaced by its eval.cases file where given; and {task: where its
    cases came from}."""
    cases = {task: [] for task in CASE_KEYS}
    source = f"the {cfg.data.source} test split"
    if set(cfg.eval.cases) != set(CASE_KEYS):
        dropped, test = {}, reports["test"]
        cases = build_text_cases(test, random.Random(cfg.seed), cfg.eval.max_reports or None, dropped,
                                 weights=idf_weights([r.text() for r in reports["train"]]))
        source += f" ({min(len(test), cfg.eval.max_reports or len(test))} reports"
        source += "".join(f"; {task}: {k} without a near-duplicate left out" for task, k in dropped.items()) + ")"
    for task, path in cfg.eval.cases.items():
        cases[task] = read_cases_jsonl(path, task)
    return cases, {task: cfg.eval.cases.get(task, source) for task in cases}


def read_cases_jsonl(path, task):
    """Prepared cases for one task, one JSON object a line: {"query", "answer", optional "key" (answers
    with one key are one gallery entry), optional "other_keys" (keys of other answers that are correct
    too), optional "distractors" (wrong texts added to the gallery)} for the retrieval tasks,
    {"findings", "impression", "wrong": [...], optional "kinds"} for
    "error". Other fields are kept. Malformed input raises ValueError naming the line."""
    if task not in CASE_KEYS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(CASE_KEYS)}")
    cases = []
    with open(path, encoding="utf-8") as f:
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
            if not isinstance(c.get("other_keys", []), list):
                raise ValueError(f"{where}: 'other_keys' must be a list of answer keys")
            near = c.get("distractors", [])
            if not isinstance(near, list) or not all(isinstance(d, str) for d in near):
                raise ValueError(f"{where}: 'distractors' must be a list of texts")
            cases.append(c)
    return cases


def write_cases_jsonl(cases, folder):
    """{task: [case]} as folder/{task}.jsonl, the format read_cases_jsonl reads (and eval.cases.{task}
    takes): to inspect the cases, reuse them, or score them with another system. Returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for task, task_cases in cases.items():
        paths[task] = os.path.join(folder, f"{task}.jsonl")
        def write(path, lines="".join(json.dumps(c, ensure_ascii=False) + "\n" for c in task_cases)):
            with open(path, "w", encoding="utf-8") as f:
                f.write(lines)
        atomic_write(paths[task], write)
    return paths
