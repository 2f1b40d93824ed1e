"""Bad inputs a user can give, each with its expected outcome: a table (issue 12).

Library cases raise a ValueError/OSError whose message holds the listed words; command-line
cases exit with status 2 and one `error:` line (no traceback) holding them. Cases that load
must load correctly. Conversion/loading, describe/features and train.py's workdir are covered
here; image decoding and evaluate.py have their own tables.
"""

import collections
import json
import logging
import os
import shutil
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

import salad_jax
import salad_jax.data.pack
import salad_jax.weights.convert
import salad_jax.weights.converted
import salad_jax.weights.infer
import salad_jax.weights.torch_files

from helpers import make_gsv, state_dict_np, twin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD = dict(m=16, l=32, g=32, hidden=128)  # configs/demo.py's head on Nano/14


@pytest.fixture(scope="module")
def nano(tmp_path_factory):
  tm, params, config = twin("Nano/14", seed=5, **HEAD)
  root = tmp_path_factory.mktemp("nano")
  model = salad_jax.SaladModel(params, config)
  model.save(str(root / "converted"))
  sd = collections.OrderedDict(state_dict_np(tm))
  torch.save(tm.state_dict(), root / "nano.pth")
  return types.SimpleNamespace(model=model, sd=sd, root=root, pth=str(root / "nano.pth"))


@pytest.fixture
def ctx(nano, tmp_path):
  def converted():
    dst = tmp_path / "converted"
    shutil.copytree(nano.root / "converted", dst)
    return str(dst)

  return types.SimpleNamespace(**vars(nano), tmp=tmp_path, converted=converted)


def pixels(n=1, hw=70):
  return np.random.default_rng(0).integers(0, 256, (n, hw, hw, 3)).astype(np.uint8)


def normalised(n=1, hw=70):
  return salad_jax.preprocess(list(pixels(n, hw)), size=None)


def with_value(x, value):
  x = np.array(x, copy=True)
  x.reshape(-1)[x.size // 3] = value
  return x


def torch_file(c, name, sd):
  path = str(c.tmp / name)
  torch.save(
    collections.OrderedDict((k, torch.from_numpy(np.asarray(v))) for k, v in sd.items()), path
  )
  return path


def changed(sd, key, value):
  sd = collections.OrderedDict(sd)
  sd[key] = value
  return sd


def flip_byte(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(path, "wb").write(data)


def largest_file(d):
  return max((os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs), key=os.path.getsize)


def edit_json(path, fn):
  meta = json.load(open(path))
  fn(meta)
  json.dump(meta, open(path, "w"))


def project_folder(c):
  d = c.tmp / "project"
  (d / "src").mkdir(parents=True)
  (d / "README.md").write_text("my notes")
  (d / "src" / "train.py").write_text("print('mine')")
  return str(d)


def assert_project_intact(c):
  d = c.tmp / "project"
  assert (d / "README.md").read_text() == "my notes" and (d / "src" / "train.py").exists()


def nan_params_without_checksum(c):
  import orbax.checkpoint as ocp

  d = c.converted()
  params = jax_tree_map(np.copy, c.model.params)
  params["aggregator"]["score_0"]["bias"][3] = np.nan
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(d, "params"), params, force=True)
  ckptr.close()
  edit_json(os.path.join(d, "salad_config.json"), lambda m: m.pop("params_checksum"))
  return salad_jax.load(d)


def jax_tree_map(fn, tree):
  return {
    k: jax_tree_map(fn, v) if isinstance(v, dict) else fn(np.asarray(v)) for k, v in tree.items()
  }


# ------------------------------------------------------------------------------ the library
# (case, action(ctx), words the error holds); after the action, `check(ctx)` if given
LIBRARY = [
  # images (item 5): describe and features take ImageNet-normalised floats
  (
    "describe: uint8 images",
    lambda c: c.model.describe(pixels()),
    ["uint8", "salad_jax.preprocess"],
  ),
  (
    "describe: floats in [0, 255]",
    lambda c: c.model.describe(pixels().astype(np.float32)),
    ["outside [-2.118, 2.640]", "salad_jax.preprocess"],
  ),
  (
    "describe: a device array in [0, 255]",
    lambda c: c.model.describe(jnp.asarray(pixels(), jnp.float32)),
    ["outside [-2.118, 2.640]"],
  ),
  (
    "describe: a NaN pixel",
    lambda c: c.model.describe(with_value(normalised(), np.nan)),
    ["NaN or Inf"],
  ),
  (
    "features: an Inf pixel",
    lambda c: c.model.features(with_value(normalised(), np.inf)),
    ["NaN or Inf"],
  ),
  ("features: uint8 images", lambda c: c.model.features(pixels()), ["uint8"]),
  # tensors (item 6): floating point and finite, named
  (
    "torch file: a NaN tensor",
    lambda c: salad_jax.load(
      torch_file(
        c,
        "nan.pth",
        changed(
          c.sd, "aggregator.score.0.weight", with_value(c.sd["aggregator.score.0.weight"], np.nan)
        ),
      )
    ),
    ["tensor 'aggregator.score.0.weight' (1 of", "is NaN or Inf"],
  ),
  (
    "safetensors: an Inf tensor",
    lambda c: salad_jax.load(
      save_st(c, changed(c.sd, "backbone.model.norm.bias", np.full(128, np.inf, np.float32)))
    ),
    ["tensor 'backbone.model.norm.bias' (128 of 128 values) is NaN or Inf"],
  ),
  (
    "torch file: an integer tensor",
    lambda c: salad_jax.load(
      torch_file(
        c,
        "int.pth",
        changed(c.sd, "backbone.model.blocks.1.attn.qkv.bias", np.zeros(384, np.int64)),
      )
    ),
    ["tensor 'backbone.model.blocks.1.attn.qkv.bias' has dtype int64", "floating point"],
  ),
  (
    "safetensors: a bool tensor",
    lambda c: salad_jax.load(save_st(c, changed(c.sd, "aggregator.dust_bin", np.array(True)))),
    ["tensor 'aggregator.dust_bin' has dtype bool"],
  ),
  (
    "converted dir: a flipped byte in params",
    lambda c: salad_jax.load(corrupt(c.converted(), flip_byte)),
    ["params is corrupt", "params_checksum recorded in", "salad_config.json"],
  ),
  (
    "converted dir: a data file deleted",
    lambda c: salad_jax.load(corrupt(c.converted(), os.remove)),
    ["params cannot be read", "damaged"],
  ),
  (
    "converted dir (no checksum): NaN params",
    nan_params_without_checksum,
    ["tensor 'aggregator/score_0/bias' (1 of 128 values) is NaN or Inf"],
  ),
  # messages (item 8)
  (
    "converted dir: salad_config.json not JSON",
    lambda c: salad_jax.load(write(c.converted(), "salad_config.json", '{"model": {"variant"')),
    ["salad_config.json is corrupt"],
  ),
  (
    "converted dir: salad_config.json with an unknown variant",
    lambda c: salad_jax.load(edit(c.converted(), lambda m: m["model"].update(variant="Z/14"))),
    ["salad_config.json is corrupt", "Z/14"],
  ),
  (
    "converted dir: salad_config.json of another model",
    lambda c: salad_jax.load(edit(c.converted(), lambda m: m["model"].update(num_clusters=8))),
    ["does not match the model in", "aggregator/score_3/bias: checkpoint (16,), model (8,)"],
  ),
  # overwriting (item 1): only ever what salad_jax wrote
  (
    "save(overwrite=True) into a project folder",
    lambda c: c.model.save(project_folder(c), overwrite=True),
    ["refusing to write into", "not a salad_jax checkpoint"],
  ),
  (
    "save(overwrite=True) over a checkpoint holding a user's file",
    lambda c: c.model.save(write(c.converted(), "notes.txt", "mine"), overwrite=True),
    ["holds files salad_jax did not write (notes.txt)"],
  ),
  (
    "save() onto a file",
    lambda c: c.model.save(write_file(c, "weights", "x")),
    ["is a file, not a directory"],
  ),
  (
    "to_torch(overwrite=True) over a user's .pth",
    lambda c: c.model.to_torch(torch_file(c, "official.pth", c.sd), overwrite=True),
    ["refusing to overwrite", "salad_jax did not write it"],
  ),
  (
    "to_torch(overwrite=True) over a user's .safetensors",
    lambda c: c.model.to_torch(save_st(c, c.sd), overwrite=True),
    ["refusing to overwrite"],
  ),
  (
    "to_torch() onto a directory named x.pth",
    lambda c: c.model.to_torch(str(mkdir(c, "x.pth"))),
    ["is a directory"],
  ),
  (
    "convert_weights --dst: an existing file where a folder is expected",
    lambda c: salad_jax.weights.converted.check_destination(write_file(c, "notes.txt", "x"), True),
    ["is a file, not a directory"],
  ),
  (
    "convert_weights --dst: below a file",
    lambda c: salad_jax.weights.converted.check_destination(
      write_file(c, "notes.txt", "x") + "/out", False
    ),
    ["is a file, not a directory"],
  ),
  (
    "load: a folder that holds no checkpoint",
    lambda c: salad_jax.load(str(mkdir(c, "empty"))),
    ["holds no salad_jax checkpoint"],
  ),
  (
    "load: a text file named .ckpt",
    lambda c: salad_jax.load(write_file(c, "text.ckpt", "hello")),
    [
      "text.ckpt is not a PyTorch checkpoint",
      "neither torch's zip format nor a pickle",
      "b'hello'",
    ],
  ),
  # overwriting (convert probe): a converted dir is replaced only if every file in it is ours
  (
    "save(overwrite=True) over a checkpoint with a user's file in params/",
    lambda c: c.model.save(user_file_in_params(c.converted()), overwrite=True),
    ["did not write (params/NOTES.txt)"],
  ),
  (
    "save(overwrite=True) over a checkpoint with a user's folder in params/",
    lambda c: c.model.save(user_folder_in_params(c.converted()), overwrite=True),
    ["did not write (params/my_analysis)"],
  ),
  (
    "save(overwrite=True) over a checkpoint whose params file was replaced by a user's",
    lambda c: c.model.save(
      corrupt(c.converted(), lambda p: open(p, "a").write("mine")), overwrite=True
    ),
    ["salad_jax did not write (params/"],
  ),
  (
    "save(overwrite=True) over an older checkpoint (no file record) with a user's file in params/",
    lambda c: c.model.save(
      user_file_in_params(edit(c.converted(), lambda m: m.pop("files"))), overwrite=True
    ),
    ["did not write (params/NOTES.txt)"],
  ),
  ("save(''): an empty path", lambda c: c.model.save(""), ["empty path"]),
  (
    "convert_weights --dst ''",
    lambda c: salad_jax.weights.converted.check_destination("", False),
    ["empty path"],
  ),
  (
    "to_torch() to a .txt file",
    lambda c: c.model.to_torch(str(c.tmp / "x.txt")),
    ["must end in .ckpt, .pth", ".safetensors"],
  ),
  (
    "to_torch(overwrite=True) over a link to a .pth salad_jax wrote",
    lambda c: c.model.to_torch(link_to_own_pth(c), overwrite=True),
    ["is a symbolic link (to ours.pth)"],
  ),
  (
    "to_torch() onto a full disk",
    lambda c: full_disk(c, lambda: c.model.to_torch(str(c.tmp / "full.pth"))),
    ["cannot write", "full.pth: no space left on the device", "nothing was written"],
  ),
  (
    "to_torch() onto a full disk, .safetensors",
    lambda c: full_disk(c, lambda: c.model.to_torch(str(c.tmp / "full.safetensors"))),
    ["full.safetensors: no space left on the device"],
  ),
  (
    "save() onto a disk that fills while Orbax writes",
    lambda c: orbax_fails(c, lambda: c.model.save(str(c.tmp / "full"))),
    ["cannot write", "full: no space left on the device"],
  ),
  (
    "save() onto a disk without room",
    lambda c: no_room(c, lambda: c.model.save(str(c.tmp / "full"))),
    ["cannot write", "MiB are free there"],
  ),
  (
    "pack: a user's folder where the staging folder goes",
    lambda c: salad_jax.data.pack._check_staging(
      write(str(mkdir(c, "2.0.0.partial")), "mine.txt", "x")
    ),
    ["is not an unfinished pack", "choose another --data_dir"],
  ),
  (
    "pack: a link where the staging folder goes",
    lambda c: salad_jax.data.pack._check_staging(
      symlink(c, str(mkdir(c, "mine")), "2.0.0.partial")
    ),
    ["is not an unfinished pack"],
  ),
  (
    "pack: another job's staging folder that also holds a file of yours",
    lambda c: salad_jax.data.pack._reset_if_other_job(
      write(write(str(mkdir(c, "other.partial")), "job.json", '{"x": 1}'), "thesis.txt", "mine"),
      {"job": 2},
    ),
    ["another job and thesis.txt, which a pack does not write"],
  ),
]


def user_file_in_params(d):
  write(os.path.join(d, "params"), "NOTES.txt", "mine")
  return d


def user_folder_in_params(d):
  os.mkdir(os.path.join(d, "params", "my_analysis"))
  write(os.path.join(d, "params", "my_analysis"), "results.csv", "x")
  return d


def symlink(c, target, name):
  os.symlink(target, c.tmp / name)
  return str(c.tmp / name)


def link_to_own_pth(c):
  c.model.to_torch(str(c.tmp / "ours.pth"))
  return symlink(c, "ours.pth", "link.pth")


def full_disk(c, action):
  """`action` on a disk that is full (Python's writes fail with ENOSPC, whatever the check said)."""
  import builtins
  import errno

  real_open = builtins.open

  class Full:
    def __init__(self, f):
      self.f = f

    def write(self, data):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
      return getattr(self.f, name)

    def __enter__(self):
      return self

    def __exit__(self, *a):
      self.f.close()

  def fake_open(path, mode="r", *a, **k):
    f = real_open(path, mode, *a, **k)
    return Full(f) if "w" in mode and str(c.tmp) in str(path) else f

  with pytest.MonkeyPatch.context() as m:
    m.setattr(builtins, "open", fake_open)
    action()


def orbax_fails(c, action):
  import orbax.checkpoint as ocp

  def save(self, *a, **k):
    raise ValueError(
      "RESOURCE_EXHAUSTED: Failed writing ...: No space left on device [os_error_code='28']"
    )

  with pytest.MonkeyPatch.context() as m:
    m.setattr(ocp.StandardCheckpointer, "save", save)
    action()


def no_room(c, action):
  with pytest.MonkeyPatch.context() as m:
    m.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1000))
    action()


def assert_nothing_left(c):
  left = [n for n in os.listdir(c.tmp) if "tmp" in n or n.startswith("full")]
  assert not left, left


CHECKS = {  # what must still hold after the refusal
  "save(overwrite=True) over a checkpoint with a user's file in params/": lambda c: (
    (c.tmp / "converted" / "params" / "NOTES.txt").read_text() == "mine" or pytest.fail()
  ),
  "save(overwrite=True) over a checkpoint with a user's folder in params/": lambda c: (
    (c.tmp / "converted/params/my_analysis/results.csv").read_text() == "x" or pytest.fail()
  ),
  "to_torch() onto a full disk": assert_nothing_left,
  "to_torch() onto a full disk, .safetensors": assert_nothing_left,
  "save() onto a disk that fills while Orbax writes": assert_nothing_left,
  "pack: a user's folder where the staging folder goes": lambda c: (
    (c.tmp / "2.0.0.partial" / "mine.txt").read_text() == "x" or pytest.fail()
  ),
  "pack: another job's staging folder that also holds a file of yours": lambda c: (
    (c.tmp / "other.partial" / "thesis.txt").read_text() == "mine" or pytest.fail()
  ),
  "save(overwrite=True) into a project folder": assert_project_intact,
  "to_torch(overwrite=True) over a user's .pth": lambda c: np.testing.assert_array_equal(
    torch.load(c.tmp / "official.pth")["aggregator.score.0.weight"].numpy(),
    c.sd["aggregator.score.0.weight"],
  ),
}


def save_st(c, sd):
  path = str(c.tmp / "w.safetensors")
  save_file({k: np.array(v, order="C") for k, v in sd.items()}, path)  # keeps 0-d shapes
  return path


def corrupt(d, how):
  how(largest_file(os.path.join(d, "params")))
  return d


def write(d, name, text):
  with open(os.path.join(d, name), "w") as f:
    f.write(text)
  return d


def write_file(c, name, text):
  return write(str(c.tmp), name, text) + "/" + name


def edit(d, fn):
  edit_json(os.path.join(d, "salad_config.json"), fn)
  return d


def mkdir(c, name):
  (c.tmp / name).mkdir()
  return c.tmp / name


@pytest.mark.parametrize("case,action,words", LIBRARY, ids=[c[0] for c in LIBRARY])
def test_library_bad_input(ctx, case, action, words):
  with pytest.raises((ValueError, OSError)) as e:
    action(ctx)
  for w in words:
    assert w in str(e.value), (w, str(e.value))
  if case in CHECKS:
    CHECKS[case](ctx)


# --------------------------------------------------------------- inputs that must still load
def test_lower_precision_weights_load_upcast_with_one_logged_line(ctx, caplog):
  half = collections.OrderedDict(
    (k, torch.from_numpy(v).to(torch.bfloat16)) for k, v in ctx.sd.items()
  )
  path = str(ctx.tmp / "bf16.pth")
  torch.save(half, path)
  fp16 = {k: v.astype(np.float16) for k, v in ctx.sd.items()}
  with caplog.at_level(logging.WARNING):
    a = salad_jax.load(path)
    b = salad_jax.load(save_st(ctx, fp16))
  lines = [r.getMessage() for r in caplog.records if "to float32" in r.getMessage()]
  assert len(lines) == 2 and "bfloat16" in lines[0] and "float16" in lines[1], lines
  assert f"converted {len(ctx.sd)} bfloat16 tensor(s)" in lines[0]
  want = half["aggregator.score.0.weight"].float().numpy()[:, :, 0, 0].T  # exact upcast
  np.testing.assert_array_equal(a.params["aggregator"]["score_0"]["kernel"], want)
  np.testing.assert_array_equal(
    b.params["aggregator"]["score_0"]["kernel"],
    fp16["aggregator.score.0.weight"][:, :, 0, 0].T.astype(np.float32),
  )


def test_own_outputs_are_replaced_with_overwrite(ctx):
  d = ctx.converted()
  ctx.model.save(d, overwrite=True)
  assert sorted(os.listdir(d)) == ["params", "salad_config.json"]
  path = str(ctx.tmp / "ours.safetensors")
  ctx.model.to_torch(path)
  with pytest.raises(FileExistsError, match="--overwrite"):
    ctx.model.to_torch(path)
  ctx.model.to_torch(path, overwrite=True)
  pth = str(ctx.tmp / "ours.pth")
  ctx.model.to_torch(pth)
  ctx.model.to_torch(pth, overwrite=True)
  assert set(torch.load(pth, weights_only=True)) == set(ctx.sd)


def test_a_checkpoint_saved_before_file_records_is_replaced_if_it_holds_only_orbax_files(ctx):
  d = edit(ctx.converted(), lambda m: m.pop("files"))
  ctx.model.save(d, overwrite=True)
  assert "files" in json.load(open(os.path.join(d, "salad_config.json")))


# every writer: a fresh temporary name, never a user's file of the old fixed names, umask mode
def _writers():
  from salad_jax.evaluation import descriptor_cache
  from salad_jax.train import workdir

  return {
    "to_torch .pth": lambda c, p: c.model.to_torch(p),
    "to_torch .safetensors": lambda c, p: c.model.to_torch(p),
    "save dir": lambda c, p: c.model.save(p),
    "workdir json": lambda c, p: workdir._write_json(p, {"a": 1}),
    "descriptor cache": lambda c, p: descriptor_cache.write_entry(
      p, {"k": 1}, np.zeros((2, 3), np.float32)
    ),
  }


@pytest.mark.parametrize(
  "writer,name",
  [
    ("to_torch .pth", "out.pth"),
    ("to_torch .safetensors", "out.safetensors"),
    ("save dir", "out"),
    ("workdir json", "config.json"),
    ("descriptor cache", "entry.npz"),
  ],
)
def test_writers_never_touch_files_beside_the_destination(ctx, writer, name):
  (ctx.tmp / "thesis.txt").write_text("mine")
  decoys = [
    f"{name}.tmp",
    f"{name}.tmp{os.getpid()}",
    f".tmp_{name}",
    f"{name}.partial",
    f".{name}.salad_tmp_",
  ]
  for i, decoy in enumerate(decoys):
    if i % 2:
      os.symlink("thesis.txt", ctx.tmp / decoy)
    else:
      (ctx.tmp / decoy).write_text("user tmp")
  before = sorted(os.listdir(ctx.tmp))
  old = os.umask(0o022)
  try:
    _writers()[writer](ctx, str(ctx.tmp / name))
  finally:
    os.umask(old)
  assert (ctx.tmp / "thesis.txt").read_text() == "mine"
  for i, decoy in enumerate(decoys):
    assert os.path.islink(ctx.tmp / decoy) if i % 2 else (ctx.tmp / decoy).read_text() == "user tmp"
  assert sorted(os.listdir(ctx.tmp)) == sorted(before + [name])  # no temporary left either
  assert not os.path.islink(ctx.tmp / name)
  mode = os.stat(ctx.tmp / name).st_mode & 0o777
  assert mode == (0o755 if writer == "save dir" else 0o644), oct(mode)


def test_suffixes_are_read_in_any_case(ctx):
  for name in ("UP.PTH", "Up.SafeTensors"):
    ctx.model.to_torch(str(ctx.tmp / name))
    assert salad_jax.weights.torch_files.written_by_us(str(ctx.tmp / name))
    np.testing.assert_array_equal(
      salad_jax.load(str(ctx.tmp / name)).params["aggregator"]["score_3"]["kernel"],
      ctx.model.params["aggregator"]["score_3"]["kernel"],
    )
  assert open(ctx.tmp / "UP.PTH", "rb").read(2) == b"PK"  # torch's format, not Orbax's directory
  from safetensors import safe_open

  with safe_open(str(ctx.tmp / "Up.SafeTensors"), "np") as f:  # not a torch file named so
    assert "salad_jax" in f.metadata()
  assert (
    salad_jax.weights.torch_files.file_kind("demo.PTH") == "torch"
  )  # convert_weights --dst demo.PTH: a file


def test_leftovers_of_a_killed_save_are_mentioned_never_deleted(ctx, capsys):
  """A marker naming a dead pid is no proof (copied, forged, another PID namespace)."""
  from salad_jax.files import atomic

  killed = ctx.tmp / ".out.salad_tmp_killed"
  (killed / "params").mkdir(parents=True)
  (killed / atomic.MARKER).write_text(
    f"{__import__('socket').gethostname()} {2**22 + 7}"
  )  # no such pid
  (killed / "thesis.txt").write_text("x")
  unknown = ctx.tmp / ".out.salad_tmp_nomarker"
  unknown.mkdir()
  ctx.model.save(str(ctx.tmp / "out"))
  out = capsys.readouterr().err
  assert (killed / "thesis.txt").read_text() == "x" and unknown.exists()
  assert "look(s) like leftovers" in out and "and 1 more" in out and "delete them if" in out


def test_an_os_error_anywhere_in_the_chain_is_one_line():
  import errno

  from salad_jax import cli

  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device", "/data/x.npz")
    except OSError as e:
      raise RuntimeError("writer failed") from e
  except RuntimeError as e:
    assert cli._os_error_line(e) == "cannot write /data/x.npz: no space left on the device"
  assert cli._os_error_line(RuntimeError("a bug")) is None


@pytest.mark.parametrize(
  "statement,words",
  [
    ("np.empty((10**7, 10**7), np.float32)", ["error: out of host memory: Unable to allocate"]),
    (
      "jnp.zeros((10**6, 10**6)).block_until_ready()",
      ["error: out of device memory: RESOURCE_EXHAUSTED"],
    ),
  ],
  ids=["host", "device"],
)
def test_running_out_of_memory_is_one_line_with_the_settings_to_change(statement, words):
  code = (
    "import numpy as np, jax.numpy as jnp\nfrom salad_jax import cli\n"
    f"def main(argv):\n  {statement}\ncli.run(main)\n"
  )
  r = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
  )
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  for w in words + ["hint: ", "--batch_size", "remat"]:
    assert w in r.stderr, (w, r.stderr)


def test_sigterm_runs_the_cleanups_and_says_so(tmp_path):
  """A scheduler's SIGTERM used to kill train.py at once (rc -15, silent, the lock left behind)."""
  import signal
  import time

  code = (
    "import sys, time\nfrom salad_jax import cli\nfrom salad_jax.train import workdir\n"
    "def main(argv):\n  with workdir.hold(sys.argv[1]) as held:\n"
    "    held.lock.acquire()\n    print('held', flush=True)\n    time.sleep(60)\n"
    "cli.run(main)\n"
  )
  wd = tmp_path / "run"
  wd.mkdir()
  p = subprocess.Popen(
    [sys.executable, "-c", code, str(wd)],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=REPO,
  )
  assert p.stdout.readline().strip() == "held" and (wd / ".lock").exists()
  time.sleep(0.2)
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=30)
  assert p.returncode == 143, err
  assert "terminated (SIGTERM)" in err and "Traceback" not in err
  assert not (wd / ".lock").exists()


def test_converted_dir_without_a_checksum_still_loads(ctx):
  d = edit(ctx.converted(), lambda m: m.pop("params_checksum"))
  got = salad_jax.load(d).params
  np.testing.assert_array_equal(
    got["aggregator"]["score_3"]["kernel"], ctx.model.params["aggregator"]["score_3"]["kernel"]
  )


# ------------------------------------------------------------ one wrong-shaped tensor, named
@pytest.mark.parametrize(
  "key",
  [
    "backbone.model.blocks.2.attn.qkv.weight",  # the middle of the backbone
    "backbone.model.blocks.1.norm2.weight",  # carries the width
    "backbone.model.cls_token",  # the width was read from it
    "aggregator.score.0.weight",  # hidden_dim was read from it
    "aggregator.cluster_features.0.bias",
    "aggregator.token_features.2.weight",  # token_dim: two tensors carry it, so both are named
  ],
)
def test_one_wrong_shaped_tensor_is_named_not_its_neighbours(nano, key):
  keys = list(nano.sd)
  sd = changed(nano.sd, key, np.zeros(tuple(d + 1 for d in nano.sd[key].shape), np.float32))
  with pytest.raises(ValueError) as e:
    salad_jax.weights.convert.torch_to_params(sd, salad_jax.weights.infer.infer_config(sd)[0])
  msg = str(e.value)
  assert key in msg
  i = keys.index(key)
  neighbours = {keys[i - 1], keys[i + 1]} if i + 1 < len(keys) else {keys[i - 1]}
  if key == "aggregator.token_features.2.weight":
    neighbours -= {"aggregator.token_features.2.bias"}
    assert "disagree on token_dim" in msg
  for n in neighbours:
    assert f"{n}:" not in msg and f"{n} " not in msg, (n, msg)


# ------------------------------------------------------------------------ the command line
@pytest.fixture(scope="module")
def gsv_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("gsv"))
  make_gsv(root, {"Alpha": [4] * 8, "Beta": [4] * 8}, size=(32, 32))
  return root


def convert_cli(c, *args, cwd=None):
  return [sys.executable, os.path.join(REPO, "convert_weights.py"), *args], cwd


def train_cli(c, workdir_path, **overrides):
  o = {
    "data.source": "folder",
    "data.root": c.gsv_root,
    "data.cities": "Alpha,Beta",
    "data.places_per_batch": 8,
    "data.image_size": "(70,70)",
    "data.num_workers": 0,
    "eval.sets": "",
    "eval.at_start": False,
    "model.variant": "Nano/14",
    **overrides,
  }
  return [
    sys.executable,
    os.path.join(REPO, "train.py"),
    "--config",
    os.path.join(REPO, "configs/demo.py"),
    "--workdir",
    str(workdir_path),
  ] + [f"--config.{k}={v}" for k, v in o.items()], None


def evil_pickle(c):
  class System:
    def __reduce__(self):
      return (os.system, ("touch " + str(c.tmp / "ran"),))

  path = str(c.tmp / "evil.ckpt")
  torch.save({"state_dict": {"w": torch.zeros(1)}, "x": System()}, path)
  return path


def trained_looking_workdir(c):
  """A workdir whose run (train_cli's settings) reached a checkpoint; its presence is all the
  check looks at."""
  from salad_jax.train import workdir

  import configs.demo

  cfg = configs.demo.get_config()
  cfg.data.source, cfg.data.root, cfg.data.cities = "folder", c.gsv_root, "Alpha,Beta"
  cfg.data.places_per_batch, cfg.data.image_size, cfg.data.num_workers = 8, (70, 70), 0
  cfg.eval.sets, cfg.eval.at_start, cfg.model.variant = "", False, "Nano/14"
  wd = c.tmp / "run"
  workdir.record_config(cfg, str(wd))
  (wd / "checkpoints" / "3").mkdir(parents=True)
  return wd


def locked_workdir(c):
  wd = c.tmp / "busy"
  wd.mkdir()
  hold = (
    "import sys, time\nfrom salad_jax.files import lock\nlock.Lock(sys.argv[1]).acquire()\n"
    "print('held', flush=True)\ntime.sleep(120)\n"
  )
  c.holder = subprocess.Popen(
    [sys.executable, "-c", hold, str(wd / ".lock")], stdout=subprocess.PIPE, text=True, cwd=REPO
  )
  assert c.holder.stdout.readline().strip() == "held"
  return wd


# (case, command(ctx) -> (argv, cwd), words on stderr)
CLI = [
  ("convert: no --src", lambda c: convert_cli(c, "--dst", str(c.tmp / "o")), ["--src"]),
  (
    "convert: --src missing",
    lambda c: convert_cli(c, "--src", str(c.tmp / "nope.pth"), "--dst", str(c.tmp / "o")),
    ["--src", "nope.pth does not exist"],
  ),
  (
    "convert: --src unreadable",
    lambda c: convert_cli(c, "--src", unreadable(c), "--dst", str(c.tmp / "o")),
    ["is not readable"],
  ),
  (
    "convert: --dst . --overwrite in a project folder",
    lambda c: convert_cli(c, "--src", c.pth, "--dst", ".", "--overwrite", cwd=project_folder(c)),
    ["refusing to write into", "not a salad_jax checkpoint"],
  ),
  (
    "convert: --dst in an unwritable location",
    lambda c: convert_cli(c, "--src", c.pth, "--dst", "/proc/sys/salad_out"),
    ["is not writable"],
  ),
  (
    "convert: --dst a file the OS will not create",
    lambda c: convert_cli(c, "--src", c.pth, "--dst", "/proc/salad_out.pth"),
    ["/proc", "writ"],
  ),
  (
    "convert: --dst a user's .pth, --overwrite",
    lambda c: convert_cli(
      c, "--src", c.pth, "--dst", torch_file(c, "mine.pth", c.sd), "--overwrite"
    ),
    ["refusing to overwrite", "did not write it"],
  ),
  (
    "convert: one wrong-shaped tensor",
    lambda c: convert_cli(
      c,
      "--src",
      torch_file(
        c,
        "shape.pth",
        changed(c.sd, "aggregator.score.0.weight", np.zeros((129, 129, 1, 1), np.float32)),
      ),
      "--dst",
      str(c.tmp / "o"),
    ),
    [
      "shape mismatches (1): aggregator.score.0.weight: checkpoint (129, 129, 1, 1), model (128, 128, 1, 1)"
    ],
  ),
  (
    "convert: a pickle that would run code",
    lambda c: convert_cli(c, "--src", evil_pickle(c), "--dst", str(c.tmp / "o")),
    ["refusing to load", "refers to os.system", "nothing in it was executed"],
  ),
  (
    "train: --workdir is a file",
    lambda c: train_cli(c, write_file(c, "run", "x")),
    ["--workdir", "is a file"],
  ),
  (
    "train: a workdir held by a live run",
    lambda c: train_cli(c, locked_workdir(c)),
    ["is in use by a running train.py", "pid"],
  ),
  (
    "train: resume with another batch layout",
    lambda c: train_cli(c, trained_looking_workdir(c), **{"data.places_per_batch": 16, "seed": 3}),
    [
      "cannot change when resuming",
      "data.places_per_batch: 8 -> 16",
      "seed: 0 -> 3",
      "another --workdir",
    ],
  ),
  (
    "train: a corrupt config.json",
    lambda c: train_cli(c, write(str(mkdir(c, "w")), "config.json", "{not json")),
    ["config.json is corrupt"],
  ),
  (
    "train: a config.json of another tool",
    lambda c: train_cli(c, write(str(mkdir(c, "other")), "config.json", '{"my": "tool"}')),
    ["config.json is not a salad_jax config", "another --workdir"],
  ),
  (
    "train: a workdir whose checkpoints is a file (Orbax hung on it)",
    lambda c: train_cli(c, write(str(mkdir(c, "w2")), "checkpoints", "x")),
    ["checkpoints is in the way", "writes a directory there"],
  ),
  ("train: --workdir ''", lambda c: train_cli(c, ""), ["--workdir is empty"]),
  (
    "train: more places per batch than the data has",
    lambda c: train_cli(c, c.tmp / "pp", **{"data.places_per_batch": 100}),
    ["places_per_batch = 100: more than the 16 places"],
  ),
  (
    "train: a .lock of yours in the workdir (it was overwritten, then deleted)",
    lambda c: train_cli(c, write(str(mkdir(c, "w3")), ".lock", "USER LOCK")),
    [".lock is not a train.py lock"],
  ),
  (
    "train: keep no checkpoint",
    lambda c: train_cli(c, c.tmp / "k", **{"checkpoint.keep_last": 0}),
    ["config.checkpoint.keep_last = 0", "--config.checkpoint.keep_last="],
  ),
]


def unreadable(c):
  if os.geteuid() == 0:
    pytest.skip("root reads every file")
  path = torch_file(c, "locked.pth", c.sd)
  os.chmod(path, 0)
  return path


@pytest.mark.parametrize("case,command,words", CLI, ids=[c[0] for c in CLI])
def test_cli_bad_input(ctx, gsv_root, case, command, words):
  ctx.gsv_root, ctx.holder = gsv_root, None
  argv, cwd = command(ctx)
  before = {
    p: open(p, "rb").read() for p in [str(ctx.tmp / "run" / "config.json")] if os.path.exists(p)
  }
  try:
    r = subprocess.run(
      argv,
      capture_output=True,
      text=True,
      cwd=cwd or REPO,
      timeout=300,
      env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"),
    )
  finally:
    if ctx.holder is not None:
      ctx.holder.kill()
      ctx.holder.wait()
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr and "weights_only" not in r.stderr
  lines = r.stderr.splitlines()
  assert len([ln for ln in lines if ln.startswith("error: ")]) == 1, r.stderr
  said = " ".join(ln for ln in lines if ln.startswith(("error: ", "hint: ")))
  for w in words:
    assert w in said, (w, r.stderr)
  for p, data in before.items():  # nothing overwritten
    assert open(p, "rb").read() == data
  if "project folder" in case:
    assert_project_intact(ctx)
  if "another tool" in case:  # refused before anything was written
    assert os.listdir(ctx.tmp / "other") == ["config.json"]
    assert open(ctx.tmp / "other" / "config.json").read() == '{"my": "tool"}'
  if ".lock of yours" in case:
    assert open(ctx.tmp / "w3" / ".lock").read() == "USER LOCK"
  if "keep no checkpoint" in case:
    assert not (ctx.tmp / "k").exists()
  if "batch layout" in case:  # exactly the two settings changed, nothing else
    assert said.count(" -> ") == 2, said
  assert not (ctx.tmp / "ran").exists()


# ------------------------------------------------------------ kill -9 leaves no worker behind
def _family(pid):
  """{pid: cmdline} of the living (not zombie) descendants of `pid`."""
  children = collections.defaultdict(list)
  for d in os.listdir("/proc"):
    try:
      fields = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
      if fields[0] != "Z":
        children[int(fields[1])].append(int(d))
    except (OSError, ValueError, IndexError):
      continue
  out, todo = {}, [pid]
  while todo:
    for c in children.get(todo.pop(), []):
      if (line := _cmdline(c)) is not None:
        out[c] = line
        todo.append(c)
  return out


def _cmdline(pid):
  try:
    return open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
  except OSError:
    return None


def _running(pid):
  try:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def _shm_mapped(pids):
  """The /dev/shm segments mapped by `pids` (grain's batches travel in them)."""
  found = set()
  for p in pids:
    try:
      lines = open(f"/proc/{p}/maps").read().splitlines()
    except OSError:
      continue
    found |= {ln.split()[-1] for ln in lines if "/dev/shm/" in ln and "(deleted)" not in ln}
  return found


def _utm_folders(root, n):
  rng = np.random.default_rng(0)
  for folder, count in (("database", n), ("queries", n // 4)):
    os.makedirs(root / folder)
    for i in range(count):
      img = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
      Image.fromarray(img).save(root / folder / f"@{10 * i}@0@{folder[0]}{i}@.jpg")
  return root


def _tiny_init(c):
  """The tiny model (shared fixture) as init: no init compile before the workers start."""
  head = dict(num_clusters=8, cluster_dim=16, token_dim=16, hidden_dim=32)
  return {
    "init": c.tiny,
    "data.image_size": "(56,56)",
    **{f"model.{k}": v for k, v in head.items()},
  }


def _kill_cases():
  return {
    "evaluate.py --num_workers 2": (
      lambda c: [
        os.path.join(REPO, "evaluate.py"),
        "--checkpoint",
        c.tiny,
        "--database_folder",
        str(c.folders / "database"),
        "--queries_folder",
        str(c.folders / "queries"),
        "--image_size=56,56",
        "--batch_size=2",
        "--num_workers=2",
        f"--output_dir={c.tmp / 'eval'}",
      ],
      lambda fam, shm: sum("spawn_main" in v for v in fam.values()) >= 2 and shm,
    ),
    "train.py with data.num_workers=2": (
      lambda c: train_cli(c, c.tmp / "run", **_tiny_init(c), **{"data.num_workers": 2})[0][1:],
      lambda fam, shm: sum("spawn_main" in v for v in fam.values()) >= 2,
    ),
    "the pack with --num_workers 2": (
      lambda c: [
        "-m",
        "salad_jax.data.tfds_gsv",
        f"--manual_dir={c.gsv_root}",
        f"--data_dir={c.tmp / 'tfds'}",
        "--image_size=28,28",
        "--images_per_shard=1",
        "--num_workers=2",
      ],
      lambda fam, shm: sum("forkserver" in v for v in fam.values()) >= 3,  # server + 2 writers
    ),
  }


@pytest.mark.parametrize("case", list(_kill_cases()))
def test_kill_9_leaves_no_worker_and_no_shared_memory_behind(
  gsv_root, tiny_model_dir, case, tmp_path
):
  """kill -9 of evaluate.py --num_workers 2 left both grain workers (~225 MB each), the
  resource tracker and 62 /dev/shm segments until killed by hand."""
  import signal
  import time

  ctx = types.SimpleNamespace(tmp=tmp_path, gsv_root=gsv_root, tiny=tiny_model_dir)
  if "evaluate" in case:
    ctx.folders = _utm_folders(tmp_path / "utm", 200)
  argv, ready = _kill_cases()[case]
  proc = subprocess.Popen(
    [sys.executable, *argv(ctx)],
    cwd=str(tmp_path),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=REPO),
  )
  family, shm, seen = {}, set(), False
  try:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not seen:
      family = {**family, **_family(proc.pid)}
      shm |= _shm_mapped([proc.pid, *family])
      seen = bool(ready(_family(proc.pid), shm)) and proc.poll() is None
      time.sleep(0.02)
  finally:
    family = {**family, **_family(proc.pid)}
    proc.send_signal(signal.SIGKILL)  # no cleanup of any kind runs in the parent
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
      left = [p for p in family if _running(p) and _cmdline(p) == family[p]]
      if not left and not [s for s in shm if os.path.exists(s)]:
        break
      time.sleep(0.1)
    for p in left:  # a failure leaves nothing running either (the tracker then exits)
      os.kill(p, signal.SIGKILL)
  assert seen, f"{case}: no workers seen before it ended: {family}"
  assert not left, {p: family[p] for p in left}
  assert not [s for s in shm if os.path.exists(s)], shm
