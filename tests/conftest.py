"""What the tests share: tiny model configs, random params, the tiny tokenizer, and the
environment of the subprocesses they start.

Markers (pyproject.toml): `slow` (a minute or more: end-to-end runs, subprocess
trainings) and `torch` (needs torch / transformers, the numerical reference). CI runs
everything; `pytest -m "not slow"` gives a quick local loop.
"""

import os

import numpy as np
import pytest

from paligemma import tokenizer as tokenizer_lib
from paligemma.checkpoint import shapes as shapes_lib
from paligemma.checkpoint import tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VOCAB = 1920  # The tiny tokenizer's: outputs can be detokenized.


def tiny_model_config(gemma=1, *, patch=16, image_size=32, vocab_size=300, **llm):
  """model_config dict of a tiny PaliGemma: a mu ViT (patch `patch`) and gemma_tiny
  (gemma=1) or gemma2_tiny (gemma=2); `llm` overrides Gemma fields."""
  return {"img": {"variant": f"mu/{patch}", "image_size": image_size},
          "llm": {"variant": "gemma_tiny" if gemma == 1 else "gemma2_tiny",
                  "vocab_size": vocab_size, **llm}}


def random_params(config, seed=0, dtype=np.float32):
  """Nested float params of `config`'s shapes, standard normal (seeded)."""
  rng = np.random.default_rng(seed)
  shapes = shapes_lib.param_shapes(config)
  return tree.unflatten({n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()})


# XLA's CPU backend at optimization level 0: compiling is several times faster, the code
# the same; for child runs that mostly compile (the multi-device runs, the README's).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def subprocess_env(devices=1, **extra):
  """os.environ for a child JAX process on the CPU (N virtual devices), TF quiet."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", **extra)
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


# The README's main command (tests/test_shapes_demo.py checks the README states it).
SHAPES_COMMAND = "python -m paligemma.train --config transfers/shapes.py --workdir {workdir}"


@pytest.fixture(scope="session")
def shapes_workdir(tmp_path_factory):
  """The workdir of SHAPES_COMMAND run as written (about 3 minutes on 2 cores), trained
  once per session: test_shapes_demo checks the run, the browser demo test serves it."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("shapes_demo"))
  command = SHAPES_COMMAND.format(workdir=workdir).split()
  assert command[0] == "python"
  out = subprocess.run([sys.executable, *command[1:], "--config.progress=False"], cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=1500)
  if out.returncode:
    raise AssertionError(f"{command} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
  return workdir


@pytest.fixture(scope="session")
def tok():
  """The tiny tokenizer (paligemma/assets/tiny_tokenizer.model)."""
  return tokenizer_lib.load_tokenizer()


# Marked by module: end-to-end runs and subprocess trainings; the transformers reference.
SLOW = ("test_train", "test_readme", "test_notebook", "test_multidevice", "test_multiprocess",
        "test_shapes_demo", "test_benchmarks", "test_train_lora", "test_demo_browser")
TORCH = ("test_model_parity", "test_checkpoint_hf", "test_checkpoint_logits", "test_segmentation",
         "test_checkpoint_convert", "test_benchmarks", "test_checkpoint_peft")


def pytest_collection_modifyitems(items):
  for item in items:
    module = item.module.__name__.rpartition(".")[2]
    if module in SLOW:
      item.add_marker(pytest.mark.slow)
    if module in TORCH:
      item.add_marker(pytest.mark.torch)
