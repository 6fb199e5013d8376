"""PEFT LoRA adapters both ways: PEFT -> load(adapter=) and save_peft -> PeftModel, logits
against transformers + peft within 1e-4, on tiny random PaliGemma 1 and 2; and errors."""

import functools
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

import hf_tiny
from paligemma import checkpoint
from paligemma import lora as lora_lib
from paligemma.checkpoint import names
from paligemma.checkpoint import peft as peft_lib
from paligemma.checkpoint import tree
from paligemma.models import build
from conftest import random_params, tiny_model_config


TOL = 1e-4
RECIPE = ["q_proj", "o_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
QKV = tiny_model_config(1, vocab_size=300, num_kv_heads=4)  # num_kv_heads == num_heads.


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
  """{name: transformers base directory}: PaliGemma 1 (MQA), 2 (GQA, window), and a
  PaliGemma 1 with as many kv heads as heads (qkv_einsum), written by save_hf."""
  root = tmp_path_factory.mktemp("bases")
  out = {}
  for version in (1, 2):
    out[f"pg{version}"] = str(root / f"pg{version}")
    hf_tiny.make_tiny_hf(out[f"pg{version}"], version, seed=version)
  out["qkv"] = str(root / "qkv")
  params = jax.tree.map(lambda x: x * 0.1, random_params(QKV, seed=3))
  checkpoint.save_hf(params, QKV, out["qkv"])
  return out


def _hf(directory):
  return transformers.PaliGemmaForConditionalGeneration.from_pretrained(directory).eval()


def _batch(model_config, seed=0):
  """(image float[2, S, S, 3], text int32[2, 8], mask_ar): a prefix of 3, suffix of 5."""
  rng = np.random.default_rng(seed)
  size = model_config["img"]["image_size"]
  image = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  text = rng.integers(4, 300, (2, 8)).astype(np.int32)
  mask_ar = np.array([[0] * 3 + [1] * 5] * 2, np.int32)
  return image, text, mask_ar


@functools.lru_cache(maxsize=None)
def _jit_apply(model):  # Compiled once per model (a Model is hashable), shared by the tests.
  return jax.jit(model.apply)


def _ours(params, model_config, batch):
  apply = _jit_apply(build.build_model(model_config))
  logits, _ = apply({"params": params}, *map(jnp.asarray, batch))
  return np.asarray(logits)


def _theirs(model, model_config, batch):
  image, text, mask_ar = batch
  vocab = model_config["llm"]["vocab_size"]
  n = (model_config["img"]["image_size"] // model_config["img"]["patch_size"]) ** 2
  ids = torch.cat([torch.full((2, n), model.config.image_token_index),
                   torch.from_numpy(text).long()], 1)
  types = torch.cat([torch.zeros(2, n, dtype=torch.long), torch.from_numpy(mask_ar).long()], 1)
  with torch.no_grad():
    out = model(input_ids=ids, pixel_values=torch.from_numpy(image.transpose(0, 3, 1, 2)),
                token_type_ids=types, attention_mask=torch.ones_like(ids))
  return out.logits.numpy()[:, n:, :vocab]


def _peft_adapter(base, directory, seed, **lora_kw):
  """An adapter made in PEFT on `base`, with random (nonzero) A and B; -> the PeftModel."""
  model = peft.get_peft_model(_hf(base), peft.LoraConfig(**lora_kw))
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ".lora_" in name or "trainable_tokens_delta" in name:
        p.copy_(torch.randn(p.shape, generator=g) * 0.05)
  model.save_pretrained(directory)
  return model.eval()


@pytest.fixture(scope="module")
def peft_adapters(bases, tmp_path_factory):
  """{version: (adapter dir, PeftModel)}: PEFT's PaliGemma recipe (also SigLIP's q/k/v);
  on PaliGemma 2 also trainable token rows (unsorted ids)."""
  root = tmp_path_factory.mktemp("adapters")
  kw = {1: dict(r=4, lora_alpha=8),
        2: dict(r=2, lora_alpha=16, lora_dropout=0.05, trainable_token_indices=[299, 7, 42])}
  return {v: (str(root / f"pg{v}"), _peft_adapter(bases[f"pg{v}"], str(root / f"pg{v}"), v,
                                                     target_modules=RECIPE, **kw[v]))
          for v in (1, 2)}


@pytest.mark.parametrize("version", [1, 2])
def test_peft_adapter_loads_merged_and_unmerged(bases, peft_adapters, version):
  base = bases[f"pg{version}"]
  directory, peft_model = peft_adapters[version]
  base_config = checkpoint.load(base)[1]
  batch = _batch(base_config, seed=version)
  theirs = _theirs(peft_model, base_config, batch)
  with peft_model.disable_adapter():
    assert np.abs(theirs - _theirs(peft_model, base_config, batch)).max() > 0.05  # It adapts.

  merged, config = checkpoint.load(base, adapter=directory)
  assert "lora" not in config
  err_merged = np.abs(_ours(merged, config, batch) - theirs).max()

  unmerged, config = checkpoint.load(base, adapter=directory, merge=False)
  lora = lora_lib.LoraConfig.from_dict(config["lora"])
  assert (lora.rank, lora.scale, lora.targets) == ((4, 2.0, "peft") if version == 1 else
                                                   (2, 8.0, "peft"))
  assert config["lora"]["dropout"] == (0.0 if version == 1 else 0.05)
  assert config["lora"]["tokens"] == ([] if version == 1 else [7, 42, 299])
  flat = tree.flatten(unmerged)
  assert "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel_lora_a" in flat
  err_unmerged = np.abs(_ours(unmerged, config, batch) - theirs).max()
  print(f"PEFT -> ours, PaliGemma {version}: max abs logit error merged {err_merged:.2e}, "
        f"unmerged {err_unmerged:.2e}")
  assert err_merged < TOL and err_unmerged < TOL
  # load's merge is lora.merge of the unmerged leaves.
  again = lora_lib.merge(flat, lora)
  for name, x in tree.flatten(merged).items():
    np.testing.assert_allclose(x, again[name], atol=1e-6, err_msg=name)


def test_old_transformers_names_and_per_layer(bases, peft_adapters, tmp_path):
  # transformers < 4.52 spellings: language_model.model.layers..., vision_tower.vision_model...
  directory = peft_adapters[1][0]
  with safetensors.safe_open(os.path.join(directory, peft_lib.WEIGHTS_FILE), "np") as f:
    state = {k: f.get_tensor(k) for k in f.keys()}
  old = {}
  for k, v in state.items():
    k = k.replace("base_model.model.model.language_model.",
                  "base_model.model.language_model.model.")
    old[k.replace("base_model.model.model.vision_tower.",
                  "base_model.model.vision_tower.vision_model.")] = v
  assert any(".vision_model.encoder." in k for k in old)
  out = tmp_path / "old"
  out.mkdir()
  safetensors.numpy.save_file(old, str(out / peft_lib.WEIGHTS_FILE))
  shutil.copy(os.path.join(directory, peft_lib.CONFIG_FILE), out)
  want, _ = checkpoint.load(bases["pg1"], adapter=directory)
  got, _ = checkpoint.load(bases["pg1"], adapter=out, stacked=False)
  got = tree.flatten(tree.stack_layers(got))
  # Merged in float32 before the cast: bfloat16 leaves are the float32 ones rounded.
  bf16 = tree.flatten(checkpoint.load(bases["pg1"], adapter=directory, dtype="bfloat16")[0])
  for name, x in tree.flatten(want).items():
    np.testing.assert_array_equal(x, got[name], err_msg=name)
    np.testing.assert_array_equal(np.asarray(x).astype(jnp.bfloat16), bf16[name], err_msg=name)


def test_partial_adapter_gets_zeros(bases, tmp_path):
  # k_proj without v_proj (one half of kv_einsum), on some layers only, q_proj nowhere.
  directory = str(tmp_path / "k")
  peft_model = _peft_adapter(bases["pg1"], directory, 5, r=2, target_modules=["k_proj"],
                             layers_to_transform=[1, 3])
  params, config = checkpoint.load(bases["pg1"], adapter=directory, merge=False)
  # ("k_proj" names SigLIP's key projection too.)
  vit_key = "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/key/kernel"
  assert config["lora"]["targets"] == f"{vit_key}|llm/layers/attn/kv_einsum/w"
  flat = tree.flatten(params)
  b = flat["llm/layers/attn/kv_einsum/w_lora_b"]  # [L, S, r, K, H]
  assert b.shape == (4, 2, 2, 1, 16)
  assert not b[:, 1].any() and not b[0].any() and not b[2].any() and b[1, 0].any()
  assert not flat[vit_key + "_lora_b"][0].any() and flat[vit_key + "_lora_b"][1].any()
  batch = _batch(config, seed=3)
  err = np.abs(_ours(params, config, batch) - _theirs(peft_model, config, batch)).max()
  print(f"PEFT k_proj-only adapter -> ours: max abs logit error {err:.2e}")
  assert err < TOL


def _random_adapters(model_config, lora, seed):
  """Random adapter leaves (A and B nonzero) for `model_config` with config.lora `lora`."""
  model = build.build_model(model_config, lora=lora)
  shapes = lora_lib.adapters(tree.flatten(build.abstract_params(model)))
  rng = np.random.default_rng(seed)
  return {n: (rng.standard_normal(s.shape) * 0.05).astype(np.float32)
          for n, s in sorted(shapes.items())}


CASES = {  # base, config.lora, target_modules written
    "pg1": ("pg1", dict(rank=4, alpha=8, targets="peft"), list),
    "pg2": ("pg2", dict(rank=3, alpha=12, dropout=0.1, targets="llm", tokens=[7, 42, 299]),
            str),
    "qkv": ("qkv", dict(rank=2, alpha=2, targets="all"), list),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_peft_loads_in_peft(bases, tmp_path, case):
  base, lora, kind = CASES[case]
  params, base_config = checkpoint.load(bases[base])
  lora = lora_lib.LoraConfig.from_dict(lora).to_dict()
  config = dict(base_config, lora=lora)
  adapters = _random_adapters(base_config, lora, seed=len(case))
  flat = {**tree.flatten(params), **adapters}
  batch = _batch(base_config, seed=4)
  ours = _ours(tree.unflatten(flat), config, batch)
  if case == "qkv":  # Per-layer flat names are accepted too.
    assert "llm/layers/attn/qkv_einsum/w_lora_a" in adapters
    flat = tree.flatten(tree.unstack_layers(tree.unflatten(flat)))
    to_save = flat
  else:
    to_save = tree.unflatten(flat)
  nbytes = checkpoint.save_peft(to_save, config, tmp_path / "a", base=bases[base])
  assert nbytes == sum(x.nbytes for x in adapters.values())

  with open(tmp_path / "a" / peft_lib.CONFIG_FILE) as f:
    written = json.load(f)
  assert written["peft_type"] == "LORA" and written["bias"] == "none"
  assert (written["r"], written["lora_alpha"], written["lora_dropout"]) == (
      lora["rank"], lora["alpha"], lora["dropout"])
  assert written["base_model_name_or_path"] == bases[base]
  assert isinstance(written["target_modules"], kind)
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message=".*missing adapter keys.*")
    model = peft.PeftModel.from_pretrained(_hf(bases[base]), tmp_path / "a").eval()
  with safetensors.safe_open(tmp_path / "a" / peft_lib.WEIGHTS_FILE, "np") as f:
    keys = set(f.keys())
  # PEFT adapted exactly the modules written (no more: the target_modules are exact).
  assert set(peft.get_peft_model_state_dict(model)) == keys
  theirs = _theirs(model, base_config, batch)
  err = np.abs(ours - theirs).max()
  print(f"ours -> PEFT, {case} (targets {lora['targets']}): max abs logit error {err:.2e}")
  assert err < TOL

  # And back: the same leaves.
  again, config2 = checkpoint.load(bases[base], adapter=tmp_path / "a", merge=False)
  assert config2["lora"] == lora
  again = tree.flatten(again)
  for name, x in adapters.items():
    np.testing.assert_array_equal(x, again[name], err_msg=name)


def test_factor_layout_matches_table():
  """B_j A_j of every torch module = names.table's to_hf of the adapter's delta weight."""
  rng = np.random.default_rng(0)
  for model_config in (tiny_model_config(1), tiny_model_config(2), QKV):
    targets = peft_lib._targets(model_config)  # pylint: disable=protected-access
    entries = {e.ours: e for e in names.table(model_config)}
    assert len(targets) == 10 + ("llm/layers/attn/kv_einsum/w" in targets)  # 6 in the ViT.
    for w, t in targets.items():
      a_shape, b_shape = t.layout.shapes(t.shape, 3)
      a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
      delta = np.asarray(lora_lib.delta_weight(jnp.asarray(a), jnp.asarray(b), t.layout, 1.0))
      ta, tb = peft_lib.to_torch(a, b, t)
      for j, hf_delta in enumerate(entries[w].to_hf(delta)):
        np.testing.assert_allclose(tb[j] @ ta[j], hf_delta, rtol=1e-5, atol=1e-5, err_msg=w)
      back_a, back_b = peft_lib.from_torch(ta, tb, t)
      np.testing.assert_array_equal(back_a, a)
      np.testing.assert_array_equal(back_b, b)


# ---- errors --------------------------------------------------------------------------------

def _copy_adapter(src, dst, config=None, drop=(), add=None):
  os.makedirs(dst)
  with open(os.path.join(src, peft_lib.CONFIG_FILE)) as f:
    cfg = json.load(f)
  cfg.update(config or {})
  with open(os.path.join(dst, peft_lib.CONFIG_FILE), "w") as f:
    json.dump(cfg, f)
  with safetensors.safe_open(os.path.join(src, peft_lib.WEIGHTS_FILE), "np") as f:
    state = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
  state.update(add or {})
  safetensors.numpy.save_file(state, os.path.join(dst, peft_lib.WEIGHTS_FILE))
  return dst


def _error(base, adapter, **kw):
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.load(base, adapter=adapter, **kw)
  return str(e.value)


def test_missing_directory_and_files(bases, peft_adapters, tmp_path):
  assert str(tmp_path / "nope") in _error(bases["pg1"], tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  msg = _error(bases["pg1"], tmp_path / "empty")
  assert str(tmp_path / "empty" / "adapter_config.json") in msg
  only_config = tmp_path / "c"
  only_config.mkdir()
  shutil.copy(os.path.join(peft_adapters[1][0], peft_lib.CONFIG_FILE), only_config)
  assert str(only_config / "adapter_model.safetensors") in _error(bases["pg1"], only_config)
  (only_config / "adapter_model.bin").write_bytes(b"\x80")
  assert "pickle" in _error(bases["pg1"], only_config)


@pytest.mark.parametrize("key, value", [("use_dora", True), ("use_rslora", True),
                                        ("rank_pattern", {"q_proj": 8}), ("bias", "all"),
                                        ("modules_to_save", ["lm_head"])])
def test_unsupported_variants_refused(bases, peft_adapters, tmp_path, key, value):
  out = _copy_adapter(peft_adapters[1][0], str(tmp_path / key), config={key: value})
  msg = _error(bases["pg1"], out)
  assert os.path.join(out, "adapter_config.json") in msg and key in msg


def test_adapter_of_another_base(bases, peft_adapters):
  # The PaliGemma 1 adapter (1 kv head) on the PaliGemma 2 base (2 kv heads).
  msg = _error(bases["pg2"], peft_adapters[1][0])
  assert os.path.join(peft_adapters[1][0], "adapter_model.safetensors") in msg
  assert "lora_" in msg and "has shape" in msg and "another model" in msg


def test_unsupported_module_and_missing_pair(bases, peft_adapters, tmp_path):
  src = peft_adapters[1][0]
  key = "base_model.model.model.multi_modal_projector.linear.lora_A.weight"
  out = _copy_adapter(src, str(tmp_path / "u"), add={key: np.zeros((4, 32), np.float32)})
  msg = _error(bases["pg1"], out)
  assert key in msg and "unsupported target module" in msg and "adapter_model.safetensors" in msg
  dropped = "base_model.model.model.language_model.layers.2.mlp.up_proj.lora_B.weight"
  out = _copy_adapter(src, str(tmp_path / "p"), drop=(dropped,))
  msg = _error(bases["pg1"], out)
  assert dropped in msg and "missing" in msg


def test_save_peft_errors(bases, tmp_path):
  params, config = checkpoint.load(bases["pg1"])
  with pytest.raises(checkpoint.CheckpointError, match="no 'lora' entry"):
    checkpoint.save_peft(params, config, tmp_path / "x")
  lora = dict(rank=2, alpha=2)
  with pytest.raises(checkpoint.CheckpointError, match="no adapter leaves"):
    checkpoint.save_peft(params, dict(config, lora=lora), tmp_path / "x")
  adapters = _random_adapters(config, lora, seed=0)
  with pytest.raises(checkpoint.CheckpointError, match="rank 3"):
    checkpoint.save_peft(adapters, dict(config, lora=dict(rank=3)), tmp_path / "x")
