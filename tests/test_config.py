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
    with pytest.raises(ConfigError) as err:
        build_config(overrides=["round=3"])
    assert err.value.key == "round" and "'rounds'" in str(err.value)  # the close match is the hint


@pytest.mark.parametrize(
    "override",
    ["clients=-3", "clients=0", "alpha=0", "alpha=-1.5", "rounds=0", "fraction=1.5", "model=resnet",
     "dataset=imagenet", "codec=zip", "security=secret", "server_opt=sgd", "clients=ten", "lr=0",
     "secure_masking=triple", "key_policy=later", "qkd_topology=ring", "ray_address=head"],
)
def test_bad_values_are_rejected_naming_the_key(override):
    with pytest.raises(ConfigError) as err:
        check_components(build_config(overrides=[override]))
    assert err.value.key == override.partition("=")[0]


def test_a_choice_names_every_valid_value():
    from qfl.config import Security

    with pytest.raises(ConfigError) as err:
        build_config(overrides=["security=secret"])
    assert all(member.value in str(err.value) for member in Security)
    cfg = build_config(overrides=["security=channel-pad"])
    assert cfg.security is Security.CHANNEL_PAD and cfg.security == "channel-pad"
    assert type(cfg.to_flat()["security"]) is str  # Flower's records and TOML take plain strings


def test_each_concern_is_a_config_of_its_own():
    from qfl.config import QkdConfig, SecurityConfig

    cfg = build_config(overrides=["qkd_distance_km=25"])
    assert isinstance(cfg, QkdConfig) and isinstance(cfg, SecurityConfig) and cfg.qkd_distance_km == 25.0
    with pytest.raises(ConfigError) as err:
        QkdConfig(qkd_rate=-1.0).check()  # a concern checks its own values without the rest of the run
    assert err.value.key == "qkd_rate"


def test_set_without_equals_is_an_error():
    with pytest.raises(ConfigError) as err:
        parse_overrides(["rounds"])
    assert err.value.key is None


def test_alpha_iid_spellings():
    assert resolve_config({"alpha": "iid"}).alpha is None
    assert resolve_config({"alpha": 1}).alpha == 1.0


@pytest.mark.parametrize("value", ["abc", "true"])
def test_a_bad_alpha_names_iid_as_the_alternative(value):
    with pytest.raises(ConfigError) as err:
        build_config(overrides=[f"alpha={value}"])
    assert err.value.key == "alpha" and "'iid'" in str(err.value)


def test_one_client_without_masking_is_allowed():
    for overrides in (["clients=1", "security=none"], ["clients=1", "security=channel-pad"]):
        assert check_components(build_config(overrides=overrides)).clients == 1


def test_every_key_has_a_default_and_a_meaning_from_the_schema():
    import dataclasses

    from qfl.config import describe_keys

    rows = describe_keys()
    keys = {row.key for row in rows}
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert keys == (fields - {"codec_params", "downlink_codec_params", "edge_codec_params"}) | {
        "codec.NAME", "downlink_codec.NAME", "edge_codec.NAME"}
    assert all(row.meaning and row.default and row.concern for row in rows)
    assert {row.key: row.default for row in rows}["rounds"] == str(RunConfig().rounds)
    assert {row.key: row.choices for row in rows}["security"] == ("none", "masked-sum", "channel-pad", "expanded")


def test_few_validation_examples_per_client_warn_but_run():
    from qfl.server.preflight import preflight

    assert preflight(build_config()) == []
    assert len(preflight(build_config(overrides=["clients=300", "security=none"]))) == 1
    assert preflight(build_config(overrides=["clients=300", "security=none", "fed_eval=false"])) == []


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
    with pytest.raises(ConfigError) as err:
        build_config(tmp_path / "missing.toml")
    assert "missing.toml" in str(err.value)
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(ConfigError) as err:
        build_config(bad)
    assert "bad.toml" in str(err.value)


def test_flwr_app_config_in_pyproject_is_valid():
    """`flwr run .` reads [tool.flwr.app.config]; every key there must pass qfl's schema."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    values = pyproject["tool"]["flwr"]["app"]["config"]
    cfg = resolve_config(values)
    assert cfg.alpha is None and cfg.rounds == values["rounds"]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["codec=qsgd", "codec.bits=0"], "codec"),
        (["codec=qsgd", "codec.bits=9"], "codec"),
        (["codec=topk", "codec.ratio=0"], "codec"),
        (["codec=topk", "codec.ratio=1.5"], "codec"),
        (["codec=randk", "codec.ratio=-0.1"], "codec"),
        (["codec=powersgd", "codec.rank=0"], "codec"),
        (["codec=sign", "codec.bits=2"], "codec"),
        (["codec=fp32", "codec.entropy=lzma"], "codec"),
        (["downlink_codec=sign"], "downlink_codec"),
        (["codec=fp32", "codec.bits=3"], "codec"),
        (["secure_clip=1e-40"], "secure_clip"),
        (["qkd_links=client-0~client-99=5"], "qkd_links"),
        (["clients=1"], "clients"),  # a masked sum of one upload is that upload
        (["clients=10", "fraction=0.1"], "fraction"),  # one client sampled per round
        (["security=expanded", "clients=4", "fraction=0.1"], "fraction"),
        (["secure_min_clients=5", "clients=4"], "clients"),
    ],
)
def test_component_errors_stop_before_any_round_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        check_components(build_config(overrides=overrides))
    assert err.value.key == key


def test_codec_params_round_trip_through_toml(tmp_path):
    cfg = build_config(overrides=["codec=topk", "codec.ratio=0.02", "codec.entropy=zstd", "downlink_codec=fp16",
                                  "security=channel-pad"])
    assert cfg.codec_params == {"ratio": 0.02, "entropy": "zstd"} and cfg.downlink_codec == "fp16"
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    assert resolve_config(load_config_file(path)) == cfg
    assert resolve_config({"codec": "topk", "codec_params.ratio": 0.02, "codec_params.entropy": "zstd",
                           "downlink_codec": "fp16", "security": "channel-pad"}) == cfg
