"""Helpers shared by the benchmark scripts: timing, and the torch oracle from tests/."""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def timeit(fn, repeats: int, warmup: int = 1) -> list[float]:
  for _ in range(warmup):
    fn()
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)
  return out


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
