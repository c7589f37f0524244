"""Synthetic radiographs with paired reports (a support module: skip it on a first read).

No openly licensed chest X-ray image set ships offline, so stage 2 trains and is evaluated on
generated studies: frontal films drawn from sampled findings, with their reports written from the
same labels in three styles (MIMIC-like prose, Open-I-like prose, hospital shorthand), so that style
shift can be studied as in Ko et al. 2025 (arXiv 2509.15234, sec. 4).

    image, labels = synth_study(seed=0, index=0)    # uint8 (256, 256) radiograph and its findings
    studies = SyntheticStudies(200, styles=["mimic"], split="test")  # (image, report, index) items
"""
import functools
import math
import os
import zlib

import numpy as np
import torch
from tqdm import tqdm

from reports import ABBR_OF, CHEXPERT_LABELS, Report

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
        w.update({k: ABBR_OF.get(p[k], p[k]) for k in ("side", "size", "severity") if k in p})
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
