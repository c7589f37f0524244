"""Report variants and error injection: the data of stage 1's contrastive step and of the evaluation's
text tasks (Ko et al. 2025, arXiv 2509.15234, sec. 2 and 3; LLM2Vec's supervised step, arXiv 2404.05961,
sec. 2.2).

- `make_variants(report, rng, family="train")`: clinically equivalent rewrites of a report (positives):
  abbreviated, expanded, sentences shuffled, normal sentences omitted, partitioned by anatomy, impression
  only, paraphrased (wording rules: synonyms, voice, sentences merged or split).
- `inject_error(text, kind, rng, family="train")`: a copy with one clinically significant error, edited in
  place and of about the same length (hard negatives): laterality, severity, false negation (either way),
  false finding, measurement, device.
- `error_impressions(impression, rng, family="eval")`: the wrong candidates of the error-discrimination task.
- `reword(text, rng, family)`: the wording rules alone, with the keys of those used.
- `unseen_edits(text, rewrite, rng, family)`: copies of text changed only in words its rewrite does not hold
  (a term swapped for another of its kind, or an error): hard negatives that only reading the rewritten
  words tells from the text.

Every abbreviation, wording rule and error wording belongs to a family, 'train' or 'eval' (reports.rule_family,
a hash of its key): training draws on one, the evaluation on the other, so an encoder is never graded on
the very rules it was trained to invert. The tables live in phrasings.py, the abbreviations in reports.py.

    make_variants(report, random.Random(0))  # {'abbreviated': ..., 'paraphrased': ..., ...}
    inject_error("Small left pleural effusion.", "laterality", random.Random(0))  # 'Small right pleural effusion.'
"""
import functools
import random
import re
from collections import Counter

from phrasings import (CONFUSABLE, DEVICE_MOVES, DEVICE_SENTENCES, MERGES, NEGATED, PARTITION_ORDER, POSITIVE,
                       REGIONS, SEVERITY_ADDED, SEVERITY_SWAP, SWAP_SIDE, WORDINGS)
from reports import (CHEXPERT_LABELS, LABEL_HEADER_RE, MEASURE, Report, abbreviate, any_of, cap_like,
                     expand_abbreviations, extract_attributes, label_report, mentions, normalize_for_match,
                     normalize_report, positive_findings, rule_family, sentences, word_tokens)

# ---------------------------------------------------------------------------------------------
# Clinically equivalent variants (positives)
# ---------------------------------------------------------------------------------------------

_REGION_RE = re.compile(r"\b(?:" + "|".join(f"(?P<r{i}>{p})" for i, (_, p) in enumerate(REGIONS)) + r")\b", re.I)
_NORMAL_CUE = re.compile(r"(?i)\b(?:no|normal|clear|unremarkable|intact|negative|within\s+normal\s+limits|free\s+of"
                         r"|without)\b")
_WORDINGS = [(key, re.compile(pattern, re.I), new) for key, pattern, new in WORDINGS]
_MERGES = [(key, re.compile(pattern), new) for key, pattern, new in MERGES]


def _section_sentences(report: Report) -> list[tuple[str, list[str]]]:
    """[(header, sentences)] of a report, list numbers ('1.', '2)') removed so that order can change."""
    out = []
    for header, body in (("FINDINGS", report.findings), ("IMPRESSION", report.impression)):
        body = re.sub(r"(?:^|(?<=[.:]\s))\d{1,2}[.)]\s+", "", normalize_report(body))
        if body:  # every sentence closed, so that a moved sentence does not run into the next
            out.append((header, [x if x[-1] in ".!?" else x + "." for x in sentences(body)]))
    return out


def _join(sections) -> str:
    return " ".join(f"{h}: {' '.join(s)}" for h, s in sections if s)


def _is_normal(sentence: str) -> bool:
    """A sentence that states only normal / negative things (nothing positive, uncertain or other)."""
    labels = [label for _, label, *_ in mentions(sentence)]
    return all(label == 0 for label in labels) and (bool(labels) or bool(_NORMAL_CUE.search(sentence)))


def _as_random(rng) -> random.Random:
    """A random.Random as it is; a numpy Generator seeds one from its own stream (either may be passed)."""
    return rng if isinstance(rng, random.Random) else random.Random(int(rng.integers(1 << 62)))


def _header(sentence):
    """'IMPRESSION: ' when the sentence opens a section, so that an edit keeps the section."""
    m = LABEL_HEADER_RE.match(sentence)
    return m.group() + " " if m else ""


def _lower_first(s):
    """s with its first word in lower case, unless it is an acronym ('Mild ...' -> 'mild ...', 'PICC' stays)."""
    return s[:1].lower() + s[1:] if s[1:2].islower() else s


def reword(text: str, rng, family: str = "train", share: float = 0.5) -> tuple[str, list[str]]:
    """text with the wording rules of one family: perhaps two negations merged, then each sentence
    rewritten by one of its rules with probability `share`, at least one rule where any applies. Returns
    (the text, the keys of the rules used)."""
    rng, used = _as_random(rng), []
    merges = [(k, p, new) for k, p, new in _MERGES if rule_family(k) == family and p.search(text)]
    merged = None
    if merges and rng.random() < 0.5:
        key, pattern, new = rng.choice(merges)
        m = pattern.search(text)
        merged = m.expand(new)  # a merged sentence is not split again
        text, used = text[:m.start()] + merged + text[m.end():], [key]
    sents = sentences(text)
    # the sentence's first word in lower case, so that a rule may move it ('No X.' -> 'X is not seen.')
    bodies = [_lower_first(s[len(_header(s)):]) for s in sents]
    rules = [[r for r in _WORDINGS if rule_family(r[0]) == family and r[1].search(b)]
             if s[len(_header(s)):] != merged else [] for s, b in zip(sents, bodies)]
    chosen = [rng.choice(r) if r and rng.random() < share else None for r in rules]
    if not used and not any(chosen) and any(rules):
        i = rng.choice([i for i, r in enumerate(rules) if r])
        chosen[i] = rng.choice(rules[i])
    used += [rule[0] for rule in chosen if rule]
    return " ".join(_header(s) + cap_like(rule[1].sub(rule[2], body, count=1), True) if rule else s
                    for s, body, rule in zip(sents, bodies, chosen)), used


def make_variants(report: Report, rng: random.Random, family: str = "train") -> dict[str, str]:
    """Clinically equivalent rewrites of a report in the styles of the paper (stage 1.4), with the
    abbreviations and wording rules of one family (training: 'train'): abbreviated, expanded,
    impression_only, shuffled (within a section), omit_normal (normal/negative sentences dropped, all
    abnormal ones kept), partitioned (sentences grouped by anatomy) and paraphrased (wording rules on
    the report or its shuffled form). A style that does not apply, or that would give back the report
    unchanged, is left out."""
    rng, sections = _as_random(rng), _section_sentences(report)
    text = _join(sections)
    out = {"abbreviated": abbreviate(text, family), "expanded": expand_abbreviations(text)}
    if report.findings and report.impression:
        out["impression_only"] = normalize_report(report.impression)
    shuffled = []
    for h, s in sections:
        perm = s[:]
        for _ in range(10):  # draw again until the order changes, when it can
            rng.shuffle(perm)
            if perm != s or len(set(s)) < 2:
                break
        shuffled.append((h, perm))
    out["shuffled"] = _join(shuffled)
    kept = [(h, [x for x in s if not _is_normal(x)]) for h, s in sections]
    if any(kept_s for _, kept_s in kept):
        out["omit_normal"] = _join(kept)
    groups, seen = {}, set()
    for _, s in sections:
        for x in s:
            if normalize_for_match(x) not in seen:
                seen.add(normalize_for_match(x))
                m = _REGION_RE.search(expand_abbreviations(x))
                region = REGIONS[int(m.lastgroup[1:])][0] if m else "Other"
                groups.setdefault(region, []).append(x)
    out["partitioned"] = " ".join(f"{r}: {' '.join(groups[r])}" for r in PARTITION_ORDER if r in groups)
    reworded, rules = reword(rng.choice([text, out["shuffled"]]), rng, family)
    out["paraphrased"] = reworded if rules else ""  # not a mere reordering
    key = normalize_for_match(text)
    return {k: v for k, v in out.items() if v and normalize_for_match(v) != key}


# ---------------------------------------------------------------------------------------------
# One clinically significant error (hard negatives, the error task)
# ---------------------------------------------------------------------------------------------

# The kinds of the paper's error discrimination. Each edit is made in place of a sentence or a word, never
# appended, and keeps the text within LENGTH_TOLERANCE of its length: length must not give the error away.
ERROR_KINDS = ["laterality", "severity", "false_negation", "false_finding", "measurement", "device"]
ADDING_KINDS = {"false_finding", "device"}  # they can only add a finding; the others also remove or change one
LENGTH_TOLERANCE = 0.2
_SIDE_RE = re.compile(r"\b(?i:left|right|bilateral)\b|\b(?:LLL|RLL|LUL|RUL)\b|(?<![\w/-])[LR](?![\w/-])")
_SEVERITY_RE = re.compile(rf"(?i)\b(?:{any_of(SEVERITY_SWAP)})\b")
_DEVICE_MOVE_RE = re.compile(rf"(?i)\b(?:{any_of(DEVICE_MOVES)})\b")
# Words before a finding that a denial drops ('Stable mild cardiomegaly' -> 'No cardiomegaly') or a severity
# replaces ('Stable cardiomegaly' -> 'Severe cardiomegaly').
_MODIFIERS = re.compile(r"(?i)^(?P<there>there\s+(?:is|are)\s+(?:an?\s+)?)?(?:(?:stable|unchanged|persistent|new|again"
                        r"|increased|decreased|increasing|decreasing|worsening|improving|improved|interval|minimal"
                        r"|mild|mildly|small|tiny|trace|moderate|moderately|large|severe|marked|markedly|massive"
                        r"|extensive|slight|slightly|patchy|focal|subtle|few|several|multiple|scattered|multifocal"
                        r"|diffuse|very),?\s+)*")
# A statement that the whole study is normal: a finding put in a report must replace it, not stand beside it.
_GLOBAL_NORMAL = re.compile(r"(?i)\b(?:no|negative\s+for)\s+(?:\w+\s+){0,2}?(?:acute|active)\b"
                            r"|\b(?:normal|negative)\s+(?:chest|study|exam|radiograph)")


def _opens_with(sentence, observations):
    """Whether the sentence opens with a positive mention of one of the observations (at most three words
    before it): where 'No' or a severity can go and still read as a radiologist's sentence."""
    text = expand_abbreviations(sentence).lower()
    return any(o in observations and label == 1 and text.startswith(clause.strip()[:12])
               and len(clause[:start].split()) <= 3 for o, label, clause, start, _ in mentions(sentence))


def _of(family, keys):
    """The keys (wordings, 'word -> replacement' rules) of one family."""
    return [k for k in keys if rule_family(k) == family]


def _sub_at(s, m, new):
    """s with the match m replaced by new, in the case of the word it replaces (Left -> Right, LLL -> RLL)."""
    old = m.group()
    if old.isupper() and len(old) > 1 and " " not in new:
        new = new.upper()
    return s[:m.start()] + cap_like(new, old[:1].isupper() and not old.isupper()) + s[m.end():]


def _fill(template, rng):
    """A wording filled in with a random side, size, degree and measurement."""
    side, size, degree = rng.choice(["left", "right"]), rng.choice(["small", "moderate", "large"]), \
        rng.choice(["mild", "moderate", "severe"])
    return template.format(side=side, Side=side.capitalize(), size=size, Size=size.capitalize(), degree=degree,
                           Degree=degree.capitalize(), mm=rng.choice([6, 8, 12, 15]))


def _new_measure(m, rng):
    """Twice, half, or the other unit (5 mm -> 5 cm): the measurement errors radiologists make."""
    value, unit, how = float(m.group(1)), m.group(2), rng.choice(["double", "half", "unit"])
    if how == "unit":
        return f"{m.group(1)} {'mm' if unit == 'cm' else 'cm'}"
    return f"{value * 2 if how == 'double' else value / 2:g} {unit}"


def _swaps(s, regex, table, family):
    """s with one matched word replaced by each of its replacements of the family (rules keyed 'word -> new')."""
    out = []
    for m in regex.finditer(s):
        word = " ".join(m.group().lower().split())
        keys = _of(family, [f"{word} -> {new}" for new in table[word].split("|")])
        out += [_sub_at(s, m, key.split(" -> ", 1)[1]) for key in keys]
    return out


def _candidates(sents, kind, rng, family):
    """[(sentences with one edit of `kind`, the observation it is meant to change or None)]."""
    found = [{o for o, label, *_ in mentions(s) if label} for s in sents]  # positive/uncertain, 'Other' too
    labels = label_report(" ".join(sents))
    normal = [i for i, s in enumerate(sents) if _is_normal(s)]
    global_normal = [i for i in normal if _GLOBAL_NORMAL.search(sents[i])]
    replaceable = global_normal or normal  # where a finding may be put
    put = lambda i, new, obs=None: (sents[:i] + [_header(sents[i]) + new] + sents[i + 1:], obs)
    body = lambda i: sents[i][len(_header(sents[i])):]
    cands = []
    for i, s in enumerate(sents):
        device = "Support Devices" in found[i]
        if kind in ("laterality", "device") and (kind == "device") == device and found[i]:
            sides = list(_SIDE_RE.finditer(body(i)))
            for ms in [sides] + ([[m] for m in sides] if len(sides) > 1 else []):  # all sides, or one
                swapped = body(i)
                for m in reversed(ms):  # left <-> right, L <-> R, LLL <-> RLL; 'bilateral' becomes one side
                    swapped = _sub_at(swapped, m, SWAP_SIDE.get(m.group().lower()) or rng.choice(["left", "right"]))
                cands.append(put(i, swapped))
        if kind == "device" and device:
            cands += [put(i, new, "Support Devices") for new in _swaps(body(i), _DEVICE_MOVE_RE, DEVICE_MOVES, family)]
        if kind == "severity" and found[i]:
            cands += [put(i, new) for new in _swaps(body(i), _SEVERITY_RE, SEVERITY_SWAP, family)]
            if not _SEVERITY_RE.search(body(i)) and not device and _opens_with(body(i), found[i]):
                m = _MODIFIERS.match(body(i))  # 'Stable severe cardiomegaly', or 'Severe cardiomegaly'
                rest, there = _lower_first(body(i)[m.end():]), body(i)[:max(m.end("there"), 0)]
                for key in _of(family, [f"severity added: {w}" for w in SEVERITY_ADDED]):
                    cands += [put(i, cap_like(f"{at}{key.split(': ')[1]} {rest}", True))
                              for at in {body(i)[:m.end()], there}]
        if kind == "measurement" and found[i]:
            cands += [put(i, body(i)[:m.start()] + _new_measure(m, rng) + body(i)[m.end():])
                      for m in MEASURE.finditer(body(i))]
    if kind == "device" and labels.get("Support Devices") != 1:
        cands += [put(i, _fill(t, rng), "Support Devices") for i in normal for t in _of(family, DEVICE_SENTENCES)]
    if kind == "false_finding":  # in place of a normal statement that did not speak of this finding
        cands += [put(i, _fill(t, rng), obs) for obs in POSITIVE if labels.get(obs) not in (1, -1)
                  for i in replaceable if obs not in {o for o, *_ in mentions(sents[i])}
                  for t in _of(family, POSITIVE[obs])]
    if kind == "false_negation":  # a reported finding denied; in a normal report, a denied one reported
        for obs in [o for o, v in labels.items() if v == 1 and o in NEGATED]:
            hits = [i for i, f in enumerate(found) if obs in f]
            if len(hits) == 1 and found[hits[0]] == {obs}:  # the whole sentence, or 'No' in place of its modifiers
                cands += [put(hits[0], t, obs) for t in _of(family, NEGATED[obs])]
            for i in hits:
                rest = _MODIFIERS.sub("", body(i))
                if _opens_with(rest, {obs}) and not re.search(r"\b(?:with|and)\b", re.split(r"[,.;]", rest)[0]):
                    cands.append(put(i, f"No {_lower_first(rest)}", obs))
        if not cands:
            for i in normal:
                denied = {o for o, *_ in mentions(sents[i])}
                if len(denied) == 1 and (obs := denied.pop()) in POSITIVE and labels.get(obs) not in (1, -1) \
                        and not (set(global_normal) - {i}):
                    cands += [put(i, _fill(t, rng), obs) for t in _of(family, POSITIVE[obs])]
    return cands


@functools.lru_cache(maxsize=4096)
def _reading(text):
    """What the labeler reads of a text: (labels, attributes); cached, as every kind reads the same texts."""
    return label_report(text), extract_attributes(text)


def contradicted(findings: str, true: str, wrong: str, obs: str) -> bool:
    """Whether the findings say the wrong impression is wrong where it differs from the true one about obs:
    a finding it adds is not reported in the findings (or is denied there), one it denies is reported, a
    side, severity, place or size it gives is not the findings' while the findings give one. An edit the
    findings are silent on ('Cardiomegaly' -> 'Mild cardiomegaly' beside 'The heart is enlarged'), or that
    they support ('... mildly enlarged'), is no error a reader of the findings can find."""
    (f, f_attr), (t, t_attr), (w, w_attr) = _reading(findings), _reading(true), _reading(wrong)
    present = lambda labels: labels.get(obs) in (1, -1)
    if present(t) != present(w):  # a finding added or denied
        return present(f) == present(t)
    for key in ("laterality", "severity", "location", "measurements"):
        said, t_says, w_says = (set(a.get(obs, {}).get(key, ())) for a in (f_attr, t_attr, w_attr))
        new, gone = w_says - t_says, t_says - w_says
        if new or gone:  # the first attribute the edit changed: the findings give it, and not as the edit has it
            return bool(said) and not new & said and bool(new or gone & said)
    return False


def _errors(text, kind, rng, family, avoid=(), longer=None, against=None):
    """(wrong text, the observation whose reading changed) for one error of `kind`, or None. Among the
    edits within LENGTH_TOLERANCE, the one nearest a random length in that band (above the text's length
    or below it when `longer` says so) that changes what the labeler reads of its observation (label, or
    laterality / severity / location / measurements) and, given `against` (the findings of an impression),
    that they contradict (`contradicted`)."""
    rng, sents = _as_random(rng), sentences(normalize_report(text))
    before = _reading(" ".join(sents))
    sign = rng.choice([-1, 1]) if longer is None else 1 if longer else -1
    n, target = len(text), len(text) * (1 + sign * rng.uniform(0.02, 0.75 * LENGTH_TOLERANCE))
    seen = {normalize_for_match(t) for t in [text, *avoid]}
    cands = [(" ".join(s.strip() for s in c if s.strip()), obs) for c, obs in _candidates(sents, kind, rng, family)]
    cands = [(t, obs) for t, obs in cands
             if abs(len(t) - n) <= LENGTH_TOLERANCE * n and normalize_for_match(t) not in seen]
    rng.shuffle(cands)
    for wrong, obs in sorted(cands, key=lambda c: abs(len(c[0]) - target)):
        if (changed := _changed(before, wrong, kind, obs)) and (against is None
                                                                or contradicted(against, text, wrong, changed)):
            return wrong, changed
    return None


def _changed(before, wrong, kind, obs):
    """The observation whose reading the edit changed (obs, or any when obs is None), or None: a finding
    denied or asserted changes its label; a side, severity, measurement or position what is read of it."""
    read, after = 1 if kind in ("false_negation", "false_finding") else 2, _reading(wrong)
    changed = [o for o in CHEXPERT_LABELS[1:] if any(b.get(o) != a.get(o) for b, a in zip(before[:read], after[:read]))]
    return obs if obs in changed else changed[0] if obs is None and changed else None


def single_errors(text: str, rng, family: str = "eval", accept=lambda wrong: True, n: int | None = None):
    """Edits of one error each, of any kind and any length, in random order: [(wrong text, kind)], the
    first n of those that accept(wrong text) and that change what the labeler reads (as inject_error's)."""
    rng, sents = _as_random(rng), sentences(normalize_report(text))
    before, out = _reading(" ".join(sents)), []
    cands = [(" ".join(s.strip() for s in c if s.strip()), obs, kind)
             for kind in ERROR_KINDS for c, obs in _candidates(sents, kind, rng, family)]
    rng.shuffle(cands)
    for wrong, obs, kind in cands:
        if len(out) == n:
            break
        if accept(wrong) and _changed(before, wrong, kind, obs):
            out.append((wrong, kind))
    return out


def inject_error(text: str, kind: str, rng: random.Random, family: str = "train") -> str | None:
    """The report with exactly one clinically significant error of `kind` (one of ERROR_KINDS), in the
    wordings of one family: a left/right swap, a severity changed, a finding denied (or, where none is
    reported, a denied one reported), a finding in place of a normal statement, a measurement changed, a
    support device moved or in place of a normal statement; None when the kind does not apply. The
    labeler always reads the result differently: a hard negative always differs."""
    error = _errors(text, kind, rng, family)
    return error and error[0]


def error_impressions(impression: str, rng, n: int = 3, family: str = "eval", counts: dict | None = None,
                      findings: str | None = None):
    """n copies of an impression with one injected error each, of different kinds where enough kinds
    apply: the wrong candidates of the error-discrimination task. Shared across a case set, counts
    (kind -> times used; ('longer', k) -> cases with k wrong impressions longer than the true one) is
    updated and balances both: the least used kinds come first, for an abnormal impression the kinds that
    remove or change a finding before those that add one (else "pick the impression with the fewest
    findings" wins; None where only additions apply), and the least used k that the kinds allow (else
    "pick the shortest" wins).
    Given the findings, only errors they contradict (`contradicted`): the findings tell every wrong
    impression from the true one. (wrong texts, their kinds, the observation each changed) or None."""
    rng, counts = _as_random(rng), {} if counts is None else counts
    abnormal = bool(positive_findings(impression))
    kinds = list(ERROR_KINDS)
    rng.shuffle(kinds)
    # abnormal: a denial first, then changes, additions last; within each, the least used kinds
    kinds.sort(key=lambda k: (abnormal and (k != "false_negation") + (k in ADDING_KINDS), counts.get(k, 0)))
    options = []  # (kind, error): up to two shorter and two longer errors of each kind
    for kind in kinds:
        for want in (False, True, False, True):
            error = _errors(impression, kind, rng, family, avoid=[e[0] for _, e in options], longer=want,
                            against=findings)
            options += [(kind, error)] if error else []
    longer = lambda option: len(option[1][0]) > len(impression)
    picks, distinct = [], len({kind for kind, _ in options})
    for k in sorted(range(n + 1), key=lambda k: (counts.get(("longer", k), 0), rng.random())):
        picks = _pick(options, n, k, min(n, distinct), longer)
        if picks:
            break
    if not picks or abnormal and all(kind in ADDING_KINDS for kind, _ in picks):
        return None  # only additions: "pick the impression with the fewest findings" would find the true one
    for kind, _ in picks:
        counts[kind] = counts.get(kind, 0) + 1
    counts["longer", k] = counts.get(("longer", k), 0) + 1
    return [e[0] for _, e in picks], [kind for kind, _ in picks], [e[1] for _, e in picks]


def _pick(options, n, n_longer, n_kinds, longer):
    """The first n options in order (of at least n_kinds kinds, distinct texts) of which n_longer are
    longer than the true text, or []: a greedy search over the ordered options."""
    def search(chosen, rest):
        if len(chosen) == n:
            return chosen if len({k for k, _ in chosen}) >= n_kinds and sum(map(longer, chosen)) == n_longer else None
        for i, option in enumerate(rest):
            if normalize_for_match(option[1][0]) not in {normalize_for_match(e[0]) for _, e in chosen}:
                found = search(chosen + [option], rest[i + 1:])
                if found:
                    return found
        return None
    return search([], options) or []


# ---------------------------------------------------------------------------------------------
# Copies changed only where a rewrite changed the words: hard negatives that only reading the
# rewritten words tells apart (data.py), and the acronym / paraphrase galleries (cases.py)
# ---------------------------------------------------------------------------------------------

_TERM_RE = re.compile(rf"(?i)(?<![\w-])(?:{any_of({t for group in CONFUSABLE for t in group.split('|')})})(?![\w-])")
_SWAPS_OF = {}  # term -> the terms it may become
for _group in CONFUSABLE:
    for _term in _group.split("|"):
        _SWAPS_OF.setdefault(_term, []).extend(t for t in _group.split("|") if t != _term)


def term_swaps(text: str) -> list[str]:
    """Copies of text with one CONFUSABLE term replaced by another of its group that the text does not hold.
    Edits like a left/right swap, they belong to no family: the held-out part of a case is the abbreviation
    or the wording that hides the term."""
    out, lower = [], text.lower()
    for m in _TERM_RE.finditer(text):
        for new in _SWAPS_OF[" ".join(m.group().lower().split())]:
            if not re.search(rf"(?<![\w-]){re.escape(new)}(?![\w-])", lower):
                out.append(text[:m.start()] + cap_like(new, m.group()[:1].isupper()) + text[m.end():])
    return out


def changed_words(text: str, copy: str) -> tuple[frozenset, frozenset]:
    """(the words copy removes from text, the words it adds), as a bag of words counts them."""
    before, after = Counter(word_tokens(text)), Counter(word_tokens(copy))
    return frozenset(before - after), frozenset(after - before)


def unseen_edits(text: str, rewrite: str, rng, family: str = "train", n_errors: int = 0) -> list[tuple[str, str]]:
    """[(copy, kind)]: copies of text, whose rewrite (abbreviated, reworded ...) is given, that replace words
    the rewrite does not hold by words it does not hold either ('No focal consolidation.' -> 'No focal
    atelectasis.' when the rewrite says 'No focal consol.'): one term swapped ("term"), and up to n_errors single errors (single_errors,
    its kind). The rewrite's words then match text and copy alike; only what the rewritten words mean
    tells them apart."""
    in_rewrite = set(word_tokens(rewrite))
    unseen = lambda copy: all(ch := changed_words(text, copy)) and not (ch[0] | ch[1]) & in_rewrite
    out = [(c, "term") for c in term_swaps(text) if unseen(c)]
    return out + (single_errors(text, rng, family, accept=unseen, n=n_errors) if n_errors else [])
