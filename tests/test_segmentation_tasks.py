"""Segmentation as a task: the shapes VAE's round trip, COCO masks to targets and back,
the `segmentation` evaluator's metrics on hand-computed cases, and drawn masks."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from paligemma import drawing
from paligemma import segmentation as seg
from paligemma import tokenizer as tokenizer_lib
from paligemma.assets import make_shapes_vae
from paligemma.data import coco_segmentation
from paligemma.data import coco_to_jsonl
from paligemma.data import refcoco
from paligemma.data import shapes
from paligemma.data import sources
from paligemma.evaluators import segmentation as seg_eval


@pytest.fixture(scope="module")
def shapes_vae():
  """The demo's VAE (trained on first use, about a minute, then read from the assets)."""
  return seg.load_vae(seg.SHAPES_VAE)


@pytest.fixture(scope="module")
def random_vae():
  return seg.random_vae(0, codebook_size=128, dim=16)


def _iou(a, b):
  return np.sum(a & b) / max(np.sum(a | b), 1)


# -- the shapes VAE ---------------------------------------------------------------------

def test_shapes_vae_round_trip_keeps_masks(shapes_vae):
  """64x64 crops of shapes at sides 8..200 px (another seed than training), encoded then
  decoded: IoU mean >= 0.97 and each >= 0.9 (measured: mean 0.991, worst 0.944)."""
  masks = make_shapes_vae.shape_masks(np.random.default_rng(123), 100, sides=(8, 200))
  decoded = np.asarray(seg.decode_codes(shapes_vae, seg.encode_masks(shapes_vae, masks))) > 0
  ious = [_iou(d, m > 0.5) for d, m in zip(decoded, masks)]
  print(f"shapes VAE codes round trip: mean IoU {np.mean(ious):.3f}, worst {np.min(ious):.3f}")
  assert np.mean(ious) >= 0.97 and np.min(ious) >= 0.9


def test_shapes_vae_string_round_trip(shapes_vae):
  """A full-image mask -> suffix -> parse_segmentation, boxes binned and truncated as
  big_vision's evaluator: IoU >= 0.9 for shapes of 60..200 px (measured: 0.93..0.99;
  small shapes lose more to the one-pixel truncation of the box)."""
  for kind in shapes.SHAPES:
    for side in (60, 100, 200):
      img = Image.new("L", (side + 10, side + 6), 0)
      shapes.draw_shape(ImageDraw.Draw(img), kind, 4, 2, side, 255)
      mask = np.asarray(img) > 0
      h, w = mask.shape
      box = (2 / h, 4 / w, (2 + side) / h, (4 + side) / w)
      objects, invalid = seg.parse_segmentation(
          seg.mask_to_suffix(shapes_vae, mask, box) + " " + kind, shapes_vae, h, w)
      assert invalid == 0 and [o["label"] for o in objects] == [kind]
      assert _iou(objects[0]["mask"], mask) >= 0.9, (kind, side)


def test_shapes_vae_has_the_released_layout(shapes_vae):
  del shapes_vae  # Built by the fixture.
  with np.load(make_shapes_vae.path()) as npz:
    state = {k: npz[k] for k in npz.files}
  assert state["_vq_vae._embedding"].shape == (make_shapes_vae.CODEBOOK_SIZE, make_shapes_vae.DIM)
  assert state["encoder.8.net.0.weight"].shape == (128, 128, 3, 3)
  seg.vae_from_state_dict(state)  # Every key and shape checked.


def test_make_shapes_vae_writes_a_loadable_file(tmp_path):
  """The build path (what `path()` runs when the committed file is missing), 2 steps."""
  out = make_shapes_vae.write(str(tmp_path / "v.npz"), steps=2, log=None)
  vae = seg.load_vae(out)
  assert (vae.codebook_size, vae.dim) == (make_shapes_vae.CODEBOOK_SIZE, make_shapes_vae.DIM)


def test_shapes_segment_examples(shapes_vae):
  source = shapes.make(task="segment", num_examples=8, seed=3, image_size=32, max_shapes=2)
  for i in range(len(source)):
    ex = source[i]
    kind = ex["prefix"].split(" ", 1)[1]
    assert ex["prefix"] == f"segment {kind}" and kind in shapes.SHAPES
    objects, invalid = seg.parse_segmentation(ex["suffix"], shapes_vae, 32, 32)
    assert invalid == 0 and [o["label"] for o in objects] == [kind] * len(ex["objects"])
    for parsed, gt in zip(objects, ex["objects"]):
      np.testing.assert_allclose(parsed["box"], gt["box"], atol=0.5 / 1023)
      assert _iou(parsed["mask"], gt["mask"]) > 0.6  # 32 px images: coarse masks.


# -- COCO and RefCOCO data ---------------------------------------------------------------

def _coco(tmp_path):
  """A two-image COCO json: a polygon cat and an RLE dog (with a crowd and a maskless one)."""
  from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top
  images = tmp_path / "images"
  images.mkdir()
  for name in ("a.png", "b.png"):
    Image.new("RGB", (80, 60), (255, 255, 255)).save(images / name)
  dog = np.zeros((60, 80), np.uint8)
  dog[10:40, 30:70] = 1
  rle = mask_utils.encode(np.asfortranarray(dog))
  data = {
      "images": [{"id": 1, "file_name": "a.png", "width": 80, "height": 60},
                 {"id": 2, "file_name": "b.png", "width": 80, "height": 60}],
      "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
      "annotations": [
          {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 5, 40, 30], "iscrowd": 0,
           "segmentation": [[10, 5, 50, 5, 50, 35, 10, 35]]},
          {"id": 11, "image_id": 2, "category_id": 2, "bbox": [30, 10, 40, 30], "iscrowd": 0,
           "segmentation": {"size": [60, 80], "counts": rle["counts"].decode()}},
          {"id": 12, "image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1,
           "segmentation": {"size": [60, 80], "counts": [0, 4800]}},
          {"id": 13, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0,
           "segmentation": []},
      ]}
  ann = tmp_path / "instances.json"
  ann.write_text(json.dumps(data))
  return str(ann), str(images)


def test_coco_polygon_and_rle_give_back_their_boxes(tmp_path, random_vae):
  ann, images = _coco(tmp_path)
  vae_path = str(tmp_path / "vae.npz")
  np.savez(vae_path, **seg.random_state_dict(0, 128, 16))
  source = sources.make_source(dict(name="coco_segmentation", annotations=ann, images=images,
                                    vae=vae_path))
  assert len(source) == 2
  cat, dog = source[0], source[1]
  assert cat["prefix"] == "segment cat" and dog["prefix"] == "segment dog"  # No crowd, no empty.
  for ex, want in ((cat, (5 / 60, 10 / 80, 35 / 60, 50 / 80)),
                   (dog, (10 / 60, 30 / 80, 40 / 60, 70 / 80))):
    objects, malformed = tokenizer_lib.parse_objects(ex["suffix"], segments=True)
    assert malformed == 0 and len(objects) == 1
    np.testing.assert_allclose(np.array(objects[0][1]) / 1023, want, atol=0.5 / 1023)
    parsed, invalid = seg.parse_segmentation(ex["suffix"], random_vae, 60, 80)
    np.testing.assert_allclose(parsed[0]["box"], want, atol=0.5 / 1023)
    assert invalid == 0 and parsed[0]["label"] == ex["prefix"].split()[1]
  # The ground truth kept as RLE decodes to the annotated pixels.
  gt = seg.read_mask(dog["objects"][0]["mask"], (60, 80))
  assert gt.sum() == 30 * 40 and gt[10:40, 30:70].all()
  poly = seg.read_mask(cat["objects"][0]["mask"], (60, 80))
  assert abs(int(poly.sum()) - 40 * 30) <= 80  # Polygon edges rasterised by pycocotools.
  with pytest.raises(ValueError, match="3 or more points"):
    coco_segmentation.to_rle([[1, 2, 3, 4]], 60, 80)


def test_coco_to_jsonl_segment(tmp_path, capsys):
  ann, images = _coco(tmp_path)
  vae_path = str(tmp_path / "vae.npz")
  np.savez(vae_path, **seg.random_state_dict(0, 128, 16))
  out = str(tmp_path / "seg.jsonl")
  coco_to_jsonl.main(["--annotations", ann, "--images", images, "--output", out,
                      "--task", "segment", "--vae", vae_path])
  assert "Wrote 2 examples" in capsys.readouterr().out
  exs = sources.make_source(dict(name="jsonl", path=out))
  assert exs[0]["prefix"] == "segment cat" and exs[0]["suffix"].count("<seg") == 16
  assert isinstance(exs[1]["objects"][0]["mask"]["counts"], str)
  with pytest.raises(SystemExit):
    coco_to_jsonl.main(["--annotations", ann, "--images", images, "--output", out,
                        "--task", "segment"])  # No --vae.


def test_refcoco_jsonl_source(tmp_path, random_vae):
  Image.new("RGB", (40, 20)).save(tmp_path / "img.png")
  mask = np.zeros((20, 40), np.uint8)
  mask[4:12, 10:30] = 255
  Image.fromarray(mask).save(tmp_path / "m.png")
  (tmp_path / "ref.jsonl").write_text(json.dumps(
      {"image": "img.png", "prefix": "segment the left dog", "mask": "m.png"}) + "\n")
  np.savez(tmp_path / "vae.npz", **seg.random_state_dict(0, 128, 16))
  source = sources.make_source(dict(name="refcoco", path=str(tmp_path / "ref.jsonl"),
                                    vae=str(tmp_path / "vae.npz")))
  ex = source[0]
  assert ex["prefix"] == "segment the left dog"
  assert ex["suffix"].startswith(tokenizer_lib.box_to_loc([4 / 20, 10 / 40, 12 / 20, 30 / 40]))
  assert ex["suffix"].endswith(">")  # No label: RefCOCO answers have none.
  assert refcoco.mask_box(np.zeros((3, 3), bool)) is None


# -- the evaluator ---------------------------------------------------------------------

def _obj(box, mask, label="x"):
  return dict(label=label, box=np.asarray(box, np.float64), mask=mask)


def test_evaluator_metrics_by_hand():
  h = w = 8
  gt = np.zeros((h, w), bool)
  gt[0:4, 0:4] = True  # 16 px, box (0, 0, .5, .5).
  wide = np.zeros((h, w), bool)
  wide[0:4, 0:8] = True  # 32 px, covers gt: IoU 16/32; box IoU .25/.5.
  exact = seg_eval.score_example([_obj((0, 0, .5, .5), gt)], [_obj((0, 0, .5, .5), gt)], h, w)
  half = seg_eval.score_example([_obj((0, 0, .5, 1), wide), _obj((0, 0, .5, .5), gt)],
                                [_obj((0, 0, .5, .5), gt)], h, w)  # One gt: first object only.
  none = seg_eval.score_example([], [_obj((0, 0, .5, .5), gt)], h, w)
  assert exact["iou"] == 1.0 and half["iou"] == 0.5 and none["iou"] == 0.0
  assert half["box_ious"] == [0.5] and none["box_ious"] == [0.0]
  out = seg_eval.summarize([exact, half, none], invalid=1, malformed=3)
  assert out["miou"] == pytest.approx((1 + 0.5 + 0) / 3)
  assert out["ciou"] == pytest.approx((16 + 16 + 0) / (16 + 32 + 16))
  assert out["boxacc/0.5"] == pytest.approx(2 / 3) and out["boxacc/0.75"] == pytest.approx(1 / 3)
  assert out["invalid"] == 1 and out["malformed"] == 3 and out["total"] == 3
  # Several ground-truth objects: unions of masks, boxes matched by label.
  other = np.zeros((h, w), bool)
  other[5:8, 5:8] = True
  two = seg_eval.score_example([_obj((5 / 8, 5 / 8, 1, 1), other, "b")],
                               [_obj((0, 0, .5, .5), gt, "a"),
                                _obj((5 / 8, 5 / 8, 1, 1), other, "b")], h, w)
  assert two["iou"] == pytest.approx(9 / 25) and two["box_ious"] == [0.0, 1.0]


def test_evaluator_scores_shapes_ground_truth_and_counts_malformed(shapes_vae):
  from paligemma.evaluators import make_evaluator  # pylint: disable=g-import-not-at-top
  from paligemma.models import build  # pylint: disable=g-import-not-at-top
  from conftest import tiny_model_config  # pylint: disable=g-import-not-at-top
  data = dict(name="shapes", task="segment", num_examples=6, seed=1, image_size=32)
  model = build.build_model(tiny_model_config(vocab_size=1920))
  ev = make_evaluator("segmentation", dict(type="segmentation", data=data, batch_size=6,
                                           vae="shapes"),
                      model=model, tokenizer=tokenizer_lib.load_tokenizer(), image_size=32,
                      text_len=32, progress=False)
  preds = [dict(index=i, id=ev.source[i]["id"], prompt=ev.source[i]["prefix"],
                prediction=ev.source[i]["suffix"], references=[]) for i in range(6)]
  out = ev.score(preds)
  assert out["miou"] > 0.75 and out["boxacc/0.75"] == 1.0 and out["invalid"] == 0
  good = out["miou"] * 6
  preds[4]["prediction"] = "<loc0001><loc0002> circle ; nonsense"
  preds[5]["prediction"] = "<loc0500><loc0500><loc0100><loc0900>" + "<seg001>" * 16  # Inverted.
  out = ev.score(preds)
  assert out["invalid"] == 2 and out["malformed"] == 3 and out["total"] == 6
  assert out["miou"] < good / 6 and out["boxacc/0.5"] == pytest.approx(4 / 6)
  assert set(ev.record(preds[0])) >= {"iou", "boxes", "prediction"}
  with pytest.raises(ValueError, match="vae"):
    make_evaluator("segmentation", dict(type="segmentation", data=data, batch_size=6),
                   model=model, tokenizer=tokenizer_lib.load_tokenizer(), image_size=32,
                   text_len=32)


# -- drawing ---------------------------------------------------------------------------

def test_draw_objects_colours_masks_and_boxes():
  image = np.full((20, 30, 3), 255, np.uint8)
  mask = np.zeros((20, 30), bool)
  mask[5:10, 5:20] = True
  out = drawing.draw_objects(image, [_obj((0.25, 1 / 6, 0.5, 2 / 3), mask, "cat")])
  pixels = np.asarray(out)
  assert out.size == (30, 20) and out.mode == "RGB"
  assert (pixels[7, 10] != 255).any() and (pixels[15, 25] == 255).all()  # Inside tinted only.
  assert (pixels[5, 5] == drawing.COLOURS[0]).all()  # The box outline.
  boxes_only = drawing.draw_objects(Image.fromarray(image), drawing.detection_objects(
      [("", np.array([0.25, 1 / 6, 0.5, 2 / 3]))]))  # No label, no text: a box only.
  boxes_only = np.asarray(boxes_only)
  assert (boxes_only[7, 10] == 255).all() and (boxes_only[5, 5] != 255).any()
  with pytest.raises(ValueError, match="image's own height"):
    drawing.draw_objects(image, [_obj((0, 0, 1, 1), np.zeros((5, 5), bool))])


def test_one_parser_for_detections_and_segmentations():
  loc = tokenizer_lib.box_to_loc([0.1, 0.2, 0.5, 0.6])
  segs = "".join(tokenizer_lib.seg_piece(i) for i in range(16))
  text = f"{loc}{segs} cat ; {loc}{segs} ; {loc} dog ; {loc}{segs[:-8]} x ; junk"
  objects, malformed = tokenizer_lib.parse_objects(text, segments=True)
  assert [(l, c) for l, _, c in objects] == [("cat", list(range(16))), ("", list(range(16)))]
  assert malformed == 3  # The detection, the 15-code object, the junk.
  detections, malformed = tokenizer_lib.parse_detections(text)
  assert [l for l, _ in detections] == ["dog"] and malformed == 4
  np.testing.assert_allclose(detections[0][1], [0.1, 0.2, 0.5, 0.6], atol=0.5 / 1023)
