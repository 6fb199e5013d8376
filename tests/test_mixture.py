"""Data mixtures: shares follow the weights, every source is seen whole each epoch, the
order is deterministic, and training on a two-source mixture resumes after SIGKILL
exactly as on one jsonl (test_train.py)."""

import collections
import json

import pytest
from PIL import Image

from paligemma.data import mixture
from paligemma.data import pipeline
from paligemma.data import shapes
from paligemma.data import sources


def _shapes(n, seed, task="caption"):
  return {"name": "shapes", "task": task, "num_examples": n, "seed": seed, "image_size": 32}


def test_places_follow_weights_and_cover_every_source():
  mix = sources.make_source({"name": "mixture", "sources": [
      {**_shapes(10, 0), "weight": 3}, {**_shapes(4, 1), "weight": 1}]})
  # Source 1 needs 4 places at 1/4: L = 16 (source 0 alone would need ceil(10 / 0.75)).
  assert mix.counts == [12, 4] and len(mix) == 16
  seen = collections.Counter(mix.locate(i) for i in range(len(mix)))
  assert {i for k, i in seen if k == 0} == set(range(10))
  assert {i for k, i in seen if k == 1} == set(range(4))
  assert mix[0]["id"] == "0:shapes-0-0" and mix[15]["id"].startswith("1:")
  # A small source with a big weight is repeated, not cut.
  mix = sources.make_source([{**_shapes(10, 0), "weight": 1}, {**_shapes(2, 1), "weight": 1}])
  assert isinstance(mix, mixture.Mixture) and mix.counts == [10, 10]
  assert collections.Counter(mix.locate(i)[1] for i in range(10, 20)) == {0: 5, 1: 5}


def test_mixture_errors_name_the_fix():
  with pytest.raises(ValueError, match="weights must be positive"):
    sources.make_source([{**_shapes(4, 0), "weight": 0}])
  with pytest.raises(ValueError, match="weight='a' must be a number"):
    sources.make_source([{**_shapes(4, 0), "weight": "a"}])
  with pytest.raises(ValueError, match="at least one source"):
    sources.make_source({"name": "mixture", "sources": []})
  with pytest.raises(ValueError, match="Unknown data source name 'nope'"):
    sources.make_source([{"name": "nope"}])


def test_mixture_batches_are_deterministic_and_resume(tok):
  config = [{**_shapes(6, 0), "weight": 2}, {**_shapes(5, 1, "detect"), "weight": 1}]

  def batches(start, steps):
    data = pipeline.make_train_input(config, tok, image_size=16, text_len=24, batch_size=3,
                                     seed=4, start_position=start, process_index=0,
                                     process_count=1)
    return [(b["position"].tolist(), b["text"].tolist()) for b, _ in zip(data, range(steps))]

  whole = batches(0, 8)
  assert whole == batches(0, 8)
  assert batches(9, 5) == whole[3:]
  prompts = {t[1] for _, texts in whole for t in texts}
  assert len(prompts) == 2  # "caption en" and "detect ..." start differently.


@pytest.mark.slow
def test_training_on_a_mixture_resumes_after_sigkill(tmp_path, tmp_path_factory):
  """The jsonl resume-after-SIGKILL check (test_train.py) on a jsonl + shapes mixture."""
  # Compiled steps shared by the three runs, and with the other resume test (same model).
  cache = tmp_path_factory.getbasetemp()
  import test_train  # pylint: disable=g-import-not-at-top
  src = shapes.make(num_examples=5, seed=7, image_size=32)
  lines = []
  for i in range(len(src)):
    Image.fromarray(src[i]["image"]).save(tmp_path / f"{i}.png")
    lines.append(json.dumps({"image": f"{i}.png", "prefix": "caption en",
                             "suffix": src[i]["suffix"]}))
  (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
  data = {"name": "mixture", "sources": [
      {"name": "jsonl", "path": str(tmp_path / "data.jsonl"), "weight": 1},
      {**_shapes(40, 3), "weight": 3}]}
  override = [f"--config.input.data={data!r}"]
  test_train.check_resume_after_sigkill(cache, tmp_path, extra=override,
                                        arg="steps=12,batch_size=2,evals=False")
