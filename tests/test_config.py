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


def test_a_check_inside_a_nested_table_reports_the_full_dotted_key():
    """The dataclass names its field; `from_dict` knows the table: the error carries both."""
    from trainer.config import RunConfig

    # ControllerConfig's own check is named `controller.floor`; loaded as [stabilisers.jacreg]
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, {"stabilisers": {"jacreg": {"floor": -1.0}}})
    assert err.value.key == "stabilisers.jacreg.floor" and err.value.value == -1.0
    assert "stabilisers.jacreg.floor = -1.0" in str(err.value)
    # ModelConfig's check is named `heads`; loaded as [model]
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, {"model": {"width": 32, "heads": 5}})
    assert err.value.key == "model.heads" and "divisor of width = 32" in str(err.value)
    # already qualified (`training.steps`) and cross-table (`training.seq_len` in RunConfig) keys stay
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, {"training": {"schedule": {"kind": "cosine"}}})
    assert err.value.key == "training.schedule.kind"
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, {"training": {"steps": 0}})
    assert err.value.key == "training.steps"
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, {"model": {"context": 8}, "training": {"seq_len": 16}})
    assert err.value.key == "training.seq_len"
    # the toy tree of this module: Inner's `eps` under `inner`
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"inner": {"eps": 2.0}})
    assert err.value.key == "inner.eps"


@dataclasses.dataclass(frozen=True)
class Holder:
    inner: Inner = dataclasses.field(default_factory=lambda: Inner(steps=7))


def test_a_partial_nested_table_keeps_the_containers_defaults():
    assert from_dict(Holder, {"inner": {"eps": 0.2}}) == Holder(Inner(eps=0.2, steps=7))
    assert from_dict(Outer, {"inner": {"eps": 0.2}}).inner.steps == 150  # a plain default_factory: the class's


def test_each_tile_setting_has_one_home_and_old_keys_move_there(tmp_path):
    """`noise_mode`, `n_reads` and `update.mode` are the tile's (analog.tile overrides); older
    files' analog.noise_mode / read_average / update_mode and flat stabilisers.eigreg_* migrate."""
    from trainer.analog import resolve_tile_config
    from trainer.config import AnalogConfig, run_config_from, run_config_from_dict

    assert not {"noise_mode", "read_average", "n_reads", "update_mode"} & {f.name for f in dataclasses.fields(AnalogConfig)}
    old = {"analog": {"device": "reram_sb", "noise_mode": "common", "read_average": 3, "update_mode": "exact"},
           "stabilisers": {"eigreg": 0.5, "eigreg_margin": 0.9, "eigreg_iters": 4}}
    cfg = run_config_from_dict(old)
    assert cfg.analog.tile == {"noise_mode": "common", "n_reads": 3, "update": {"mode": "exact"}}
    assert (cfg.stabilisers.eigreg.weight, cfg.stabilisers.eigreg.margin, cfg.stabilisers.eigreg.iters) == (0.5, 0.9, 4)
    assert old["analog"]["noise_mode"] == "common"  # the caller's mapping is not changed
    tile = resolve_tile_config(cfg.analog)
    assert (tile.noise_mode, tile.n_reads, tile.update.mode) == ("common", 3, "exact")
    # defaults: the tile's own (preset: fast update, fresh noise, one read)
    plain = resolve_tile_config(run_config_from_dict({"analog": {"device": "reram_sb"}}).analog)
    assert (plain.noise_mode, plain.n_reads, plain.update.mode) == ("fresh", 1, "fast")
    # a tile file's own setting is kept (no run-level copy overwrites it)
    (tmp_path / "t.toml").write_text('[tile]\ndevice = "reram_sb"\nn_reads = 2\n')
    assert resolve_tile_config(run_config_from_dict({"analog": {"device": str(tmp_path / "t.toml")}}).analog).n_reads == 2
    # a later layer's old key overrides an earlier layer's new key; both names in one layer is refused
    (tmp_path / "preset.toml").write_text('[analog.tile]\nn_reads = 2\n')
    assert run_config_from(tmp_path / "preset.toml", {"analog": {"read_average": 5}}).analog.tile == {"n_reads": 5}
    with pytest.raises(ConfigError, match=r"analog\.read_average"):
        run_config_from_dict({"analog": {"read_average": 2, "tile": {"n_reads": 3}}})
    # overrides are checked by key and type at load, by range when applied, under the full key
    with pytest.raises(ConfigError) as err:
        run_config_from_dict({"analog": {"tile": {"update": {"mdoe": "exact"}}}})
    assert err.value.key == "analog.tile.update.mdoe"
    with pytest.raises(ConfigError) as err:
        run_config_from_dict({"analog": {"tile": {"n_reads": "two"}}})
    assert err.value.key == "analog.tile.n_reads"
    with pytest.raises(ConfigError) as err:
        resolve_tile_config(run_config_from_dict({"analog": {"device": "reram_sb", "tile": {"n_reads": 0}}}).analog)
    assert err.value.key == "analog.tile.n_reads"
    with pytest.raises(ConfigError) as err:
        run_config_from_dict({"analog": {"tile": {"device": "ecram"}}})
    assert err.value.key == "analog.tile.device"


def test_a_run_override_of_a_tile_file_setting_is_warned(tmp_path, caplog):
    """`analog.tile` wins over a `[tile]` file (documented); when it changes a value the file states
    (e.g. a preset's own algorithm over a benchmark's tile file) the run says so."""
    import logging

    from trainer.analog import resolve_tile_config
    from trainer.config import run_config_from_dict

    (tmp_path / "t.toml").write_text('[tile]\ndevice = "reram_sb"\nalgorithm = "sgd"\nn_reads = 2\n')
    with caplog.at_level(logging.WARNING, logger="trainer.analog"):
        tile = resolve_tile_config(run_config_from_dict(
            {"analog": {"device": str(tmp_path / "t.toml"), "tile": {"algorithm": "mixed_precision", "n_reads": 2,
                                                                      "noise_mode": "common"}}}).analog)
    assert tile.algorithm == "mixed_precision"
    warned = [r.getMessage() for r in caplog.records if "overrides the tile file" in r.getMessage()]
    assert len(warned) == 1 and "analog.tile.algorithm = 'mixed_precision' (the file: 'sgd')" in warned[0]
    assert "n_reads" not in warned[0] and "noise_mode" not in warned[0]  # same value / not in the file
