import json
import subprocess
import sys

import pytest
import yaml

from pipeline.config import Config, load_config, parse_config
from pipeline.errors import UserError


def _write(tmp_path, obj, name="c.yaml"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else yaml.safe_dump(obj))
    return p


def test_defaults_round_trip(tmp_path):
    cfg = parse_config({"run": {"name": "x", "out_dir": str(tmp_path)}, "pack": {"window_len": 512, "doc_len": [8, 64]}})
    again = parse_config(json.loads(cfg.to_json()))
    assert again == cfg
    assert again.pack.window_len == 512 and again.pack.doc_len == (8, 64)


def test_contract_keys_exist():
    cfg = Config()
    for path in ["run.name", "run.out_dir", "run.seed", "data.source", "data.text_field", "data.tokenizer",
                 "pack.window_len", "pack.mode", "pack.doc_len"]:
        obj = cfg
        for part in path.split("."):
            obj = getattr(obj, part)


@pytest.mark.parametrize("raw,expected", [
    ({"pack": {"windw_len": 5}}, "pack.windw_len: unknown key (did you mean 'window_len'?)"),
    ({"pack": {"window_len": 0}}, "pack.window_len: Input should be greater than 0"),
    ({"pack": {"window_len": "long"}}, "pack.window_len: Input should be a valid integer"),
    ({"pack": {"mode": "diagonal"}}, "pack.mode: Input should be 'cross_doc' or 'doc_masked'"),
    ({"pack": {"doc_len": [100, 10]}}, "pack.doc_len: must be [min, max]"),
    ({"pack": {"window_len": 100, "doc_len": [10, 200]}}, "window_len 100 is smaller than doc_len max 200"),
    ({"bogus": 1}, "bogus: unknown key"),
    ({"train": {"phases": [{"window_len": 64, "steps": 0}]}}, "train.phases[0].steps: Input should be greater than 0"),
])
def test_bad_values_name_the_key(raw, expected):
    with pytest.raises(UserError) as err:
        parse_config(raw)
    assert expected in str(err.value)


def test_yaml_not_a_mapping(tmp_path):
    with pytest.raises(UserError, match="must be a YAML mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_show_and_exit_codes(tmp_path):
    good = _write(tmp_path, {"run": {"name": "x"}, "pack": {"window_len": 256, "doc_len": [8, 64]}})
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "config", "show", str(good)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["pack"]["window_len"] == 256 and shown["data"]["tokenizer"] == "byte"
    bad = _write(tmp_path, {"pack": {"window_len": -1}}, "bad.yaml")
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "config", "show", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "pack.window_len" in out.stderr and "Traceback" not in out.stderr


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads `3e-4` as a string; strict types would then refuse what users write."""
    from pipeline.config import load_config

    p = tmp_path / "c.yaml"
    p.write_text("train: {lr: 3e-4, eps: 1e-8}\n")
    t = load_config(p).train
    assert t.lr == 3e-4 and t.eps == 1e-8
    p.write_text("train: {lr: '3e-4'}\n")  # quoted: a string, refused
    import pytest

    from pipeline.errors import UserError

    with pytest.raises(UserError, match="train.lr"):
        load_config(p)
