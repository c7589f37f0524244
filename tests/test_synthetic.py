"""Tests of synthetic.py: synthetic studies drawn from their findings, and their reports in every style."""
import re

import numpy as np
import pytest
import torch

import data
from reports import (CHEXPERT_LABELS, label_report)
from synthetic import (REPORT_STYLES, SyntheticStudies, _NORMAL, chexpert_of, sample_findings, synth_report,
                       synth_reports, synth_study)

SIZE = 128
NOT_L, NOT_R = (lambda x, y: x < -0.15), (lambda x, y: x > 0.15)  # the other side, beyond a small rotation
CASES = {  # finding -> (labels, region where pixels may change, region that must stay identical)
    # x, y in [-1, 1] image coordinates, y down; the patient's left (L) is the image's right (x > 0)
    "cardiomegaly": ({"cardiomegaly": {"severity": "severe"}},
                     lambda x, y: (y > -0.4) & (np.abs(x) < 0.8), lambda x, y: y < -0.5),
    "effusion": ({"effusion": {"side": "left", "size": "moderate"}}, lambda x, y: (x > 0) & (y > -0.4), NOT_L),
    "pneumothorax": ({"pneumothorax": {"side": "right", "size": "moderate"}}, lambda x, y: (x < 0) & (y < 0.5), NOT_R),
    "consolidation RUL": ({"consolidation": {"lobe": "RUL"}}, lambda x, y: (x < 0) & (y < 0.2), NOT_R),
    "consolidation LLL": ({"consolidation": {"lobe": "LLL"}}, lambda x, y: (x > 0) & (y > -0.3), NOT_L),
    "edema": ({"edema": {"severity": "severe"}},
              lambda x, y: (np.abs(x) < 0.8) & (np.abs(y) < 0.9), lambda x, y: np.abs(x) > 0.9),
    "nodule": ({"nodule": {"side": "left", "zone": "upper", "size_mm": 20}}, lambda x, y: (x > 0) & (y < 0), NOT_L),
    "atelectasis": ({"atelectasis": {"side": "right"}}, lambda x, y: (x < 0) & (y > 0), NOT_R),
    "ett": ({"ett": {"tip_cm": 4}}, lambda x, y: (np.abs(x) < 0.15) & (y < -0.2), lambda x, y: np.abs(x) > 0.3),
    "central_line": ({"central_line": {"side": "left"}}, lambda x, y: (x > -0.2) & (y < 0), lambda x, y: x < -0.3),
}


def grid(size=SIZE):
    g = np.linspace(-1, 1, size)
    return g[None, :], g[:, None]


def mask(region, size=SIZE):  # a region given as a function of x, y -> boolean (size, size) image
    return np.broadcast_to(region(*grid(size)), (size, size))


@pytest.mark.parametrize("name", CASES)
def test_each_finding_changes_pixels_in_its_region_only(name):
    findings, region, untouched = CASES[name]
    for index in range(3):  # a few patients: rotations, shifts and anatomy differ
        base, _ = synth_study(5, index, SIZE, findings={})
        img, labels = synth_study(5, index, SIZE, findings=findings)
        changed = np.abs(img.astype(int) - base) > 8
        assert changed.sum() > 15, f"{name} barely visible: {changed.sum()} pixels"
        assert changed[mask(region)].sum() >= 0.95 * changed.sum(), f"{name} drawn outside its region"
        assert np.array_equal(img[mask(untouched)], base[mask(untouched)]), f"{name} changed the other side"
        assert labels["chexpert"]["No Finding"] == int(name in ("ett", "central_line"))


def test_effusion_size_and_cardiomegaly_grow():
    base, _ = synth_study(1, 2, SIZE, findings={})
    area = lambda f: (np.abs(synth_study(1, 2, SIZE, findings=f)[0].astype(int) - base) > 8).sum()
    sizes = [area({"effusion": {"side": "right", "size": s}}) for s in ("small", "moderate", "large")]
    assert sizes[0] < sizes[1] < sizes[2]
    sev = [area({"cardiomegaly": {"severity": s}}) for s in ("mild", "moderate", "severe")]
    assert sev[0] < sev[1] < sev[2]


def test_study_is_deterministic_and_radiograph_like():
    a, la = synth_study(3, 7)
    b, lb = synth_study(3, 7)
    assert a.dtype == np.uint8 and a.shape == (256, 256) and np.array_equal(a, b) and la == lb
    assert not np.array_equal(a, synth_study(3, 8)[0]) and not np.array_equal(a, synth_study(4, 7)[0])
    img, _ = synth_study(0, 0, 100, findings={})  # any size
    assert img.shape == (100, 100)
    lungs = img[mask(lambda x, y: (np.abs(np.abs(x) - 0.4) < 0.1) & (np.abs(y + 0.2) < 0.15), 100)]
    spine = img[mask(lambda x, y: (np.abs(x) < 0.03) & (y > 0.7), 100)]
    assert lungs.mean() + 60 < spine.mean()  # aerated lung is dark, bone and soft tissue bright


def test_labels_prior_and_chexpert():
    labels = [sample_findings(0, i) for i in range(2000)]
    normal = np.mean([lab["chexpert"]["No Finding"] for lab in labels])
    assert 0.33 < normal < 0.47  # ~40 % normal, as in real data
    chexpert = CHEXPERT_LABELS
    assert all(list(lab["chexpert"]) == list(chexpert) for lab in labels[:50])
    assert np.mean([len(lab) - 1 >= 2 for lab in labels]) > 0.1  # findings co-occur
    devices_only = {**dict.fromkeys(chexpert, 0), "No Finding": 1, "Support Devices": 1}
    assert chexpert_of({"ett": {"tip_cm": 3}}) == devices_only
    assert chexpert_of({"consolidation": {"lobe": "LLL"}})["Consolidation"] == 1


SIDE = {"left": ("left", "L"), "right": ("right", "R"), "bilateral": ("bilateral", "b/l")}
SIZE_WORDS = {"small": ("small", "sm"), "moderate": ("moderate", "mod"), "large": ("large", "lg"),
              "mild": ("mild", "mild"), "severe": ("severe", "severe")}


@pytest.mark.parametrize("style", REPORT_STYLES)
def test_reports_state_the_same_side_and_size_in_every_style(style):
    short = style == "shorthand"
    for findings in [{"effusion": {"side": s, "size": z}} for s in SIDE for z in ("small", "moderate", "large")] + \
                    [{"pneumothorax": {"side": s, "size": "large"}} for s in ("left", "right")] + \
                    [{"cardiomegaly": {"severity": "mild"}}, {"edema": {"severity": "severe"}}]:
        (name, p), = findings.items()
        for k in range(4):  # different templates
            r = synth_report({**findings, "chexpert": chexpert_of(findings)}, style, np.random.default_rng(k))
            text = r.text()
            assert r.style == style and (not short or not r.findings)
            words = set(re.findall(r"[\w/]+", text.lower()))
            if "side" in p:
                assert SIDE[p["side"]][short].lower() in words, text
                other = {"left": "right", "right": "left"}.get(p["side"])
                assert other is None or SIDE[other][short].lower() not in words, text
            size = p.get("size", p.get("severity"))
            assert SIZE_WORDS[size][short] in words, text
    rc = synth_report({"consolidation": {"lobe": "RLL"}}, style, np.random.default_rng(0))
    assert ("RLL" if short else "right lower lobe") in rc.text().replace("Right", "right")
    normal = synth_report({"chexpert": chexpert_of({})}, style, np.random.default_rng(0)).impression
    assert normal in _NORMAL[style] or normal.split(" ")[-1] in ("NAD.", "process.", "findings."), normal


def test_synthetic_dataset_styles_reports_and_cache(tmp_path):
    ds = SyntheticStudies(40, seed=2, size=64, styles={"mimic": 1, "shorthand": 1}, split="val")
    x, text, i = ds[5]
    assert x.shape == (1, 64, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and i == 5
    assert text == ds.report(5).text() and ds.report(5).style in ("mimic", "shorthand")
    assert {ds.report(i).style for i in range(40)} == {"mimic", "shorthand"}
    assert ds.labels(5) == synth_study(ds.seed, 5, 64)[1]
    openi = synth_reports(2, 40, "openi", split="val")
    assert [r.text() for r in openi] == [ds.report(i, "openi").text() for i in range(40)]
    assert synth_reports(2, 5, "openi", split="test")[0].study_id != openi[0].study_id  # splits differ

    cached = SyntheticStudies(40, seed=2, size=64, split="val", cache_dir=str(tmp_path))
    (f,) = tmp_path.iterdir()
    mtime = f.stat().st_mtime_ns
    again = SyntheticStudies(40, seed=2, size=64, split="val", cache_dir=str(tmp_path))
    assert f.stat().st_mtime_ns == mtime and np.array_equal(again.image(7), ds.image(7))
    loader = torch.utils.data.DataLoader(again, batch_size=16, num_workers=2, collate_fn=data.collate_pairs)
    images = torch.cat([b[0] for b in loader])
    assert images.shape == (40, 1, 64, 64) and torch.equal(images[7], cached[7][0])


@pytest.mark.parametrize("style", REPORT_STYLES)
def test_labeler_recovers_synthetic_labels(style):
    # measured: 1.000 for all 14 observations in every style (500 reports each)
    reports = synth_reports(0, 200, style)
    predicted = [label_report(r.text()) for r in reports]
    agree = {n: np.mean([int(p.get(n) == 1) == r.labels["chexpert"][n] for p, r in zip(predicted, reports)])
             for n in CHEXPERT_LABELS}
    assert min(agree.values()) >= 0.97, {n: round(float(a), 3) for n, a in agree.items()}
