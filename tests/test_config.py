import pytest

from grpo_agent.config import Config, config_from_dict, load_config
from grpo_agent.errors import ConfigError


def test_defaults_are_valid():
    cfg = Config()
    assert cfg.policy.model == "default" and cfg.policy.device == "auto"
    assert cfg.sampling.k == 8 and cfg.sampling.temperature == 1.0


def test_load_toml_file(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[policy]\nmodel = "/models/mine"\ndevice = "cpu"\n\n[sampling]\nk = 4\ntop_p = 0.9\n')
    cfg = load_config(path)
    assert cfg.policy.model == "/models/mine" and cfg.policy.device == "cpu"
    assert cfg.sampling.k == 4 and cfg.sampling.top_p == 0.9 and cfg.sampling.max_new_tokens == 128


@pytest.mark.parametrize(
    "data,message",
    [
        ({"policy": {"modle": "x"}}, "unknown key policy.modle: valid keys in [policy] are"),
        ({"sampler": {}}, "unknown table [sampler]"),
        ({"sampling": {"k": 0}}, "sampling.k = 0"),
        ({"sampling": {"k": "8"}}, "sampling.k = '8'"),
        ({"sampling": {"top_p": 1.5}}, "sampling.top_p = 1.5"),
        ({"sampling": {"temperature": -1}}, "sampling.temperature = -1"),
        ({"policy": {"device": "tpu"}}, "policy.device = 'tpu': choose one of 'auto', 'cpu', 'cuda'"),
        ({"policy": {"dtype": "int8"}}, "policy.dtype = 'int8'"),
        ({"policy": 3}, "[policy] must be a table"),
        ({"policy": {"model": 7}}, "policy.model = 7"),
        ({"loop": {"min_gain_z": -1}}, "loop.min_gain_z = -1: must be a finite number >= 0"),
        ({"loop": {"margin": float("nan")}}, "loop.margin = nan: must be a finite number >= 0"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(data, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert message in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist: create one with `grpo-agent init"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[policy\nmodel = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
