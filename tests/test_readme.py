"""Every command in README.md runs, on tiny data, so the README cannot drift from the code.

The commands are the lines of the README's ```bash blocks (continuations joined, trailing
comments dropped). Each must match exactly one rule below, or the test fails:

  run      run with bash in a scratch folder, after the README's own `export` lines, with
           the rule's `extra` arguments appended (short schedules, tiny sizes) and /tmp/
           redirected into the scratch folder; it must exit 0 and pass the rule's check
  ci       `.ci/run` runs it (the install and test commands): checked to be there verbatim
  fixture  needs the network; the test makes its result instead (named in `reason`)
  mapped   run by another test (`mapped`: its file and the parts of the command in it)
  export   a variable the later commands use

What stands in for the real things, in their real formats:
  CKPT, the kaggle: handles   a kagglehub cache ($KAGGLEHUB_CACHE) holding tiny random
                              checkpoints (SigLIP mu/16 + Gemma 2 tiny, bfloat16 .npz) under
                              the released names, with the Kaggle API unreachable
  paligemma_tokenizer.model   the repo's tiny tokenizer (its vocabulary fits the model)
  $FLICKR8K, $COCO            folders in the Kaggle / COCO layouts with a few JPEGs
  data/*.jsonl, cat.jpg       a few shapes images and JSON lines
  /tmp/shapes                 the demo's workdir layout with random weights (the demo
                              itself is run in full by tests/test_shapes_demo.py)
The pretrained configs get `--config.model.{img,llm}.variant` overrides naming the tiny
towers, 32 px images, 2 steps at batch 2, small evaluation batches; the other benchmarks
get their smallest arguments. XLA compiles at optimization level 0 (XLA_FLAGS, set, not
inherited). `pytest -s` prints each command's CPU and wall seconds.
"""

import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from paligemma import checkpoint
from paligemma import config as config_lib
from paligemma import tokenizer as tokenizer_lib
from paligemma import transfer_configs
from paligemma.checkpoint import tree
from paligemma.data import shapes

from conftest import FAST_COMPILE  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
TIMEOUT_S = 420
WORKERS = 2
# README_TEST_ONLY=regex runs only the commands whose rule name matches (and their needs).
ONLY = os.environ.get("README_TEST_ONLY")

# Tiny stand-in for the released checkpoints; its variants are the overrides below.
TINY_CKPT = {"img": {"variant": "mu/16", "image_size": 32},
             "llm": {"variant": "gemma2_tiny", "vocab_size": 1920}}
TINY_TOWERS = ["--config.model.img.variant=mu/16", "--config.model.llm.variant=gemma2_tiny",
               "--config.model.img.image_size=32", "--config.input.image_size=32"]
SHORT_RUN = ["--config.total_steps=2", "--config.input.batch_size=2", "--config.progress=False"]
KAGGLE_MODELS = ("google/paligemma-2/jax/paligemma2-3b-pt-224",
                 "google/paligemma-2/jax/paligemma2-3b-pt-448")
# Variables the README uses without exporting them: datasets the reader downloads.
DATASET_VARS = ("FLICKR8K", "COCO")
FLICKR_IMAGES = 12


def _flickr_sizes(*prefixes):
  return [f"--config.{p}.{k}={v}" for p in prefixes
          for k, v in (("train_size", 8), ("val_size", 3))]


def _small_evals(*names, decoding=()):
  """Evaluators at batch 4 (the tiny validation sets), decoding 8 tokens."""
  return ([f"--config.evals.{n}.batch_size=4" for n in names] +
          [f"--config.evals.{n}.max_decode_len=8" for n in decoding])


def _shapes_evals(n=8, evals=("val", "caption")):
  return [f"--config.evals.{e}.data.num_examples={n}" for e in evals]


def _exists(*paths):
  def check(root, out):
    del out
    for p in paths:
      assert os.path.exists(os.path.join(root, p)), f"{p} was not written"
  return check


def _stdout_has(pattern, *paths):
  def check(root, out):
    assert re.search(pattern, out.stdout, re.M), f"{pattern!r} not in:\n{out.stdout[-2000:]}"
    _exists(*paths)(root, out)
  return check


@dataclasses.dataclass
class Rule:
  name: str
  pattern: str                  # Full match on the README command.
  kind: str = "run"             # run | ci | fixture | export | mapped
  extra: tuple = ()             # Appended to a `run` command.
  after: tuple = ()             # Names of rules whose commands must run first.
  check: object = None          # check(root, completed_process) for `run`.
  reason: str = ""              # For `fixture`: what the test makes in its place.
  mapped: tuple = ()            # For `mapped`: (test file, *what it has of the command).


RULES = [
    Rule("install", r'pip install -e "\.\[test\]"', kind="ci"),
    Rule("tests", r"python -m pytest -q", kind="ci"),
    Rule("export", r"export (CKPT|TOKENIZER)=\S+", kind="export"),
    Rule("tokenizer download",
         r"curl -L -o paligemma_tokenizer\.model "
         r"https://storage\.googleapis\.com/big_vision/paligemma_tokenizer\.model",
         kind="fixture", reason="the tiny tokenizer is written as paligemma_tokenizer.model"),
    # Run in full, as written, by tests/test_shapes_demo.py (about 3 minutes); here
    # /tmp/shapes is a workdir in the trainer's export layout with random weights.
    Rule("shapes demo", r"python -m paligemma\.train --config transfers/shapes\.py "
         r"--workdir /tmp/shapes", kind="mapped",
         mapped=("tests/conftest.py",  # Its shapes_workdir fixture, which test_shapes_demo uses.
                 "python -m paligemma.train --config transfers/shapes.py --workdir {workdir}")),
    Rule("draw a shape", r"python -c \"from paligemma\.data import shapes; .*"
         r"save\('shape\.png'\)\"", check=_exists("shape.png")),
    Rule("predict shapes", r"python -m paligemma\.predict --checkpoint /tmp/shapes "
         r"--image shape\.png --prompt \"caption en\"",
         extra=("--max_decode_len", "8"), after=("draw a shape",),
         check=_stdout_has(r"^shape\.png\t")),
    Rule("evaluate shapes", r"python -m paligemma\.evaluate --config transfers/shapes\.py "
         r"--checkpoint /tmp/shapes",
         extra=("--progress=false", *_shapes_evals()),
         check=_exists("tmp/shapes/eval/metrics.json")),
    Rule("forkme", r"python -m paligemma\.train --config transfers/forkme\.py:"
         r"train=data/train\.jsonl,val=data/val\.jsonl,checkpoint=\$CKPT,tokenizer=\$TOKENIZER "
         r"--workdir /tmp/mytask",
         # float32 compute: XLA's CPU backend widens bfloat16 at a cost (and it is not
         # what this command checks).
         extra=(*TINY_TOWERS, *SHORT_RUN, "--config.model.dtype=float32",
                *_small_evals("val", "caption", decoding=["caption"])),
         check=_exists("tmp/mytask/params.npz")),
    Rule("flickr8k", r"python -m paligemma\.train --config transfers/flickr8k\.py:"
         r"directory=\$FLICKR8K,checkpoint=\$CKPT,tokenizer=\$TOKENIZER --workdir /tmp/flickr8k",
         extra=(*TINY_TOWERS, *SHORT_RUN,
                *_flickr_sizes("input.data", "evals.val.data", "evals.caption.data"),
                *_small_evals("val", "caption", decoding=["caption"])),
         check=_exists("tmp/flickr8k/params.npz")),
    Rule("coco detection", r"python -m paligemma\.train --config transfers/coco_detection\.py:"
         r"annotations=\$COCO/annotations/instances_train2017\.json,images=\$COCO/train2017,"
         r"val_annotations=\$COCO/annotations/instances_val2017\.json,"
         r"val_images=\$COCO/val2017,tokenizer=\$TOKENIZER --workdir /tmp/cocodet",
         extra=(*TINY_TOWERS, *SHORT_RUN, *_small_evals("val", "detection",
                                                        decoding=["detection"])),
         check=_exists("tmp/cocodet/params.npz")),
    Rule("coco to jsonl", r"python -m paligemma\.data\.coco_to_jsonl --annotations "
         r"\$COCO/annotations/instances_val2017\.json --images \$COCO/val2017 "
         r"--output /tmp/coco_val\.jsonl", check=_exists("tmp/coco_val.jsonl")),
    # Segmentation: vae-oid.npz is a random VAE in the released layout and the COCO
    # annotations carry polygons (_segmentation_data, _coco).
    Rule("coco segmentation", r"python -m paligemma\.train --config "
         r"transfers/coco_segmentation\.py:annotations=\$COCO/annotations/instances_train2017\.json,"
         r"images=\$COCO/train2017,val_annotations=\$COCO/annotations/instances_val2017\.json,"
         r"val_images=\$COCO/val2017,vae=vae-oid\.npz,tokenizer=\$TOKENIZER --workdir /tmp/cocoseg",
         extra=(*TINY_TOWERS, *SHORT_RUN, *_small_evals("val", "segment", decoding=["segment"])),
         check=_exists("tmp/cocoseg/params.npz")),
    Rule("coco to jsonl segment", r"python -m paligemma\.data\.coco_to_jsonl --task segment "
         r"--vae vae-oid\.npz --annotations \$COCO/annotations/instances_val2017\.json "
         r"--images \$COCO/val2017 --output /tmp/coco_seg\.jsonl",
         check=_exists("tmp/coco_seg.jsonl")),
    Rule("refcoco seg", r"python -m paligemma\.train --config transfers/refcoco_seg\.py:"
         r"train=refcoco_train\.jsonl,val=refcoco_val\.jsonl,vae=vae-oid\.npz,"
         r"tokenizer=\$TOKENIZER --workdir /tmp/refcoco",
         extra=(*TINY_TOWERS, *SHORT_RUN, *_small_evals("val", "segment", decoding=["segment"])),
         check=_exists("tmp/refcoco/params.npz")),
    # Its workdir is the segmentation demo's, run in full by tests/test_shapes_demo.py.
    Rule("predict segment shapes", r"python -m paligemma\.predict --checkpoint /tmp/seg "
         r"--image shape\.png --prompt \"segment square\" --out masks/ --json", kind="mapped",
         mapped=("tests/test_shapes_demo.py", "transfers/shapes.py:task=segment",
                 '"paligemma.predict"', '"--out"', '"--json"')),
    # The `hf` recipes on tiny parquet folders in the Hub's layout (_hf_datasets) standing
    # in for diffusers/tuxemon and a VQAv2 mirror.
    Rule("tuxemon", r"python -m paligemma\.train --config transfers/tuxemon\.py:"
         r"checkpoint=\$CKPT,tokenizer=\$TOKENIZER --workdir /tmp/tuxemon",
         extra=(*TINY_TOWERS, *SHORT_RUN, "--config.input.data.path=hf/tuxemon",
                "--config.input.data.split=train[:4]",
                *[f"--config.evals.{e}.data.{k}={v}" for e in ("val", "caption")
                  for k, v in (("path", "hf/tuxemon"), ("split", "train[4:]"))],
                *_small_evals("val", "caption", decoding=["caption"])),
         check=_exists("tmp/tuxemon/params.npz")),
    Rule("vqav2 hf", r"python -m paligemma\.train --config transfers/vqav2_hf\.py:"
         r"checkpoint=\$CKPT,tokenizer=\$TOKENIZER --workdir /tmp/vqav2",
         extra=(*TINY_TOWERS, *SHORT_RUN, "--config.model.dtype=float32",
                "--config.input.data.path=hf/vqav2", "--config.input.data.split=validation[2:]",
                *[f"--config.evals.{e}.data.{k}={v}" for e in ("val", "vqa")
                  for k, v in (("path", "hf/vqav2"), ("split", "validation[:2]"))],
                *_small_evals("val", "vqa", decoding=["vqa"])),
         check=_exists("tmp/vqav2/params.npz")),
    # A server: tests/test_demo_browser.py starts it (on the real shapes workdir, with
    # --compare) and drives it in Chromium.
    Rule("demo", r"python -m paligemma\.demo --checkpoint /tmp/shapes", kind="mapped",
         mapped=("tests/test_demo_browser.py", '"paligemma.demo"', '"--checkpoint"')),
    Rule("demo compare", r"python -m paligemma\.demo --checkpoint \$CKPT --compare /tmp/tuxemon "
         r"--tokenizer \$TOKENIZER", kind="mapped",
         mapped=("tests/test_demo_browser.py", '"paligemma.demo"', '"--compare"')),
    Rule("predict detect", r"python -m paligemma\.predict --checkpoint \$CKPT --tokenizer "
         r"\$TOKENIZER --image cat\.jpg --prompt \"detect cat\" --out boxes/ --json "
         r"--sampler \"beam\(4\)\" --max_decode_len 64",
         extra=("--max_decode_len", "12"), check=_stdout_has(r'^\{"image": "cat\.jpg"')),
    Rule("convert workdir", r"python -m paligemma\.convert /tmp/flickr8k/params\.npz "
         r"/tmp/flickr8k-hf --to hf --tokenizer \$TOKENIZER", after=("flickr8k",),
         check=_stdout_has(r"^wrote .*\(hf\)", "tmp/flickr8k-hf/config.json",
                           "tmp/flickr8k-hf/tokenizer_config.json")),
    Rule("convert kaggle", r"python -m paligemma\.convert \$CKPT pg2-hf/ --to hf "
         r"--dtype bfloat16 --tokenizer \$TOKENIZER",
         check=_stdout_has(r"^wrote .*\(hf\)", "pg2-hf/config.json")),
    Rule("lora t4", r"python -m paligemma\.train --config transfers/lora_t4\.py:"
         r"checkpoint=\$CKPT,data=data/train\.jsonl,tokenizer=\$TOKENIZER,quantize=nf4 "
         r"--workdir /tmp/lora_t4", extra=(*TINY_TOWERS, *SHORT_RUN),
         check=_exists("tmp/lora_t4/adapter/adapter_config.json")),
    Rule("predict lora", r"python -m paligemma\.predict --checkpoint \$CKPT --adapter "
         r"/tmp/lora_t4 --tokenizer \$TOKENIZER --image cat\.jpg --prompt \"caption en\"",
         extra=("--max_decode_len", "8"), after=("lora t4",),
         check=_stdout_has(r"^cat\.jpg\t")),
    Rule("shapes lora", r"python -m paligemma\.train --config transfers/shapes_lora\.py:"
         r"base=/tmp/shapes --workdir /tmp/shapes_lora",
         extra=(*SHORT_RUN, *_shapes_evals(evals=("val", "detect"))),
         check=_exists("tmp/shapes_lora/adapter/adapter_model.safetensors")),
    Rule("evaluate shapes lora", r"python -m paligemma\.evaluate --config "
         r"transfers/shapes_lora\.py --checkpoint /tmp/shapes --adapter /tmp/shapes_lora",
         extra=("--progress=false", *_shapes_evals(evals=("val", "detect")),
                "--config.evals.detect.max_decode_len=8"),
         after=("shapes lora",), check=_exists("tmp/shapes_lora/eval/metrics.json")),
    Rule("plan lora", r"python -m paligemma\.plan --config transfers/lora_t4\.py:size=28b,"
         r"quantize=nf4 --config\.optim\.accum_steps=8 --device rtx4090",
         extra=TINY_TOWERS, check=_stdout_has(r"^fits: (yes|NO)")),
    Rule("plan", r"python -m paligemma\.plan --config transfers/colab_t4\.py --device t4",
         extra=TINY_TOWERS, check=_stdout_has(r"^fits: (yes|NO)")),
    # tests/test_benchmarks.py runs these with --quick (one timed repetition), and the
    # decode step profile with one timed step.
    Rule("bench train step", r"python benchmarks/train_step\.py --preset cpu-small "
         r"--out results\.jsonl", kind="mapped",
         mapped=("tests/test_benchmarks.py", '_run("train_step.py"', '"--preset"', '"cpu-small"',
                 '"--out"')),
    Rule("bench decode", r"python benchmarks/decode\.py --preset cpu-small --out results\.jsonl",
         kind="mapped",
         mapped=("tests/test_benchmarks.py", '_run("decode.py"', '"--preset"', '"cpu-small"',
                 '"--out"')),
    Rule("bench lora train step", r"python benchmarks/lora_train_step\.py --preset cpu-small "
         r"--out results\.jsonl", kind="mapped",
         mapped=("tests/test_benchmarks.py", '_run("lora_train_step.py"')),
    Rule("bench decode step", r"python benchmarks/decode_step_profile\.py --batch 16",
         kind="mapped", mapped=("tests/test_benchmarks.py", '"decode_step_profile.py"',
                                '"--batch", "16"')),
    Rule("bench input", r"python benchmarks/input_pipeline\.py",
         extra=("--steps", "2", "--warmup", "1", "--num_files", "4", "--batch_size", "2",
                "--image_size", "32", "--text_len", "16"),
         check=_stdout_has(r"images/s")),
    Rule("bench checkpoint memory", r"python benchmarks/checkpoint_memory\.py --gb 1\.2",
         extra=("--gb", "0.01", "--dir", "."),
         check=_stdout_has(r"load as stored: .*peak RSS[\s\S]*load float16: .*peak RSS"
                           r"[\s\S]*load float16, NF4 matmul weights: .*peak RSS")),
]
RULES_BY_NAME = {r.name: r for r in RULES}

# ----------------------------------------------------------------------- the README

def readme_commands():
  """[(line number, command)] of the README's bash blocks."""
  with open(README, encoding="utf-8") as f:
    text = f.read()
  out = []
  for match in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
    first = text[:match.start(1)].count("\n") + 1
    lines = match.group(1).split("\n")
    i = 0
    while i < len(lines):
      start, line = first + i, lines[i]
      while line.rstrip().endswith("\\") and i + 1 < len(lines):
        i += 1
        line = line.rstrip()[:-1].rstrip() + " " + lines[i].strip()
      i += 1
      line = re.sub(r"\s+#\s.*$", "", line).strip()
      if line and not line.startswith("#"):
        out.append((start, line))
  return out


COMMANDS = readme_commands()


def rule_for(command):
  matches = [r for r in RULES if re.fullmatch(r.pattern, command)]
  assert len(matches) == 1, (
      f"README command {command!r} matches {[r.name for r in matches] or 'no rule'} in "
      "tests/test_readme.py: add a rule that runs it on tiny data.")
  return matches[0]


def test_every_command_has_exactly_one_rule():
  names = [rule_for(c).name for _, c in COMMANDS]
  unused = sorted(set(RULES_BY_NAME) - set(names))
  assert not unused, f"rules for commands no longer in the README: {unused}"
  for rule in RULES:
    for dep in rule.after:
      assert dep in RULES_BY_NAME, (rule.name, dep)


def test_commands_are_only_in_bash_blocks():
  """A shell command in a block of another language would escape this test."""
  with open(README, encoding="utf-8") as f:
    langs = re.findall(r"^```(\w*)\n.*?^```", f.read(), re.S | re.M)
  assert set(langs) <= {"bash", "json", "python"}, langs


def test_ci_runs_the_install_and_test_commands():
  with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
    ci = [l.strip() for l in f]
  for _, command in COMMANDS:
    if rule_for(command).kind == "ci":
      assert command in ci, f".ci/run must run the README's {command!r} as it is"


def test_mapped_commands_are_run_by_their_test():
  for _, command in COMMANDS:
    rule = rule_for(command)
    if rule.kind == "mapped":
      path, *snippets = rule.mapped
      with open(os.path.join(REPO, path), encoding="utf-8") as f:
        text = f.read()
      for snippet in snippets:
        assert snippet in text, f"{path} no longer runs the README's {command!r}"


def test_every_variable_is_defined():
  exported = {re.match(r"export (\w+)=", c).group(1) for _, c in COMMANDS
              if c.startswith("export ")}
  used = {v for _, c in COMMANDS for v in re.findall(r"\$\{?(\w+)", c)} - {"PWD"}
  assert used <= exported | set(DATASET_VARS), used - exported - set(DATASET_VARS)


def _slug(heading):
  slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return slug.replace(" ", "-")


def test_links_and_anchors_resolve():
  with open(README, encoding="utf-8") as f:
    text = f.read()
  prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
  anchors = {_slug(h) for h in re.findall(r"^#+ (.*)$", prose, re.M)}
  for target in re.findall(r"\]\(([^)\s]+)\)", prose):
    if target.startswith(("http://", "https://")):
      continue
    if target.startswith("#"):
      assert target[1:] in anchors, f"README links to missing section {target}"
    else:
      assert os.path.exists(os.path.join(REPO, target.split("#")[0])), \
          f"README links to missing file {target}"


def test_every_transfer_config_is_listed():
  with open(README, encoding="utf-8") as f:
    text = f.read()
  names = sorted(f for f in os.listdir(os.path.join(REPO, "transfers")) if f.endswith(".py"))
  missing = [n for n in names if f"transfers/{n}" not in text]
  assert not missing, f"transfer configs the README does not mention: {missing}"


def test_config_keys_table_matches_base_config():
  with open(README, encoding="utf-8") as f:
    text = f.read()
  section = text.split("## Configs: every key", 1)[1].split("\n## ", 1)[0]
  documented = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)?)`", section))
  base = transfer_configs.base_config()
  keys = {k for k in base if k not in ("input", "optim", "model")}
  keys |= {f"{g}.{k}" for g in ("input", "optim", "model") for k in base[g]}
  missing = sorted(keys - documented)
  assert not missing, f"config keys missing from the README's key table: {missing}"


# ----------------------------------------------------------------------- the fixtures

def _jpeg(path, size=(40, 30), seed=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _tiny_checkpoint(path):
  rng = np.random.default_rng(0)
  params = {n: rng.normal(0, 0.02, s).astype(np.float32)
            for n, s in checkpoint.param_shapes(TINY_CKPT).items()}
  checkpoint.save_npz(tree.unflatten(params), path, dtype="bfloat16")


def _kaggle_cache(cache):
  """Tiny checkpoints laid out as kagglehub 1.0 caches the released ones (version 1)."""
  for handle in KAGGLE_MODELS:
    folder = os.path.join(cache, "models", handle, "1")
    os.makedirs(folder)
    _tiny_checkpoint(os.path.join(folder, f"{handle.rsplit('/', 1)[1]}.b16.npz"))
    open(os.path.join(cache, "models", handle, "1.complete"), "w").close()


def _flickr8k(root):
  rows = ["image,caption"]
  for i in range(FLICKR_IMAGES):
    name = f"{1000 + i}_a.jpg"
    _jpeg(os.path.join(root, "Images", name), seed=i)
    rows += [f"{name},a dog runs number {i} .", f'{name},"a dog, number {i}, plays ."']
  with open(os.path.join(root, "captions.txt"), "w") as f:
    f.write("\n".join(rows) + "\n")


def _coco(root):
  cats = [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]
  for split in ("train2017", "val2017"):
    images, anns = [], []
    for i in range(1, 4):
      _jpeg(os.path.join(root, split, f"{i:012d}.jpg"), seed=i)
      images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": 40, "height": 30})
      anns.append({"id": 10 + i, "image_id": i, "category_id": 17 + i % 2,
                   "bbox": [2, 3, 20, 15], "area": 300, "iscrowd": 0,
                   "segmentation": [[2, 3, 22, 3, 22, 18, 2, 18]]})
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
      json.dump({"images": images, "annotations": anns, "categories": cats}, f)


def _segmentation_data(root):
  """vae-oid.npz (random weights, the released layout, a small codebook) and RefCOCO-style
  jsonl files with 0/255 PNG masks."""
  from paligemma import segmentation  # pylint: disable=g-import-not-at-top
  np.savez(os.path.join(root, "vae-oid.npz"), **segmentation.random_state_dict(0, 128, 16))
  os.makedirs(os.path.join(root, "refcoco"))
  for split in ("train", "val"):
    lines = []
    for i in range(3):
      _jpeg(os.path.join(root, "refcoco", f"{split}{i}.jpg"), seed=i)
      mask = np.zeros((30, 40), np.uint8)
      mask[3 + i:20, 5:30 - i] = 255
      Image.fromarray(mask).save(os.path.join(root, "refcoco", f"{split}{i}.png"))
      lines.append(json.dumps({"image": f"refcoco/{split}{i}.jpg", "mask": f"refcoco/{split}{i}.png",
                               "prefix": f"segment the thing {i}"}))
    with open(os.path.join(root, f"refcoco_{split}.jsonl"), "w") as f:
      f.write("\n".join(lines) + "\n")


def _jsonl_data(root):
  os.makedirs(os.path.join(root, "data", "images"))
  for split, seed in (("train", 0), ("val", 1)):
    source = shapes.make(task="caption", num_examples=4, seed=seed, image_size=32)
    with open(os.path.join(root, "data", f"{split}.jsonl"), "w") as f:
      for i in range(len(source)):
        ex = source[i]
        Image.fromarray(ex["image"]).save(os.path.join(root, "data", "images", f"{split}{i}.png"))
        f.write(json.dumps({"image": f"images/{split}{i}.png", "prefix": ex["prefix"],
                            "suffix": ex["suffix"]}) + "\n")


def _hf_datasets(root):
  """Tiny parquet folders as the Hub holds diffusers/tuxemon and a VQAv2 mirror
  (data/<split>-00000-of-00001.parquet), written by `datasets` (tests/test_data_hf.py)."""
  import test_data_hf  # pylint: disable=g-import-not-at-top
  for name, split, ds in (("tuxemon", "train", test_data_hf.tuxemon_like(6)[0]),
                          ("vqav2", "validation", test_data_hf.vqav2_like(6))):
    os.makedirs(os.path.join(root, "hf", name, "data"))
    ds.to_parquet(os.path.join(root, "hf", name, "data", f"{split}-00000-of-00001.parquet"))


def _shapes_workdir(workdir):
  """transfers/shapes.py's export layout (params.npz, model_config.json, config.json),
  random weights: what /tmp/shapes holds after the demo, for predict and evaluate."""
  from paligemma.models import variants  # pylint: disable=g-import-not-at-top
  config = config_lib.load(os.path.join(REPO, "transfers", "shapes.py"))
  model_config = {"img": variants.resolve_vit(dict(config.model.img)),
                  "llm": variants.resolve_gemma(dict(config.model.llm))}
  rng = np.random.default_rng(0)
  params = {n: rng.normal(0, 0.02, s).astype(np.float32)
            for n, s in checkpoint.param_shapes(model_config).items()}
  os.makedirs(workdir)
  checkpoint.save_npz(tree.unflatten(params), os.path.join(workdir, "params.npz"))
  for name, obj in (("model_config.json", model_config), ("config.json", config.to_dict())):
    with open(os.path.join(workdir, name), "w") as f:
      json.dump(obj, f, default=str)


def _environment(root):
  bin_dir = os.path.join(root, "bin")
  os.makedirs(bin_dir)
  # A script, not a symlink: a venv's python found through a link elsewhere is the base
  # interpreter without the venv's packages (pyvenv.cfg is looked up next to the link).
  wrapper = os.path.join(bin_dir, "python")
  with open(wrapper, "w") as f:
    f.write(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
  os.chmod(wrapper, 0o755)
  env = {k: v for k, v in os.environ.items()
         if k not in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_KERNEL_RUN_TYPE",
                      "COLAB_RELEASE_TAG")}
  env.update(
      PATH=bin_dir + os.pathsep + env.get("PATH", ""),
      PYTHONPATH=os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p),
      JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", CI="true",
      # In place of any XLA_FLAGS of the caller: the commands' short runs are mostly
      # compiling, which this makes ~20% faster.
      XLA_FLAGS=FAST_COMPILE,
      KAGGLEHUB_CACHE=os.path.join(root, "kagglehub"),
      KAGGLE_API_ENVIRONMENT="TEST",  # kagglehub talks to localhost:7777: refused.
      JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      FLICKR8K=os.path.join(root, "flickr8k"), COCO=os.path.join(root, "coco"))
  return env


def _bash(root, command, rule):
  """The bash script that runs `command` as a reader would, after the README's exports."""
  exports = [c for _, c in COMMANDS if rule_for(c).kind == "export"]
  line = command.replace("/tmp/", os.path.join(root, "tmp") + "/")
  extra = " ".join(f"'{a}'" for a in rule.extra)
  return "\n".join(["set -euo pipefail", *exports, f"{line} {extra}".rstrip()])


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory):
  """{command: CompletedProcess} of every `run` command, two at a time, in their order."""
  root = str(tmp_path_factory.mktemp("readme"))
  for name in ("transfers", "benchmarks"):
    os.symlink(os.path.join(REPO, name), os.path.join(root, name))
  os.makedirs(os.path.join(root, "tmp"))
  _shapes_workdir(os.path.join(root, "tmp", "shapes"))
  shutil.copy(tokenizer_lib.TINY_TOKENIZER, os.path.join(root, "paligemma_tokenizer.model"))
  _kaggle_cache(os.path.join(root, "kagglehub"))
  _flickr8k(os.path.join(root, "flickr8k"))
  _coco(os.path.join(root, "coco"))
  _segmentation_data(root)
  _jsonl_data(root)
  _hf_datasets(root)
  _jpeg(os.path.join(root, "cat.jpg"), size=(64, 48))
  env = _environment(root)

  todo = [(c, rule_for(c)) for _, c in COMMANDS if rule_for(c).kind == "run"]
  if ONLY:  # While working on some commands: those and what they need.
    want = {r.name for _, r in todo if re.search(ONLY, r.name)}
    want |= {d for _, r in todo if r.name in want for d in r.after}
    todo = [(c, r) for c, r in todo if r.name in want]
  results, done = {}, set()

  def run(command, rule):
    """CompletedProcess of one command, with its wall and CPU seconds."""
    log = os.path.join(root, "logs", re.sub(r"\W+", "_", rule.name))
    os.makedirs(os.path.dirname(log), exist_ok=True)
    start = time.perf_counter()
    with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
      proc = subprocess.Popen(["bash", "-c", _bash(root, command, rule)], cwd=root,
                              env=env, stdout=out, stderr=err)
      # Reaped here rather than by Popen, for the CPU time of the command's processes.
      while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
          break
        if time.perf_counter() - start > TIMEOUT_S:
          proc.kill()
        time.sleep(0.1)
      proc.returncode = os.waitstatus_to_exitcode(status)
    with open(log + ".out") as out, open(log + ".err") as err:
      result = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = usage.ru_utime + usage.ru_stime
    return result

  with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
    running = {}
    while todo or running:
      for item in [t for t in todo if set(t[1].after) <= done]:
        todo.remove(item)
        running[pool.submit(run, *item)] = item
      assert running, f"README commands waiting on commands that never run: {todo}"
      finished, _ = concurrent.futures.wait(running, return_when="FIRST_COMPLETED")
      for future in finished:
        command, rule = running.pop(future)
        results[command] = future.result()
        done.add(rule.name)
  # Seconds per command, for keeping this test fast (pytest -s shows them).
  for command, out in sorted(results.items(), key=lambda kv: -kv[1].cpu_seconds):
    print(f"{out.cpu_seconds:6.1f} s CPU {out.seconds:6.1f} s wall  {rule_for(command).name}")
  return root, results


@pytest.mark.parametrize("command", [c for _, c in COMMANDS],
                         ids=[f"L{n}:{c[:60]}" for n, c in COMMANDS])
def test_readme_command(command, request):
  rule = rule_for(command)
  if rule.kind != "run":
    return  # ci, export, mapped: checked above; fixture: made by readme_runs.
  root, results = request.getfixturevalue("readme_runs")
  if command not in results:
    pytest.skip(f"not selected by README_TEST_ONLY={ONLY}")
  out = results[command]
  assert out.returncode == 0, (
      f"README command failed ({out.returncode}):\n{_bash(root, command, rule)}\n"
      f"--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-5000:]}")
  if rule.check:
    rule.check(root, out)
