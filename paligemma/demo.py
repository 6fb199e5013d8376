r"""A browser demo: caption, answer, detect, segment or any prompt on an image, with one
checkpoint, or a base and its fine-tune side by side.

  python -m paligemma.demo --checkpoint /tmp/shapes
  python -m paligemma.demo --checkpoint kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224 \
      --compare /tmp/finetune --tokenizer paligemma_tokenizer.model --vae vae-oid.npz

Needs the `demo` extra (Gradio): `pip install -e ".[demo]"`. Serves on
http://127.0.0.1:7860 (--host, --port); upload an image or pick an example, choose the
task and the sampler, and press Run: each model's text is shown, with its boxes (detect)
and masks (segment: decoded with --vae, big_vision's mask VQ-VAE file or "shapes", else
the VAE the workdir's run used) drawn on the image (paligemma/drawing.py).
Checkpoints load as for `python -m paligemma.predict` (a trainer workdir, .npz, Hugging
Face directory or kaggle: handle) and predictions come from its `predict`. --examples
takes image files; by default three freshly drawn shapes images (transfers/shapes.py's
world) are offered.
"""

import argparse
import dataclasses
import os
import tempfile

import numpy as np
from PIL import Image

from paligemma import clean_exit
from paligemma import predict as predict_lib

TASKS = ("caption", "answer", "detect", "segment", "free prompt")
# Decode specs offered (paligemma/decode.py); any other spec may be typed in.
SAMPLERS = ("greedy", "nucleus(p=0.9)", "temperature(t=0.7)", "topk(k=10)", "beam(4)")


def make_prompt(task, text="", lang="en"):
  """The PaliGemma prompt of a task: "caption en", "answer en <question>", "detect cat",
  "segment cat", or `text` itself ("free prompt")."""
  text, lang = (text or "").strip(), (lang or "en").strip()
  if task == "caption":
    return f"caption {lang}"
  if task == "free prompt":
    if not text:
      raise ValueError("A free prompt needs its text.")
    return text
  if task not in TASKS:
    raise ValueError(f"Unknown task {task!r}; one of {TASKS}.")
  if not text:
    what = "a question" if task == "answer" else "what to find (e.g. 'cat' or 'cat ; dog')"
    raise ValueError(f"The {task} task needs {what} in the text box.")
  return f"answer {lang} {text}" if task == "answer" else f"{task} {text}"


@dataclasses.dataclass
class Loaded:
  """A checkpoint ready for `predict`: its name (the column title), its parts, and the
  mask VAE for segment prompts (None: none known)."""
  name: str
  model: object
  params: object
  tokenizer: object
  vae: object = None


def load(checkpoint, tokenizer=None, dtype=None, vae=None, adapter=None):
  """`Loaded` checkpoint, as `python -m paligemma.predict` loads it (with a LoRA
  `adapter` merged in, if given); the VAE is `vae` (a path, or "shapes"), else the one
  its training run used, if any."""
  model, params, tok, run_config = predict_lib.load_for_inference(
      checkpoint, tokenizer=tokenizer, dtype=dtype, adapter=adapter)
  vae = vae or predict_lib.run_vae(run_config)
  if vae:
    from paligemma import segmentation  # pylint: disable=g-import-not-at-top
    vae = segmentation.load_vae(vae)
  name = os.path.basename(os.path.normpath(str(adapter or checkpoint))) or str(checkpoint)
  return Loaded(name, model, params, tok, vae)


def annotate(image_path, record):
  """uint8[H, W, 3]: the image with the record's parsed objects (predict's `objects`:
  detect boxes, segment masks and boxes) drawn by paligemma/drawing.py."""
  from paligemma import drawing  # pylint: disable=g-import-not-at-top
  from paligemma.data import images as images_lib  # pylint: disable=g-import-not-at-top
  image = images_lib.decode(image_path)
  objects = record.get("objects")
  if objects is None and record.get("boxes"):  # A predict that gives pixel boxes only.
    h, w = image.shape[:2]
    objects = [{"label": b["label"], "box": np.asarray(b["box_xyxy"])[[1, 0, 3, 2]] /
                [h, w, h, w]} for b in record["boxes"]]
  return np.asarray(drawing.draw_objects(image, objects)) if objects else image


def run(loaded, image_path, prompt, *, sampler="greedy", max_decode_len=32, seed=0,
        vae=None):
  """(text, uint8[H, W, 3] annotated image) of one model on one image."""
  vae = vae if vae is not None else loaded.vae
  record = predict_lib.predict(loaded.model, loaded.params, loaded.tokenizer, [image_path],
                               prompt, max_decode_len=max_decode_len, sampler=sampler,
                               seed=seed, batch_size=1,
                               **({"vae": vae} if vae is not None else {}))[0]
  if "error" in record:
    raise ValueError(f"Cannot read the image: {record['error']}")
  # One line, as predict prints it: a newline the model wrote stays visible.
  text = record["prediction"].replace("\\", "\\\\").replace("\n", "\\n")
  return text, annotate(image_path, record)


def example_images(folder, count=3, image_size=224):
  """Paths of `count` freshly drawn shapes images (one shape each) written to `folder`."""
  from paligemma.data import shapes  # pylint: disable=g-import-not-at-top
  source = shapes.make(task="caption", num_examples=count, seed=2024, image_size=image_size)
  paths = []
  for i in range(count):
    paths.append(os.path.join(folder, f"shapes_{i}.png"))
    Image.fromarray(source[i]["image"]).save(paths[-1])
  return paths


def build_ui(models, examples=(), *, max_decode_len=32):
  """The Gradio Blocks app: inputs on the left, one output column per model."""
  import gradio as gr  # pylint: disable=g-import-not-at-top

  def on_run(image_path, task, text, lang, sampler, seed):
    if not image_path:
      raise gr.Error("Upload an image or pick an example first.")
    try:
      prompt = make_prompt(task, text, lang)
      outputs = [prompt]
      for m in models:
        outputs += run(m, image_path, prompt, sampler=sampler or "greedy",
                       max_decode_len=max_decode_len, seed=int(seed or 0))
    except ValueError as e:  # A bad prompt, sampler spec or image: shown, not a crash.
      raise gr.Error(str(e)) from None
    return outputs

  with gr.Blocks(title="PaliGemma demo") as ui:
    gr.Markdown("# PaliGemma\n" + " vs ".join(f"**{m.name}**" for m in models))
    with gr.Row():
      with gr.Column(scale=1):
        # PNG, not Gradio's default WebP: a lossy copy would not be the image uploaded.
        image = gr.Image(type="filepath", format="png", label="Image", elem_id="image",
                         sources=["upload", "clipboard"])
        task = gr.Radio(list(TASKS), value="caption", label="Task", elem_id="task")
        text = gr.Textbox(label="Question, objects (detect / segment) or free prompt",
                          elem_id="text")
        with gr.Row():
          lang = gr.Textbox("en", label="Language", elem_id="lang")
          sampler = gr.Dropdown(list(SAMPLERS), value="greedy", allow_custom_value=True,
                                label="Sampler", elem_id="sampler")
          seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
        button = gr.Button("Run", variant="primary", elem_id="run")
        if examples:
          gr.Examples([[p] for p in examples], inputs=[image], label="Examples")
      outputs = []
      for i, m in enumerate(models):
        with gr.Column(scale=1):
          outputs.append(gr.Textbox(label=m.name, elem_id=f"output-{i}", interactive=False,
                                    lines=1, max_lines=4))
          outputs.append(gr.Image(label=f"{m.name}: drawn", elem_id=f"drawn-{i}",
                                  format="png", interactive=False))
    prompt = gr.Textbox(label="Prompt sent", elem_id="prompt", interactive=False)
    button.click(on_run, inputs=[image, task, text, lang, sampler, seed],
                 outputs=[prompt, *outputs])
  return ui


def _parser():
  p = argparse.ArgumentParser(prog="python -m paligemma.demo", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True,
                 help="trainer workdir, .npz, Hugging Face directory or kaggle: handle")
  p.add_argument("--compare", help="a second checkpoint (e.g. the fine-tune of the first), "
                 "shown side by side")
  p.add_argument("--tokenizer", help="SentencePiece .model (default: as predict finds it)")
  p.add_argument("--compare_tokenizer", help="the --compare checkpoint's, if another")
  p.add_argument("--adapter", help="a PEFT LoRA adapter (or LoRA run workdir) for --checkpoint")
  p.add_argument("--compare_adapter", help="one for --compare (default --compare: "
                 "--checkpoint, i.e. the base next to base + adapter)")
  p.add_argument("--names", nargs="+", metavar="NAME",
                 help="column titles (default: the checkpoints' folder names)")
  p.add_argument("--vae", help='segment prompts: the mask VQ-VAE (vae-oid.npz, or "shapes"); '
                 "default: each workdir config's")
  p.add_argument("--examples", nargs="*", help="example image files (default: shapes)")
  p.add_argument("--max_decode_len", type=int, default=32)
  p.add_argument("--dtype", help="cast params, e.g. bfloat16 (default: as stored)")
  p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
  p.add_argument("--port", type=int, default=7860)
  return p


def main(argv=None):
  args = _parser().parse_args(argv)
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # No calls home.
  try:
    import gradio as gr  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit("The demo needs Gradio: pip install -e \".[demo]\".") from None
  models = [load(args.checkpoint, args.tokenizer, args.dtype, args.vae, args.adapter)]
  if args.compare or args.compare_adapter:
    models.append(load(args.compare or args.checkpoint, args.compare_tokenizer or args.tokenizer,
                       args.dtype, args.vae, args.compare_adapter))
    if models[0].name == models[1].name:
      models[0].name, models[1].name = args.checkpoint, args.compare
  for m, name in zip(models, args.names or ()):
    m.name = name
  examples = args.examples
  if examples is None:
    examples = example_images(tempfile.mkdtemp(prefix="paligemma_demo_"),
                              image_size=models[0].model.img.image_size)
  missing = [p for p in examples if not os.path.exists(p)]
  if missing:
    raise SystemExit(f"Example image(s) not found: {', '.join(missing)}")
  ui = build_ui(models, examples, max_decode_len=args.max_decode_len)
  # System fonts: the default theme's web fonts would be fetched from the internet.
  theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                            font_mono=["ui-monospace", "monospace"])
  ui.launch(server_name=args.host, server_port=args.port, theme=theme,
            allowed_paths=[os.path.dirname(os.path.abspath(p)) for p in examples])


if __name__ == "__main__":
  clean_exit.run(main)
