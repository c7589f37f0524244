"""results.plot_losses: a readable loss plot from two stages' JSONL logs (pillow only)."""
import json

from PIL import Image

from results import PLOT_COLORS, nice_ticks, plot_losses, smooth


def write_log(path, losses):
    with open(path, "w") as f:
        for step, loss in enumerate(losses, 1):
            f.write(json.dumps(dict(stage="s", step=step, loss=loss, lr=1e-4)) + "\n")


def test_nice_ticks_and_smoothing():
    assert nice_ticks(0.13, 4.87) == [0, 1, 2, 3, 4, 5]
    assert nice_ticks(1, 200) == [0, 50, 100, 150, 200]
    assert nice_ticks(2.0, 2.0) == [1.4, 1.6, 1.8, 2, 2.2, 2.4, 2.6]  # a flat loss still gets an axis
    assert max(abs(v - 3) for v in smooth([3.0] * 50)) < 1e-12  # bias-corrected: no ramp up from 0
    noisy = [2 + (-1) ** i for i in range(200)]
    assert max(smooth(noisy)[50:]) - min(smooth(noisy)[50:]) < 0.5  # the zig-zag is averaged out


def test_plot_two_stages(tmp_path):
    write_log(tmp_path / "mntp.jsonl", [8 - 5 * i / 300 + 0.3 * (-1) ** i for i in range(300)])
    write_log(tmp_path / "contrastive.jsonl", [2.5 - i / 100 for i in range(100)])
    png = tmp_path / "loss.png"
    plot_losses({"mntp": str(tmp_path / "mntp.jsonl"), "contrastive": str(tmp_path / "contrastive.jsonl"),
                 "missing": str(tmp_path / "none.jsonl")}, str(png))
    img = Image.open(png).convert("RGB")
    assert img.size == (800, 450)
    area = img.crop((71, 41, 780 - 131, 400))  # the plot area, left of the legend
    colors = {c for _, c in area.getcolors(maxcolors=1 << 16)}
    for rgb in PLOT_COLORS[:2]:  # each stage's smoothed line, and its lighter raw curve
        assert rgb in colors
        assert tuple(c + (255 - c) * 3 // 5 for c in rgb) in colors
    assert PLOT_COLORS[2] not in colors  # the missing log draws nothing
    # tick labels: dark text below the x axis and left of the y axis, at several distinct places
    below = img.crop((60, 404, 790, 420))
    dark_columns = [x for x in range(below.width) if any(sum(below.getpixel((x, y))) < 200 for y in range(below.height))]
    assert len(dark_columns) > 20 and max(dark_columns) - min(dark_columns) > 500
    left = img.crop((20, 35, 64, 405))
    dark_rows = [y for y in range(left.height) if any(sum(left.getpixel((x, y))) < 200 for x in range(left.width))]
    assert max(dark_rows) - min(dark_rows) > 250


def test_plot_without_logs(tmp_path):
    plot_losses({"mntp": str(tmp_path / "none.jsonl")}, str(tmp_path / "loss.png"))
    assert Image.open(tmp_path / "loss.png").size == (800, 450)
