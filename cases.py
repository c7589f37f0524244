"""The cases of the report-understanding tasks (Ko et al. 2025, arXiv 2509.15234, sec. 3): built from
held-out reports with variants.py's rewrites and errors, or read from JSONL files you prepared;
evaluate.py scores those of cases_for_config (built from the test split, or your eval.cases files) and
writes the cases it used back out (write_cases_jsonl).

- acronym: an abbreviated report -> its expanded text (Recall@k over all expanded texts);
- paraphrase: a restyled and reworded report -> the report;
- summarisation: findings -> the impression;
- error: findings -> {the true impression, three impressions with one injected error each}.

The rewrites and error wordings are variants.py's held-out 'eval' family (reports.rule_family): stage 1
trains on the 'train' abbreviations, wordings and error wordings only, so acronym and paraphrase grade
understanding, not the inversion of rules seen in training. Wrong impressions are edited in place and keep
the true one's length; for abnormal impressions they remove or change findings before adding one, and
normal impressions (whose errors can only add a finding) are capped, so that neither length nor the number
of findings tells the true impression apart. Read every task beside its baseline rows all the same.
"""
import json
import os
import random

from reports import normalize_for_match, positive_findings
from runtime import atomic_write
from variants import error_impressions, make_variants, reword

RETRIEVAL_TASKS = ("acronym", "paraphrase", "summarisation")
CASE_KEYS = {**{t: ("query", "answer") for t in RETRIEVAL_TASKS},
             "error": ("findings", "impression", "wrong")}
# variants that restyle a report ("abbreviated" and "expanded" are the acronym task's); a paraphrase query
# is reworded on top by the eval family's wording rules wherever one applies (on Open-I: about 60 %)
PARAPHRASE_STYLES = ("shuffled", "omit_normal", "partitioned", "impression_only", "paraphrased")
FAMILY = "eval"  # the rules of the cases: never those that make stage 1's training variants
NORMAL_SHARE = 0.2  # about the most error cases with a normal impression may make (its errors all add a finding)


def build_text_cases(reports, rng, n=None):
    """Cases for every text task from reports.Report objects (real or synthetic), with variants.py's
    rewrites and errors of the 'eval' family. rng: the generator make_variants takes (numpy's or
    random.Random: only shuffle and choice are used here). Returns {task: [case, ...]} in the format
    of read_cases_jsonl: retrieval cases carry a "key" (the normalised answer) so that identical
    answers are merged, paraphrase cases their "style", the wording "rules" used and "other_keys"
    (below), error cases the "kinds" of their wrong impressions and the observation each "changed"."""
    reports = list(reports)
    if n is not None and n < len(reports):
        rng.shuffle(reports)
        reports = reports[:n]
    case = lambda q, a: {"query": q, "answer": a, "key": normalize_for_match(a)}
    cases = {task: [] for task in CASE_KEYS}
    all_variants = [make_variants(report, rng, family=FAMILY) for report in reports]
    # A paraphrase that leaves content out rewrites several reports equally well: "impression only"
    # every report with that impression, "omit normal" every report with those abnormal sentences.
    # All of them are correct answers ("other_keys"), or "No acute disease." would have one right
    # answer among fifty equally right ones.
    content = lambda report, variants, style: normalize_for_match(
        report.impression if style == "impression_only" else variants[style])
    rewrites = {}  # (style, content) -> keys of the reports it rewrites
    for report, variants in zip(reports, all_variants):
        for style in PARAPHRASE_STYLES:
            if variants.get(style):
                rewrites.setdefault((style, content(report, variants, style)), set()).add(
                    normalize_for_match(report.text()))
    normal = lambda report: not positive_findings(report.impression)
    with_pair = [r for r in reports if r.findings and r.impression]
    normal_left = int(NORMAL_SHARE / (1 - NORMAL_SHARE) * sum(not normal(r) for r in with_pair))
    counts = {}  # kinds (and lengths) of the wrong impressions so far, which error_impressions balances
    for report, variants in zip(reports, all_variants):
        # make_variants leaves out "expanded" when it equals the report (no abbreviations to expand)
        expanded = variants.get("expanded") or report.text()
        if variants.get("abbreviated") and variants["abbreviated"] != expanded:  # else nothing to understand
            cases["acronym"].append(case(variants["abbreviated"], expanded))
        # each restyled report reworded on top ("paraphrased": the report itself), recording the rules used
        reworded = {s: reword(report.text() if s == "paraphrased" else variants[s], rng, FAMILY)
                    for s in PARAPHRASE_STYLES if variants.get(s) and variants[s] != report.text()}
        styles = [s for s, (query, rules) in reworded.items() if rules or s != "paraphrased"]
        if styles:
            style = rng.choice(styles)
            query, rules = reworded[style]
            c = case(query, report.text()) | {"style": style, "rules": rules}
            c["other_keys"] = sorted(rewrites[style, content(report, variants, style)] - {c["key"]})
            cases["paraphrase"].append(c)
        if report.findings and report.impression:
            cases["summarisation"].append(case(report.findings, report.impression))
            if normal(report):
                if normal_left == 0:
                    continue
                normal_left -= 1
            errors = error_impressions(report.impression, rng, n=3, family=FAMILY, counts=counts)
            if errors:
                cases["error"].append({"findings": report.findings, "impression": report.impression,
                                       "wrong": errors[0], "kinds": errors[1], "changed": errors[2]})
    return cases


def cases_for_config(cfg, reports):
    """{task: [case]} from the test split of data.source (eval.max_reports of them, 0 = all; reports:
    data.load_reports), each task replaced by its eval.cases file where given; and {task: where its
    cases came from}."""
    cases = {task: [] for task in CASE_KEYS}
    source = f"the {cfg.data.source} test split"
    if set(cfg.eval.cases) != set(CASE_KEYS):
        reports = reports["test"]
        cases = build_text_cases(reports, random.Random(cfg.seed), cfg.eval.max_reports or None)
        source += f" ({min(len(reports), cfg.eval.max_reports or len(reports))} reports)"
    for task, path in cfg.eval.cases.items():
        cases[task] = read_cases_jsonl(path, task)
    return cases, {task: cfg.eval.cases.get(task, source) for task in cases}


def read_cases_jsonl(path, task):
    """Prepared cases for one task, one JSON object a line: {"query", "answer", optional "key" (answers
    with one key are one gallery entry), optional "other_keys" (keys of other answers that are correct
    too)} for the retrieval tasks, {"findings", "impression", "wrong": [...], optional "kinds"} for
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
