"""paligemma/demo.py without a browser: prompts of each task, boxes and masks drawn, one
model run through predict, the Gradio app built and called (test_demo_browser.py drives
it in Chromium)."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from paligemma import checkpoint
from paligemma import demo
from paligemma import transfer_configs
from paligemma.models import build
from paligemma.models.paligemma import Model

TINY = {k: transfer_configs.TINY_MODEL[k] for k in ("img", "llm")}


@pytest.fixture(scope="module")
def random_workdir(tmp_path_factory):
  """A workdir in the trainer's export layout with random params."""
  workdir = str(tmp_path_factory.mktemp("workdir"))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32),
                        build.abstract_params(Model(**TINY)))
  checkpoint.save_npz(params, os.path.join(workdir, "params.npz"))
  with open(os.path.join(workdir, "model_config.json"), "w") as f:
    json.dump(TINY, f)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"tokenizer": None, "model": dict(TINY, dtype="float32", scan=True)}, f)
  return workdir


def test_prompts_of_each_task():
  assert demo.make_prompt("caption", "", "de") == "caption de"
  assert demo.make_prompt("answer", " what colour? ") == "answer en what colour?"
  assert demo.make_prompt("detect", "circle ; square") == "detect circle ; square"
  assert demo.make_prompt("segment", "circle") == "segment circle"
  assert demo.make_prompt("free prompt", "ocr") == "ocr"
  with pytest.raises(ValueError, match="needs a question"):
    demo.make_prompt("answer", "")
  with pytest.raises(ValueError, match="Unknown task 'count'"):
    demo.make_prompt("count", "x")


def test_parsed_objects_are_drawn(tmp_path):
  path = str(tmp_path / "grey.png")
  Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(path)
  mask = np.zeros((40, 60), bool)
  mask[10:30, 15:45] = True
  box = np.array([10, 15, 30, 45]) / [40, 60, 40, 60]
  boxed = demo.annotate(path, {"objects": [{"label": "cat", "box": box}]})
  masked = demo.annotate(path, {"objects": [{"label": "cat", "box": box, "mask": mask}]})
  assert boxed.shape == (40, 60, 3)
  changed = np.argwhere((boxed != 128).any(-1))
  assert changed[:, 0].max() <= 31 and changed[:, 1].min() >= 14  # Box (and label) only.
  assert (masked[mask] != 128).any(-1).all()  # Every mask pixel tinted.
  assert (masked != 128).any(-1).sum() > (boxed != 128).any(-1).sum()
  # Pixel boxes alone (x_min, y_min, x_max, y_max) draw the same box.
  from_pixels = demo.annotate(path, {"boxes": [{"label": "cat", "box_xyxy": [15, 10, 45, 30]}]})
  np.testing.assert_array_equal(from_pixels, boxed)
  plain = demo.annotate(path, {"prediction": "a cat"})
  np.testing.assert_array_equal(plain, np.full((40, 60, 3), 128))


def test_run_and_the_gradio_app(random_workdir, tmp_path):
  gr = pytest.importorskip("gradio")
  [image] = demo.example_images(str(tmp_path), count=1, image_size=32)
  loaded = demo.load(random_workdir)
  text, drawn = demo.run(loaded, image, "detect circle", max_decode_len=6)
  assert isinstance(text, str) and drawn.shape == (32, 32, 3)
  # Segment prompts go through predict with the VAE (here a random one).
  from paligemma import segmentation  # pylint: disable=g-import-not-at-top
  text, drawn = demo.run(loaded, image, "segment circle", max_decode_len=6,
                         vae=segmentation.random_vae())
  assert isinstance(text, str) and drawn.shape == (32, 32, 3)
  ui = demo.build_ui([loaded, loaded], [image], max_decode_len=4)
  assert isinstance(ui, gr.Blocks)
  # The click handler, as Gradio calls it: the prompt, then text and image per model.
  [handler] = [fn for fn in ui.fns.values() if fn.name == "on_run"]
  out = handler.fn(image, "caption", "", "en", "greedy", 0)
  assert out[0] == "caption en" and len(out) == 5 and out[1] == out[3]
  with pytest.raises(gr.Error, match="needs a question"):
    handler.fn(image, "answer", "", "en", "greedy", 0)
  with pytest.raises(gr.Error, match="Upload an image"):
    handler.fn(None, "caption", "", "en", "greedy", 0)


def test_base_next_to_base_with_adapter(random_workdir, tmp_path):
  """--compare_adapter: the second model is the base with a LoRA adapter merged in."""
  from paligemma import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from paligemma.checkpoint import tree  # pylint: disable=g-import-not-at-top
  lora = dict(rank=2, alpha=2.0, targets="llm")
  model = build.build_model(TINY, lora=lora)
  # (Stacked as the adapter's names are: on a CPU the demo keeps the layers apart.)
  base = tree.flatten(tree.stack_layers(demo.load(random_workdir).params))
  shapes = lora_lib.adapters(tree.flatten(build.abstract_params(model)))
  rng = np.random.default_rng(1)
  adapters = {k: rng.normal(0, 0.1, s.shape).astype(np.float32) for k, s in shapes.items()}
  checkpoint.save_peft({**base, **adapters}, {**TINY, "lora": model.lora.to_dict()},
                       str(tmp_path / "adapter"))
  tuned = demo.load(random_workdir, adapter=str(tmp_path / "adapter"))
  assert tuned.name == "adapter"
  want = lora_lib.merge({**base, **adapters}, model.lora)
  got = tree.flatten(tree.stack_layers(tuned.params))
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=1e-6, err_msg=k)
  assert not np.allclose(got["llm/layers/mlp/linear"], base["llm/layers/mlp/linear"])
