"""`python -m paligemma.predict` and `python -m paligemma.evaluate` on trainer workdirs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from paligemma import checkpoint
from paligemma import predict
from paligemma import transfer_configs
from paligemma.data import shapes
from paligemma.models import build
from paligemma.models.paligemma import Model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The shapes demo's model (what a trainer workdir of transfers/shapes.py holds).
TINY = {k: transfer_configs.TINY_MODEL[k] for k in ("img", "llm")}


def _run(module, *args, check=True):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
  if check and out.returncode:
    raise AssertionError(f"{module} {args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
  return out


def _fresh_images(folder, task, count, seed=4242):
  """Shapes images never seen in training (another seed), saved as PNG files."""
  source = shapes.make(task=task, num_examples=count, seed=seed, image_size=32)
  paths = []
  for i in range(count):
    ex = source[i]
    path = os.path.join(folder, f"{task}_{i}.png")
    Image.fromarray(ex["image"]).save(path)
    paths.append((path, ex))
  return paths


@pytest.fixture(scope="module")
def random_workdir(tmp_path_factory):
  """A workdir in the trainer's export layout, with random params (plumbing tests)."""
  workdir = str(tmp_path_factory.mktemp("workdir"))
  model = Model(**TINY)
  shapes_ = build.abstract_params(model)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), shapes_)
  checkpoint.save_npz(params, os.path.join(workdir, "params.npz"))
  with open(os.path.join(workdir, "model_config.json"), "w") as f:
    json.dump(TINY, f)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"tokenizer": None, "model": dict(TINY, dtype="float32", scan=True),
               "input": {"image_size": 32, "text_len": 12}}, f)
  return workdir


def test_predict_cli_on_workdir_layout(random_workdir, tmp_path):
  images = [p for p, _ in _fresh_images(str(tmp_path), "detect", 2)]
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"not an image")
  out = _run("paligemma.predict", "--checkpoint", random_workdir, "--image", *images, str(bad),
             "--prompt", "detect circle ; square ; triangle", "--out", str(tmp_path / "out"),
             "--json", "--max_decode_len", "8")
  records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert [r["image"] for r in records] == images + [str(bad)]
  for r in records[:2]:
    assert isinstance(r["prediction"], str) and isinstance(r["boxes"], list)
    assert os.path.exists(r["annotated"])
  assert "error" in records[2]  # An unreadable image is reported, not fatal.

  text = _run("paligemma.predict", "--checkpoint", random_workdir, "--image", images[0],
              "--max_decode_len", "4").stdout.splitlines()
  assert len(text) == 1 and text[0].startswith(images[0] + "\t")


def test_load_for_inference_errors(tmp_path, random_workdir):
  with pytest.raises(checkpoint.CheckpointError, match="no such file"):
    predict.load_for_inference(str(tmp_path / "missing.npz"))
  model, params, tok, run_config = predict.load_for_inference(random_workdir)
  assert model.img.image_size == 32 and tok.vocab_size == 1920
  assert run_config["input"]["text_len"] == 12


def test_inference_on_cpu_keeps_layers_apart_and_decodes_as_stacked(random_workdir):
  """On a CPU the inference loader keeps each layer's weights apart (decoding reads them
  in place) and decodes the tokens of the run's stacked layout."""
  from paligemma import decode  # pylint: disable=g-import-not-at-top
  model, params, _, _ = predict.load_for_inference(random_workdir)
  assert jax.default_backend() == "cpu"
  assert not model.scan and "layers_1" in params["llm"] and "layers" not in params["llm"]
  stacked_params, _ = checkpoint.load(os.path.join(random_workdir, "params.npz"))
  stacked = Model(**TINY)
  rng = np.random.default_rng(3)
  text = rng.integers(3, 1000, (3, 5)).astype(np.int32)
  batch = dict(image=rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32), text=text,
               mask_ar=np.zeros_like(text), mask_input=np.ones_like(text))
  for sampler in ("greedy", "beam(2)"):
    got = decode.decode(model, params, batch, max_decode_len=5, sampler=sampler, eos_id=None)
    want = decode.decode(stacked, stacked_params, batch, max_decode_len=5, sampler=sampler,
                         eos_id=None)
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=1e-5)


def test_predict_segment_prompt_needs_a_vae_and_draws(random_workdir, tmp_path):
  """Plumbing of segment prompts (the trained demo's masks: test_shapes_demo.py)."""
  paths = [p for p, _ in _fresh_images(str(tmp_path), "caption", 2)]
  args = ["--checkpoint", random_workdir, "--image", *paths, "--prompt", "segment circle",
          "--max_decode_len", "4"]
  with pytest.raises(SystemExit, match="--vae"):
    predict.main(args)  # The workdir's config names no VAE.
  out = predict.main(args + ["--vae", "shapes", "--json", "--out", str(tmp_path / "out")])
  assert [r["image"] for r in out] == paths
  for rec in out:  # A random model writes no valid object; each is counted, none fatal.
    assert rec["boxes"] == [] and rec["malformed"] >= 0 and "objects" not in rec
    assert Image.open(rec["annotated"]).size == (32, 32)
  assert predict.run_vae({"evals": {"seg": {"type": "segmentation", "vae": "v.npz"}}}) == "v.npz"
  assert predict.run_vae({"input": {"data": {"name": "shapes", "vae": "shapes"}}}) == "shapes"
