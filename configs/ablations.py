"""The paper's three claims in miniature (README, "Results"): every row is configs/small.yaml plus a
few key=value overrides, trained and evaluated for three seeds; the tables show mean ± standard
deviation over the seeds (each seed also draws its own evaluation cases and synthetic studies).

    python configs/ablations.py               # 3 seeds (see README for the time on a 2-core CPU)
    python configs/ablations.py --quick       # 1 seed, shorter runs: under 30 minutes
    python configs/ablations.py --readme      # also rewrite README's Results tables and docs/ablations.png

Each run is an ordinary command of the pipeline, printed before it starts, e.g.
    python train_text.py configs/small.yaml text.stages=[contrastive] text.init=results/ablations/seed0/mntp/text ...
A run whose result file exists is skipped, so an interrupted sweep continues where it stopped. Raw
outputs (a JSON per run) stay in results/ablations/ (--out), which is not committed.

1. The text-encoder recipe, on held-out real Open-I test reports (evaluate.py): the raw LLM (causal,
   mean pooling, the paper's baseline), the same bidirectional, + MNTP, + MNTP + contrastive (the
   small.yaml recipe), and that recipe with the hard negatives of reports and impressions, without the
   rewritten sentences, without the findings -> impression pairs, with latent-attention pooling, with
   last-token pooling. One MNTP run per seed feeds every contrastive run (text.init).
2. Mixing report styles in CLIP (synthetic radiographs, frozen text tower): (a) 1,000 studies in one
   prose style (mimic) against (b) 2,000 studies, half in that style and half in abbreviation-rich
   hospital shorthand, each with the raw LLM run bidirectionally (raw_bidirectional) and with the
   adapted encoder of row 1's recipe.
3. External generalisation: the same models tested on another prose style (openi) and on shorthand.
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# stage 1: run -> train_text.py overrides; {mntp} is the same seed's MNTP run
FROM_MNTP = ["text.stages=[contrastive]", "text.init={mntp}/text"]
TEXT_RUNS = {"mntp": ["text.stages=[mntp]"],
             "contrastive": FROM_MNTP,
             "steps75": FROM_MNTP + ["text.contrastive.steps=75"],
             "top_layers": FROM_MNTP + ["text.contrastive_lora_layers=8", "text.contrastive.steps=90",
                                        "text.contrastive.grad_checkpointing=false"],
             "hard_negatives": FROM_MNTP + ["text.hard_negative_share=1.0"],
             "no_sentences": FROM_MNTP + ["text.sentence_share=0"],
             "no_summaries": FROM_MNTP + ["text.summarize_share=0"],
             "latent_attention": FROM_MNTP + ["model.pooling=latent_attention"],
             "last_token": FROM_MNTP + ["model.pooling=last_token"]}
# table 1: row -> evaluate.py's eval.models entry (a raw model, or one of TEXT_RUNS)
TEXT_ROWS = {"raw LLM (causal, mean pooling)": "raw", "raw LLM, bidirectional": "raw_bidirectional",
             "+ MNTP": "mntp", "+ MNTP + contrastive (small.yaml)": "contrastive",
             "... 75 contrastive steps, not 60 (over 10 minutes)": "steps75",
             "... LoRA on the top 8 layers only (90 steps)": "top_layers",
             "... with hard negatives of reports and impressions": "hard_negatives",
             "... without rewritten sentences": "no_sentences",
             "... without findings -> impression pairs": "no_summaries",
             "... latent-attention pooling": "latent_attention", "... last-token pooling": "last_token"}
TEXT_METRICS = {"acronym R@1": ("acronym", "R@1"), "paraphrase R@1": ("paraphrase", "R@1"),
                "summarisation R@1": ("summarisation", "R@1"), "summarisation label R@1": ("summarisation_label", "R@1"),
                "error top-1": ("error", "top1_accuracy"), "clinical label F1": ("clinical", "label_f1")}
# stage 2: the training mix and the text encoder; {contrastive} is the same seed's adapted encoder
MIXES = {"prose": ["clip.train_n=1000", "data.train_styles=[mimic]"],
         "prose+shorthand": ["clip.train_n=2000", "data.train_styles=[mimic,shorthand]"]}
# the untrained LLM without its causal mask (train_clip.py's raw_bidirectional; raw is the causal one)
ENCODERS = {"raw_bidirectional": ["clip.text_encoder=raw_bidirectional"], "adapted": ["clip.text_encoder={contrastive}/text"]}
TEST_STYLES = ("mimic", "openi", "shorthand")  # small.yaml's data.test_styles
CLIP_MARK = "<!-- ablations:clip -->"  # in the README, where tables 2-3 begin
QUICK = ["text.mntp.steps=20", "text.contrastive.steps=12", "clip.optim.steps=300", "eval.max_reports=50"]


def run(script, config, overrides, out_dir, done, log):
    """One pipeline command, unless its result file `done` exists; its wall time goes to `log`
    (a dict, saved beside the runs as timings.json)."""
    if os.path.exists(os.path.join(ROOT, done)):
        return
    cmd = [script, config, *overrides, f"out_dir={out_dir}"]
    print("\n$ python " + " ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)
    log[out_dir] = time.perf_counter() - t
    with open(os.path.join(ROOT, os.path.dirname(os.path.dirname(out_dir)), "timings.json"), "w") as f:  # out/seedN/run
        json.dump(log, f, indent=1)


def sweep(config, seeds, out, extra, log, text_only=False):
    """Every run of every seed (text_only: table 1's); returns {seed: {"text": {entry: metrics}, "clip":
    {(mix, encoder): eval}}}. The end-of-stage evaluation of train_text.py is skipped (text.eval_reports=0):
    evaluate.py does it."""
    found = {}
    for seed in seeds:
        d = f"{out}/seed{seed}"
        common = [f"seed={seed}", "text.eval_reports=0", *extra]
        for name, overrides in TEXT_RUNS.items():
            run("train_text.py", config, common + [o.format(mntp=f"{d}/mntp") for o in overrides], f"{d}/{name}",
                f"{d}/{name}/text/encoder.json", log)
        found[seed] = {"text": {}, "clip": {}}
        for entry in TEXT_ROWS.values():  # one evaluate.py run a row: a changed recipe re-evaluates its row only
            model = entry if entry.startswith("raw") else f"{d}/{entry}"
            run("evaluate.py", config, common + [f"eval.models=[{model}]"], f"{d}/eval_{entry}",
                f"{d}/eval_{entry}/eval/results.json", log)
            with open(os.path.join(ROOT, d, f"eval_{entry}", "eval", "results.json")) as f:
                text = json.load(f)["text"]  # every row of a seed is evaluated on the same cases (seed, data)
            found[seed]["text"][entry] = text["models"][model]
            found[seed].setdefault("baselines", text["baselines"])
        for mix, mix_overrides in {} if text_only else MIXES.items():
            for encoder, enc_overrides in ENCODERS.items():
                run_dir = f"{d}/clip_{mix}_{encoder}"
                overrides = [o.format(contrastive=f"{d}/contrastive") for o in enc_overrides]
                run("train_clip.py", config, common + mix_overrides + overrides + [f"clip.cache_dir={d}/clip_cache"],
                    run_dir, f"{run_dir}/clip/eval.json", log)
                with open(os.path.join(ROOT, run_dir, "clip", "eval.json")) as f:
                    found[seed]["clip"][mix, encoder] = json.load(f)
    return found


# ---------------------------------------------------------------------------------------------
# The tables and the plot
# ---------------------------------------------------------------------------------------------

def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def cell(values, scale=1.0):
    m, s = mean_std([v * scale for v in values if v is not None])
    if m is None:
        return "-"
    return f"{m:.1f}" if s is None else f"{m:.1f} ± {s:.1f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def text_tables(found):
    """The encoders' rows, then the baselines' (evaluate.py's, on the same cases): what an encoder must beat."""
    seeds = list(found)
    get = lambda entry, task, metric: [found[s]["text"][entry].get(task, {}).get(metric) for s in seeds]
    rows = [[label] + [cell(get(entry, *tm), 100 if tm[1] == "label_f1" else 1) for tm in TEXT_METRICS.values()]
            for label, entry in TEXT_ROWS.items()]
    for name in found[seeds[0]].get("baselines", {}):
        got = lambda task, metric: [found[s]["baselines"].get(name, {}).get(task, {}).get(metric) for s in seeds]
        rows.append([f"*{name}*"] + [cell(got(*tm), 100 if tm[1] == "label_f1" else 1) for tm in TEXT_METRICS.values()])
    md = table(["text encoder"] + list(TEXT_METRICS), rows)
    kinds = sorted({k for s in seeds for r in found[s]["text"].values() for k in r.get("error", {}).get("per_kind", {})})
    per_kind = [[label] + [cell([found[s]["text"][entry]["error"]["per_kind"].get(k, {}).get("pairwise_accuracy")
                                 for s in seeds]) for k in kinds] for label, entry in TEXT_ROWS.items()]
    raw = found[seeds[0]]["text"]["raw"]  # every encoder of a seed is evaluated on the same cases
    n = {task: raw[task].get("n_cases", raw[task].get("n_queries")) for task, _ in TEXT_METRICS.values() if task in raw}
    return md, table(["text encoder"] + kinds, per_kind), ", ".join(f"{task} {v}" for task, v in n.items() if v)


def clip_tables(found):
    seeds, out = list(found), {}
    for style in TEST_STYLES:
        rows = []
        for mix in MIXES:
            for encoder in ENCODERS:
                r = [found[s]["clip"][mix, encoder][f"test/{style}"] for s in seeds]
                rows.append([mix, encoder] + [cell([x[d][f"R@{k}"] for x in r]) for d in ("image_to_text", "text_to_image")
                                              for k in (1, 5, 10)] + [cell([x["chance"]["R@5"] for x in r])])
        out[style] = table(["trained on", "text encoder"] + [f"{d} R@{k}" for d in ("image→report", "report→image")
                                                             for k in (1, 5, 10)] + ["chance R@5"], rows)
    return out


def bar_chart(panels, path, size=(1100, 420)):
    """Grouped bars with ±1 std whiskers, one panel per (title, groups, {series: [(mean, std) per group]})."""
    from PIL import Image, ImageDraw
    colors = ["#9e9e9e", "#6baed6", "#2171b5", "#08306b", "#e6550d", "#fd8d3c"]
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    W, H, pad, legend_h = size[0] // len(panels), size[1], 40, 16
    for p, (title, groups, series) in enumerate(panels):
        x0, y0, x1, y1 = p * W + pad, pad, (p + 1) * W - 10, H - pad - legend_h * len(series)
        draw.text((x0, 10), title, fill="black")
        top = 25.0 * math.ceil(max(m + (s or 0) for v in series.values() for m, s in v if m is not None) / 25)
        draw.rectangle([x0, y0, x1, y1], outline="black")
        for tick in range(0, int(top) + 1, 25):
            y = y1 - (y1 - y0) * tick / top
            draw.line([(x0, y), (x0 - 4, y)], fill="black")
            draw.text((x0 - 30, y - 6), str(tick), fill="gray")
        gw = (x1 - x0) / len(groups)
        bw = gw * 0.8 / len(series)
        for g, group in enumerate(groups):
            draw.text((x0 + g * gw + 4, y1 + 4), group, fill="black")
            for k, (name, values) in enumerate(series.items()):
                m, s = values[g]
                if m is None:
                    continue
                bx = x0 + g * gw + gw * 0.1 + k * bw
                draw.rectangle([bx, y1 - (y1 - y0) * m / top, bx + bw - 2, y1], fill=colors[k % len(colors)])
                if s:
                    cx = bx + bw / 2
                    draw.line([(cx, y1 - (y1 - y0) * max(0, m - s) / top), (cx, y1 - (y1 - y0) * (m + s) / top)],
                              fill="black")
        for k, name in enumerate(series):
            y = y1 + 20 + k * legend_h
            draw.rectangle([x0, y, x0 + 10, y + 10], fill=colors[k % len(colors)])
            draw.text((x0 + 16, y - 1), name, fill="black")
    img.save(path)


def plot(found, path):
    seeds = list(found)
    text_rows = {"raw LLM": "raw", "raw, bidirectional": "raw_bidirectional", "+ MNTP": "mntp",
                 "+ MNTP + contrastive": "contrastive", "... with hard negatives": "hard_negatives",
                 "... no rewritten sentences": "no_sentences"}
    text_rows = {label: entry for label, entry in text_rows.items() if entry in TEXT_ROWS.values()}
    metrics = {"acronym R@1": ("acronym", "R@1"), "paraphrase R@1": ("paraphrase", "R@1"),
               "summ. R@1": ("summarisation", "R@1"), "error top-1": ("error", "top1_accuracy")}
    text_series = {label: [mean_std([found[s]["text"][entry].get(t, {}).get(m) for s in seeds]) for t, m in metrics.values()]
                   for label, entry in text_rows.items()}
    clip_series = {f"{mix}, {enc}": [mean_std([found[s]["clip"][mix, enc][f"test/{style}"]["image_to_text"]["R@5"]
                                               for s in seeds]) for style in TEST_STYLES]
                   for mix in MIXES for enc in ENCODERS} if all(found[s]["clip"] for s in seeds) else {}
    panels = [("1. text encoders on held-out Open-I reports (%)", list(metrics), text_series)]
    if all(found[s]["clip"] for s in seeds):
        panels.append(("2-3. CLIP image->report R@5 (%) by test report style", list(TEST_STYLES), clip_series))
    bar_chart(panels, path, size=(550 * len(panels), 420))


def report(found, args, log):
    """The Markdown of the Results tables."""
    main, per_kind, cases = text_tables(found)
    clip = clip_tables(found) if all(r["clip"] for r in found.values()) else {}
    minutes = {s: sum(t for run, t in log.items() if f"/seed{s}/" in run + "/") / 60 for s in found}
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    flags = (" --quick" if args.quick else "") + (" --text-only" if args.text_only else "") \
        + (" --rows " + " ".join(args.rows) if args.rows else "") + (f" --out {args.out}" if args.out else "")
    md = [f"Produced by `python configs/ablations.py{flags}` on `{args.config}`, "
          f"seeds {', '.join(map(str, found))}, on {machine}; the runs of each seed took "
          f"{', '.join(f'{m:.0f}' for m in minutes.values())} minutes. Mean ± standard deviation over seeds, in %.\n\n",
          f"**1. Text encoders** on the held-out test reports of data.source (small.yaml: the real Open-I "
          f"reports; {cases} cases per seed):\n\n", main,
          "\nAcronym and paraphrase galleries hold up to three near-duplicates of each answer; *chance among "
          "copies* is the R@1 of a reader that finds the copies but cannot tell which one is the answer.\n",
          "\nError discrimination per error kind, pairwise accuracy (true impression scored above the one wrong "
          "one; chance 50):\n\n", per_kind]
    if not clip:
        return "".join(md)
    md += [CLIP_MARK + "\n", "\n**2. Mixing report styles** and **3. external generalisation**: CLIP on synthetic radiographs, image ↔ "
          "report retrieval on the test studies, their reports written in each style; text encoder raw_bidirectional: "
          "the untrained LLM without its causal mask, mean-pooled, adapted: the small.yaml stage-1 encoder.\n"]
    for style, t in clip.items():
        what = {"mimic": "the training prose style (claim 2)", "openi": "another prose style (claim 3)",
                "shorthand": "hospital shorthand (claims 2 and 3)"}[style]
        md += [f"\nTest reports in `{style}` style, {what}:\n\n", t]
    return "".join(md)


def readme_with(text, md, section="ablations", keep_clip=False):
    """README text with the block between <!-- section:begin --> and <!-- section:end --> replaced by md;
    keep_clip (a table-1-only sweep) keeps the block's CLIP tables, from CLIP_MARK on."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    if begin not in text or end not in text:
        sys.exit(f"README.md lacks the {begin} ... {end} markers to write the tables between")
    head, rest = text.split(begin, 1)
    block, tail = rest.split(end, 1)
    kept = CLIP_MARK + block.split(CLIP_MARK, 1)[1] if keep_clip and CLIP_MARK in block else ""
    return head + begin + "\n" + md + "\n" + kept + end + tail


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, shorter runs (under 30 minutes)")
    p.add_argument("--config", default="configs/small.yaml", help="the base config of every row")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for every run")
    p.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (--quick: 0)")
    p.add_argument("--out", help="default: results/ablations (--quick: results/ablations-quick)")
    p.add_argument("--readme", action="store_true", help="rewrite README's Results tables and docs/ablations.png")
    p.add_argument("--section", default="ablations",
                   help="with --readme, the README block to rewrite, between <!-- SECTION:begin --> and "
                        "<!-- SECTION:end --> (default: ablations, the Results tables; another keeps docs/ablations.png)")
    p.add_argument("--text-only", action="store_true", help="table 1 only (no CLIP runs); --readme keeps tables 2-3")
    p.add_argument("--rows", nargs="+", choices=list(TEXT_ROWS.values()), help="table 1's rows (default: all)")
    args = p.parse_args()
    if args.rows:  # the MNTP run stays: every contrastive run starts from it
        for label in [label for label, entry in TEXT_ROWS.items() if entry not in args.rows]:
            del TEXT_ROWS[label]
        for name in [name for name in TEXT_RUNS if name != "mntp" and name not in args.rows]:
            del TEXT_RUNS[name]
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = args.out or ("results/ablations-quick" if args.quick else "results/ablations")
    os.makedirs(os.path.join(ROOT, out), exist_ok=True)
    timings = os.path.join(ROOT, out, "timings.json")
    log = json.load(open(timings)) if os.path.exists(timings) else {}
    found = sweep(args.config, seeds, out, (QUICK if args.quick else []) + args.set, log, args.text_only)

    md = report(found, args, log)
    with open(os.path.join(ROOT, out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(ROOT, out, "results.json"), "w") as f:
        json.dump({str(s): {"text": r["text"], "clip": {f"{m}/{e}": v for (m, e), v in r["clip"].items()}}
                   for s, r in found.items()}, f, indent=1)
    plot(found, os.path.join(ROOT, out, "ablations.png"))
    print("\n" + md + f"\nwritten to {out}/: results.md, results.json, ablations.png")
    if args.readme:
        readme = os.path.join(ROOT, "README.md")
        with open(readme) as f:
            text = readme_with(f.read(), md, args.section, keep_clip=args.text_only)
        with open(readme, "w") as f:
            f.write(text)
        if args.section != "ablations":  # docs/ablations.png shows the Results tables
            print(f"README.md's {args.section} block updated")
            return
        os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
        plot(found, os.path.join(ROOT, "docs", "ablations.png"))
        print("README.md and docs/ablations.png updated")


if __name__ == "__main__":
    main()
