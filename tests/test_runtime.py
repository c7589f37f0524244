"""runtime.py: config loading and overrides, with errors that name the key."""
import pytest

from runtime import Config, load_config


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out_dir: runs/x\nmodel:\n  pooling: mean\ntext:\n  mntp:\n    lr: 1e-4\n    steps: 5\n")
    return str(path)


def test_yaml_and_overrides(cfg_file):
    cfg = load_config(cfg_file, ["text.mntp.lr=3e-4", "out_dir=/tmp/elsewhere", "text.stages=[mntp]",
                                 "model.random_init={hidden_size: 32}", "train.precision=fp32"])
    assert isinstance(cfg, Config)
    assert cfg.text.mntp.lr == 3e-4 and isinstance(cfg.text.mntp.lr, float)
    assert cfg.text.mntp.steps == 5 and cfg.out_dir == "/tmp/elsewhere"
    assert cfg.text.stages == ["mntp"] and cfg.model.random_init == {"hidden_size": 32}
    assert cfg.text.contrastive.steps == Config().text.contrastive.steps  # untouched default


def test_unknown_key_names_it_and_lists_valid(cfg_file):
    with pytest.raises(KeyError, match=r"unknown config key 'text.mntp.learning_rate'; valid keys here: steps, batch_size, lr"):
        load_config(cfg_file, ["text.mntp.learning_rate=1"])
    with pytest.raises(KeyError, match="unknown config key 'modle'"):
        load_config(cfg_file, ["modle.path=x"])


def test_wrong_type_names_key(cfg_file):
    with pytest.raises(TypeError, match=r"config key 'text.mntp.steps' expects int, got 'many'"):
        load_config(cfg_file, ["text.mntp.steps=many"])
    with pytest.raises(TypeError, match=r"'train.grad_checkpointing' expects bool"):
        load_config(cfg_file, ["train.grad_checkpointing=3"])
    with pytest.raises(TypeError, match=r"section 'text.mntp' must be a mapping"):
        load_config(cfg_file, ["text.mntp=3"])


def test_bad_override_syntax_and_missing_file(cfg_file):
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_config(cfg_file, ["text.mntp.lr"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")
