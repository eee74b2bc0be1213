"""Configs load, compose and fail with clear errors that name the key."""

import pytest

from m2train.config import ConfigError, load_config


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(*args, **kw):
    with pytest.raises(ConfigError) as e:
        load_config(*args, **kw)
    return str(e.value)


def test_defaults_include_and_override_order(tmp_path):
    write(tmp_path, "base.yaml", "model:\n  hidden_size: 64\n  num_layers: 3\n")
    p = write(tmp_path, "run.yaml", "defaults: [base.yaml]\nmodel:\n  num_layers: 5\n")
    cfg = load_config(p, ["model.intermediate_size=256", "optim.betas=[0.9, 0.95]"])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.intermediate_size) == (64, 5, 256)
    assert cfg.optim.betas == (0.9, 0.95)


def test_named_configs_resolve_without_path():
    assert load_config("m2_bert_80m").model.mixer_input_norm is True
    assert load_config("m2_bert_110m").model.mixer_input_norm is False
    assert load_config("m2_bert_80m_8k").model.max_seq_len == 8192


def test_unknown_key_suggests_the_right_one(tmp_path):
    msg = error_of(write(tmp_path, "a.yaml", "model:\n  hiden_size: 64\n"))
    assert "model.hiden_size" in msg and "did you mean 'hidden_size'" in msg


def test_wrong_type_names_key_and_value():
    msg = error_of(None, ["model.hidden_size=big"])
    assert "model.hidden_size" in msg and "integer" in msg and "'big'" in msg
    msg = error_of(None, ["model.bidirectional=3"])
    assert "model.bidirectional" in msg and "true or false" in msg


def test_bad_choice_lists_the_choices():
    msg = error_of(None, ["model.mlp_type=monarh"])
    assert "model.mlp_type" in msg and "'blockdiag'" in msg and "did you mean 'monarch'" in msg


def test_range_checks():
    assert "model.hidden_size: must be >= 1" in error_of(None, ["model.hidden_size=0"])
    assert "model.hidden_dropout" in error_of(None, ["model.hidden_dropout=1.5"])
    assert "optim.lr: must be > 0" in error_of(None, ["optim.lr=0"])
    assert "optim.betas" in error_of(None, ["optim.betas=[0.9]"])
    assert "model.pad_token_id" in error_of(None, ["model.pad_token_id=40000"])
    assert "model.filter_emb_dim" in error_of(None, ["model.filter_emb_dim=4"])


def test_architecture_consistency():
    assert "M2-GPT must be causal" in error_of(None, ["model.arch=m2_gpt", "model.bidirectional=true"])
    assert "model.head" in error_of(None, ["model.arch=m2_gpt", "model.bidirectional=false", "model.head=mlm"])
    assert "model.head" in error_of(None, ["model.head=causal_lm"])
    assert "num_heads" in error_of(None, ["model.arch=bert", "model.num_heads=5"])


def test_file_errors(tmp_path):
    assert "config file not found" in error_of(tmp_path / "missing.yaml")
    assert "not valid YAML" in error_of(write(tmp_path, "bad.yaml", "model: [1, 2\n"))
    assert "top level must be a mapping" in error_of(write(tmp_path, "list.yaml", "- 1\n- 2\n"))
    write(tmp_path, "a.yaml", "defaults: [b.yaml]\n")
    write(tmp_path, "b.yaml", "defaults: [a.yaml]\n")
    assert "include cycle" in error_of(tmp_path / "a.yaml")
    assert "expected key=value" in error_of(None, ["model.hidden_size"])


def test_cli_reports_config_errors_cleanly(capsys):
    from m2train.cli import main
    assert main(["model-summary", "configs/m2_bert_tiny.yaml", "model.hiden_size=3"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "model.hiden_size" in err


def test_cli_overrides_may_follow_options(capsys):
    from m2train.cli import main
    assert main(["model-summary", "configs/m2_bert_tiny.yaml", "--seq-len", "64", "model.num_layers=1"]) == 0
    assert "FLOPs per token" in capsys.readouterr().out


def test_float_spellings_yaml_reads_as_strings(tmp_path):
    cfg = load_config(write(tmp_path, "eps.yaml", "model:\n  layer_norm_eps: 1e-12\noptim:\n  lr: 3e-4\n"))
    assert cfg.model.layer_norm_eps == 1e-12 and cfg.optim.lr == 3e-4
    assert "model.layer_norm_eps" in error_of(None, ["model.layer_norm_eps=tiny"])
