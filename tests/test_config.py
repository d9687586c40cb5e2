from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from pathanat.config import from_dict, load_config, save_config, to_dict
from pathanat.errors import ConfigError


@dataclass
class Inner:
    kind: Literal["vae", "nvae"] = "vae"
    channels: int = 2
    rate: float = 1e-3
    shape: tuple[int, int] = (96, 112)
    cache: Path | None = None


@dataclass
class Outer:
    name: str = "run"
    inner: Inner = field(default_factory=Inner)
    flags: list[bool] = field(default_factory=list)


def test_yaml_and_overrides_fill_nested_dataclasses(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ninner:\n  kind: nvae\n  rate: 1\n")
    cfg = load_config(
        Outer,
        path,
        ["inner.channels=4", "inner.shape=[32, 48]", "flags=[true]", "inner.cache=/data/c"],
    )
    assert cfg == Outer("x", Inner("nvae", 4, 1.0, (32, 48), Path("/data/c")), [True])
    assert isinstance(cfg.inner.rate, float)


def test_a_number_matches_its_literal_string_choice():
    @dataclass
    class Trainer:
        precision: Literal["32", "bf16-mixed"] = "bf16-mixed"

    assert load_config(Trainer, None, ["precision=32"]).precision == "32"


def test_exponent_without_a_dot_is_a_float_and_a_word_is_not():
    # YAML 1.1 reads 2e-3 as a string; a float key must still take it
    assert load_config(Outer, None, ["inner.rate=2e-3"]).inner.rate == pytest.approx(0.002)
    assert load_config(Outer, None, ["inner.rate=-1E5"]).inner.rate == -1e5
    with pytest.raises(ConfigError, match=r"inner\.rate: expected float"):
        load_config(Outer, None, ["inner.rate=e-3"])


def test_round_trip_through_yaml(tmp_path):
    cfg = Outer(inner=Inner(cache=Path("c")))
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(Outer, tmp_path / "c.yaml") == cfg
    assert to_dict(cfg)["inner"]["shape"] == [96, 112]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"inner": {"chanels": 3}}, "inner.chanels: unknown key; did you mean 'channels'?"),
        ({"inner": {"channels": "two"}}, "inner.channels: expected int, got 'two' (str)"),
        ({"inner": {"channels": True}}, "inner.channels: expected int"),
        ({"inner": {"kind": "gan"}}, "inner.kind: expected one of 'vae', 'nvae', got 'gan'"),
        ({"inner": {"shape": [1, 2, 3]}}, "inner.shape: expected 2 items, got 3"),
        ({"inner": 5}, "inner: expected a mapping, got 5 (int)"),
        ({"flags": [1]}, "flags[0]: expected bool"),
        ({"zzz": 1}, "zzz: unknown key; known keys: name, inner, flags"),
    ],
)
def test_bad_keys_and_types_are_named(data, message):
    with pytest.raises(
        ConfigError,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("]", r"\]")
        .replace("?", r"\?"),
    ):
        from_dict(Outer, data)


def test_bad_override_and_missing_file_are_named(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(Outer, None, ["inner.channels"])
    with pytest.raises(ConfigError, match="name is not a section"):
        load_config(Outer, None, ["name=x", "name.sub=1"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "none.yaml")


@pytest.mark.parametrize("raw", [".nan", ".inf", "-.inf", ".NaN"])
def test_a_float_that_is_not_finite_is_refused_by_name(tmp_path, raw):
    with pytest.raises(ConfigError, match=r"inner\.rate: expected a finite number"):
        load_config(Outer, None, [f"inner.rate={raw}"])
    path = tmp_path / "c.yaml"
    path.write_text(f"inner:\n  rate: {raw}\n")
    with pytest.raises(ConfigError, match=r"inner\.rate: expected a finite number"):
        load_config(Outer, path)


def test_a_packaged_experiment_refuses_a_nan_learning_rate_before_any_run_folder(tmp_path):
    from pathanat.training.run import train

    with pytest.raises(ConfigError, match=r"optim\.lr: expected a finite number"):
        train("demo", ["optim.lr=.nan"], out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_packaged_configs_resolve_to_their_frozen_snapshot():
    """Each packaged YAML states only what differs from the schema's defaults; what it resolves to
    must stay what it was when every default was written out (tests/fixtures, taken before)."""
    import json

    from pathanat.experiment import load_experiment, packaged_configs

    frozen = json.loads((Path(__file__).parent / "fixtures" / "packaged_configs.json").read_text())
    assert sorted(packaged_configs()) == sorted(frozen)
    for name, expected in frozen.items():
        assert json.loads(json.dumps(to_dict(load_experiment(name)))) == expected, name


@dataclass
class Window:
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self):
        if self.low >= self.high:
            raise ConfigError(f"low: expected a value below high ({self.high}), got {self.low}")


def test_an_error_names_the_file_or_the_overrides_its_value_came_from(tmp_path):
    path = tmp_path / "window.yaml"
    path.write_text("low: 2.0\nhigh: 3.0\nlwo: 1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: lwo: unknown key; did you mean 'low'"):
        load_config(Window, path)
    path.write_text("low: 2.0\nhigh: 3.0\n")
    with pytest.raises(ConfigError, match=r"^override high=1\.5: low: expected a value below"):
        load_config(Window, path, ["high=1.5"])
    path.write_text("low: 2.0\n")  # invalid alone; an override may complete it
    assert load_config(Window, path, ["high=4"]) == Window(2.0, 4.0)
    with pytest.raises(ConfigError, match=rf"^{path}: low: expected a value below"):
        load_config(Window, path, ["high=1.5"])


def test_kl_group_scale_takes_one_value_per_group_fine_groups_included():
    from pathanat.experiment import load_experiment

    # 4 levels: z_0..z_4, one per scale; a second full-resolution group makes 6
    five, six = "objective.kl_group_scale=[1,1,1,1,3]", "objective.kl_group_scale=[1,1,1,1,3,3]"
    assert load_experiment("demo", [five]).objective.kl_group_scale == (1, 1, 1, 1, 3)
    with pytest.raises(ConfigError, match=r"kl_group_scale: expected 6 values > 0 .*"
                                          r"model\.levels \+ model\.fine_groups"):
        load_experiment("demo", ["model.fine_groups=2", five])
    assert len(load_experiment("demo", ["model.fine_groups=2", six]).objective.kl_group_scale) == 6


def test_second_stage_detail_steps_are_a_count_of_zero_or_more():
    from pathanat.experiment import load_experiment

    assert load_experiment("demo").second_stage.detail_steps == 0  # no detail model unless asked
    assert load_experiment("demo", ["second_stage.detail_steps=8000"]).second_stage.detail_steps \
        == 8000
    for raw, message in (("-1", "expected a value >= 0"), ("2.5", "expected int")):
        with pytest.raises(ConfigError, match=rf"second_stage\.detail_steps: {message}"):
            load_experiment("demo", [f"second_stage.detail_steps={raw}"])
