import json

import pytest

from ept_hw.config import ConfigError
from ept_hw.gradcheck import GradcheckConfig, run_gradcheck
from ept_hw.model import ModelConfig
from experiments.cli import main

SMALL = ["--vocab", "8", "-T", "4", "-C", "8", "-H", "2", "-B", "2"]
GROUPS = {"W_Q", "W_K", "W_V", "W_O", "W_1", "W_2", "W_h", "embeddings"}
KEYS = {"cos_implicit", "cos_bptt", "norm_ratio_implicit", "norm_ratio_bptt"}


def test_run_gradcheck_defaults_agree():
    report = run_gradcheck(GradcheckConfig(model=ModelConfig(vocab_size=8, context=4, width=8, heads=2), batch=2))
    assert report["converged"] and report["residual"] < 1e-10
    assert set(report["groups"]) >= GROUPS
    for name, g in report["groups"].items():
        assert g["cos_implicit"] >= 0.999 and g["cos_bptt"] >= 0.999, name
        assert abs(g["norm_ratio_implicit"] - 1) < 0.01, name


def test_cli_json_parses_and_has_the_keys(capsys):
    assert main(["gradcheck", *SMALL, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert isinstance(report["residual"], float) and report["residual"] < 1e-10
    assert set(report["groups"]) >= GROUPS
    for g in report["groups"].values():
        assert set(g) >= KEYS
        assert g["cos_implicit"] > 0.999


def test_cli_exits_nonzero_when_free_phase_does_not_converge(capsys):
    code = main(["gradcheck", *SMALL, "--max-steps", "5", "--json"])
    captured = capsys.readouterr()
    assert code == 1
    report = json.loads(captured.out)
    assert report["converged"] is False and report["residual"] > 1e-3
    assert "did not converge" in captured.err


def test_cli_bad_option_is_a_clean_error(capsys):
    assert main(["gradcheck", *SMALL, "--beta", "-1"]) == 2
    assert "beta" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="dtype"):
        GradcheckConfig(dtype="float16")
