"""The `hf` source on tiny datasets written by `datasets` itself in the real formats
(a save_to_disk directory, a parquet folder, a hub cache read offline, a stream), and
training on it resumed after SIGKILL exactly as for jsonl."""

import io
import os

import numpy as np
import pytest
from PIL import Image

datasets = pytest.importorskip("datasets")

from paligemma.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from paligemma.data import shapes  # pylint: disable=g-import-not-at-top,wrong-import-position
from paligemma.data import sources  # pylint: disable=g-import-not-at-top,wrong-import-position


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, "PNG")
  return buf.getvalue()


def tuxemon_like(n=8, seed=3):
  """A Dataset in diffusers/tuxemon's format: `image` (Image) and `blip_caption`
  (here shapes captions, which the tiny tokenizer knows)."""
  src = shapes.make(task="caption", num_examples=n, seed=seed, image_size=32)
  features = datasets.Features({"image": datasets.Image(), "blip_caption": datasets.Value("string")})
  return datasets.Dataset.from_dict(
      {"image": [{"bytes": _png(src[i]["image"]), "path": None} for i in range(n)],
       "blip_caption": [src[i]["suffix"] for i in range(n)]}, features=features), src


def vqav2_like(n=6):
  """A Dataset in the VQAv2 mirrors' format (question, multiple_choice_answer, answers)."""
  rng = np.random.default_rng(0)
  answers = [[{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
              for j, a in enumerate(["red", "red", "blue"])] for _ in range(n)]
  features = datasets.Features({
      "question_id": datasets.Value("int64"), "question": datasets.Value("string"),
      "multiple_choice_answer": datasets.Value("string"), "image": datasets.Image(),
      "answers": [{"answer": datasets.Value("string"),
                   "answer_confidence": datasets.Value("string"),
                   "answer_id": datasets.Value("int64")}]})
  return datasets.Dataset.from_dict({
      "question_id": list(range(100, 100 + n)),
      "question": [f"what colour is shape {i}?" for i in range(n)],
      "multiple_choice_answer": ["red"] * n,
      "image": [{"bytes": _png(rng.integers(0, 255, (8, 8, 3), np.uint8)), "path": None}
                for _ in range(n)],
      "answers": answers}, features=features)


def test_save_to_disk_caption_source(tmp_path):
  ds, src = tuxemon_like()
  datasets.DatasetDict(train=ds).save_to_disk(str(tmp_path / "tux"))
  source = sources.make_source({"name": "hf", "path": str(tmp_path / "tux"),
                                "prefix": "caption en", "suffix": "blip_caption"})
  assert len(source) == 8
  ex = source[3]
  assert ex["prefix"] == "caption en" and ex["suffix"] == src[3]["suffix"]
  assert ex["references"] == [src[3]["suffix"]] and ex["id"] == "train:3"
  assert isinstance(ex["image"], bytes)  # Decoded by the pipeline, not the source.
  sliced = sources.make_source({"name": "hf", "path": str(tmp_path / "tux"),
                                "split": "train[2:5]", "suffix": "blip_caption"})
  assert len(sliced) == 3 and sliced[0]["suffix"] == src[2]["suffix"]


def test_parquet_folder_vqa_templates(tmp_path, tok):
  folder = tmp_path / "vqav2" / "data"
  folder.mkdir(parents=True)
  vqav2_like().to_parquet(str(folder / "validation-00000-of-00001.parquet"))
  source = sources.make_source({
      "name": "hf", "path": str(tmp_path / "vqav2"), "split": "validation",
      "prefix": "answer en {question}", "suffix": "multiple_choice_answer",
      "references": "answers", "id": "question_id"})
  ex = source[2]
  assert ex["prefix"] == "answer en what colour is shape 2?" and ex["suffix"] == "red"
  assert ex["references"] == ["red", "red", "blue"] and ex["id"] == "102"
  data = pipeline.make_eval_input(source, tok, image_size=16, text_len=24, batch_size=4,
                                  process_index=0, process_count=1)
  batches = list(data)
  assert sum(int(b["valid"].sum()) for b in batches) == 6
  assert batches[0]["references"][0] == ["red", "red", "blue"]


def test_errors_name_the_option(tmp_path):
  ds, _ = tuxemon_like(2)
  ds.save_to_disk(str(tmp_path / "one"))
  base = {"name": "hf", "path": str(tmp_path / "one")}
  with pytest.raises(ValueError, match=r"`image` to one of \['blip_caption', 'image'\]"):
    sources.make_source({**base, "image": "img"})
  with pytest.raises(ValueError, match=r"suffix='\{caption\}' names column\(s\) \['caption'\]"):
    sources.make_source({**base, "suffix": "{caption}"})
  with pytest.raises(FileNotFoundError, match="not found"):
    sources.make_source({"name": "hf", "path": str(tmp_path / "nothing")})


def test_offline_hub_name_from_the_cache(tmp_path, monkeypatch):
  """A hub dataset read by its name with HF_HUB_OFFLINE=1 from datasets' cache, laid out
  as a first (online) load leaves it: <cache>/<owner>___<name>/<config>/<version>/<hash>/
  with <name>-<split>.arrow files."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  ds, src = tuxemon_like(5)
  ds.to_parquet(str(tmp_path / "train.parquet"))
  builder = datasets.load_dataset_builder(
      "parquet", data_files={"train": str(tmp_path / "train.parquet")},
      cache_dir=str(tmp_path / "build"))
  builder.download_and_prepare()
  cache = tmp_path / "datasets"
  prepared = cache / "tiny___tuxemon" / "default" / "0.0.0" / os.path.basename(builder.cache_dir)
  shutil.copytree(builder.cache_dir, prepared)
  for f in prepared.glob("parquet-*"):
    f.rename(prepared / f.name.replace("parquet-", "tuxemon-", 1))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
  source = sources.make_source({"name": "hf", "path": "tiny/tuxemon", "suffix": "blip_caption"})
  assert len(source) == 5 and source[4]["suffix"] == src[4]["suffix"]


def test_stream_resumes_exactly(tmp_path, tok, monkeypatch):
  # datasets waits 5 s after each pass over a shuffled parquet stream (an arrow
  # workaround): harmless once an epoch in a run, most of this test's time.
  monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
  ds, _ = tuxemon_like(10)
  ds.to_parquet(str(tmp_path / "train.parquet"))
  config = {"name": "hf", "path": str(tmp_path), "suffix": "blip_caption", "streaming": True,
            "num_examples": 10, "shuffle_buffer": 4}
  with pytest.raises(ValueError, match="serves training only"):
    pipeline.make_eval_input(config, tok, image_size=16, text_len=12, batch_size=2)

  stream = sources.make_source(config)  # Built once, as the trainer does.
  assert sources.make_source(stream) is stream and len(stream) == 10

  def texts(start, steps, process_index=0, process_count=1):
    data = pipeline.make_train_input(stream, tok, image_size=16, text_len=12, batch_size=2,
                                     seed=1, start_position=start, process_index=process_index,
                                     process_count=process_count)
    out = []
    for batch, _ in zip(data, range(steps)):
      out += [(int(p), t.tobytes()) for p, t in zip(batch["position"], batch["text"])]
    return out

  whole = texts(0, 12)  # 2.4 epochs.
  assert [p for p, _ in whole] == list(range(24))
  assert whole[:10] != whole[10:20]  # Reshuffled each epoch...
  assert sorted(t for _, t in whole[:10]) == sorted(t for _, t in whole[10:20])  # ...whole.
  assert texts(7, 6) == whole[7:19]  # Resumed mid-epoch, across an epoch boundary.
  # Two processes: disjoint shares of the same epoch.
  a, b = texts(0, 5, 0, 2), texts(0, 5, 1, 2)
  assert sorted(t for _, t in a[:5] + b[:5]) == sorted(t for _, t in whole[:10])


@pytest.mark.slow
def test_training_on_hf_resumes_after_sigkill(tmp_path, tmp_path_factory):
  """The jsonl resume-after-SIGKILL check (test_train.py) on an `hf` source."""
  # Compiled steps shared by the three runs, and with the other resume test (same model).
  cache = tmp_path_factory.getbasetemp()
  import test_train  # pylint: disable=g-import-not-at-top
  ds, _ = tuxemon_like(12)
  ds.save_to_disk(str(tmp_path / "tux"))
  data = {"name": "hf", "path": str(tmp_path / "tux"), "suffix": "blip_caption"}
  override = [f"--config.input.data={data!r}"]
  killed = test_train.check_resume_after_sigkill(cache, tmp_path, extra=override,
                                                 arg="steps=12,batch_size=2,evals=False")
  assert os.path.exists(killed / "params.npz")
