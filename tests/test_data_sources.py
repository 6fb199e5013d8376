"""Each data source on a tiny dataset written in its real layout."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from paligemma.data import coco_detection
from paligemma.data import coco_to_jsonl
from paligemma.data import flickr8k
from paligemma.data import make_source


def _image(path, size=(8, 6), colour=(10, 20, 30)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, colour).save(path)


# ------------------------------------------------------------------------------ registry

def test_unknown_source_name_lists_valid_ones():
  with pytest.raises(ValueError, match="valid names: jsonl, flickr8k, coco_detection, .*shapes"):
    make_source({"name": "imagenet"})


def test_unknown_and_missing_options():
  with pytest.raises(ValueError, match=r"Unknown option\(s\) \['pth'\].*'path'"):
    make_source({"name": "jsonl", "pth": "x"})
  with pytest.raises(ValueError, match=r"needs option\(s\) \['path'\]"):
    make_source({"name": "jsonl"})


# --------------------------------------------------------------------------------- jsonl

def test_jsonl_paths_ids_and_extra_keys(tmp_path):
  _image(str(tmp_path / "img" / "a.png"))
  absolute = str(tmp_path / "abs.png")
  _image(absolute)
  lines = [
      {"image": "img/a.png", "prefix": "caption en", "suffix": "a red circle", "extra": 7},
      {"image": absolute, "prefix": "caption en", "suffix": "x", "id": "mine",
       "references": ["x", "y"]},
      {"image": "img/a.png", "prefix": "caption en"},
  ]
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(json.dumps(l) for l in lines[:2]) + "\n\n" + json.dumps(lines[2]))
  src = make_source({"name": "jsonl", "path": str(path)})
  assert len(src) == 3
  assert src[0] == {"image": str(tmp_path / "img" / "a.png"), "prefix": "caption en",
                    "suffix": "a red circle", "extra": 7, "id": "data.jsonl:1",
                    "references": ["a red circle"]}
  assert src[1]["image"] == absolute and src[1]["id"] == "mine"
  assert src[1]["references"] == ["x", "y"]
  assert src[2]["suffix"] is None and src[2]["references"] == [] and src[2]["id"] == "data.jsonl:4"


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.png", "prefix": "p", "suffix": "s"', "not valid JSON"),
    ('["a.png", "p", "s"]', "expected a JSON object"),
    ('{"prefix": "p", "suffix": "s"}', "key 'image' must be a string"),
    ('{"image": "a.png", "prefix": "p", "suffix": 3}', "key 'suffix' must be a string"),
])
def test_jsonl_malformed_line_names_file_and_line(tmp_path, line, message):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"image": "a.png", "prefix": "p", "suffix": "s"}\n' + line + "\n")
  with pytest.raises(ValueError, match=f"bad.jsonl:2: {message}"):
    make_source({"name": "jsonl", "path": str(path)})


def test_jsonl_empty_and_missing(tmp_path):
  (tmp_path / "empty.jsonl").write_text("\n  \n")
  with pytest.raises(ValueError, match="is empty"):
    make_source({"name": "jsonl", "path": str(tmp_path / "empty.jsonl")})
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    make_source({"name": "jsonl", "path": str(tmp_path / "nope.jsonl")})


# ------------------------------------------------------------------------------ flickr8k

def _flickr(root, num_images=10, captions_per_image=3):
  rows = ["image,caption"]
  for i in range(num_images):
    name = f"{1000 + i}_abc.jpg"
    _image(os.path.join(root, "Images", name), colour=(i * 20, 0, 0))
    for k in range(captions_per_image):
      rows.append(f'{name},"a dog, number {i}, caption {k} ."' if k == 0
                  else f"{name},a dog number {i} caption {k} .")
  with open(os.path.join(root, "captions.txt"), "w") as f:
    f.write("\n".join(rows) + "\n")


def test_flickr8k_split_by_image_and_captions(tmp_path):
  _flickr(str(tmp_path))
  cfg = {"name": "flickr8k", "directory": str(tmp_path), "train_size": 6, "val_size": 3,
         "seed": 0}
  train = make_source(dict(cfg, split="train"))
  val = make_source(dict(cfg, split="validation"))
  train_images = {os.path.basename(ex["image"]) for ex in train}
  val_images = {os.path.basename(ex["image"]) for ex in val}
  assert len(train_images) == 6 and len(val_images) == 3
  assert not train_images & val_images
  assert len(train) == 18  # Every caption of every training image.
  assert len(val) == 3
  ex = val[0]
  i = int(ex["id"][:4]) - 1000
  assert ex["references"] == [f"a dog, number {i}, caption 0 .",
                              f"a dog number {i} caption 1 .", f"a dog number {i} caption 2 ."]
  assert ex["suffix"] == ex["references"][0] and ex["prefix"] == "caption en"
  assert ex["image"] == os.path.join(str(tmp_path), "Images", ex["id"])
  caps = sorted(e["suffix"] for e in train if e["image"] == train[0]["image"])
  assert len(caps) == 3 and all(e["references"] == [e["suffix"]] for e in train)


def test_flickr8k_split_determinism(tmp_path):
  _flickr(str(tmp_path))
  def split(seed, split="validation", train_size=6):
    return [e["id"] for e in make_source({"name": "flickr8k", "directory": str(tmp_path),
                                          "split": split, "train_size": train_size,
                                          "val_size": 3, "seed": seed})]
  assert split(0) == split(0)
  assert split(0) != split(1)
  # Growing the training set never changes validation.
  assert split(0, train_size=None) == split(0)
  assert len(split(0, "train", None)) == 7 * 3
  # The rule, spelled out: sorted names, permuted by the seed, validation first.
  names = sorted(f"{1000 + i}_abc.jpg" for i in range(10))
  perm = np.random.default_rng(0).permutation(10)
  assert split(0) == [names[j] for j in perm[:3]]


def test_flickr8k_bad_inputs(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    make_source({"name": "flickr8k", "directory": str(tmp_path / "none")})
  with pytest.raises(FileNotFoundError, match="Images/"):
    make_source({"name": "flickr8k", "directory": str(tmp_path)})
  _flickr(str(tmp_path))
  with pytest.raises(ValueError, match="too few"):
    make_source({"name": "flickr8k", "directory": str(tmp_path), "train_size": 8, "val_size": 3})
  with pytest.raises(ValueError, match="split must be"):
    make_source({"name": "flickr8k", "directory": str(tmp_path), "split": "test"})
  captions = tmp_path / "captions.txt"
  lines = captions.read_text().splitlines()
  captions.write_text("\n".join(lines[:4] + ["1000_abc.jpg"] + lines[4:]) + "\n")
  with pytest.raises(ValueError, match="captions.txt:5: expected two non-empty fields"):
    make_source({"name": "flickr8k", "directory": str(tmp_path)})
  captions.write_text("")
  with pytest.raises(ValueError, match="captions.txt: empty file"):
    make_source({"name": "flickr8k", "directory": str(tmp_path)})
  captions.write_text("file,text\na.jpg,b\n")
  with pytest.raises(ValueError, match="expected `image,caption`"):
    make_source({"name": "flickr8k", "directory": str(tmp_path)})


def test_flickr8k_commas_quoted_or_not(tmp_path):
  _image(str(tmp_path / "Images" / "a.jpg"))
  (tmp_path / "captions.txt").write_text(
      "image,caption\n"
      "a.jpg,a dog, running on grass .\n"          # Unquoted comma: split at the first.
      'a.jpg,"a dog, running ""fast"" ."\n'        # Kaggle's quoting: the unquoted text.
      "a.jpg,a plain caption .\n")
  captions = flickr8k.read_captions(str(tmp_path / "captions.txt"))
  assert captions == {"a.jpg": ["a dog, running on grass .", 'a dog, running "fast" .',
                                "a plain caption ."]}


def test_flickr8k_helpers():
  with pytest.raises(ValueError, match="split must be"):
    flickr8k.split_images(["a"], "dev", None, 0, 0)


# -------------------------------------------------------------------------------- coco

def _coco(root):
  _image(os.path.join(root, "images", "1.jpg"), size=(200, 100))
  _image(os.path.join(root, "images", "2.jpg"), size=(100, 100))
  _image(os.path.join(root, "images", "3.jpg"), size=(50, 50))
  data = {
      "images": [{"id": 2, "file_name": "2.jpg", "width": 100, "height": 100},
                 {"id": 1, "file_name": "1.jpg", "width": 200, "height": 100},
                 {"id": 3, "file_name": "3.jpg", "width": 50, "height": 50}],
      "categories": [{"id": 18, "name": "dog"}, {"id": 17, "name": "cat"},
                     {"id": 1, "name": "person"}],
      "annotations": [
          {"id": 10, "image_id": 1, "category_id": 18, "bbox": [0, 0, 100, 50], "iscrowd": 0},
          {"id": 11, "image_id": 1, "category_id": 17, "bbox": [50, 25, 150, 75], "iscrowd": 0},
          {"id": 12, "image_id": 1, "category_id": 1, "bbox": [0, 0, 200, 100], "iscrowd": 1},
          {"id": 13, "image_id": 2, "category_id": 1, "bbox": [10, 20, 30, 40], "iscrowd": 0},
      ],
  }
  path = os.path.join(root, "instances.json")
  with open(path, "w") as f:
    json.dump(data, f)
  return path


def test_coco_detection_strings(tmp_path):
  ann = _coco(str(tmp_path))
  src = make_source({"name": "coco_detection", "annotations": ann,
                     "images": str(tmp_path / "images")})
  assert [ex["id"] for ex in src] == ["1", "2"]  # Image 3 has no object: dropped.
  # Image 1 (200 wide, 100 high): dog x 0..100, y 0..50 -> y 0..0.5, x 0..0.5;
  # cat x 50..200, y 25..100 -> y 0.25..1, x 0.25..1. Crowd person ignored.
  # Categories are ordered by id: person (1), cat (17), dog (18).
  assert src[0]["prefix"] == "detect cat ; dog"
  assert src[0]["suffix"] == ("<loc0000><loc0000><loc0512><loc0512> dog ; "
                              "<loc0256><loc0256><loc1023><loc1023> cat")
  assert src[0]["image"] == str(tmp_path / "images" / "1.jpg")
  assert src[0]["references"] == [src[0]["suffix"]]
  assert src[0]["objects"][0] == {"label": "dog", "box": [0.0, 0.0, 0.5, 0.5]}
  # Image 2: person x 10..40, y 20..60 of 100 -> 0.2, 0.1, 0.6, 0.4.
  assert src[1]["prefix"] == "detect person"
  assert src[1]["suffix"] == "<loc0205><loc0102><loc0614><loc0409> person"


def test_coco_detection_options(tmp_path):
  ann = _coco(str(tmp_path))
  images = str(tmp_path / "images")
  only_cats = make_source({"name": "coco_detection", "annotations": ann, "images": images,
                           "classes": ["cat"]})
  assert [(e["id"], e["prefix"], e["suffix"][-3:]) for e in only_cats] == [("1", "detect cat", "cat")]
  ask_all = make_source({"name": "coco_detection", "annotations": ann, "images": images,
                         "classes": ["dog", "person"], "ask": "all", "skip_crowd": False})
  assert [e["id"] for e in ask_all] == ["1", "2", "3"]
  assert all(e["prefix"] == "detect dog ; person" for e in ask_all)
  assert ask_all[0]["suffix"].endswith("dog ; <loc0000><loc0000><loc1023><loc1023> person")
  assert ask_all[2]["suffix"] == ""
  orders = set()
  for seed in range(8):
    exs = coco_detection.examples(ann, images, shuffle_objects=True, seed=seed)
    assert exs == coco_detection.examples(ann, images, shuffle_objects=True, seed=seed)
    orders.add(exs[0]["suffix"])
  assert len(orders) == 2  # Both orders of image 1's two objects occur.
  with pytest.raises(ValueError, match=r"classes \['unicorn'\] are not categories"):
    make_source({"name": "coco_detection", "annotations": ann, "images": images,
                 "classes": ["unicorn"]})
  with pytest.raises(FileNotFoundError, match="set `annotations`"):
    make_source({"name": "coco_detection", "annotations": str(tmp_path / "x.json"),
                 "images": images})


def _coco_outside(root):
  """Image 1 (100 x 50): a box partly outside, one wholly outside, one of zero width;
  image 2: only a box wholly outside."""
  _image(os.path.join(root, "images", "1.jpg"), size=(100, 50))
  _image(os.path.join(root, "images", "2.jpg"), size=(100, 50))
  data = {
      "images": [{"id": 1, "file_name": "1.jpg", "width": 100, "height": 50},
                 {"id": 2, "file_name": "2.jpg", "width": 100, "height": 50}],
      "categories": [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}],
      "annotations": [
          {"id": 20, "image_id": 1, "category_id": 17, "bbox": [80, -10, 40, 40],
           "area": 1600, "iscrowd": 0},
          {"id": 21, "image_id": 1, "category_id": 18, "bbox": [120, 10, 30, 20],
           "area": 600, "iscrowd": 0},
          {"id": 22, "image_id": 1, "category_id": 18, "bbox": [10, 10, 0, 20],
           "area": 0, "iscrowd": 0},
          {"id": 23, "image_id": 2, "category_id": 18, "bbox": [10, 60, 20, 20],
           "area": 400, "iscrowd": 0},
      ],
  }
  path = os.path.join(root, "instances.json")
  with open(path, "w") as f:
    json.dump(data, f)
  return path


def test_coco_detection_clips_and_counts_empty_boxes(tmp_path, caplog, capsys):
  ann = _coco_outside(str(tmp_path))
  images = str(tmp_path / "images")
  with caplog.at_level("WARNING"):
    src = make_source({"name": "coco_detection", "annotations": ann, "images": images})
  # The cat, x 80..120 -> 80..100 of 100, y -10..30 -> 0..30 of 50: y1 0, x1 .8, y2 .6, x2 1
  # (round(v * 1023)). The dogs (wholly outside, zero width) are dropped, not <loc1023>s.
  assert [ex["id"] for ex in src] == ["1"]  # Image 2 lost its only box.
  assert src[0]["prefix"] == "detect cat"
  assert src[0]["suffix"] == "<loc0000><loc0818><loc0614><loc1023> cat"
  assert src[0]["objects"] == [{"label": "cat", "box": [0.0, 0.8, 0.6, 1.0]}]
  assert src.dropped_boxes == 3 and "3 empty boxes dropped" in src.name
  assert "instances.json: dropped 3 box(es)" in caplog.text and "[21, 22, 23]" in caplog.text
  every = make_source({"name": "coco_detection", "annotations": ann, "images": images,
                       "keep_empty": True})
  assert [(ex["id"], ex["suffix"]) for ex in every][1] == ("2", "")
  out = tmp_path / "det.jsonl"
  coco_to_jsonl.main(["--annotations", ann, "--images", images, "--output", str(out)])
  assert len(out.read_text().splitlines()) == 1
  assert "dropped 3 box(es) with no area inside their image" in capsys.readouterr().out


def test_coco_to_jsonl_round_trip(tmp_path):
  ann = _coco(str(tmp_path))
  out = tmp_path / "out" / "det.jsonl"
  out.parent.mkdir()
  result = subprocess.run(
      [sys.executable, "-m", "paligemma.data.coco_to_jsonl", "--annotations", ann,
       "--images", str(tmp_path / "images"), "--output", str(out)],
      capture_output=True, text=True, check=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert "Wrote 2 examples" in result.stdout and "dropped 0 box(es)" in result.stdout
  first = json.loads(out.read_text().splitlines()[0])
  assert first["image"] == os.path.join("..", "images", "1.jpg")
  back = make_source({"name": "jsonl", "path": str(out)})
  direct = make_source({"name": "coco_detection", "annotations": ann,
                        "images": str(tmp_path / "images")})
  for a, b in zip(back, direct):
    assert os.path.normpath(a["image"]) == b["image"]
    assert {k: a[k] for k in ("prefix", "suffix", "id", "references", "objects")} == \
           {k: b[k] for k in ("prefix", "suffix", "id", "references", "objects")}
  coco_to_jsonl.main(["--annotations", ann, "--images", str(tmp_path / "images"),
                      "--output", str(tmp_path / "cats.jsonl"), "--classes", "cat"])
  assert len((tmp_path / "cats.jsonl").read_text().splitlines()) == 1


# --------------------------------------------------------------------------------- vqa

def _vqa(root, with_annotations=True):
  for image_id in (42, 7):
    _image(os.path.join(root, "val2014", f"COCO_val2014_{image_id:012d}.jpg"))
  questions = {"data_subtype": "val2014", "questions": [
      {"image_id": 42, "question": "What colour is the bus?", "question_id": 420},
      {"image_id": 7, "question": "How many dogs?", "question_id": 70},
      {"image_id": 42, "question": "Is it raining?", "question_id": 421}]}
  answers = ["red"] * 7 + ["dark red", "red", "maroon"]
  annotations = {"annotations": [
      {"question_id": 420, "image_id": 42, "multiple_choice_answer": "red",
       "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                   for i, a in enumerate(answers)]},
      {"question_id": 70, "image_id": 7, "multiple_choice_answer": "2",
       "answers": [{"answer": "2", "answer_id": 1}]},
      {"question_id": 421, "image_id": 42, "multiple_choice_answer": "no", "answers": []}]}
  qpath, apath = os.path.join(root, "q.json"), os.path.join(root, "a.json")
  with open(qpath, "w") as f:
    json.dump(questions, f)
  with open(apath, "w") as f:
    json.dump(annotations, f)
  return qpath, apath


def test_vqa(tmp_path):
  qpath, apath = _vqa(str(tmp_path))
  src = make_source({"name": "vqa", "questions": qpath, "annotations": apath,
                     "images": str(tmp_path / "val2014")})
  assert len(src) == 3
  ex = src[0]
  assert ex["prefix"] == "answer en What colour is the bus?"
  assert ex["suffix"] == "red" and ex["id"] == "420"
  assert ex["references"] == ["red"] * 7 + ["dark red", "red", "maroon"]
  assert ex["image"] == str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
  assert src[2]["references"] == ["no"]  # No annotator list: the answer itself.
  no_answers = make_source({"name": "vqa", "questions": qpath,
                            "images": str(tmp_path / "val2014")})
  assert no_answers[1]["suffix"] is None and no_answers[1]["references"] == []
  custom = make_source({"name": "vqa", "questions": qpath, "annotations": apath,
                        "images": str(tmp_path), "image_pattern": "{image_id}.png"})
  assert custom[1]["image"] == str(tmp_path / "7.png")


def test_vqa_bad_inputs(tmp_path):
  qpath, apath = _vqa(str(tmp_path))
  with open(apath) as f:
    ann = json.load(f)
  ann["annotations"].pop()
  with open(apath, "w") as f:
    json.dump(ann, f)
  images = str(tmp_path / "val2014")
  with pytest.raises(ValueError, match="no annotation for question_id 421"):
    make_source({"name": "vqa", "questions": qpath, "annotations": apath, "images": images})
  with open(qpath, "w") as f:
    f.write('{"questions": [\n{"image_id": 1,}\n]}')
  with pytest.raises(ValueError, match="q.json:2: not valid JSON"):
    make_source({"name": "vqa", "questions": qpath, "images": images})
  with pytest.raises(FileNotFoundError, match="image folder"):
    make_source({"name": "vqa", "questions": qpath, "images": str(tmp_path / "none")})


# ------------------------------------------------------------------------------ shapes

def test_shapes_caption_deterministic_and_sized():
  cfg = {"name": "shapes", "task": "caption", "num_examples": 20, "seed": 3, "image_size": 48}
  a, b = make_source(cfg), make_source(cfg)
  assert len(a) == 20
  for i in range(20):
    assert a[i]["suffix"] == b[i]["suffix"] and np.array_equal(a[i]["image"], b[i]["image"])
    assert a[i]["image"].shape == (48, 48, 3) and a[i]["image"].dtype == np.uint8
    assert a[i]["prefix"] == "caption en"
    words = a[i]["suffix"].split()
    assert len(words) == 3 and words[0] == "a"
    assert words[1] in ("red", "green", "blue", "yellow")
    assert words[2] in ("circle", "square", "triangle")
  other = make_source(dict(cfg, seed=4))
  assert [a[i]["suffix"] for i in range(20)] != [other[i]["suffix"] for i in range(20)]
  assert a[-1]["id"] == "shapes-3-19"
  with pytest.raises(IndexError):
    a[20]


def test_shapes_pixels_match_caption_and_boxes():
  from paligemma.data import shapes
  src = make_source({"name": "shapes", "task": "detect", "num_examples": 10, "seed": 0,
                     "image_size": 64, "max_shapes": 3})
  for ex in src:
    assert ex["prefix"] == "detect circle ; square ; triangle"
    assert ex["suffix"].count("<loc") == 4 * len(ex["objects"])
    for obj in ex["objects"]:
      colour = shapes.COLOURS[obj["colour"]]
      inside = np.zeros((64, 64), bool)
      for other in ex["objects"]:
        if other["colour"] == obj["colour"]:
          y1, x1, y2, x2 = (int(round(v * 64)) for v in other["box"])
          inside[y1:y2, x1:x2] = True
      painted = (ex["image"] == colour).all(-1)
      assert not (painted & ~inside).any()  # No colour outside its boxes.
      y1, x1, y2, x2 = (int(round(v * 64)) for v in obj["box"])
      assert painted[y1:y2, x1:x2].mean() > 0.4  # The box is mostly its shape.
  with pytest.raises(ValueError, match="task"):
    make_source({"name": "shapes", "task": "classify"})


def test_shapes_size_range():
  for low, high in ((0.3, 0.5), (0.7, 0.9)):
    src = make_source({"name": "shapes", "task": "caption", "num_examples": 30, "seed": 0,
                       "image_size": 100, "size": [low, high]})
    sides = [ex["objects"][0]["box"][2] - ex["objects"][0]["box"][0] for ex in src]
    assert low - 0.011 <= min(sides) and max(sides) <= high  # Sides are whole pixels.
    assert max(sides) - min(sides) > (high - low) / 3  # Drawn across the range.
  with pytest.raises(ValueError, match="size"):
    make_source({"name": "shapes", "size": [0.6, 0.4]})
