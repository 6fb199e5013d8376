"""Every transfer config builds, passes the trainer's key check, and has a sane recipe."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # pylint: disable=g-import-not-at-top

from paligemma import config as config_lib  # pylint: disable=g-import-not-at-top
from paligemma import optim  # pylint: disable=g-import-not-at-top
from paligemma import train  # pylint: disable=g-import-not-at-top
from paligemma import transfer_configs  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSFERS = ["shapes", "forkme", "flickr8k", "cococap", "coco_detection", "coco_segmentation",
             "refcoco_seg", "vqa", "colab_t4",
             "tuxemon", "vqav2_hf", "lora_t4", "shapes_lora"]


def _transfer(name, arg=None):
  """transfers/<name>.py[:arg], loaded as --config loads it (from any directory)."""
  path = os.path.join(REPO, "transfers", f"{name}.py")
  return config_lib.load(path if arg is None else f"{path}:{arg}")


@pytest.mark.parametrize("name", TRANSFERS)
def test_transfer_builds_and_validates(name):
  config = _transfer(name)
  train.validate(config)
  optim.groups_from_config(config.schedule, config.optim.schedule)
  assert config.input.batch_size % config.optim.accum_steps == 0
  for ev in config.evals.values():
    assert ev.type and ev.data and ev.every >= 0


def test_every_transfer_is_tested():
  names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "transfers"))
                 if f.endswith(".py"))
  assert names == sorted(TRANSFERS)


def test_transfers_import_only_the_package():
  # A transfer runs from any directory and any install: no imports of each other, no
  # sys.path edits.
  for name in TRANSFERS:
    with open(os.path.join(REPO, "transfers", f"{name}.py"), encoding="utf-8") as f:
      text = f.read()
    imports = [l for l in text.splitlines() if l.startswith(("import ", "from "))]
    assert all(l.startswith("from paligemma") for l in imports), (name, imports)
    assert "sys.path" not in text, name


def test_shapes_detect_variant():
  config = _transfer("shapes", "task=detect")
  train.validate(config)
  assert config.input.data.task == "detect" and "detect" in config.evals


def test_segmentation_recipes():
  config = _transfer("shapes", "task=segment")
  train.validate(config)
  assert config.input.data.vae == "shapes" and config.evals.segment.type == "segmentation"
  c = _transfer("refcoco_seg", "vae=/v/vae-oid.npz")  # big_vision's refcoco_seg.
  assert (c.input.image_size, c.input.text_len, c.label_smoothing) == (448, 48, 0.3)
  assert c.input.data.vae == c.evals.segment.vae == "/v/vae-oid.npz"
  assert c.model_init.endswith("paligemma2-3b-pt-448")
  assert _transfer("refcoco_seg", "res=224").model_init.endswith("pt-224")
  assert _transfer("coco_segmentation").input.data.name == "coco_segmentation"


def test_flickr8k_recipe():
  c = _transfer("flickr8k", "directory=/data/f8k,checkpoint=/ckpt/pg2.npz")
  assert c.schedule == "attention_only" and c.optim.lr == 5e-5
  assert c.input.batch_size == 10 and c.total_epochs == 10 and c.input.text_len == 128
  assert c.input.image_size == 224 and c.export_dtype == "float16"
  assert (c.input.data.train_size, c.input.data.val_size) == (1200, 300)
  assert c.input.data.directory == "/data/f8k" and c.model_init == "/ckpt/pg2.npz"


@pytest.mark.parametrize("arg, checkpoint, llm", [
    ("", "kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224", "gemma2_2b"),
    ("size=10b,res=448", "kaggle:google/paligemma-2/jax/paligemma2-10b-pt-448", "gemma2_9b"),
    ("size=28b,res=896", "kaggle:google/paligemma-2/jax/paligemma2-28b-pt-896", "gemma2_27b"),
    ("size=", "kaggle:google/paligemma/jax/paligemma-3b-pt-224", "gemma_2b"),  # PaliGemma 1.
    ("size=10b,checkpoint=/ckpt/paligemma-3b-pt-224.npz", "/ckpt/paligemma-3b-pt-224.npz",
     "gemma_2b"),  # A given checkpoint wins; its name picks the Gemma.
])
def test_forkme_checkpoint_and_model_from_size_and_res(arg, checkpoint, llm):
  c = _transfer("forkme", arg)
  train.validate(c)
  res = int(dict(kv.split("=") for kv in arg.split(",") if kv).get("res", 224))
  assert c.model_init == checkpoint and c.model.llm.variant == llm
  assert c.model.img.variant == "So400m/14" and c.model.img.image_size == res
  assert c.input.image_size == res and c.model.remat_policy == "nothing_saveable"


@pytest.mark.parametrize("arg, frozen", [
    ("", []), ("freeze_vit=True", ["img/"]), ("freeze_llm=True", ["llm/"]),
    ("freeze_vit,freeze_llm=false", ["img/"]),
])
def test_forkme_freezes_towers(arg, frozen):
  c = _transfer("forkme", arg)
  groups = optim.groups_from_config(c.schedule, c.optim.schedule)
  names = ["img/Transformer/encoder_norm/scale", "llm/layers/attn/q_einsum/w"]
  index = optim.assign_groups(names, groups)
  for name in names:
    is_frozen = groups[index[name]][1] is None
    assert is_frozen == any(name.startswith(f) for f in frozen), (arg, name)
    if not is_frozen:  # The one schedule of c.optim.schedule.
      assert groups[index[name]][1] == dict(decay="cosine", warmup_percent=0.05)


def test_forkme_rejects_unreleased_size_and_res():
  with pytest.raises(config_lib.ConfigError, match="size='7b' is not released"):
    _transfer("forkme", "size=7b")
  with pytest.raises(config_lib.ConfigError, match="res=300 has no released checkpoint"):
    _transfer("forkme", "res=300")
  assert _transfer("forkme", "res=300,checkpoint=/ckpt/x.npz").model.img.image_size == 300


def test_big_vision_sharding_rules_key_is_refused():
  # big_vision's `sharding_rules` shards activations; ignored here it would mean nothing
  # is sharded as the author meant.
  c = _transfer("forkme")
  c.sharding_rules = [("act_batch", ("data",))]
  with pytest.raises(config_lib.ConfigError, match="sharding_rules.*batch_axes.*"
                     "sharding_strategy"):
    train.validate(c)
  with pytest.raises(config_lib.ConfigError, match="did you mean 'sharding_strategy'"):
    config_lib.load(os.path.join(REPO, "transfers", "forkme.py"),
                    [("sharding_rules", "fsdp")])


def test_config_arguments_are_checked():
  with pytest.raises(config_lib.ConfigError, match="Unknown config argument 'tsk'"):
    _transfer("shapes", "tsk=detect")
  assert transfer_configs.parse_arg("steps=5,evals=false", steps=0, evals=True).to_dict() == \
      {"steps": 5, "evals": False}
