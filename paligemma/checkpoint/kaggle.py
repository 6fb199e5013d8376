"""`kaggle:<owner>/<model>/jax/<variation>[/<version>][/<file>]` handles, via kagglehub.

kagglehub (1.0.x) keeps downloads under $KAGGLEHUB_CACHE (default ~/.cache/kagglehub) at
models/<owner>/<model>/<framework>/<variation>/<version>/, marked complete by
<version>.complete (or .complete/<version>/<file>.complete for a single file). A
versioned handle that is cached resolves with no network; an unversioned one asks
Kaggle for the latest version first, so offline we fall back to the newest complete
version in that cache ourselves.
"""

import logging
import os

from paligemma.checkpoint.source import CheckpointError

PREFIX = "kaggle:"


def parse(spec):
  """"kaggle:o/m/jax/v[/3][/f.npz]" -> (kagglehub ModelHandle, file or None)."""
  from kagglehub import handle as handle_lib  # pylint: disable=g-import-not-at-top
  parts = spec[len(PREFIX):].strip("/").split("/")
  if len(parts) < 4:
    raise CheckpointError(f"{spec!r}: a Kaggle handle reads "
                          "kaggle:<owner>/<model>/<framework>/<variation>[/<version>][/<file>], "
                          "e.g. kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224")
  n = 5 if len(parts) > 4 and parts[4].isdigit() else 4
  h = handle_lib.parse_model_handle("/".join(parts[:n]))
  return h, "/".join(parts[n:]) or None


def _cached(h, file):
  """Newest complete copy (of `file`, or of the whole bundle) in kagglehub's cache, or None."""
  from kagglehub import cache as cache_lib  # pylint: disable=g-import-not-at-top
  if h.is_versioned():
    versions = [h.version]
  else:
    root = os.path.dirname(cache_lib.get_cached_path(h.with_version(1)))
    names = os.listdir(root) if os.path.isdir(root) else []
    versions = sorted((int(v) for v in names if v.isdigit()), reverse=True)
  cache = cache_lib.Cache()
  for v in versions:
    hv = h.with_version(v)
    if file and cache.load_from_cache(hv, file):
      return cache.load_from_cache(hv, file)
    bundle = cache.load_from_cache(hv)
    if bundle and (not file or os.path.exists(os.path.join(bundle, file))):
      return os.path.join(bundle, file) if file else bundle
  return None


def resolve(spec):
  """Local path of a Kaggle handle: kagglehub's download (or its cache), else an error."""
  import kagglehub  # pylint: disable=g-import-not-at-top
  from kagglehub import config as kh_config  # pylint: disable=g-import-not-at-top
  h, file = parse(spec)
  try:
    return kagglehub.model_download(str(h), path=file) if file else kagglehub.model_download(str(h))
  except Exception as e:  # pylint: disable=broad-except  (network, auth, 404: all end here)
    path = _cached(h, file)
    if path:
      logging.warning("Kaggle unreachable (%s); using the cached copy %s", e, path)
      return path
    what = f"{h}" + (f" file {file}" if file else "")
    raise CheckpointError(
        f"{spec}: cannot download Kaggle model {what} ({type(e).__name__}: {e}) and "
        f"kagglehub's cache ({kh_config.get_cache_folder()}) holds no complete copy. "
        "On a machine with network and Kaggle credentials (and the model's license accepted "
        f"at https://www.kaggle.com/models/{h.owner}/{h.model}), run "
        f"`kagglehub.model_download({str(h)!r}" + (f", path={file!r}" if file else "") + ")` "
        "or download the file from that page, then pass the local path instead, e.g. "
        "paligemma.checkpoint.load('/path/to/paligemma2-3b-pt-224.b16.npz') or "
        "`python -m paligemma.convert /path/to/file.npz OUT`; or copy the download into "
        "that cache (set KAGGLEHUB_CACHE to point elsewhere).") from None


def pick_checkpoint(path, spec=""):
  """A downloaded Kaggle path -> the checkpoint in it (a .npz file or an HF directory)."""
  if os.path.isfile(path) or os.path.exists(os.path.join(path, "config.json")):
    return path
  found = sorted(f for f in os.listdir(path) if f.endswith(".npz"))
  if len(found) == 1:
    return os.path.join(path, found[0])
  if not found:
    raise CheckpointError(f"{spec or path}: no .npz checkpoint or config.json in {path}: "
                          f"{sorted(os.listdir(path))}")
  raise CheckpointError(f"{spec or path}: several checkpoints in {path}: {found}; name one, "
                        f"e.g. {spec.rstrip('/') or PREFIX + '...'}/{found[0]}")
