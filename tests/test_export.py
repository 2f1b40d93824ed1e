"""`python -m salad_jax.export`: a jax.export artifact of describe that runs without salad_jax
and equals `SaladModel.describe`; files it did not write are never replaced."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import salad_jax
from salad_jax import export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the artifact with salad_jax made unimportable: jax and numpy only.
RUN_WITHOUT_SALAD_JAX = textwrap.dedent("""
    import sys
    sys.modules["salad_jax"] = None  # any `import salad_jax` would raise ImportError
    import jax, numpy as np
    exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
    x = np.load(sys.argv[2])
    out = {str(n): np.asarray(exported.call(x[:n])) for n in (1, 3)}
    assert sys.modules["salad_jax"] is None
    assert not [m for m in sys.modules if m.startswith("salad_jax.")]
    np.savez(sys.argv[3], **out)
    print(exported.in_avals[0], exported.out_avals[0])
""")


def run_export(*args):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run(
    [sys.executable, "-m", "salad_jax.export", *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    timeout=300,
  )


def test_exported_describe_runs_without_salad_jax_and_equals_describe(tmp_path, tiny_model_dir):
  out = tmp_path / "tiny.jaxexport"
  r = run_export("--checkpoint", tiny_model_dir, "--image_size", "56", "70", "--output", str(out))
  assert r.returncode == 0, r.stderr
  assert "params baked in; platforms cpu, cuda, tpu" in r.stdout
  x = np.random.default_rng(0).standard_normal((3, 56, 70, 3)).astype(np.float32)
  x = np.clip(x, -2.1, 2.6)  # within the range of normalised images, as describe checks
  np.save(tmp_path / "x.npy", x)
  script = tmp_path / "run.py"
  script.write_text(RUN_WITHOUT_SALAD_JAX)
  r = subprocess.run(
    [sys.executable, str(script), str(out), str(tmp_path / "x.npy"), str(tmp_path / "y.npz")],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    timeout=300,
    env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
  )
  assert r.returncode == 0, r.stderr
  assert "float32[batch,56,70,3]" in r.stdout and "float32[batch,144]" in r.stdout
  model = salad_jax.load(tiny_model_dir)
  got = np.load(tmp_path / "y.npz")
  for n in (1, 3):
    want = model.describe(x[:n])
    assert got[str(n)].shape == want.shape == (n, 144)
    np.testing.assert_allclose(got[str(n)], want, atol=1e-6, rtol=0)
  # the library's own reader and overwrite rules
  exported = export.load(str(out))
  assert exported.fun_name == export.FUN_NAME
  export.save(exported, str(out), overwrite=True)  # ours: replaced
  assert sorted(os.listdir(tmp_path)) == ["run.py", "tiny.jaxexport", "x.npy", "y.npz"]


def test_cli_errors_are_one_line_and_foreign_files_are_kept(tmp_path, tiny_model_dir):
  mine = tmp_path / "photo.jpg"
  mine.write_bytes(b"\xff\xd8\xff a user's photo")
  r = run_export(
    "--checkpoint", tiny_model_dir, "--image_size", "56", "--output", str(mine), "--overwrite"
  )
  assert r.returncode == 2 and mine.read_bytes() == b"\xff\xd8\xff a user's photo"
  assert r.stderr.splitlines() == [
    f"error: refusing to overwrite {mine}: salad_jax did not write it (not a salad_jax export); "
    "it only ever replaces files it wrote itself",
    "hint: remove the file yourself, or choose another --output",
  ]
  r = run_export(
    "--checkpoint", tiny_model_dir, "--image_size", "50", "--output", str(tmp_path / "m.jaxexport")
  )
  assert r.returncode == 2 and r.stderr.splitlines() == [
    "error: image 50x50: height and width must be multiples of 14 (try 56x56)"
  ]
  assert not (tmp_path / "m.jaxexport").exists()


def test_library_checks(tmp_path, tiny_model_dir):
  model = salad_jax.load(tiny_model_dir)
  with pytest.raises(ValueError, match="each one of cpu, cuda, rocm, tpu"):
    export.export_describe(model, (56, 56), platforms=("cpu", "metal"))
  with pytest.raises(ValueError, match="at least 8 patches|patches"):
    export.export_describe(model, (28, 28))
  bad = tmp_path / "bad.jaxexport"
  bad.write_bytes(b"not flatbuffers at all")
  with pytest.raises(ValueError, match="not a jax.export file"):
    export.load(str(bad))
  with pytest.raises(FileExistsError, match="--overwrite"):
    export.check_destination(str(bad), overwrite=False)
