"""Report variants and error injection: the data of stage 1's contrastive step (Ko et al. 2025,
arXiv 2509.15234, sec. 2; LLM2Vec's supervised step, arXiv 2404.05961, sec. 2.2).

- `make_variants(report, rng)`: clinically equivalent rewrites of a report (positives): abbreviated,
  expanded, sentences shuffled, normal sentences omitted, partitioned by anatomy, impression only.
- `inject_error(text, kind, rng)`: a copy with one clinically significant error (hard negatives and
  the error-discrimination task): laterality, severity, false negation, false finding, measurement,
  device.

The tables of phrasings both draw on (anatomical regions, error sentences) live in phrasings.py,
the abbreviation table in reports.py.

    make_variants(report, random.Random(0))  # {'abbreviated': ..., 'impression_only': ..., ...}
    inject_error("Small left pleural effusion.", "laterality", random.Random(0))  # '... right ...'
"""
import random
import re

from phrasings import (DEVICE_MOVES, DEVICE_SENTENCES, FALSE_FINDINGS, NEGATED, PARTITION_ORDER, REGIONS,
                       SEVERITY_SWAP, SWAP_SIDE)
from reports import (LABEL_HEADER_RE, MEASURE, Report, abbreviate, any_of, cap_like, expand_abbreviations,
                     extract_attributes, label_report, mentions, normalize_for_match, normalize_report, sentences)

# ---------------------------------------------------------------------------------------------
# Clinically equivalent variants (positives)
# ---------------------------------------------------------------------------------------------

_REGION_RE = re.compile(r"\b(?:" + "|".join(f"(?P<r{i}>{p})" for i, (_, p) in enumerate(REGIONS)) + r")\b", re.I)
_NORMAL_CUE = re.compile(r"(?i)\b(?:no|normal|clear|unremarkable|intact|negative|within\s+normal\s+limits|free\s+of"
                         r"|without)\b")


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


def make_variants(report: Report, rng: random.Random) -> dict[str, str]:
    """Clinically equivalent rewrites of a report in the styles of the paper (stage 1.4):
    abbreviated, expanded, impression_only, shuffled (within a section), omit_normal (normal/negative
    sentences dropped, all abnormal ones kept) and partitioned (sentences grouped by anatomy). A style
    that does not apply, or that would give back the report unchanged, is left out."""
    rng, sections = _as_random(rng), _section_sentences(report)
    text = _join(sections)
    out = {"abbreviated": abbreviate(text), "expanded": expand_abbreviations(text)}
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
    key = normalize_for_match(text)
    return {k: v for k, v in out.items() if v and normalize_for_match(v) != key}


# ---------------------------------------------------------------------------------------------
# One clinically significant error (hard negatives)
# ---------------------------------------------------------------------------------------------

# Errors (hard negatives): one clinically significant change, the kinds of the paper's error discrimination.
ERROR_KINDS = ["laterality", "severity", "false_negation", "false_finding", "measurement", "device"]
_SIDE_RE = re.compile(r"\b(?i:left|right|bilateral)\b|\b(?:LLL|RLL|LUL|RUL)\b|(?<![\w/-])[LR](?![\w/-])")
_SEVERITY_RE = re.compile(rf"(?i)\b(?:{any_of(SEVERITY_SWAP)})\b")
_DEVICE_MOVE_RE = re.compile(rf"(?i)\b(?:{any_of(DEVICE_MOVES)})\b")


def _sub_at(s, m, new):
    """s with the match m replaced by new, in the case of the word it replaces (Left -> Right, LLL -> RLL)."""
    old = m.group()
    if old.isupper() and len(old) > 1 and " " not in new:
        new = new.upper()
    return s[:m.start()] + cap_like(new, old[:1].isupper() and not old.isupper()) + s[m.end():]


def _fill(template, rng):
    side = rng.choice(["left", "right"])
    return template.format(side=side, Side=side.capitalize(), Size=rng.choice(["Small", "Moderate", "Large"]),
                           Degree=rng.choice(["Mild", "Moderate", "Severe"]), mm=rng.choice([6, 8, 12, 15]))


def _header(sentence):
    """'IMPRESSION: ' when the sentence opens a section, so that an edit keeps the section."""
    m = LABEL_HEADER_RE.match(sentence)
    return m.group() + " " if m else ""


def _insert(sents, new, rng):
    i = rng.randrange(1 if sents and _header(sents[0]) else 0, len(sents) + 1)  # never before the first header
    return sents[:i] + [new] + sents[i:]


def _new_measure(m, rng):
    """Twice, half, or the other unit (5 mm -> 5 cm): the measurement errors radiologists make."""
    value, unit, how = float(m.group(1)), m.group(2), rng.choice(["double", "half", "unit"])
    if how == "unit":
        return f"{m.group(1)} {'mm' if unit == 'cm' else 'cm'}"
    return f"{value * 2 if how == 'double' else value / 2:g} {unit}"


def inject_error(text: str, kind: str, rng: random.Random) -> str | None:
    """The report with exactly one clinically significant error of `kind` (one of ERROR_KINDS): a left/right
    swap, a severity change, a finding denied, a finding added, a measurement changed, a support device
    added or moved; None when the kind does not apply. Candidate edits are tried in random order and the
    first that changes what the labeler reads (labels, attributes) is returned: a hard negative always differs."""
    rng, sents = _as_random(rng), sentences(normalize_report(text))
    found = [{o for o, label, *_ in mentions(s) if label} for s in sents]  # positive/uncertain, 'Other' too
    labels, cands = label_report(text), []

    def put(i, new):
        return sents[:i] + [new] + sents[i + 1:]
    for i, s in enumerate(sents):
        if kind in ("laterality", "device") and (kind == "device") == ("Support Devices" in found[i]):
            swapped, sides = s, list(_SIDE_RE.finditer(s))
            for m in reversed(sides):  # left <-> right, L <-> R, LLL <-> RLL; 'bilateral' becomes one side
                swapped = _sub_at(swapped, m, SWAP_SIDE.get(m.group().lower()) or rng.choice(["left", "right"]))
            cands += [put(i, swapped)] if sides else []
            cands += [put(i, _sub_at(s, m, DEVICE_MOVES[" ".join(m.group().lower().split())]))
                      for m in (_DEVICE_MOVE_RE.finditer(s) if kind == "device" else [])]
        if kind == "severity":
            cands += [put(i, _sub_at(s, m, rng.choice(SEVERITY_SWAP[m.group().lower()].split())))
                      for m in _SEVERITY_RE.finditer(s)]
        if kind == "measurement":
            cands += [put(i, s[:m.start()] + _new_measure(m, rng) + s[m.end():]) for m in MEASURE.finditer(s)]
    if kind == "device":
        cands += [_insert(sents, _fill(t, rng), rng) for t in DEVICE_SENTENCES]
    if kind == "false_negation":  # every sentence reporting the finding, when they report nothing else
        for obs in [o for o, v in labels.items() if v == 1 and o in NEGATED]:
            hits = [i for i, f in enumerate(found) if obs in f]
            if all(found[i] == {obs} for i in hits):
                cands.append([_header(s) + (NEGATED[obs] if i == hits[0] else "") if i in hits else s
                              for i, s in enumerate(sents)])
    if kind == "false_finding":  # in place of a sentence that denied only this finding, else a new sentence
        for obs in [o for o in FALSE_FINDINGS if not labels.get(o)]:
            new = _fill(FALSE_FINDINGS[obs], rng)
            denied = [i for i, s in enumerate(sents) if not found[i] and {o for o, *_ in mentions(s)} == {obs}]
            cands.append(put(denied[0], _header(sents[denied[0]]) + new) if denied else _insert(sents, new, rng))
    rng.shuffle(cands)
    view = lambda t: (label_report(t), extract_attributes(t))
    before = view(" ".join(sents))
    for cand in cands:
        edited = " ".join(s.strip() for s in cand if s.strip())
        if view(edited) != before:
            return edited
    return None


def error_impressions(impression: str, rng, n: int = 3):
    """n copies of an impression with one injected error each, of different kinds where enough kinds
    apply: the wrong candidates of the error-discrimination task. (wrong texts, their kinds) or None."""
    rng = _as_random(rng)
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
