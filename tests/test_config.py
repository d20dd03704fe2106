"""Typed configs: from_dict, YAML files, command-line overrides and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether import ConfigError, KLConfig, PPOConfig, SamplingConfig
from tether.config import from_dict, load_config, load_yaml, save_yaml, split_args


def test_from_dict_builds_nested_dataclasses() -> None:
    cfg = from_dict(
        PPOConfig,
        {
            "learning_rate": 1e-5,
            "sampling": {"max_new_tokens": 7, "temperature": 0.7},
            "kl": {"coef": 0.1, "target": 6.0, "estimator": "k3"},
        },
    )
    assert isinstance(cfg.sampling, SamplingConfig) and isinstance(cfg.kl, KLConfig)
    assert cfg.sampling.max_new_tokens == 7 and cfg.sampling.temperature == 0.7
    assert (cfg.kl.coef, cfg.kl.target, cfg.kl.estimator) == (0.1, 6.0, "k3")
    assert cfg.learning_rate == 1e-5
    # fields not given keep their defaults, in the nested blocks too
    assert cfg.sampling.top_k == 0 and cfg.kl.horizon == KLConfig().horizon
    assert cfg.mini_batch_size == PPOConfig().mini_batch_size


def test_from_dict_coerces_strings_from_the_command_line() -> None:
    cfg = from_dict(
        PPOConfig,
        {"seed": "3", "learning_rate": "1e-5", "whiten_rewards": "true", "sampling": {"max_new_tokens": "9"}},
    )
    assert cfg.seed == 3 and isinstance(cfg.seed, int)
    assert cfg.learning_rate == 1e-5
    assert cfg.whiten_rewards is True
    assert cfg.sampling.max_new_tokens == 9


@pytest.mark.parametrize(
    "data,named",
    [
        ({"learning_rat": 1e-5}, "learning_rat"),
        ({"sampling": {"max_new_tokenz": 3}}, "sampling.max_new_tokenz"),
        ({"kl": {"coeff": 0.1}}, "kl.coeff"),
    ],
)
def test_unknown_key_error_names_the_key(data: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        from_dict(PPOConfig, data)


@pytest.mark.parametrize(
    "data,named",
    [
        ({"seed": "abc"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"learning_rate": True}, "learning_rate"),
        ({"whiten_rewards": "maybe"}, "whiten_rewards"),
        ({"sampling": {"max_new_tokens": "lots"}}, "sampling.max_new_tokens"),
        ({"kl": {"target": "high"}}, "kl.target"),
        ({"sampling": 5}, "sampling"),
        ({"logging": {"report_to": 3}}, "logging.report_to"),
    ],
)
def test_bad_type_error_names_the_field(data: dict, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(PPOConfig, data)
    assert named in str(info.value)


def test_literal_choices() -> None:
    assert from_dict(PPOConfig, {"loss_aggregation": "seq-mean"}).loss_aggregation == "seq-mean"
    with pytest.raises(ConfigError) as info:
        from_dict(PPOConfig, {"loss_aggregation": "sum"})
    message = str(info.value)
    assert "loss_aggregation" in message and "'sum'" in message
    assert "'token-mean'" in message and "'seq-mean'" in message
    with pytest.raises(ConfigError, match=r"kl\.estimator.*'k1', 'k2', 'k3'"):
        from_dict(PPOConfig, {"kl": {"estimator": "k4"}})


@pytest.mark.parametrize("null", [None, "null", "none", "None", "NULL"])
def test_optional_fields_accept_null_spellings(null) -> None:
    cfg = from_dict(
        PPOConfig, {"cliprange_high": null, "missing_eos_penalty": null, "kl": {"coef": 0.1, "target": null}}
    )
    assert cfg.cliprange_high is None and cfg.missing_eos_penalty is None and cfg.kl.target is None


def test_optional_fields_accept_values() -> None:
    cfg = from_dict(PPOConfig, {"cliprange_high": "0.28", "kl": {"target": 6}})
    assert cfg.cliprange_high == 0.28
    assert cfg.kl.target == 6.0 and isinstance(cfg.kl.target, float)


def test_post_init_errors_become_config_errors() -> None:
    with pytest.raises(ConfigError, match="temperature"):
        from_dict(PPOConfig, {"sampling": {"temperature": 0}})
    with pytest.raises(ConfigError, match="kl.coef"):
        from_dict(PPOConfig, {"kl": {"coef": -1}})


def test_split_args() -> None:
    assert split_args(["--a.b", "1", "--c=x", "--flag", "--output-dir", "d"]) == {
        "a.b": "1",
        "c": "x",
        "flag": "true",
        "output_dir": "d",
    }
    with pytest.raises(ConfigError, match="stray"):
        split_args(["stray"])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_load_config_yaml_plus_overrides(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "ppo.yaml",
        "output_dir: from_file\n"
        "learning_rate: 2.0e-5\n"
        "sampling:\n  max_new_tokens: 16\n  temperature: 0.7\n"
        "kl:\n  coef: 0.2\n  target: 6.0\n",
    )
    argv = [
        "--config",
        str(path),
        "--sampling.max_new_tokens",
        "7",
        "--output-dir",
        "x",
        "--kl.target",
        "null",
    ]
    cfg, extras = load_config(PPOConfig, argv)
    assert extras == {}
    # the command line wins ...
    assert cfg.sampling.max_new_tokens == 7
    assert cfg.output_dir == "x"
    assert cfg.kl.target is None
    # ... and the rest of the file, including the rest of the same nested blocks, is kept
    assert cfg.sampling.temperature == 0.7
    assert cfg.kl.coef == 0.2
    assert cfg.learning_rate == 2e-5


def test_load_config_dash_spelling_and_extras(tmp_path: Path) -> None:
    cfg, extras = load_config(
        PPOConfig,
        ["--sampling.max-new-tokens", "5", "--loss-aggregation=seq-mean", "--policy", "gpt2"],
        extra=("policy",),
    )
    assert cfg.sampling.max_new_tokens == 5
    assert cfg.loss_aggregation == "seq-mean"
    assert extras == {"policy": "gpt2"}
    with pytest.raises(ConfigError, match="policy"):
        load_config(PPOConfig, ["--policy", "gpt2"])  # not declared as extra -> unknown key


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.yaml", "sampling:\n  max_new_tokenz: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(PPOConfig, ["--config", str(path)])
    assert str(path) in str(info.value) and "sampling.max_new_tokenz" in str(info.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PPOConfig, ["--config", str(tmp_path / "missing.yaml")])
    not_a_mapping = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(PPOConfig, ["--config", str(not_a_mapping)])


@pytest.mark.parametrize(
    "sizes,named",
    [
        (
            {"rollout_batch_size": 64, "mini_batch_size": 12},
            ("rollout_batch_size", "mini_batch_size", "64", "12"),
        ),
        ({"mini_batch_size": 16, "micro_batch_size": 5}, ("mini_batch_size", "micro_batch_size", "16", "5")),
    ],
)
def test_batch_sizes_that_do_not_divide(sizes: dict, named: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(PPOConfig, sizes)
    for word in named:
        assert word in str(info.value)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()]
    with pytest.raises(ConfigError, match="mini_batch_size"):
        load_config(PPOConfig, argv)


def test_derived_batch_values() -> None:
    cfg = from_dict(
        PPOConfig,
        {"rollout_batch_size": 32, "mini_batch_size": 8, "micro_batch_size": 2, "total_episodes": 100},
    )
    assert cfg.gradient_accumulation_steps == 4
    assert cfg.num_mini_batches == 4
    assert cfg.num_steps == 3  # 100 // 32


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = from_dict(
        PPOConfig,
        {
            "output_dir": "runs/x",
            "cliprange_high": 0.28,
            "missing_eos_penalty": None,
            "loss_aggregation": "seq-mean",
            "sampling": {"max_new_tokens": 7, "temperature": 0.7},
            "kl": {"coef": 0.1, "target": 6.0, "estimator": "k3"},
            "logging": {"report_to": ["jsonl"], "save_steps": 0},
        },
    )
    path = tmp_path / "config.yaml"
    save_yaml(cfg, path)
    loaded = load_yaml(PPOConfig, path)
    assert loaded == cfg
    assert loaded != PPOConfig()  # the round trip carried non-default values
    # and a file with a typo names the file and the key
    _write(path, path.read_text().replace("estimator:", "estimatr:"))
    with pytest.raises(ConfigError) as info:
        load_yaml(PPOConfig, path)
    assert str(path) in str(info.value) and "kl.estimatr" in str(info.value)


@pytest.mark.parametrize("text", ["2024_06_01", "0123", "on"])
def test_string_override_is_kept_verbatim(text: str) -> None:
    cfg, _ = load_config(PPOConfig, ["--output-dir", text])
    assert cfg.output_dir == text


def test_every_cli_config_field_has_help_text_and_help_lists_it(capsys):
    """--help is generated from the fields: every field, nested ones dotted, with its docstring."""
    import dataclasses
    import typing

    from tether.cli import main as cli_main
    from tether.config import config_help, field_docs
    from tether.sample import SampleConfig
    from tether.trainers.ppo import PPOConfig
    from tether.trainers.reward import RewardConfig

    def leaves(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from leaves(hints[f.name], f"{prefix}{f.name}.")
            else:
                assert f.name in field_docs(cls), f"{cls.__name__}.{f.name} has no docstring"
                yield f"{prefix}{f.name}", field_docs(cls)[f.name]

    for command, cls in (("ppo", PPOConfig), ("rm", RewardConfig), ("sample", SampleConfig)):
        assert cli_main([command, "--help"]) == 0
        out = capsys.readouterr().out
        for name, doc in leaves(cls):
            assert f"  --{name}  " in out, (command, name)
            assert doc.split()[0] in out
    lines = config_help(PPOConfig)
    assert "  --kl.estimator  k1|k2|k3|full = 'k1'" in lines
    assert "  --sampling.max_new_tokens  int = 32" in lines
    assert "  --cliprange_high  float | None = None" in lines


def test_presets_load_and_layer_under_the_config_file_and_the_command_line(tmp_path, capsys) -> None:
    from tether.cli import main as cli_main
    from tether.presets import preset_names, preset_path

    assert {"tiny", "small", "adaptive-kl"} <= set(preset_names())
    for name in preset_names():
        cfg, _ = load_config(PPOConfig, [], base_file=preset_path(name))  # valid, and batch sizes divide
        assert cfg.num_steps >= 1
    tiny, _ = load_config(PPOConfig, [], base_file=preset_path("tiny"))
    assert (tiny.rollout_batch_size, tiny.sampling.max_new_tokens, tiny.num_steps) == (8, 16, 32)
    assert tiny.sampling.top_k == 0  # what the preset does not set keeps its default
    adaptive, _ = load_config(PPOConfig, [], base_file=preset_path("adaptive-kl"))
    assert adaptive.kl.target == 6.0 and adaptive.missing_eos_penalty == 1.0
    # preset < --config file < --field value, nested blocks merged key by key
    run = tmp_path / "run.yaml"
    run.write_text("sampling: {temperature: 0.7}\nlearning_rate: 2.0e-5\n")
    cfg, extra = load_config(PPOConfig, ["--config", str(run), "--learning_rate", "5e-5"],
                             base_file=preset_path("tiny"))
    assert (cfg.sampling.max_new_tokens, cfg.sampling.temperature) == (16, 0.7)
    assert cfg.learning_rate == 5e-5 and cfg.rollout_batch_size == 8
    assert cli_main(["ppo", "--preset", "huge", "--policy", "p", "--reward", "r.py:f", "--prompts", "x"]) == 2
    err = capsys.readouterr().err
    assert "unknown ppo preset 'huge'" in err and "tiny" in err
    assert cli_main(["ppo", "--help"]) == 0
    assert "adaptive-kl" in capsys.readouterr().out
