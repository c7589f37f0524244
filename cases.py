"""The cases of the report-understanding tasks (Ko et al. 2025, arXiv 2509.15234, sec. 3): built from
held-out reports with variants.py's rewrites and errors, or read from JSONL files you prepared.
evaluate.py scores them.

- acronym: an abbreviated report -> its expanded text (Recall@k over all expanded texts);
- paraphrase: a restyled report -> the report;
- summarisation: findings -> the impression;
- error: findings -> {the true impression, three impressions with one injected error each}.
"""
import json

from reports import normalize_for_match
from variants import ERROR_KINDS, inject_error, make_variants

RETRIEVAL_TASKS = ("acronym", "paraphrase", "summarisation")
CASE_KEYS = {**{t: ("query", "answer") for t in RETRIEVAL_TASKS},
             "error": ("findings", "impression", "wrong")}
# variants that restyle a report; "abbreviated" and "expanded" are the acronym task's
PARAPHRASE_STYLES = ("shuffled", "omit_normal", "partitioned", "impression_only")


def _error_impressions(impression, rng, n=3):
    """n impressions with one injected error each, of different kinds where enough kinds apply."""
    kinds = list(ERROR_KINDS)
    rng.shuffle(kinds)
    seen, wrong, used = {normalize_for_match(impression)}, [], []
    for kind in kinds + kinds:  # the second pass repeats kinds when fewer than n apply
        text = inject_error(impression, kind, rng)
        if text and normalize_for_match(text) not in seen:
            seen.add(normalize_for_match(text))
            wrong.append(text)
            used.append(kind)
            if len(wrong) == n:
                return wrong, used
    return None


def build_text_cases(reports, rng, n=None):
    """Cases for every text task from reports.Report objects (real or synthetic), using variants.py's
    variants and errors. rng: the generator make_variants takes (numpy's or random.Random:
    only shuffle and choice are used here). Returns
    {task: [case, ...]} in the same format as read_cases_jsonl; retrieval cases carry a "key"
    (the normalised answer) so that identical answers are merged."""
    reports = list(reports)
    if n is not None and n < len(reports):
        rng.shuffle(reports)
        reports = reports[:n]
    case = lambda q, a: {"query": q, "answer": a, "key": normalize_for_match(a)}
    cases = {task: [] for task in CASE_KEYS}
    for report in reports:
        variants = make_variants(report, rng)
        # make_variants leaves out "expanded" when it equals the report (no abbreviations to expand)
        expanded = variants.get("expanded") or report.text()
        if variants.get("abbreviated") and variants["abbreviated"] != expanded:  # else nothing to understand
            cases["acronym"].append(case(variants["abbreviated"], expanded))
        styles = [s for s in PARAPHRASE_STYLES if variants.get(s) and variants[s] != report.text()]
        if styles:
            cases["paraphrase"].append(case(variants[rng.choice(styles)], report.text()))
        if report.findings and report.impression:
            cases["summarisation"].append(case(report.findings, report.impression))
            errors = _error_impressions(report.impression, rng)
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
