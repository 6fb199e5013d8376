"""VQAv2-style visual question answering: a questions json and an annotations json.

  questions    {"data_subtype": "val2014", "questions": [{"image_id", "question",
               "question_id"}, ...]}
  annotations  {"annotations": [{"question_id", "multiple_choice_answer",
               "answers": [{"answer": ...}, ...]}, ...]}  (optional: test splits have none)

One example per question: prefix "answer en {question}", suffix the
`multiple_choice_answer` (None without annotations), `references` all the annotators'
answers (VQA accuracy needs them), id the question id.

Images: `images` folder + `image_pattern`, formatted with `image_id` and `subtype` (the
questions' `data_subtype`); the default is COCO's "COCO_{subtype}_{image_id:012d}.jpg".

Config: {"name": "vqa", "questions": ..., "annotations": ..., "images": ...}.
"""

import os

from paligemma.data import sources

DEFAULT_PATTERN = "COCO_{subtype}_{image_id:012d}.jpg"


def make(questions, images, annotations=None, image_pattern=DEFAULT_PATTERN,
         prefix="answer en {question}"):
  """Source of VQA examples."""
  if not os.path.isdir(images):
    raise FileNotFoundError(f"VQA image folder {images!r} not found; set `images`.")
  qdata = sources.read_json(questions, ("questions",), "VQAv2 questions", "questions")
  subtype = qdata.get("data_subtype", "")
  answers = {}
  if annotations is not None:
    for ann in sources.read_json(annotations, ("annotations",), "VQAv2 annotations",
                                  "annotations")["annotations"]:
      answers[ann["question_id"]] = ann
  examples = []
  for q in qdata["questions"]:
    ann = answers.get(q["question_id"])
    if annotations is not None and ann is None:
      raise ValueError(f"{annotations}: no annotation for question_id {q['question_id']} of "
                       f"{questions}; the two files must be the same split.")
    try:
      name = image_pattern.format(image_id=q["image_id"], subtype=subtype)
    except (KeyError, ValueError) as e:
      raise ValueError(f"image_pattern {image_pattern!r} cannot be formatted ({e}); it may use "
                       "{image_id} and {subtype}.") from None
    suffix = ann["multiple_choice_answer"] if ann else None
    refs = [a["answer"] for a in ann.get("answers", [])] if ann else []
    examples.append(dict(image=os.path.join(images, name),
                         prefix=prefix.format(question=q["question"]), suffix=suffix,
                         id=str(q["question_id"]), references=refs or ([suffix] if ann else []),
                         question=q["question"], image_id=q["image_id"]))
  return sources.ListSource(f"vqa {questions}", examples)
