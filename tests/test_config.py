import pytest

from qfl.config import ConfigError, RunConfig, build_config, load_config_file, parse_overrides, resolve_config
from qfl.server.preflight import check_components


def test_defaults_are_the_demo_run():
    cfg = build_config()
    assert cfg == RunConfig()
    assert cfg.clients == 10 and cfg.dataset == "digits" and cfg.alpha is None


def test_overrides_parse_toml_literals():
    values = parse_overrides(["rounds=3", "alpha=0.5", "model=mlp", "fed_eval=false", "lr=1e-2"])
    assert values == {"rounds": 3, "alpha": 0.5, "model": "mlp", "fed_eval": False, "lr": 0.01}
    cfg = resolve_config(values)
    assert cfg.rounds == 3 and cfg.alpha == 0.5 and cfg.model == "mlp" and cfg.fed_eval is False


def test_unknown_key_names_the_key_and_a_close_match():
    with pytest.raises(ConfigError, match=r"unknown config key 'round'.*did you mean 'rounds'"):
        build_config(overrides=["round=3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("clients=-3", r"clients must be >= 1, got -3"),
        ("clients=0", r"clients must be >= 1"),
        ("alpha=0", r"alpha must be > 0"),
        ("alpha=-1.5", r"alpha must be > 0"),
        ("rounds=0", r"rounds must be >= 1"),
        ("fraction=1.5", r"fraction must be in \(0, 1\]"),
        ("model=resnet", r"unknown model 'resnet'; choose one of cnn, mlp"),
        ("dataset=imagenet", r"unknown dataset 'imagenet'"),
        ("codec=zip", r"unknown codec .zip.; choose one of: fp32, fp16"),
        ("security=secret", r"unknown security mode .secret."),
        ("server_opt=sgd", r"unknown server_opt 'sgd'"),
        ("clients=ten", r"config key 'clients' must be int, got 'ten'"),
        ("lr=0", r"lr must be > 0"),
    ],
)
def test_bad_values_are_rejected_with_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        check_components(build_config(overrides=[override]))


def test_set_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["rounds"])


def test_alpha_iid_spellings():
    assert resolve_config({"alpha": "iid"}).alpha is None
    assert resolve_config({"alpha": 1}).alpha == 1.0


def test_resolved_toml_round_trips(tmp_path):
    cfg = build_config(overrides=["alpha=0.3", "rounds=4", "server_opt=fedadam", "server_lr=0.01"])
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    assert resolve_config(load_config_file(path)) == cfg


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('rounds = 7\nmodel = "mlp"\n')
    cfg = build_config(path, ["rounds=2"])
    assert cfg.rounds == 2 and cfg.model == "mlp"


def test_bad_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        build_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        build_config(bad)


def test_flwr_app_config_in_pyproject_is_valid():
    """`flwr run .` reads [tool.flwr.app.config]; every key there must pass qfl's schema."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    values = pyproject["tool"]["flwr"]["app"]["config"]
    cfg = resolve_config(values)
    assert cfg.alpha is None and cfg.rounds == values["rounds"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["codec=qsgd", "codec.bits=0"], r"qsgd bits must be in 1\.\.8, got 0"),
        (["codec=qsgd", "codec.bits=9"], r"qsgd bits must be in 1\.\.8, got 9"),
        (["codec=topk", "codec.ratio=0"], r"topk ratio must be in \(0, 1\].*0 < k ≤ d"),
        (["codec=topk", "codec.ratio=1.5"], r"topk ratio must be in \(0, 1\]"),
        (["codec=randk", "codec.ratio=-0.1"], r"randk ratio must be in \(0, 1\]"),
        (["codec=powersgd", "codec.rank=0"], r"powersgd rank must be >= 1, got 0"),
        (["codec=sign", "codec.bits=2"], r"codec 'sign' does not take codec\.bits"),
        (["codec=fp32", "codec.entropy=lzma"], r"codec\.entropy must be one of none, zstd, zlib"),
        (["downlink_codec=sign"], r"downlink_codec 'sign' keeps state"),
        (["codec=fp32", "codec.bits=3"], r"codec 'fp32' does not take codec\.bits"),
    ],
)
def test_codec_config_errors_stop_before_any_round(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_components(build_config(overrides=overrides))


def test_codec_params_round_trip_through_toml(tmp_path):
    cfg = build_config(overrides=["codec=topk", "codec.ratio=0.02", "codec.entropy=zstd", "downlink_codec=fp16",
                                  "security=channel-pad"])
    assert cfg.codec_params == {"ratio": 0.02, "entropy": "zstd"} and cfg.downlink_codec == "fp16"
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    assert resolve_config(load_config_file(path)) == cfg
    assert resolve_config({"codec": "topk", "codec_params.ratio": 0.02, "codec_params.entropy": "zstd",
                           "downlink_codec": "fp16", "security": "channel-pad"}) == cfg
