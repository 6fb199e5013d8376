"""Evaluator metrics against hand-computed values, and the evaluators end to end."""

import math

import jax
import numpy as np
import pytest

from paligemma import tokenizer as tokenizer_lib
from paligemma.evaluators import captioning
from paligemma.evaluators import detection
from paligemma.evaluators import exact_match
from paligemma.evaluators import make_evaluator
from paligemma.evaluators import predictions
from paligemma.evaluators import vqa
from paligemma.models import build
from paligemma.models.paligemma import Model
from conftest import TINY_VOCAB, tiny_model_config

REFS = {"0": ["a red circle on white paper"], "1": ["two blue squares next to trees"]}


# -- captioning -------------------------------------------------------------------------

@pytest.mark.parametrize("tokenization", ["simple", "ptb"])
def test_caption_perfect_and_empty(tokenization):
  if tokenization == "ptb" and not captioning.java_available():
    pytest.skip("no Java: PTBTokenizer cannot run")
  meteor = tokenization == "ptb"  # METEOR needs Java too; run it once.
  perfect = captioning.caption_metrics({k: v[0] for k, v in REFS.items()}, REFS,
                                       tokenization=tokenization, meteor=meteor)
  # Every n-gram occurs in one of the two images, so idf = log 2 > 0 everywhere and a
  # perfect caption has cosine 1 at every n: CIDEr-D = 10 * 1.
  assert perfect["cider"] == pytest.approx(10.0, abs=1e-6)
  assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6)
  assert perfect["rouge_l"] == pytest.approx(1.0, abs=1e-6)
  assert perfect["ptb_tokenizer"] == float(tokenization == "ptb")
  if meteor:
    assert perfect["meteor"] == pytest.approx(1.0, abs=1e-3)
  empty = captioning.caption_metrics({"0": "", "1": ""}, REFS, tokenization=tokenization,
                                     meteor=False)
  assert empty["cider"] == 0 and empty["bleu4"] < 1e-6 and empty["rouge_l"] == 0


def test_caption_punctuation_and_case_ignored():
  out = captioning.caption_metrics({"0": "A red circle, on white paper.",
                                    "1": "two blue squares next to trees"}, REFS,
                                   tokenization="simple", meteor=False)
  assert out["bleu4"] == pytest.approx(1.0, abs=1e-6)
  assert captioning.simple_tokenize("A man's dog (don't) -- runs.") == \
      "a man 's dog -lrb- do n't -rrb- runs"


def test_exact_match():
  assert exact_match.exact_match(" a red  circle", ["a blue square", "a red circle"]) == 1.0
  assert exact_match.exact_match("a red circle.", ["a red circle"]) == 0.0
  assert exact_match.exact_match("", ["a red circle"]) == 0.0


# -- VQA --------------------------------------------------------------------------------

def test_vqa_normalisation():
  assert vqa.normalise_answer("Two dogs.") == "2 dogs"
  assert vqa.normalise_answer("black-and-white") == "black and white"
  assert vqa.normalise_answer("The 1,000 cats!") == "1000 cats"
  assert vqa.normalise_answer(" dont\tknow\n") == "don't know"
  assert vqa.normalise_answer("3.5") == "3.5"  # A period inside a number stays.


def test_vqa_accuracy_official_averaging():
  # 3 of 10 say "yes": left-out "yes" -> 2/3 (x3), left-out "no" -> min(3/3, 1) (x7).
  assert vqa.vqa_accuracy("Yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)
  # 2 of 10: left-out "2" -> 1/3 (x2), others -> 2/3 (x8) = 0.6; "two" normalises to "2".
  assert vqa.vqa_accuracy("two", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
  assert vqa.vqa_accuracy("two", ["2"] * 10) == 1.0
  assert vqa.vqa_accuracy("cat", ["dog"] * 10) == 0.0
  assert vqa.vqa_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == 1.0
  assert vqa.vqa_accuracy("A cat.", ["cat"]) == 1.0  # One reference: exact after normalising.


# -- detection --------------------------------------------------------------------------

def test_detection_parse_is_robust():
  good = tokenizer_lib.detection_string([[0.1, 0.2, 0.5, 0.6]], ["cat"])
  objects, bad = tokenizer_lib.parse_detections(f"{good} ; <loc0001><loc0002> dog ; junk ; "
                                 "<loc0500><loc0500><loc0100><loc0900> inverted ; "
                                 "<loc0001><loc0002><loc0003><loc0004>")
  assert [l for l, _ in objects] == ["cat"] and bad == 4
  np.testing.assert_allclose(objects[0][1], [0.1, 0.2, 0.5, 0.6], atol=0.5 / 1023)
  assert tokenizer_lib.parse_detections("") == ([], 0)
  assert tokenizer_lib.parse_detections("<loc9999><loc0000><loc1023><loc1023> x")[1] == 1  # Inverted after clip.


def test_iou_and_map_known_values():
  assert detection.iou([0, 0, 10, 10], [0, 0, 10, 16]) == pytest.approx(100 / 160)
  assert detection.iou([0, 0, 10, 10], [0, 20, 10, 30]) == 0.0
  gt = [[("a", [0, 0, 10, 10])], [("a", [0, 0, 10, 10])]]
  exact = [[("a", [0, 0, 10, 10])], [("a", [0, 0, 10, 10])]]
  assert detection.coco_map(gt, exact) == pytest.approx((1.0, 1.0))
  # Image 1's box has IoU 0.625: a hit at thresholds .5, .55, .6; at the 7 others one
  # hit out of two (first in score order, scores tie) gives precision 1 up to recall
  # .5: 51 of COCO's 101 recall points.
  shifted = [[("a", [0, 0, 10, 10])], [("a", [0, 0, 10, 16])]]
  m, m50 = detection.coco_map(gt, shifted)
  assert m50 == pytest.approx(1.0)
  assert m == pytest.approx((3 + 7 * 51 / 101) / 10)
  assert detection.coco_map(gt, [[], []]) == (0.0, 0.0)
  wrong_label = [[("b", [0, 0, 10, 10])], [("b", [0, 0, 10, 10])]]
  assert detection.coco_map(gt, wrong_label) == (0.0, 0.0)


# -- evaluators end to end --------------------------------------------------------------

def _tiny_model():
  return Model(**tiny_model_config(1, patch=4, image_size=16, vocab_size=TINY_VOCAB))


def _zero_params(model):
  """All-zero params: logits are all 0, so every token has probability 1/V."""
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), build.abstract_params(model))


def _context(tmp_path=None):
  return dict(model=_tiny_model(), tokenizer=tokenizer_lib.load_tokenizer(), image_size=16,
              text_len=16, progress=False,
              predictions_dir=None if tmp_path is None else str(tmp_path))


SHAPES = dict(name="shapes", task="caption", num_examples=6, seed=1, image_size=32)


def test_perplexity_of_uniform_model_is_vocab_size():
  ctx = _context()
  ev = make_evaluator("perplexity", dict(type="perplexity", data=SHAPES, batch_size=3), **ctx)
  out = ev.run(_zero_params(ctx["model"]))
  assert out["loss"] == pytest.approx(math.log(1920), rel=1e-5)
  assert out["perplexity"] == pytest.approx(1920, rel=1e-4)


def test_decoding_evaluator_writes_predictions(tmp_path):
  ctx = _context(tmp_path)
  cfg = dict(type="exact_match", data=SHAPES, batch_size=4, max_decode_len=4, every=10)
  ev = make_evaluator("exact_match", cfg, eval_name="caption", **ctx)
  out = ev.run(_zero_params(ctx["model"]), step=7)
  # Uniform logits: argmax is token 0 (pad) every time, an empty caption.
  assert out == {"exact_match": 0.0, "num_examples": 6.0}
  records = predictions.read(tmp_path / "caption-000007.jsonl")
  assert [r["id"] for r in records] == [f"shapes-1-{i}" for i in range(6)]
  assert all(set(r) == {"id", "prompt", "prediction", "references"} for r in records)
  assert records[0]["prompt"] == "caption en" and records[0]["prediction"] == ""
  assert records[0]["references"][0].startswith("a ")


def test_detection_evaluator_scores_ground_truth(tmp_path):
  """Scoring the ground-truth strings gives mAP 1 and IoU ~1 (1023 binning aside)."""
  ctx = _context(tmp_path)
  data = dict(SHAPES, task="detect", num_examples=5)
  ev = make_evaluator("detection", dict(type="detection", data=data, batch_size=5), **ctx)
  preds = [dict(index=i, id=ev.source[i]["id"], prompt=ev.source[i]["prefix"],
                prediction=ev.source[i]["suffix"], references=[]) for i in range(5)]
  out = ev.score(preds)
  assert out["map50"] == 1.0 and out["map"] > 0.9 and out["malformed"] == 0
  assert out["mean_iou"] == pytest.approx(1.0, abs=0.02) and out["num_single_object"] == 5
  preds[4]["prediction"] = "<loc0001> circle ; nonsense"
  out = ev.score(preds)
  assert out["malformed"] == 2 and out["num_predicted"] == 4
  assert out["mean_iou"] == pytest.approx(0.8, abs=0.02)  # 4 exact, 1 missing.
  assert 0.5 < out["map50"] < 1.0
  record = ev.record(preds[0])
  box = record["boxes"][0]["box"]  # Pixels of the 32 px source image.
  np.testing.assert_allclose(box, np.array(ev.source[0]["objects"][0]["box"]) * 32, atol=0.1)


def test_config_errors_name_the_key():
  ctx = _context()
  with pytest.raises(ValueError, match="max_decode_lenn"):
    make_evaluator("caption", dict(type="caption", data=SHAPES, batch_size=2,
                                   max_decode_lenn=3), **ctx)
  with pytest.raises(ValueError, match="Unknown evaluator type 'captions'"):
    make_evaluator("captions", dict(data=SHAPES, batch_size=2), **ctx)
  with pytest.raises(ValueError, match="batch_size"):
    make_evaluator("vqa", dict(type="vqa", data=SHAPES), **ctx)


def test_prompt_override_fills_fields():
  ctx = _context()
  ev = make_evaluator("vqa", dict(type="vqa", data=SHAPES, batch_size=2,
                                  prompt="answer en what is {id}?"), **ctx)
  assert ev.source[1]["prefix"] == "answer en what is shapes-1-1?"
  with pytest.raises(ValueError, match="cannot be filled"):
    make_evaluator("vqa", dict(type="vqa", data=SHAPES, batch_size=2, prompt="{nope}"),
                   **ctx).source[0]
