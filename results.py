"""Result writing (a support module: skip it on a first read): Markdown tables, JSON files, the
self-contained retrieval.html, PNG contact sheets of what was retrieved, and loss plots, all drawn
with pillow (no plotting library needed)."""
import base64
import io
import json
import math
import os
import re
import textwrap
from html import escape
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from runtime import atomic_write, write_text


# ---------------------------------------------------------------------------------------------
# Tables and JSON
# ---------------------------------------------------------------------------------------------

def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        out |= _flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + str(k): v}
    return out


def cell(v):
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")


def results_table(rows):
    """Markdown table, a row per model, a column per (flattened: "image_to_text/R@5") metric."""
    rows = {model: _flatten(metrics) for model, metrics in rows.items()}
    columns = list(dict.fromkeys(c for metrics in rows.values() for c in metrics))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {model} | " + " | ".join(cell(m.get(c)) for c in columns) + " |"
              for model, m in rows.items()]
    return "\n".join(lines) + "\n"


def write_results(results, out_dir, name):
    """Write {model: metrics} as out_dir/name.json and out_dir/name.md; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    write_text(str(json_path), json.dumps(results, indent=2) + "\n")
    write_text(str(md_path), results_table(results))
    return json_path, md_path


# ---------------------------------------------------------------------------------------------
# Pictures: what each model retrieved
# ---------------------------------------------------------------------------------------------

def _font(size):
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def _wrap(text, font, width, max_lines):
    chars = max(8, int(width / (font.getlength("abcdefghij klmnopqrstuvwxyz") / 27)))
    lines = textwrap.wrap(text, chars)
    return lines[:max_lines - 1] + ["..."] if len(lines) > max_lines else lines


def contact_sheet(title, rows, query_w=320, hit_w=250, row_h=180, thumb=120):
    """A PIL image: per row the query (image, or text), its true report, and its top-5 with
    similarities, correct reports framed and tinted green."""
    font, small, line = _font(13), _font(11), 15  # multiline_text: 11 px glyphs + 4 px spacing
    k = max((len(r["hits"]) for r in rows), default=5)
    sheet = Image.new("RGB", (query_w + k * hit_w + 10, 40 + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((10, 10), title, fill="black", font=font)
    lines = lambda text, width, height: "\n".join(_wrap(text, small, width, height // line))
    for r, row in enumerate(rows):
        y = 40 + r * row_h
        if row.get("image") is not None:  # the image, its report beside it
            sheet.paste(Image.fromarray(row["image"]).convert("RGB").resize((thumb, thumb)), (10, y))
            draw.multiline_text((thumb + 18, y), lines("TRUE: " + row["truth"], query_w - thumb - 30, row_h - 10),
                                fill="#555555", font=small)
        else:  # the query text, its true answer below it
            draw.multiline_text((10, y), lines("QUERY: " + row["query"], query_w - 20, 7 * line),
                                fill="black", font=small)
            draw.multiline_text((10, y + 7 * line + 4), lines("TRUE: " + row["truth"], query_w - 20,
                                                               row_h - 7 * line - 14), fill="#555555", font=small)
        for j, (text, score, correct) in enumerate(row["hits"]):
            x0 = query_w + j * hit_w
            draw.rectangle([x0, y, x0 + hit_w - 8, y + row_h - 10], fill="#dcf5dc" if correct else "#f4f4f4",
                           outline="#1a9c1a" if correct else "#bbbbbb", width=3 if correct else 1)
            draw.text((x0 + 6, y + 4), f"#{j + 1}  sim {score:.3f}" + ("  correct" if correct else ""),
                      fill="#1a7a1a" if correct else "black", font=font)
            draw.multiline_text((x0 + 6, y + 24), lines(text, hit_w - 20, row_h - 40), fill="black", font=small)
        draw.line([(0, y + row_h - 3), (sheet.width, y + row_h - 3)], fill="#dddddd")
    return sheet


def _png_base64(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def retrieval_html(sections, note):
    """One self-contained page (images inlined as base64 PNG): a table per model."""
    parts = ["<!doctype html><meta charset='utf-8'><title>What was retrieved</title><style>"
             "body{font:14px sans-serif;margin:20px} td{vertical-align:top;padding:6px;"
             "border:1px solid #ccc;width:16%} .hit{background:#f6f6f6} .correct{background:#dcf5dc;"
             "border:3px solid #1a9c1a} .sim{font-weight:bold} .truth{color:#555}</style>",
             f"<h1>What was retrieved</h1><p>{escape(note)}</p>"]
    for _, title, rows in sections:
        parts.append(f"<h2>{escape(title)}</h2><table>")
        for row in rows:
            if row.get("image") is not None:
                query = f"<img width=160 src='data:image/png;base64,{_png_base64(Image.fromarray(row['image']))}'>"
            else:
                query = f"<b>query</b>: {escape(row['query'])}"
            cells = [f"<td>{query}<p class=truth><b>true</b>: {escape(row['truth'])}</p></td>"]
            cells += [f"<td class='{'hit correct' if ok else 'hit'}'><span class=sim>#{j + 1} "
                      f"sim {s:.3f}{' correct' if ok else ''}</span><br>{escape(text)}</td>"
                      for j, (text, s, ok) in enumerate(row["hits"])]
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    return "\n".join(parts) + "\n"


def slug(name):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


# ---------------------------------------------------------------------------------------------
# Loss curves
# ---------------------------------------------------------------------------------------------

PLOT_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]  # one per stage


def nice_ticks(lo, hi, n=5):
    """About n round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / n
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def smooth(values, frac=0.05):
    """Exponential moving average over about frac of the points, bias-corrected at the start (as
    TensorBoard), so the first points are not pulled towards zero."""
    beta = 1 - 1 / max(1.0, frac * len(values))
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)) if beta > 0 else v)
    return out


def _text(draw, xy, text, font, anchor="la", fill="black"):
    """draw.text at an anchor (l/m/r, a/m/d) for any font: Pillow < 10.1's bitmap font takes no `anchor`."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    dx = {"l": 0, "m": (right - left) / 2, "r": right - left}[anchor[0]]
    dy = {"a": 0, "m": (bottom - top) / 2, "d": bottom - top}[anchor[1]]
    draw.text((xy[0] - dx - left, xy[1] - dy - top), text, fill=fill, font=font)


def plot_losses(log_paths: dict, png_path: str, size=(800, 450), title="training loss"):
    """Loss against step, one curve per stage ({stage: its log.jsonl}) on shared axes: the raw
    loss light, its moving average dark. Drawn with pillow (no plotting library needed)."""
    curves = []
    for name, path in log_paths.items():
        recs = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
        pts = [(r["step"], r["loss"]) for r in recs if math.isfinite(r.get("loss", math.nan))]
        if pts:
            curves.append((name, pts))
    W, H = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font, big = _font(12), _font(16)
    left, right, top, bottom = 70, W - 20, 40, H - 50                    # the plot area
    _text(draw, (W / 2, 10), title, big, "ma")
    if not curves:
        _text(draw, (W / 2, H / 2), "no losses logged", font, "mm", "gray")
        atomic_write(png_path, lambda p: img.save(p, format="PNG"))
        return
    xs = nice_ticks(min(s for _, pts in curves for s, _ in pts), max(s for _, pts in curves for s, _ in pts))
    ys = nice_ticks(min(v for _, pts in curves for _, v in pts), max(v for _, pts in curves for _, v in pts))
    px = lambda s: left + (right - left) * (s - xs[0]) / (xs[-1] - xs[0])
    py = lambda v: bottom - (bottom - top) * (v - ys[0]) / (ys[-1] - ys[0])
    for s in xs:
        draw.line([(px(s), top), (px(s), bottom)], fill="#eeeeee")
        draw.line([(px(s), bottom), (px(s), bottom + 4)], fill="black")
        _text(draw, (px(s), bottom + 6), f"{s:g}", font, "ma")
    for v in ys:
        draw.line([(left, py(v)), (right, py(v))], fill="#eeeeee")
        draw.line([(left - 4, py(v)), (left, py(v))], fill="black")
        _text(draw, (left - 6, py(v)), f"{v:g}", font, "rm")
    draw.rectangle([left, top, right, bottom], outline="black")
    _text(draw, ((left + right) / 2, H - 8), "step", font, "md")
    label = Image.new("RGB", (40, 16), "white")
    _text(ImageDraw.Draw(label), (20, 8), "loss", font, "mm")
    img.paste(label.rotate(90, expand=True), (4, (top + bottom) // 2 - 20))
    for k, (name, pts) in enumerate(curves):
        rgb = PLOT_COLORS[k % len(PLOT_COLORS)]
        light = tuple(c + (255 - c) * 3 // 5 for c in rgb)               # the raw loss, 60% towards white
        steps, losses = zip(*pts)
        for values, fill, width in ((losses, light, 1), (smooth(losses), rgb, 2)):
            line = [(px(s), py(v)) for s, v in zip(steps, values)]
            draw.line(line + line[-1:], fill=fill, width=width, joint="curve")  # 1 point: a dot
    draw.rectangle([right - 130, top + 1, right - 1, top + 8 + 18 * len(curves)], fill="white", outline="#cccccc")
    for k, (name, _) in enumerate(curves):                               # the legend, top right
        y = top + 13 + 18 * k
        draw.line([(right - 120, y), (right - 100, y)], fill=PLOT_COLORS[k % len(PLOT_COLORS)], width=3)
        _text(draw, (right - 94, y), name, font, "lm")
    atomic_write(png_path, lambda p: img.save(p, format="PNG"))


# ---------------------------------------------------------------------------------------------
# evaluate.py's results.md
# ---------------------------------------------------------------------------------------------

HEADLINE = {"acronym R@1": ("acronym", "R@1"), "acronym R@5": ("acronym", "R@5"),
            "paraphrase R@1": ("paraphrase", "R@1"), "paraphrase R@5": ("paraphrase", "R@5"),
            "summarisation R@1": ("summarisation", "R@1"), "summarisation R@5": ("summarisation", "R@5"),
            "summarisation label R@1": ("summarisation_label", "R@1"),
            "error top1_accuracy": ("error", "top1_accuracy"),
            "clinical label_f1": ("clinical", "label_f1")}


def headline(results):
    """The table's columns: the number the paper reports for each task, and its R@5."""
    return {column: results.get(task, {}).get(metric) for column, (task, metric) in HEADLINE.items()}


def eval_markdown(results, n_boot):
    """The tables of results.md: text encoders, error kinds, and the CLIP model if there is one."""
    text, clip = results["text"], results["clip"]
    by_source = {}
    for task, c in text["cases"].items():
        by_source.setdefault(c["from"], []).append(f"{task} {c['n']}")
    test, baselines = text["overlap"]["test"], text["baselines"]
    notes = [f"Test reports whose text occurs in training were dropped first: {test['dropped']} of {test['of']}."]
    multi = {task: r["multi_answer_queries"] for task, r in baselines["baseline: TF-IDF"].items()
             if r.get("multi_answer_queries") and task != "summarisation_label"}  # the same for every model
    if multi:
        notes.append("Queries with several correct answers, each counted as a hit: "
                     + ", ".join(f"{task} {n}" for task, n in multi.items()) + ".")
    notes.append("Summarisation label R@1: the top impression has the true one's findings.")
    if "clinical" in baselines["baseline: majority"]:
        notes.append(f"Majority: always {', '.join(baselines['baseline: majority']['clinical']['answer'])}, "
                     "the most common findings of the training impressions.")
    rows = text["models"] | baselines  # the baselines beside the encoders: an encoder must beat them
    md = ["## Text encoders on the report tasks\n\nCases: "
          + "; ".join(f"{', '.join(tasks)} from {source}" for source, tasks in by_source.items())
          + ". " + " ".join(notes) + "\n\n",
          results_table({name: headline(r) for name, r in rows.items()})]
    per_kind = {name: {kind: v["pairwise_accuracy"] for kind, v in r["error"]["per_kind"].items()}
                for name, r in rows.items() if "per_kind" in r.get("error", {})}
    if per_kind:
        md += ["\nError discrimination, pairwise accuracy per error kind (chance 50 %):\n\n",
               results_table(per_kind)]
    if "skipped" in clip:
        return "".join(md) + f"\n(image side skipped: {clip['skipped']})\n"
    directions = (("image_to_text", "image->report"), ("text_to_image", "report->image"))
    md += [f"\n## CLIP: image <-> report retrieval on {clip['studies']} synthetic test studies, their "
           f"reports in each style\n\nMulti-positive ({clip['merge']}): {clip['merge_note']}.\n\n",
           results_table({style: {f"{d} {m}": r[direction][m] for direction, d in directions
                                  for m in ("R@1", "R@5", "R@10", "mean_rank", "median_rank")}
                          | {"gallery entries": r["gallery_entries"]}
                          for style, r in clip["styles"].items()}),
           f"\nZero-shot classification (CheXzero prompts), AUROC with bootstrap 95 % CI ({n_boot} "
           f"resamples); mean AUROC {cell(clip['zero_shot']['mean_auroc'])}:\n\n",
           results_table({name: {"AUROC": v["auroc"], "95% CI": None if v["auroc"] is None else
                                 f"{v['ci_low']:.3f}-{v['ci_high']:.3f}", "positives": v["n_pos"],
                                 "negatives": v["n_neg"]}
                          for name, v in clip["zero_shot"]["per_label"].items()})]
    return "".join(md)
