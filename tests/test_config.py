import dataclasses

import pytest

from ept_hw.config import ConfigError, check_range, config_hash, from_dict, load_toml, save_toml, to_dict


@dataclasses.dataclass(frozen=True)
class Inner:
    eps: float = 0.1
    steps: int = 150

    def __post_init__(self):
        check_range("eps", self.eps, 0.0, 1.0, lo_open=True)


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "tiny"
    inner: Inner = dataclasses.field(default_factory=Inner)
    widths: tuple[int, ...] = (1, 2)
    note: str | None = None


def test_round_trip_through_toml(tmp_path):
    cfg = Outer(name="x", inner=Inner(eps=0.05, steps=3), widths=(4, 5))
    save_toml(tmp_path / "c.toml", cfg)
    back = from_dict(Outer, load_toml(tmp_path / "c.toml"))
    assert back == cfg
    assert config_hash(back) == config_hash(cfg)
    assert config_hash(Outer()) != config_hash(cfg)


def test_int_is_coerced_to_float_and_none_dropped():
    cfg = from_dict(Outer, {"inner": {"eps": 1}})
    assert isinstance(cfg.inner.eps, float) and cfg.inner.eps == 1.0
    assert "note" not in to_dict(cfg)


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"inner": {"epsilon": 0.1}})
    assert err.value.key == "inner.epsilon"
    assert "eps" in str(err.value) and "steps" in str(err.value)


def test_out_of_range_names_key_value_and_range():
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"inner": {"eps": -0.5}})
    msg = str(err.value)
    assert "eps" in msg and "-0.5" in msg and "(0, 1]" in msg


def test_wrong_type_is_refused():
    with pytest.raises(ConfigError):
        from_dict(Outer, {"inner": {"steps": "many"}})
    with pytest.raises(ConfigError):
        check_range("x", float("nan"), 0, 1)


def test_missing_or_broken_toml_file(tmp_path):
    with pytest.raises(ConfigError, match="existing TOML file"):
        load_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("a = = 1")
    with pytest.raises(ConfigError, match="valid TOML"):
        load_toml(bad)
