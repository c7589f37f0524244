"""Tests of variants.py: clinically equivalent rewrites and error injection, on hand-made and real reports."""
import random
import re

from reports import (ABBREVIATIONS, Report, abbreviate, expand_abbreviations, extract_attributes, label_report,
                     normalize_report)
from variants import ERROR_KINDS, inject_error, make_variants


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
    assert set(v) == {"abbreviated", "impression_only", "shuffled", "omit_normal", "partitioned"}  # nothing to expand
    assert "L PEx" in v["abbreviated"] and "PTX" in v["abbreviated"]
    assert v["impression_only"] == "1. Small left pleural effusion. 2. No acute osseous abnormality."
    f, i = v["shuffled"].split(" IMPRESSION: ")  # the same sentences, each within its own section
    assert f != "FINDINGS: " + r.findings and sorted(re.split(r"(?<=\.) ", f.removeprefix("FINDINGS: "))) == sorted(re.split(r"(?<=\.) ", r.findings))
    assert v["omit_normal"] == ("FINDINGS: There is a small left pleural effusion. Degenerative changes of the spine. "
                                "IMPRESSION: Small left pleural effusion.")
    assert v["partitioned"].startswith("Pleura: There is a small left pleural effusion. No pneumothorax.")
    assert "Heart and mediastinum: The heart is normal." in v["partitioned"] and "Bones: " in v["partitioned"]
    short = make_variants(Report("s2", impression="No PTX. Small L pl eff."), random.Random(0))
    assert set(short) == {"abbreviated", "expanded", "shuffled", "omit_normal"}  # no findings: no impression_only
    assert short["expanded"] == "IMPRESSION: No pneumothorax. Small left pleural effusion."
    assert short["omit_normal"] == "IMPRESSION: Small L pl eff." and short["abbreviated"] == "IMPRESSION: No PTX. Sm L pl eff."
    assert make_variants(r, random.Random(0)) == v  # deterministic given the rng
    np_rng = __import__("numpy").random.default_rng(0)  # evaluate.py may pass a numpy Generator
    assert set(make_variants(r, np_rng)) == set(v) and inject_error(r.text(), "device", np_rng)


# share of variants whose labels (positive and uncertain observations) the labeler reads unchanged,
# measured on 300 real reports: 1.0 for every style; asserted a little below
VARIANT_PRESERVED = {"abbreviated": 0.97, "expanded": 0.97, "impression_only": 0.99, "shuffled": 0.97,
                     "omit_normal": 0.97, "partitioned": 0.97}


def test_variants_preserve_labels_on_real_reports(openi_sample):
    kept, total = {s: 0 for s in VARIANT_PRESERVED}, {s: 0 for s in VARIANT_PRESERVED}
    for k, r in enumerate(openi_sample):
        original = _findings(label_report(r.text()))
        for style, text in make_variants(r, random.Random(k)).items():
            reference = _findings(label_report(r.impression)) if style == "impression_only" else original
            total[style] += 1
            kept[style] += _findings(label_report(text)) == reference
    assert min(total.values()) >= 10, total
    for style, bound in VARIANT_PRESERVED.items():
        assert kept[style] / total[style] >= bound, (style, kept[style], total[style])


def test_inject_error_cases():
    rng = random.Random(0)
    text = "FINDINGS: Small left pleural effusion. Heart size is normal. IMPRESSION: Small left pleural effusion."
    lat = inject_error(text, "laterality", rng)
    assert lat is not None and lat.count("right") == 1 and lat.count("left") == 1
    sev = inject_error(text, "severity", rng)
    assert sev is not None and sev.count("Large") == 1
    neg = inject_error(text, "false_negation", rng)
    assert neg == "FINDINGS: No pleural effusion. Heart size is normal. IMPRESSION:"
    assert label_report(neg)["Pleural Effusion"] == 0
    assert inject_error("Heart size is normal.", "measurement", rng) is None  # nothing to measure
    assert inject_error("No acute disease.", "laterality", rng) is None
    assert inject_error("8 mm nodule in the right upper lobe.", "measurement", rng) != \
        "8 mm nodule in the right upper lobe."
    moved = inject_error("Right IJ catheter with tip in the SVC. No pneumothorax.", "device", random.Random(1))
    assert moved is not None and moved != "Right IJ catheter with tip in the SVC. No pneumothorax."
    added = inject_error("No acute disease.", "device", rng)
    assert label_report(added)["Support Devices"] == 1
    new = inject_error("Heart size is normal. No pleural effusion.", "false_finding", random.Random(3))
    assert sum(v == 1 for v in label_report(new).values()) == 1
    assert inject_error(text, "severity", random.Random(5)) == inject_error(text, "severity", random.Random(5))


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
                assert wrong != normalize_report(text)
    assert all(made[k] > 0 for k in ERROR_KINDS), made
    assert made["device"] == made["false_finding"] == 150  # always applicable: one can always be added
