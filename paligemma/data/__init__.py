"""Data sources (one module each) and the tf.data input pipeline.

  from paligemma import data
  source = data.make_source({"name": "shapes", "task": "caption", "num_examples": 256})
  train = data.pipeline.make_train_input(source, tokenizer, image_size=224, text_len=32,
                                         batch_size=8, seed=0)

Sources: jsonl, flickr8k, coco_detection, coco_segmentation, refcoco, vqa, shapes, hf (hf_datasets.py: any
`datasets` dataset) and mixture (weighted sources; a list of source configs is one). See
`sources.py` for the example format and each module for its options. Batches: see
`pipeline.py`.
"""

from paligemma.data.sources import SOURCES, ListSource, make_source
