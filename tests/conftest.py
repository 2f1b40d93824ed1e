import os
import sys

# 8 CPU devices for the sharding tests; must be set before jax initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))

from tiny_model import tiny_model_dir  # noqa: E402, F401  (a session fixture shared by the test modules)
