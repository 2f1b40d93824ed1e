"""The workdir: settings compared before a resume, each run's config kept, one run at a time."""

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from salad_jax.errors import UserError
from salad_jax.files import lock as lock_lib
from salad_jax.train import workdir
from salad_jax.train.config import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**changes):
  c = base_config()
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _history(wd):
  return sorted(os.listdir(os.path.join(wd, workdir.HISTORY)))


def _with_checkpoint(wd):
  os.makedirs(os.path.join(wd, "checkpoints", "3"))


# ------------------------------------------------------------------------------ settings
def test_first_run_writes_config_and_history(tmp_path):
  wd = str(tmp_path)
  assert workdir.record_config(_config(), wd) == []
  assert json.load(open(tmp_path / "config.json")) == workdir.config_dict(_config())
  (entry,) = _history(wd)
  assert entry.startswith("001-") and entry.endswith("Z.json")


def test_fixed_changes_are_one_error_naming_each_and_nothing_is_written(tmp_path):
  wd = str(tmp_path)
  workdir.record_config(_config(), wd)
  _with_checkpoint(wd)
  before = (tmp_path / "config.json").read_bytes()
  new = _config(
    data__places_per_batch=16,
    model__num_clusters=32,
    optim__lr=1e-3,
    seed=1,
    data__num_workers=2,
    log_every_steps=99,
  )
  with pytest.raises(UserError) as e:
    workdir.record_config(new, wd)
  msg = str(e.value)
  for words in [
    "data.places_per_batch: 60 -> 16",
    "model.num_clusters: 64 -> 32",
    "optim.lr: 6e-05 -> 0.001",
    "seed: 0 -> 1",
    "data.num_workers: 8 -> 2 (the saved data-loader position is per grain worker)",
    "another --workdir",
  ]:
    assert words in msg, (words, msg)
  assert "log_every_steps" not in msg  # allowed: not an error
  assert (tmp_path / "config.json").read_bytes() == before and len(_history(wd)) == 1


def test_allowed_changes_are_printed_and_recorded(tmp_path, capsys):
  wd = str(tmp_path)
  workdir.record_config(_config(), wd)
  _with_checkpoint(wd)
  new = _config(
    eval__sets="msls_val",
    log_every_steps=5,
    num_epochs=8,
    model__attention="xla",
    data__root="/elsewhere/GSVCities",
    checkpoint__keep_last=5,
    data__num_threads=2,
  )
  diffs = workdir.record_config(new, wd)
  assert len(diffs) == 7
  out = capsys.readouterr().out
  assert "resuming with changed settings" in out and 'eval.sets: "" -> "msls_val"' in out
  assert json.load(open(tmp_path / "config.json"))["num_epochs"] == 8
  assert [h[:3] for h in _history(wd)] == ["001", "002"]


def test_without_checkpoints_any_change_is_allowed(tmp_path, capsys):
  wd = str(tmp_path)
  workdir.record_config(_config(), wd)
  workdir.record_config(_config(data__places_per_batch=30), wd)  # e.g. after an out-of-memory
  assert (
    "no checkpoint yet; starting with changed settings: data.places_per_batch: 60 -> 30"
    in capsys.readouterr().out
  )
  assert len(_history(wd)) == 2


def test_a_key_the_saved_config_lacks_is_compared_with_its_default(tmp_path):
  wd = str(tmp_path)
  workdir.record_config(_config(), wd)
  _with_checkpoint(wd)
  saved = json.load(open(tmp_path / "config.json"))
  del saved["data"]["demo_seed"], saved["data"]["num_threads"]  # as if added to salad_jax since
  saved["data"]["gone"] = 1  # and one removed since
  json.dump(saved, open(tmp_path / "config.json", "w"))
  assert [d[0] for d in workdir.record_config(_config(), wd)] == [
    "data.gone"
  ]  # defaults: no change
  json.dump(saved, open(tmp_path / "config.json", "w"))
  with pytest.raises(UserError, match=r"data.demo_seed: 0 -> 3"):
    workdir.record_config(_config(data__demo_seed=3), wd)


def test_a_corrupt_config_json_names_the_file(tmp_path):
  (tmp_path / "config.json").write_text('{"seed": 0, "model": {')
  with pytest.raises(UserError, match=r"config.json is corrupt \(.*\); it records the settings"):
    workdir.record_config(_config(), str(tmp_path))


def test_a_workdir_from_before_the_history_keeps_its_config(tmp_path):
  old = workdir.config_dict(_config(seed=7))
  (tmp_path / "config.json").write_text(json.dumps(old))
  workdir.record_config(_config(seed=8), str(tmp_path))
  first, second = _history(str(tmp_path))
  assert first.startswith("000-") and second.startswith("001-")
  assert json.load(open(tmp_path / workdir.HISTORY / first)) == old


# ------------------------------------------------------------------------------ the lock
HOLD = (
  "import sys, time\nfrom salad_jax.files import lock as lock_lib\nlock = lock_lib.Lock(sys.argv[1])\n"
  "lock.acquire()\nprint('held', flush=True)\ntime.sleep(300)\n"
)


def test_a_live_holder_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, capsys):
  path = str(tmp_path / ".lock")
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLD, path], stdout=subprocess.PIPE, text=True, cwd=REPO
  )
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError) as e:
      lock_lib.Lock(path).acquire()
    assert f"{socket.gethostname()} pid {holder.pid}" in str(e.value)
    assert "is in use by a running train.py" in str(e.value)
  finally:
    holder.kill()  # SIGKILL: no chance to remove its lock file
    holder.wait()
  assert json.load(open(path))["pid"] == holder.pid  # the stale lock is still there
  lock = lock_lib.Lock(path)
  lock.acquire()
  out = capsys.readouterr().out
  assert f"taking over the stale lock {path} of {socket.gethostname()} pid {holder.pid}" in out
  assert "no longer running" in out and json.load(open(path))["pid"] == os.getpid()
  lock.release()
  assert not os.path.exists(path)


def test_hold_releases_the_lock_on_errors(tmp_path):
  wd = str(tmp_path / "w")
  with pytest.raises(RuntimeError):
    with workdir.hold(wd) as held:
      held.start(_config())
      assert os.path.exists(os.path.join(wd, workdir.LOCK))
      raise RuntimeError("boom")
  assert not os.path.exists(os.path.join(wd, workdir.LOCK))
  _with_checkpoint(wd)
  with pytest.raises(UserError, match="seed: 0 -> 1"):  # a refused config releases it too
    with workdir.hold(wd) as held:
      held.start(_config(seed=1))
  assert not os.path.exists(os.path.join(wd, workdir.LOCK))


def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch):
  """File systems without flock (some network mounts): simulated, as none is mounted here."""

  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(fcntl, "flock", no_flock)
  path = str(tmp_path / ".lock")
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
  try:
    with open(path, "w") as f:
      json.dump(
        {
          "host": socket.gethostname(),
          "pid": sleeper.pid,
          "start": lock_lib._proc_start(sleeper.pid),
          "time": "t",
        },
        f,
      )
    with pytest.raises(UserError, match=f"pid {sleeper.pid}"):
      lock_lib.Lock(path).acquire()
  finally:
    sleeper.kill()
    sleeper.wait()
  lock = lock_lib.Lock(path)
  lock.acquire()  # the pid is gone now
  lock.release()


def test_another_hosts_lock_is_taken_over_only_when_its_heartbeat_stops(tmp_path, capsys):
  path = str(tmp_path / ".lock")
  with open(path, "w") as f:
    json.dump({"host": "node-17", "pid": 4242, "time": "t"}, f)
  stop = threading.Event()

  def beat():
    while not stop.wait(0.05):
      os.utime(path)

  t = threading.Thread(target=beat)
  t.start()
  try:
    with pytest.raises(UserError, match="node-17 pid 4242"):
      lock_lib.Lock(path, heartbeat_s=0.2).acquire()
  finally:
    stop.set()
    t.join()
  lock = lock_lib.Lock(path, heartbeat_s=0.2)
  lock.acquire()
  assert "of node-17 pid 4242 (since t): its heartbeat stopped" in capsys.readouterr().out
  lock.release()


def test_num_epochs_may_change_the_data_position_does_not_depend_on_it(tmp_path):
  """Why `num_epochs` may change on resume: the grain iterator's saved position means the same
  batch whatever the epoch count (the LR schedule does not depend on it either: `optim`), so a
  1-epoch run resumed with num_epochs=2 trains exactly as a 2-epoch run (seen end to end: the
  same losses at steps 4-6)."""
  from salad_jax.data import gsv_cities, pipeline

  from helpers import make_gsv

  make_gsv(str(tmp_path), {"A": [4] * 6, "B": [4] * 5}, size=(16, 16))
  ds = gsv_cities.read_gsv_cities(str(tmp_path), ("A", "B"), 4)

  def iterator(epochs):
    it, spec = pipeline.train_dataset(
      ds,
      places_per_batch=4,
      img_per_place=4,
      image_size=(14, 14),
      num_epochs=epochs,
      seed=0,
      num_threads=1,
      randaugment=False,
    )
    return iter(it), spec

  short, spec = iterator(1)
  for _ in range(spec.steps_per_epoch):
    next(short)
  resumed, _ = iterator(2)
  resumed.set_state(short.get_state())
  straight, _ = iterator(2)
  for _ in range(spec.steps_per_epoch):
    next(straight)
  for _ in range(spec.steps_per_epoch):
    a, b = next(resumed), next(straight)
    assert all(np.array_equal(a[k], b[k]) for k in a)
