"""Every transfer config builds, passes the trainer's key check, and has a sane recipe."""

import importlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from paligemma import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from paligemma import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position

TRANSFERS = ["shapes", "forkme", "flickr8k", "cococap", "coco_detection", "vqa"]


@pytest.mark.parametrize("name", TRANSFERS)
def test_transfer_builds_and_validates(name):
  config = importlib.import_module(f"transfers.{name}").get_config(None)
  train.validate(config)
  optim.groups_from_config(config.schedule, config.optim.schedule)
  assert config.input.batch_size % config.optim.accum_steps == 0
  for ev in config.evals.values():
    assert ev.type and ev.data and ev.every >= 0


def test_shapes_detect_variant():
  config = importlib.import_module("transfers.shapes").get_config("task=detect")
  train.validate(config)
  assert config.input.data.task == "detect" and "detect" in config.evals


def test_flickr8k_is_the_brief_recipe():
  c = importlib.import_module("transfers.flickr8k").get_config(
      "directory=/data/f8k,checkpoint=/ckpt/pg2.npz")
  assert c.schedule == "attention_only" and c.optim.lr == 5e-5
  assert c.input.batch_size == 10 and c.total_epochs == 10 and c.input.text_len == 128
  assert c.input.image_size == 224 and c.export_dtype == "float16"
  assert (c.input.data.train_size, c.input.data.val_size) == (1200, 300)
  assert c.input.data.directory == "/data/f8k" and c.model_init == "/ckpt/pg2.npz"


def test_config_arguments_are_checked():
  with pytest.raises(ValueError, match="Unknown config argument 'tsk'"):
    importlib.import_module("transfers.shapes").get_config("tsk=detect")
  assert common.parse_arg("steps=5,evals=false", steps=0, evals=True).to_dict() == \
      {"steps": 5, "evals": False}
