"""Helpers shared by the benchmark scripts: timing, and the torch oracle from tests/."""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def interleaved(runs: dict, rounds: int) -> dict:
  """Times each run `rounds` times, alternating between them so slow drifts hit all alike.

  Every timed call directly follows an untimed call of the same run: switching framework
  leaves the other's threads, caches and memory state behind (measured: a JAX train step is
  ~20 % slower right after a PyTorch step, back to normal on the next call).
  """
  times = {name: [] for name in runs}
  for _ in range(rounds):
    for name, fn in runs.items():
      fn()
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return times


def median(xs):
  return statistics.median(xs)


def machine() -> str:
  import platform

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{cpu}, {os.cpu_count()} cores"
