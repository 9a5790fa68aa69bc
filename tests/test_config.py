import pytest

from prefalign.config import ConfigError, StrictModel, load_config


class Lora(StrictModel):
    r: int = 8
    alpha: float = 16.0


class Cfg(StrictModel):
    method: str = "dpo"
    learning_rate: float = 1e-5
    lora: Lora | bool = False
    tags: list[str] = []


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: ipo\nlearning_rate: 0.001\n")
    cfg = load_config(Cfg, path, ["learning_rate=2e-4", "tags=[a, b]", "lora.r=4"])
    assert cfg.method == "ipo" and cfg.learning_rate == 2e-4 and cfg.tags == ["a", "b"]
    assert cfg.lora == Lora(r=4)


def test_unknown_key_names_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rat'; did you mean 'learning_rate'\?"):
        load_config(Cfg, None, ["learning_rat=1"])
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  rr: 3\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown key 'lora.rr'; did you mean 'r'\?"):
        load_config(Cfg, path)


def test_bad_values_and_files(tmp_path):
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(Cfg, None, ["learning_rate=fast"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Cfg, None, ["oops"])
    bad = tmp_path / "b.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Cfg, bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(Cfg, tmp_path / "missing.yaml")
