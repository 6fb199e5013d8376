"""notebooks/finetune_paligemma.ipynb runs from top to bottom in smoke mode (CPU, tiny model).

Smoke mode (PALIGEMMA_SMOKE=1) runs the very cells a Colab user runs, on the shapes
demo's tiny model and data: install skipped, a random tiny checkpoint instead of the
Kaggle download, a jsonl written from the shapes generator, a short training run (LoRA
adapters, and the attention layers), predictions before and after, the loss plot, and
the .npz / Hugging Face export.
"""

import json
import os

import pytest
import nbclient  # The `test` extra installs nbclient, nbformat, ipykernel, matplotlib.
import nbformat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "finetune_paligemma.ipynb")
CELL_TIMEOUT_S = 300


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, cell.source[:80]
  assert nb.metadata.kernelspec.name == "python3"


# LoRA adapters or the attention-layers recipe; captions, or masks drawn before and after.
@pytest.mark.parametrize("lora,task", [("1", "caption"), ("0", "caption"), ("1", "segment")])
def test_notebook_runs_in_smoke_mode(tmp_path, monkeypatch, lora, task):
  work = tmp_path / "work"
  # The kernel inherits this environment: smoke mode, its scratch folder, this checkout.
  monkeypatch.setenv("PALIGEMMA_SMOKE", "1")
  monkeypatch.setenv("PALIGEMMA_LORA", lora)
  monkeypatch.setenv("PALIGEMMA_TASK", task)
  monkeypatch.setenv("PALIGEMMA_SMOKE_DIR", str(work))
  monkeypatch.setenv("PALIGEMMA_REPO", REPO)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": REPO}})
  try:
    client.execute()  # Raises CellExecutionError naming the cell on any error.
  finally:
    with open(tmp_path / "executed.ipynb", "w", encoding="utf-8") as f:
      nbformat.write(nb, f)  # For a look at what failed.

  export = work / "export"
  assert (export / "paligemma-finetuned.f16.npz").stat().st_size > 0
  hf = export / "paligemma-finetuned-hf"
  assert (hf / "config.json").exists() and (hf / "model.safetensors").exists()
  assert (hf / "tokenizer.model").exists() or (hf / "tokenizer.json").exists()
  with open(work / "workdir" / "metrics.jsonl") as f:
    losses = [json.loads(l)["train/loss"] for l in f if "train/loss" in l]
  assert len(losses) >= 2
  # A LoRA run ends with a PEFT adapter directory instead of params.npz.
  assert (work / "workdir" / "adapter" / "adapter_config.json").exists() == (lora == "1")
  assert (work / "workdir" / "params.npz").exists() == (lora == "0")
  # The plots (before/after captions, loss curve) reached the notebook as images.
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert len(images) >= 3
