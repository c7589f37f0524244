"""configs/ablations.py: the sweep runs each pipeline command once (a finished run is skipped, so an
interrupted sweep continues), and its tables show the mean ± sample standard deviation over seeds of
what each run wrote, checked here against numbers computed by hand."""
import importlib.util
import json
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("ablations", os.path.join(ROOT, "configs", "ablations.py"))
ablations = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablations)


def text_result(acronym, error, kinds):
    return {"acronym": {"R@1": acronym, "n_queries": 40}, "paraphrase": {"R@1": 50.0},
            "summarisation": {"R@1": 10.0}, "summarisation_label": {"R@1": 40.0}, "clinical": {"label_f1": 0.5, "n": 30},
            "error": {"top1_accuracy": error, "n_cases": 30,
                      "per_kind": {k: {"pairwise_accuracy": v} for k, v in kinds.items()}}}


def clip_result(r5):
    side = {"R@1": 1.0, "R@5": r5, "R@10": 20.0}
    return {f"test/{s}": {"image_to_text": side, "text_to_image": side, "chance": {"R@5": 4.0}}
            for s in ablations.TEST_STYLES}


def fake_sweep(monkeypatch, tmp_path):
    """ablations.sweep with every command replaced by writing the files it would write."""
    commands = []

    def fake_run(cmd, cwd, check):
        script, overrides = cmd[1], dict(o.split("=", 1) for o in cmd[3:])
        out, seed = os.path.join(cwd, overrides["out_dir"]), int(overrides["seed"])
        commands.append((script, overrides))
        if script == "train_text.py":
            os.makedirs(os.path.join(out, "text"))
            open(os.path.join(out, "text", "encoder.json"), "w").write("{}")
        elif script == "evaluate.py":
            models = overrides["eval.models"].strip("[]").split(",")
            res = {m: text_result(60.0 + 10 * seed, 20.0 + seed, {"laterality": 50.0 + seed}) for m in models}
            os.makedirs(os.path.join(out, "eval"))
            baselines = {"baseline: TF-IDF": text_result(90.0 + seed, 30.0, {}), "chance": {"error": {"top1_accuracy": 25.0}}}
            json.dump({"text": {"models": res, "baselines": baselines}},
                      open(os.path.join(out, "eval", "results.json"), "w"))
        else:
            os.makedirs(os.path.join(out, "clip"))
            r5 = 10.0 * (seed + 1) if overrides["clip.text_encoder"].startswith("raw") else 30.0
            json.dump(clip_result(r5), open(os.path.join(out, "clip", "eval.json"), "w"))
    monkeypatch.setattr(ablations, "ROOT", str(tmp_path))
    monkeypatch.setattr(ablations.subprocess, "run", fake_run)
    return commands


def test_sweep_runs_each_command_once_and_tables_are_mean_and_std(monkeypatch, tmp_path):
    commands = fake_sweep(monkeypatch, tmp_path)
    log = {}
    found = ablations.sweep("configs/small.yaml", [0, 1, 2], "res", [], log)
    per_seed = len(ablations.TEXT_RUNS) + len(ablations.TEXT_ROWS) + len(ablations.MIXES) * len(ablations.ENCODERS)
    assert len(commands) == 3 * per_seed and len(log) == 3 * per_seed
    contrastive = [o for s, o in commands if s == "train_text.py" and o["out_dir"] == "res/seed1/contrastive"][0]
    assert contrastive["text.init"] == "res/seed1/mntp/text" and contrastive["seed"] == "1"
    adapted = [o for s, o in commands if s == "train_clip.py" and o["out_dir"] == "res/seed2/clip_prose_adapted"][0]
    assert adapted["clip.text_encoder"] == "res/seed2/contrastive/text" and adapted["data.train_styles"] == "[mimic]"

    assert ablations.sweep("configs/small.yaml", [0, 1, 2], "res", [], log) == found  # all done: nothing reruns
    assert len(commands) == 3 * per_seed
    shutil.rmtree(tmp_path / "res" / "seed1" / "contrastive")  # a changed recipe: its runs and its row only
    shutil.rmtree(tmp_path / "res" / "seed1" / "eval_contrastive")
    assert ablations.sweep("configs/small.yaml", [0, 1, 2], "res", [], log) == found
    assert [o["out_dir"] for _, o in commands[3 * per_seed:]] == ["res/seed1/contrastive", "res/seed1/eval_contrastive"]
    assert commands[-1][1]["eval.models"] == "[res/seed1/contrastive]"

    main, per_kind, _ = ablations.text_tables(found)
    row = next(line for line in main.splitlines() if line.startswith("| + MNTP |"))
    # acronym R@1 60, 70, 80: mean 70, sample std 10; error 20, 21, 22: 21 ± 1; label F1 0.5 -> 50 %
    assert row == "| + MNTP | 70.0 ± 10.0 | 50.0 ± 0.0 | 10.0 ± 0.0 | 40.0 ± 0.0 | 21.0 ± 1.0 | 50.0 ± 0.0 |"
    # the baselines of evaluate.py are rows of the same table, below the encoders
    assert "| *baseline: TF-IDF* | 91.0 ± 1.0 | 50.0 ± 0.0 |" in main and "| *chance* | - | - | - | - | 25.0 ± 0.0 | - |" in main
    assert "| 51.0 ± 1.0 |" in per_kind
    prose = ablations.clip_tables(found)["mimic"].splitlines()[2]
    assert prose.startswith("| prose | raw_bidirectional | 1.0 ± 0.0 | 20.0 ± 10.0 | 20.0 ± 0.0 |")  # R@5 10, 20, 30


def test_one_seed_has_no_std():
    assert ablations.cell([12.34]) == "12.3"
    assert ablations.cell([1.0, None, 3.0]) == "2.0 ± 1.4"
    assert ablations.cell([None]) == "-"


def test_bar_heights_follow_the_means(tmp_path):
    """Bars of equal width: the painted area of each series is proportional to the sum of its means
    (s1: 10, a missing value drawn as nothing; s2: 40 + 5 = 45), so 4.5x, give or take the legend."""
    import numpy as np
    from PIL import Image
    path = tmp_path / "chart.png"
    ablations.bar_chart([("a", ["x", "y"], {"s1": [(10.0, 2.0), (None, None)], "s2": [(40.0, None), (5.0, 9.0)]})], path)
    img = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    area = lambda hex_color: int((img == [int(hex_color[i:i + 2], 16) for i in (1, 3, 5)]).all(1).sum())
    ratio = area("#6baed6") / area("#9e9e9e")  # the chart's first two series colours
    assert 4.0 < ratio < 5.0, ratio


def test_readme_blocks_are_rewritten_in_place():
    """--readme rewrites one marked block of README.md: the text around it, another block and (for a
    table-1-only sweep) the block's CLIP tables stay as they were; a README without the markers is an error."""
    readme = ("intro\n<!-- ablations:begin -->\nold table 1\n" + ablations.CLIP_MARK + "\nclip tables\n"
              "<!-- ablations:end -->\nmiddle\n<!-- ideas:begin -->\nold ideas\n<!-- ideas:end -->\noutro\n")
    ideas = ablations.readme_with(readme, "new ideas", "ideas", keep_clip=True)
    assert ideas == readme.replace("old ideas", "new ideas")
    text_only = ablations.readme_with(readme, "new table 1", keep_clip=True)
    assert text_only == readme.replace("old table 1", "new table 1")
    everything = ablations.readme_with(readme, "all tables")
    assert everything == readme.replace("old table 1\n" + ablations.CLIP_MARK + "\nclip tables", "all tables")
    with pytest.raises(SystemExit, match="other:begin"):
        ablations.readme_with(readme, "x", "other")
