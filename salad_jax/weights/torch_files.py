"""Weight files and weight checks: reading and writing flat state_dicts, checking every tensor.

Reading `.ckpt/.pth/.pt/.bin` needs torch and only ever uses `torch.load(weights_only=True)`: a
pickle that would call code is refused (naming what it would call), never run. `.safetensors`
files are read without torch, bfloat16 and float8 included. `check_weights` is applied to every
tensor salad_jax loads, from any format: floating point and finite, or a `UserError` naming the
tensor; float16/bfloat16/float64 become float32 with one logged line.

Files salad_jax writes carry a marker (safetensors metadata `salad_jax`, a `salad_jax` entry in
the torch state_dict's `_metadata`), so `check_file_destination` can tell a file it may replace
(`--overwrite`) from a user's file, which it never replaces.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import io
import json
import os
import pickletools
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np
from absl import logging

from salad_jax.errors import UserError
from salad_jax.files import atomic, destinations, paths

TORCH_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")
INTEGER_BUFFERS = ("num_batches_tracked",)  # the only integer tensors a weight file may hold
SAFETENSORS_SUFFIX = ".safetensors"
MARKER = "salad_jax"  # key of the writer marker in files salad_jax writes
_LOW_PRECISION = {
  np.dtype(t)
  for t in (np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)
}
_ST_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "U16": np.uint16,
  "U32": np.uint32,
  "U64": np.uint64,
  "BOOL": np.bool_,
}


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with paths.open_read(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def import_torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      "reading a PyTorch .ckpt/.pth needs torch: pip install 'salad-jax[torch]' "
      "(or convert the file to .safetensors elsewhere)"
    ) from e
  return torch


# ------------------------------------------------------------------------------ checks
def is_counter(name: str, a: np.ndarray) -> bool:
  """BatchNorm's `num_batches_tracked`: a legitimate integer buffer (a scalar count >= 0)."""
  leaf = name.replace("/", ".").rsplit(".", 1)[-1]
  return leaf in INTEGER_BUFFERS and a.dtype.kind in "iu" and a.ndim == 0 and int(a) >= 0


def check_weights(tensors: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
  """Every tensor floating point and finite -> float32 numpy arrays (same keys, same order).

  Integer/bool tensors and NaN/Inf values are a `UserError` naming the first offending tensor;
  lower (or higher) precision floats are converted to float32 with one logged line. The one
  exception: BatchNorm's counter (`INTEGER_BUFFERS`, a scalar count) stays an integer.
  """
  out, converted, bad = {}, collections.Counter(), []
  for name, value in tensors.items():
    a = np.asarray(value)
    if is_counter(name, a):
      out[name] = a
      continue
    if a.dtype.kind != "f" and a.dtype not in _LOW_PRECISION:
      raise UserError(
        f"{where}: tensor {name!r} has dtype {a.dtype}; weights must be floating point",
        "the file holds something other than float weights (quantised or not a "
        "model checkpoint); convert it from the original float weights",
      )
    if a.dtype != np.float32:
      converted[str(a.dtype)] += 1
      a = a.astype(np.float32)
    if a.size and not (np.isfinite(a.min()) and np.isfinite(a.max())):  # NaN propagates
      bad.append(f"{name!r} ({int(a.size - np.isfinite(a).sum())} of {a.size} values)")
    out[name] = a
  if bad:
    more = f", and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else ""
    raise UserError(
      f"{where}: tensor {bad[0]} is NaN or Inf{more}; these weights are broken",
      "use another checkpoint (e.g. one saved before training diverged)",
    )
  if converted:
    kinds = " and ".join(f"{n} {d}" for d, n in sorted(converted.items()))
    logging.warning("%s: converted %s tensor(s) to float32", where, kinds)
  return out


def check_params(params: Mapping, where: str) -> dict:
  """`check_weights` over a nested params dict (tensors named 'backbone/blocks_0/...')."""
  flat: dict[str, Any] = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, Mapping):
        walk(v, f"{prefix}{k}/")
      else:
        flat[f"{prefix}{k}"] = v

  walk(params, "")
  out: dict = {}
  for name, v in check_weights(flat, where).items():
    *parents, leaf = name.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


# ------------------------------------------------------------------------------ reading
def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Flat state_dict of a .ckpt/.pth/.pt/.bin or .safetensors file, checked, as float32 numpy.

  A Lightning-style dict is unwrapped through its `state_dict` key.
  """
  return read_checkpoint_file(path)[0]


def read_checkpoint_file(path: str) -> tuple[dict[str, np.ndarray], dict | None]:
  """(`read_state_dict`, the Lightning file's `hyper_parameters` or None)."""
  if paths.isdir(path):
    raise IsADirectoryError(f"{path} is a directory, not a checkpoint file")
  if not paths.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  try:
    with paths.open_read(path, "rb"):
      pass
  except OSError as e:
    raise PermissionError(f"cannot read {path}: {e.strerror or e}") from None
  with paths.local_copy(path) as local:  # a URL is read from a temporary download
    try:
      if file_kind(path) == "safetensors":
        raw, hparams = _read_safetensors(local), None
      else:
        raw, hparams = _read_torch(local)
    except UserError as e:  # name the user's path, not the download's
      if local == path:
        raise
      raise UserError(e.message.replace(local, path), e.hint) from None
  return check_weights(raw, path), hparams


def _plain(value: Any) -> Any:
  """hyper_parameters as plain JSON-like values (a tensor or other object becomes its repr)."""
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return repr(value)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """numpy arrays of every tensor (bfloat16/float8 via ml_dtypes, which safetensors.numpy lacks)."""
  from safetensors import SafetensorError, safe_open

  try:
    with safe_open(path, framework="numpy"):  # validates the header and the offsets
      pass
    with open(path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      header = json.loads(f.read(n))
      data = f.read()
  except (SafetensorError, ValueError, OSError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not a readable .safetensors file: {e}") from e
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise UserError(
        f"{path}: tensor {name!r} has dtype {info['dtype']}; weights must be floating point"
      )
    start, end = info["data_offsets"]
    out[name] = np.frombuffer(data[start:end], _ST_DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def _read_torch(path: str) -> tuple[dict[str, np.ndarray], dict | None]:
  torch = import_torch()
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
    raise _refusal(path, e) from None
  hparams = None
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    if isinstance(obj.get("hyper_parameters"), Mapping):
      hparams = _plain(obj["hyper_parameters"])
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping) or not obj:
    raise UserError(
      f"{path} holds a {type(obj).__name__}, not a state_dict (a mapping of "
      "parameter names to tensors)"
    )
  raw = {}
  for k, v in obj.items():
    if not isinstance(v, torch.Tensor):
      raise UserError(
        f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor; expected a flat state_dict"
      )
    v = v.detach().cpu()
    if v.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits (exact)
      raw[k] = v.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).reshape(v.shape)
    elif v.dtype.is_floating_point and v.dtype.itemsize == 1:
      raw[k] = v.to(torch.float32).numpy()  # float8: exact in float32
    else:
      raw[k] = v.numpy()
  return raw, hparams


def _refusal(path: str, error: Exception) -> UserError:
  """torch refused the file: say what the pickle would call, never "retry unsafely"."""
  calls = [
    g for g in _pickle_globals(path) if not g.startswith(("torch.", "collections.", "_codecs."))
  ]
  if calls:
    what = ", ".join(dict.fromkeys(calls))
    return UserError(
      f"refusing to load {path}: its pickle refers to {what} (code, not tensors); "
      "nothing in it was executed",
      "a checkpoint holds only tensors; get the weights from a source you trust, or "
      "as .safetensors",
    )
  try:
    with open(path, "rb") as f:
      head = f.read(16)
  except OSError:
    head = b""
  if not head.startswith((b"PK", b"\x80")):  # torch's zip format, or a pickle (protocol >= 2)
    return UserError(
      f"{path} is not a PyTorch checkpoint: it is neither torch's zip format nor a "
      f"pickle (it starts with {head!r}); nothing in it was executed",
      "give a file saved with torch.save, or a .safetensors file",
    )
  lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
  reason = next(
    (
      ln
      for ln in lines
      if "weights_only" not in ln
      and "Weights only" not in ln
      and "documentation" not in ln
      and "Please" not in ln
    ),
    "",
  )
  if len(reason) < 20:  # e.g. KeyError('101'), an empty EOFError: name the error too
    reason = f"{type(error).__name__} {reason}".strip() + (
      ", the file is truncated" if isinstance(error, EOFError) else ""
    )
  return UserError(
    f"{path} is not a PyTorch checkpoint torch can read safely ({reason}); "
    "nothing in it was executed"
  )


def _pickle_globals(path: str) -> list[str]:
  """'module.name' of every global a pickle (plain, or torch's zip format) references.

  Reads the opcodes with pickletools (nothing is executed). Best effort: for messages only.
  """
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        data = z.read(name)
    else:
      with open(path, "rb") as f:
        data = f.read()
  except (OSError, StopIteration, zipfile.BadZipFile):
    return []
  found, strings, memo = [], [], {}
  stream = io.BytesIO(data)
  while stream.tell() < len(data):  # torch's legacy format is several pickles in a row
    try:
      for op, arg, _ in pickletools.genops(stream):
        if op.name == "GLOBAL":
          found.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
          found.append(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
          strings.append(arg)
        elif op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT") and strings:
          memo[arg if op.name != "MEMOIZE" else len(memo)] = strings[-1]
        elif op.name in ("GET", "BINGET", "LONG_BINGET") and arg in memo:
          strings.append(memo[arg])
    except Exception:  # a truncated or non-pickle tail
      break
  fix = {"__builtin__": "builtins", "posix": "os", "nt": "os"}
  return [".".join([fix.get(g.split(".")[0], g.split(".")[0])] + g.split(".")[1:]) for g in found]


# ------------------------------------------------------------------------------ writing
def _version() -> str:
  """salad_jax's installed version, recorded in the marker (its presence is what counts)."""
  try:
    return importlib.metadata.version("salad-jax")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def file_kind(path: str) -> str | None:
  """'safetensors', 'torch' or None, from the suffix (any case: `X.PTH` is a .pth file)."""
  low = os.fspath(path).lower()
  if low.endswith(SAFETENSORS_SUFFIX):
    return "safetensors"
  return "torch" if low.endswith(TORCH_SUFFIXES) else None


def write_state_dict(path: str, state_dict: Mapping[str, np.ndarray]) -> None:
  """Writes a flat float32 state_dict (BatchNorm counters int64) (.pth/.ckpt via torch, or .safetensors) with the marker.

  Written under a fresh temporary name beside `path`, then renamed (`atomic.new_file`); a full
  disk or a folder that cannot be written is one `UserError`, and nothing partial is left.
  """

  paths.makedirs(paths.parent(path))
  atomic.remove_leftovers(path)  # files of a killed run: only mentioned
  atomic.check_space(path, sum(np.asarray(v).nbytes for v in state_dict.values()))
  with atomic.new_file(path) as tmp:
    if file_kind(path) == "safetensors":
      from safetensors.numpy import save

      data = save(dict(state_dict), metadata={"format": "pt", MARKER: _version()})
      with open(tmp, "wb") as f:  # Python's write: a full disk is an OSError with its errno
        f.write(data)
    else:
      torch = import_torch()
      sd = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in state_dict.items())
      sd._metadata = {MARKER: {"version": _version()}}  # torch ignores keys that name no module
      with open(tmp, "wb") as f:
        torch.save(sd, f)


def written_by_us(path: str) -> bool:
  """True iff `path` is a weight file salad_jax wrote (it carries the marker)."""
  if paths.is_url(path):
    try:
      with paths.local_copy(path) as local:
        return written_by_us(local)
    except Exception:  # unreadable, not ours
      return False
  try:
    if file_kind(path) == "safetensors":
      from safetensors import safe_open

      with safe_open(path, framework="numpy") as f:
        return MARKER in (f.metadata() or {})
    torch = import_torch()
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return MARKER in (getattr(obj, "_metadata", None) or {})
  except Exception:  # unreadable, not ours
    return False


def check_file_destination(path: str, overwrite: bool) -> None:
  """An output weight file: a known suffix, then `files.destinations.check_file` (an existing
  file is replaced only with `overwrite` and only if it carries salad_jax's marker)."""
  if file_kind(path) is None:
    raise UserError(
      f"{path}: a weight file must end in {', '.join(TORCH_SUFFIXES)} (PyTorch) or "
      f"{SAFETENSORS_SUFFIX}",
      f"e.g. {os.path.splitext(path)[0] or 'model'}.pth",
    )
  destinations.check_file(path, overwrite, written_by_us)
