"""Bad input as a new user makes it: each gets an error that names the file or config key and the fix,
instead of an IndexError, KeyError or ZeroDivisionError from deep inside, or a run that does nothing."""
import os
import re

import pytest

import runtime
import weights
from reports import read_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


@pytest.mark.parametrize("n_bytes", [24, 5000, 2_000_000])  # in the header, the metadata, the tensors
def test_truncated_gguf_names_the_file(tmp_path, n_bytes):
    path = tmp_path / "model.gguf"
    with open(weights.smollm2_gguf_path(), "rb") as f:
        path.write_bytes(f.read(n_bytes))
    for load in (weights.load_tokenizer, weights.load_llm):
        with pytest.raises(ValueError, match=re.escape(str(path)) + r".* truncated or corrupt.*download it again"):
            load(str(path))


def test_malformed_pairs_jsonl_names_the_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = '{"image": "a.png", "report": "No acute disease."}\n'
    path.write_text(good + "\n" + '{"image": "b.png", "report": "Small effusion.",\n')  # line 3 is cut short
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 3: not valid JSON")):
        read_pairs(str(path))
    path.write_text(good + '{"image": "b.png", "text": "Small effusion."}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: needs an object with a \"report\" key")):
        read_pairs(str(path))
    path.write_text(good)
    assert [r.impression for r in read_pairs(str(path))] == ["No acute disease."]


def test_pairs_csv_without_report_column_names_its_columns(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("image,text\na.png,No acute disease.\n")
    with pytest.raises(ValueError, match=re.escape(f"{path} has no 'report' column: its header reads ['image', 'text']")):
        read_pairs(str(path))


def test_model_dtype_float16_names_the_valid_values():
    with pytest.raises(ValueError, match="model.dtype must be one of float32, bfloat16, got 'float16'"):
        runtime.load_config(TINY, ["model.dtype=float16"])


def test_unknown_random_init_key_names_the_valid_fields():
    with pytest.raises(KeyError, match=r"model.random_init: unknown LlamaConfig field\(s\) \['hidden_sz'\]; "
                                       r"valid: .*\bhidden_size\b.*\bnum_hidden_layers\b"):
        runtime.load_config(TINY, ["model.random_init.hidden_sz=32"])


def test_yaml_list_with_an_override_names_the_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("- model\n- text\n")
    for overrides in (["seed=1"], []):
        with pytest.raises(TypeError, match=re.escape(f"config file {str(path)!r} must be a mapping of sections")):
            runtime.load_config(str(path), overrides)


@pytest.mark.parametrize("stage", ["text.mntp", "text.contrastive", "clip.optim"])
def test_zero_batch_size_and_negative_steps_are_refused(stage):
    with pytest.raises(ValueError, match=re.escape(f"{stage}.batch_size must be at least 1, got 0")):
        runtime.load_config(TINY, [f"{stage}.batch_size=0"])
    with pytest.raises(ValueError, match=re.escape(f"{stage}.steps must be at least 0, got -5")):
        runtime.load_config(TINY, [f"{stage}.steps=-5"])
    runtime.load_config(TINY, [f"{stage}.batch_size=2", f"{stage}.steps=0"])  # the least valid values pass


def test_all_images_unreadable_names_a_file(tmp_path):
    """clip.images=real where no image can be read (here: every file corrupt) names one of them."""
    import train_clip
    rows = ["study_id,image,report"]
    for i in range(40):
        (tmp_path / f"s{i}.png").write_bytes(b"not a png")
        rows.append(f"s{i},s{i}.png,{'No acute disease.' if i % 2 else 'Small left effusion.'} Study {i}.")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(OSError, match=r"none of the \d+ training images can be read, e.g. cannot read image "
                                      + re.escape(str(tmp_path)) + r"/s\d+\.png.*data.image_root"):
        train_clip.main([TINY, f"out_dir={tmp_path / 'run'}", "clip.images=real", "data.source=pairs",
                         f"data.path={tmp_path / 'pairs.csv'}", "clip.text_encoder=raw", "clip.optim.steps=2",
                         "clip.optim.batch_size=4"])
