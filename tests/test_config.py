"""Transfer configs from the command line: overrides, added keys, one-line errors."""

import os
import subprocess
import sys

import ml_collections
import pytest

from paligemma import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(REPO, "transfers", "shapes.py")


def _load(*overrides, arg="evals=False"):
  return config_lib.load(f"{SHAPES}:{arg}", [o.split("=", 1) for o in overrides])


def test_overrides_take_each_fields_type():
  c = _load("optim.lr=3e-4", "total_steps=7", "progress=false", "input.batch_size=4",
            "mesh=[('data', 4), ('model', 2)]", "sharding_strategy=fsdp", "distributed=False",
            "schedule=[('img/.*', None), ('.*', 'default')]", "frozen_dtype=float16",
            "model_init=None")
  assert c.optim.lr == 3e-4 and isinstance(c.optim.lr, float)
  assert c.total_steps == 7 and c.progress is False and c.input.batch_size == 4
  assert c.mesh == [("data", 4), ("model", 2)] and c.sharding_strategy == "fsdp"
  assert c.distributed is False and c.schedule == [("img/.*", None), (".*", "default")]
  assert c.frozen_dtype == "float16" and c.model_init is None
  config_lib.validate(c)


def test_keys_are_added_to_free_form_dicts_only():
  c = _load("model.llm.mlp_dim=256", "optim.kwargs.b1=0.8", "evals.val.every=5",
            "evals.val.type=perplexity", "evals.val.data={'name': 'shapes'}",
            "evals.val.data.num_examples=8")
  assert c.model.llm.mlp_dim == 256 and c.optim.kwargs.b1 == 0.8
  assert c.evals.val.every == 5 and c.evals.val.data.num_examples == 8
  config_lib.validate(c)
  c = _load("input.data={'name': 'jsonl', 'path': 'x.jsonl'}")
  assert c.input.data.to_dict() == {"name": "jsonl", "path": "x.jsonl"}
  c = _load("evals={}", arg="")
  assert isinstance(c.evals, ml_collections.ConfigDict) and not c.evals


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", r"Unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
    ("nothing.x=1", r"Unknown config key 'nothing'"),
    ("total_steps=abc", r"--config.total_steps='abc' is not an int"),
    ("input.batch_size=2.5", r"--config.input.batch_size='2.5' is not an int"),
    ("optim.lr=fast", r"--config.optim.lr='fast' is not a float"),
    ("progress=ture", r"--config.progress='ture' is not a bool; use --config.progress=true"),
    ("optim.lr.x=1", r"config.optim.lr is float, not a dict"),
])
def test_override_mistakes_name_the_key(override, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    _load(override)


@pytest.mark.parametrize("override, message", [
    ("model.llm.mlp_dim=abc", r"config.model.llm.mlp_dim='abc' must be int"),
    ("model.llm.mlpdim=3", r"Unknown config key 'model.llm.mlpdim'"),
    ("model.img.variant=Huge/14", r"config.model.img: Unknown img variant 'Huge/14'"),
])
def test_validation_names_tower_mistakes(override, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(_load(override))


def test_config_argument_mistakes():
  with pytest.raises(config_lib.ConfigError, match=r"evals='ture' is not a bool"):
    _load(arg="evals=ture")
  with pytest.raises(config_lib.ConfigError, match=r"steps='abc' is not int"):
    _load(arg="steps=abc")
  with pytest.raises(config_lib.ConfigError, match=r"Unknown config argument 'stesp'"):
    _load(arg="stesp=3")
  with pytest.raises(config_lib.ConfigError, match=r"Config file 'nope.py' not found"):
    config_lib.load("nope.py")


def test_split_argv_takes_both_flag_spellings():
  spec, overrides, rest = config_lib.split_argv(
      ["prog", "--config", "a.py:x=1", "--config.optim.lr", "0.1", "--config.seed=3",
       "--workdir=/w"])
  assert spec == "a.py:x=1" and overrides == [("optim.lr", "0.1"), ("seed", "3")]
  assert rest == ["prog", "--workdir=/w"]


@pytest.mark.parametrize("flag", ["--config.optim.lrr=0.1", "--config.evals=ture"])
def test_command_line_mistake_is_one_line(tmp_path, flag):
  """No traceback: one `error:` line naming the key, exit status 2, nothing written."""
  out = subprocess.run(
      [sys.executable, "-m", "paligemma.train", "--config=transfers/shapes.py", flag,
       f"--workdir={tmp_path / 'w'}"], cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert out.returncode == 2, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and flag.split("=")[0][len("--config."):] in errors[0], out.stderr
  assert not (tmp_path / "w").exists()
