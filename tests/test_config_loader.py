"""vit_adapter.config: the one typed-config loader behind train, pretrain and sweep settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

import vit_adapter.engine.config as train_config
from vit_adapter.config import ConfigError, build_dataclass, check_dataclass, parse_yaml
from vit_adapter.engine.pretrain import PretrainConfig, pretrain, validate
from vit_adapter.sweep import SweepError, SweepSettings, read_params_file, settings_from_mapping


@dataclass(frozen=True)
class _Opts:
    lr: float = 1e-3
    steps: int | None = None
    scale: tuple[float, float] = (0.5, 1.0)
    mode: Literal["a", "b"] = "a"
    names: list[str] = field(default_factory=list)


def test_one_config_error_class_and_it_is_a_value_error() -> None:
    assert train_config.ConfigError is ConfigError and issubclass(ConfigError, ValueError)
    assert train_config.parse_yaml is parse_yaml


def test_parse_yaml_is_yaml_12_floats_and_rejects_duplicate_keys() -> None:
    assert parse_yaml("lr: 1e-4\nn: 3", "f.yaml") == {"lr": 1e-4, "n": 3}
    with pytest.raises(ConfigError, match=r"f\.yaml: invalid YAML: duplicate key 'a'"):
        parse_yaml("a: 1\na: 2\n", "f.yaml")


def test_build_dataclass_coerces_against_the_annotations() -> None:
    opts = build_dataclass(_Opts, {"lr": 1, "scale": [0, 1], "mode": "b"}, "x.yaml")
    assert opts == _Opts(lr=1.0, scale=(0.0, 1.0), mode="b") and type(opts.lr) is float
    assert type(opts.scale) is tuple and dataclasses.is_dataclass(opts)
    kept = build_dataclass(_Opts, {"lr": 1, "scale": [0, 1]}, "x.yaml", convert=False)  # checked, not converted
    assert type(kept.lr) is int and kept.scale == [0, 1]


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"lrr": 1.0}, r"unknown key 'opt\.lrr' in x\.yaml; did you mean 'lr'\?"),
        ({"zzz": 1}, r"unknown key 'opt\.zzz' in x\.yaml; known: lr, steps"),
        ({"steps": 2.5}, r"opt\.steps = 2\.5 \(from x\.yaml\) is invalid: expected an int or null"),
        ({"steps": True}, r"opt\.steps = True"),  # a bool is never a number
        ({"mode": "c"}, r"expected one of 'a', 'b'"),
        ({"scale": [1.0]}, r"expected a list of 2 values"),
        ({"lr": float("nan")}, r"opt\.lr = nan \(from x\.yaml\) is invalid: must be a finite number"),
    ],
)
def test_build_dataclass_errors_name_the_key_and_the_source(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_dataclass(_Opts, values, "x.yaml", prefix="opt.")


def test_per_key_origins_win_over_the_source() -> None:
    with pytest.raises(ConfigError, match=r"from --set opt\.steps"):
        build_dataclass(_Opts, {"steps": "x"}, "x.yaml", prefix="opt.", origins={"opt.steps": "--set opt.steps"})


def test_train_errors_still_name_the_file(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=rf"optim\.lr = 'fast' \(from {bad}\) is invalid: expected a number"):
        train_config.load_config(None, [bad])
    with pytest.raises(ConfigError, match=r"optim\.betas = \[0\.9\] \(from --set optim\.betas\)"):
        train_config.load_config(None, [], ["optim.betas=[0.9]"])
    cfg = train_config.load_config(None, [], ["optim.lr=1", "optim.betas=[1, 0.99]"])
    assert type(cfg.optim.lr) is float and cfg.optim.betas == (1.0, 0.99) and type(cfg.optim.betas) is tuple


def test_pretrain_types_come_from_the_annotations_and_values_are_kept(tmp_path) -> None:
    out = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="unknown pretrain option 'lrr' in pretrain\\(\\); did you mean 'lr'"):
        pretrain("vit_cpu", out=out, lrr=1e-3)
    with pytest.raises(ValueError, match=r"item_scale must be a list of 2 values"):
        pretrain("vit_cpu", out=out, item_scale=(0.5,))
    with pytest.raises(ValueError, match=r"init_from must be str, got 3"):
        validate(PretrainConfig(init_from=3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"grad_clip = inf .* must be a finite number"):
        validate(PretrainConfig(grad_clip=float("inf")))
    check_dataclass(PretrainConfig(lr=1, item_scale=[0.6, 0.9]))  # type: ignore[arg-type]  # ints and lists fit
    assert not out.exists()


def test_sweep_settings_go_through_the_same_builder(tmp_path) -> None:
    s = settings_from_mapping({"n_trials": 3, "timeout_s": 60, "seeds": 1}, "p.yaml")
    assert s == SweepSettings(n_trials=3, timeout_s=60, seeds=[1]) and type(s.timeout_s) is int
    with pytest.raises(SweepError, match=r"unknown sweep setting 'n_trail' in p\.yaml; did you mean 'n_trials'"):
        settings_from_mapping({"n_trail": 3}, "p.yaml")
    with pytest.raises(SweepError, match=r"n_workers = '2' \(from p\.yaml\) is invalid: expected an int"):
        settings_from_mapping({"n_workers": "2"}, "p.yaml")
    params = tmp_path / "params.yaml"
    params.write_text("sweep:\n  prune_below: 1e-3\n  pruner: threshold\n")
    assert settings_from_mapping(read_params_file(params), str(params)).prune_below == 1e-3  # YAML 1.2 float
    params.write_text("sweep:\n  n_trials: 3\n  n_trials: 4\n")
    with pytest.raises(SweepError, match="duplicate key 'n_trials'"):
        read_params_file(params)
