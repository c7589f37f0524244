"""Tests of variants.py: clinically equivalent rewrites and error injection, on hand-made and real reports,
and the train / eval families of the rules (reports.rule_family)."""
import collections
import hashlib
import random
import re

import pytest

from phrasings import DEVICE_SENTENCES, NEGATED, POSITIVE, WORDINGS
from reports import (ABBREVIATIONS, Report, abbreviate, expand_abbreviations, extract_attributes, label_report,
                     normalize_report, rule_family, sentences)
from variants import ERROR_KINDS, contradicted, error_impressions, inject_error, make_variants, reword, unseen_edits


# ---------------------------------------------------------------------------------------------
# Variants and errors
# ---------------------------------------------------------------------------------------------


def _findings(labels):
    """What a report asserts: its positive and uncertain observations (No Finding included). Negatives
    are left out: omitting a normal sentence turns a 0 into 'not mentioned', which is no change."""
    return {k: v for k, v in labels.items() if v != 0}


def test_abbreviations_round_trip():
    text = "Small left pleural effusion without pneumothorax. Mild cardiomegaly. Endotracheal tube in place."
    short = abbreviate(text)
    assert short == "Sm L PEx w/o PTX. Mild CMG. ETT in place."
    assert expand_abbreviations(short) == "Small left pleural effusion without pneumothorax. Mild cardiomegaly. " \
                                               "Endotracheal tube in place."
    assert expand_abbreviations("L5 vertebra. R/o PNA. s/p CABG.") == \
        "L5 vertebra. Rule out pneumonia. Status post coronary artery bypass graft."
    assert {"CMG", "PTX", "PEx", "b/l", "L", "R", "RLL", "RML", "RUL", "LLL", "LUL", "NAD", "ETT", "NGT", "PICC",
            "s/p", "w/", "w/o", "DJD", "COPD", "CHF"} <= set(ABBREVIATIONS)


def test_make_variants_styles():
    r = Report("s1", findings="The heart is normal. There is a small left pleural effusion. No pneumothorax. "
                              "Degenerative changes of the spine.",
               impression="1. Small left pleural effusion. 2. No acute osseous abnormality.")
    v = make_variants(r, random.Random(0))
    assert set(v) == {"abbreviated", "impression_only", "shuffled", "omit_normal", "partitioned",
                      "paraphrased"}  # nothing to expand
    # training family: sm, L, PTX, nl; not PEx (eval)
    assert "sm L pleural effusion" in v["abbreviated"] and "PTX" in v["abbreviated"] and "PEx" not in v["abbreviated"]
    assert "PEx" in make_variants(r, random.Random(0), family="eval")["abbreviated"]
    assert v["impression_only"] == "1. Small left pleural effusion. 2. No acute osseous abnormality."
    f, i = v["shuffled"].split(" IMPRESSION: ")  # the same sentences, each within its own section
    assert f != "FINDINGS: " + r.findings and sorted(re.split(r"(?<=\.) ", f.removeprefix("FINDINGS: "))) == sorted(re.split(r"(?<=\.) ", r.findings))
    assert v["omit_normal"] == ("FINDINGS: There is a small left pleural effusion. Degenerative changes of the spine. "
                                "IMPRESSION: Small left pleural effusion.")
    assert v["partitioned"].startswith("Pleura: There is a small left pleural effusion. No pneumothorax.")
    assert "Heart and mediastinum: The heart is normal." in v["partitioned"] and "Bones: " in v["partitioned"]
    short = make_variants(Report("s2", impression="No PTX. Small L pl eff."), random.Random(0))
    assert set(short) == {"abbreviated", "expanded", "shuffled", "omit_normal", "paraphrased"}  # no impression_only
    assert short["expanded"] == "IMPRESSION: No pneumothorax. Small left pleural effusion."
    assert short["omit_normal"] == "IMPRESSION: Small L pl eff." and short["abbreviated"] == "IMPRESSION: No PTX. Sm L pl eff."
    assert make_variants(r, random.Random(0)) == v  # deterministic given the rng
    np_rng = __import__("numpy").random.default_rng(0)  # evaluate.py may pass a numpy Generator
    assert set(make_variants(r, np_rng)) == set(v) and inject_error(r.text(), "laterality", np_rng)


def test_rule_family_is_the_documented_hash():
    # sha256("PTX") = 2c..., sha256("PEx") = 53..., sha256("L") = 72..., sha256("w/o") = 39... (first bytes)
    assert [hashlib.sha256(k.encode()).hexdigest()[:2] for k in ("PTX", "PEx", "L", "w/o")] == ["2c", "53", "72", "39"]
    assert [rule_family(k) for k in ("PTX", "PEx", "L", "w/o")] == ["train", "eval", "train", "eval"]
    keys = list(ABBREVIATIONS) + [k for k, _, _ in WORDINGS] + [w for ws in NEGATED.values() for w in ws]
    shares = [sum(rule_family(k) == f for k in keys) / len(keys) for f in ("train", "eval")]
    assert min(shares) > 0.35  # both families rich
    assert len(ABBREVIATIONS) >= 90 and {"AP", "PA", "lat", "bilat", "h/o", "RIJ", "IVC"} <= set(ABBREVIATIONS)


def test_abbreviate_uses_only_its_family():
    text = "Small left pleural effusion without pneumothorax."
    # by hand from the hash: sm, L, PTX are 'train'; PEx, w/o are 'eval'
    assert abbreviate(text, family="train") == "Sm L pleural effusion without PTX."
    assert abbreviate(text, family="eval") == "Small left PEx w/o pneumothorax."
    assert abbreviate(text) == "Sm L PEx w/o PTX."
    for family in ("train", "eval"):  # every abbreviation a family writes is one of its own
        short = abbreviate(" ".join(ABBREVIATIONS.values()), family=family)
        assert expand_abbreviations(short) != short
        for key in ABBREVIATIONS:
            if rule_family(key) != family and len(key) > 1 and not key.endswith("/"):
                assert not re.search(rf"(?<![\w/-]){re.escape(key)}(?![\w/-])", short), (family, key)


def test_reword_uses_only_its_family():
    assert reword("Clear lungs.", random.Random(0), "eval") == ("The lungs are clear.", ["clear lungs -> lungs are clear"])
    assert reword("Clear lungs.", random.Random(0), "train") == ("Clear lungs.", [])  # no train rule reads it
    split = {reword("No pleural effusion or pneumothorax.", random.Random(s), "eval")[0] for s in range(30)}
    assert split == {"No pleural effusion. No pneumothorax.", "There is no pleural effusion or pneumothorax.",
                     "No effusion or pneumothorax.", "Negative for pleural effusion or pneumothorax."}
    merged = {reword("No pleural effusion. No pneumothorax.", random.Random(s), "train")[0] for s in range(30)}
    assert {"No pleural effusion or pneumothorax.", "No pleural effusion and no pneumothorax.",
            "No pleural effusion. Pneumothorax is not seen."} <= merged
    for s in range(20):
        for family in ("train", "eval"):
            text, rules = reword("Heart size is normal. The lungs are clear. No pneumothorax. Mild cardiomegaly is "
                                 "seen. No acute cardiopulmonary disease.", random.Random(s), family)
            assert rules and {rule_family(k) for k in rules} == {family}


# share of variants whose labels (positive and uncertain observations) the labeler reads unchanged,
# measured on 300 real reports: 1.0 for every style; asserted a little below
VARIANT_PRESERVED = {"abbreviated": 0.97, "expanded": 0.97, "impression_only": 0.99, "shuffled": 0.97,
                     "omit_normal": 0.97, "partitioned": 0.97, "paraphrased": 0.97}


def test_variants_preserve_labels_on_real_reports(openi_sample):
    kept, total = {s: 0 for s in VARIANT_PRESERVED}, {s: 0 for s in VARIANT_PRESERVED}
    for k, r in enumerate(openi_sample):
        original = _findings(label_report(r.text()))
        for style, text in make_variants(r, random.Random(k), family=("train", "eval")[k % 2]).items():
            reference = _findings(label_report(r.impression)) if style == "impression_only" else original
            total[style] += 1
            kept[style] += _findings(label_report(text)) == reference
    assert min(total.values()) >= 10, total
    for style, bound in VARIANT_PRESERVED.items():
        assert kept[style] / total[style] >= bound, (style, kept[style], total[style])


def _within(wrong, true, tolerance=0.2):
    return abs(len(wrong) - len(true)) <= tolerance * len(true)


def test_each_wording_rule_rewrites_real_sentences_and_keeps_their_labels(openi):
    """Every wording rule matches sentences of the real archive (no dead rule), and on up to 40 of them the
    labeler reads the rewritten sentence as it reads the sentence ('granuloma -> granulomatous nodule' would
    add a Lung Lesion to 9 in 10: no clinically equivalent rewrite)."""
    bodies = sorted({re.sub(r"^[A-Za-z ]+: ", "", s) for r in openi for s in sentences(r.text())})
    for key, pattern, new in WORDINGS:
        rule = re.compile(pattern, re.I)
        hits = [b for b in bodies if rule.search(b)]
        assert hits, key
        hits = random.Random(0).sample(hits, min(40, len(hits)))
        kept = sum(_findings(label_report(rule.sub(new, b, count=1))) == _findings(label_report(b)) for b in hits)
        assert kept >= 0.95 * len(hits), (key, kept, len(hits))


def test_errors_in_place_by_hand():
    effusion = "Small left pleural effusion."
    outputs = lambda text, kind, family: {inject_error(text, kind, random.Random(s), family=family) for s in range(20)}
    assert outputs(effusion, "laterality", "eval") == {"Small right pleural effusion."}
    # small -> large | moderate are 'eval' rules, small -> extensive 'train'
    assert outputs(effusion, "severity", "eval") == {"Large left pleural effusion.", "Moderate left pleural effusion."}
    assert outputs(effusion, "severity", "train") == {"Extensive left pleural effusion."}
    # no severity word: an 'eval' one (mild, severe, minimal, extensive) in place of 'Stable', or before it when short
    # enough ('Stable mild cardiomegaly.' is 25 > 1.2 * 20 characters)
    assert set() < outputs("Stable cardiomegaly.", "severity", "eval") <= {
        "Mild cardiomegaly.", "Severe cardiomegaly.", "Minimal cardiomegaly.", "Extensive cardiomegaly."}
    # a reported finding denied, in place; 'No pleural effusion.' is too short (20 < 0.8 * 28)
    assert outputs(effusion, "false_negation", "eval") == {"No left pleural effusion.", "There is no pleural effusion.",
                                                           "No pleural effusion is seen."}
    # and the other way: in a normal impression, the denied finding reported (eval wordings of its length)
    assert outputs("No pneumothorax.", "false_negation", "eval") == {"Left pneumothorax.", "Right pneumothorax."}
    assert outputs("8 mm nodule in the right upper lobe.", "measurement", "eval") <= {
        "16 mm nodule in the right upper lobe.", "4 mm nodule in the right upper lobe.", "8 cm nodule in the right upper lobe."}
    # the tip moved ('superior vena cava -> right atrium | brachiocephalic vein' are 'eval' rules) or the side swapped
    assert outputs("Right IJ catheter tip in the superior vena cava.", "device", "eval") == {
        "Right IJ catheter tip in the right atrium.", "Right IJ catheter tip in the brachiocephalic vein.",
        "Left IJ catheter tip in the superior vena cava."}
    assert outputs("Nasogastric tube tip in the stomach.", "device", "eval") == {"Nasogastric tube tip in the duodenum."}
    for kind in ("measurement", "device", "false_finding"):  # nothing to measure; no normal sentence to replace
        assert outputs(effusion, kind, "eval") == {None}
    assert inject_error("No acute disease.", "laterality", random.Random(0)) is None


def test_added_findings_replace_a_normal_statement():
    text = "Heart size is normal. No acute cardiopulmonary disease."
    for s in range(10):
        # a false finding never stands beside 'No acute ...': it replaces that statement
        wrong = inject_error(text, "false_finding", random.Random(s), family="eval")
        first, second = sentences(wrong)
        assert first == "Heart size is normal." and "acute" not in second.lower() and _within(wrong, text)
        found = {o for o, v in label_report(second).items() if v == 1 and o != "No Finding"}
        assert len(found) == 1 and found <= set(POSITIVE), wrong
        # a device replaces either normal sentence and keeps the other
        wrong = inject_error(text, "device", random.Random(s), family="eval")
        assert len(set(sentences(wrong)) & set(sentences(text))) == 1 and _within(wrong, text)
        assert label_report(wrong)["Support Devices"] == 1
    # a single normal sentence is replaced whole, by a wording of its length
    for s in range(10):
        wrong = inject_error("No acute cardiopulmonary abnormality.", "device", random.Random(s), family="eval")
        assert len(sentences(wrong)) == 1 and label_report(wrong)["Support Devices"] == 1 and _within(wrong, "x" * 37)
        assert any(wrong == t.format(Side=side, side=side.lower()) for t in DEVICE_SENTENCES for side in ("Left", "Right"))


def test_error_impressions_by_hand():
    counts = {}
    wrong, kinds, changed = error_impressions("Small left pleural effusion.", random.Random(0), counts=counts)
    assert sorted(kinds) == ["false_negation", "laterality", "severity"] and changed == ["Pleural Effusion"] * 3
    assert counts == {"false_negation": 1, "laterality": 1, "severity": 1, ("longer", sum(
        len(w) > len("Small left pleural effusion.") for w in wrong)): 1}
    # the least used kinds come first: four kinds apply here (an addition would need a normal sentence)
    text = "Moderate right pleural effusion, 4 cm in depth."
    for overused in ("laterality", "measurement", "severity"):
        _, kinds, _ = error_impressions(text, random.Random(0), counts={overused: 50})
        assert kinds[0] == "false_negation" and set(kinds) == {"false_negation", "laterality", "measurement",
                                                                "severity"} - {overused}
    assert error_impressions("Heart size is normal.", random.Random(0), family="eval") is not None


@pytest.mark.parametrize("findings, true, wrong, obs, is_error", [
    ("The heart is enlarged.", "Cardiomegaly.", "Mild cardiomegaly.", "Cardiomegaly", False),  # silent on degree
    ("Heart size is mildly enlarged.", "Cardiomegaly.", "Mild cardiomegaly.", "Cardiomegaly", False),  # agrees
    ("Heart size is severely enlarged.", "Cardiomegaly.", "Mild cardiomegaly.", "Cardiomegaly", True),
    ("Small left pleural effusion.", "Left pleural effusion.", "Right pleural effusion.", "Pleural Effusion", True),
    ("Small pleural effusion.", "Left pleural effusion.", "Right pleural effusion.", "Pleural Effusion", False),
    ("Small left pleural effusion.", "Small left pleural effusion.", "No pleural effusion.", "Pleural Effusion", True),
    ("The lungs are clear.", "Possible pneumonia.", "No pneumonia.", "Pneumonia", False),  # a reading, not a finding
    ("The lungs are clear. No pleural effusion.", "No acute disease.", "Right pleural effusion.", "Pleural Effusion",
     True),
    ("Small right pleural effusion.", "No acute disease.", "Right pleural effusion.", "Pleural Effusion", False),
    ("Nodule measures 8 mm.", "8 mm nodule.", "16 mm nodule.", "Lung Lesion", True),
])
def test_contradicted_by_hand(findings, true, wrong, obs, is_error):
    """A wrong impression is an error to find only where its findings say otherwise (judged by hand)."""
    assert contradicted(findings, true, wrong, obs) is is_error


def test_error_impressions_only_what_the_findings_contradict():
    # 'Cardiomegaly' -> 'Mild ...' / 'Left ...' would be errors of the impression alone; beside findings that
    # give no degree and no side, only denying the finding is one
    impression = "Cardiomegaly. Left lower lobe atelectasis."
    findings = "The heart is enlarged. Patchy opacity at the lung base, likely atelectasis."
    alone = error_impressions(impression, random.Random(0), n=3, family="train")
    assert alone and {"severity", "laterality"} & set(alone[1])
    found = [error_impressions(impression, random.Random(seed), n=1, family=family, findings=findings)
             for seed in range(5) for family in ("train", "eval")]
    assert all(f is None or f[1] == ["false_negation"] for f in found) and any(found)


def test_inject_error_changes_what_the_labeler_reads(openi_sample):
    made = {k: 0 for k in ERROR_KINDS}
    for i, r in enumerate(openi_sample[:150]):
        text = r.text()
        before = (label_report(text), extract_attributes(text))
        for kind in ERROR_KINDS:
            wrong = inject_error(text, kind, random.Random(i))
            if wrong is not None:
                made[kind] += 1
                assert (label_report(wrong), extract_attributes(wrong)) != before, (kind, text, wrong)
                assert wrong != normalize_report(text) and _within(wrong, normalize_report(text))
    assert all(made[k] > 0 for k in ERROR_KINDS), made
    assert made["false_finding"] >= 100 and made["device"] >= 100  # most reports have a normal sentence


def test_unseen_edits_change_only_words_the_rewrite_lacks():
    text = "Small left pleural effusion. No pneumothorax. Mild cardiomegaly."
    rewrite = "Sm L PEx. No PTX. Mild cardiomegaly."
    words = lambda t: collections.Counter(re.findall(r"[a-z0-9]+", t.lower()))
    edits = unseen_edits(text, rewrite, random.Random(0), "eval", n_errors=5)
    copies = {c for c, _ in edits}
    # by hand: the abbreviated words (small, left, pleural effusion, pneumothorax) may change; 'mild
    # cardiomegaly' and 'no' are in the rewrite and may not
    assert "Small left pleural effusion. No thickening. Mild cardiomegaly." in copies
    assert "Small right pleural effusion. No pneumothorax. Mild cardiomegaly." in copies
    assert "Small left pleural effusion. No pneumothorax. Severe cardiomegaly." not in copies
    for copy in copies:
        removed, added = words(text) - words(copy), words(copy) - words(text)
        assert removed and added and not (set(removed) | set(added)) & set(words(rewrite)), copy
    assert unseen_edits(text, text, random.Random(0), "eval", n_errors=5) == []  # nothing rewritten, nothing to hide
