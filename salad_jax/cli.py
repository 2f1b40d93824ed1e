"""Small helpers shared by the absl entry points: quiet logs and one-line user errors."""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, Sequence

from absl import app, flags, logging

from salad_jax import errors
from salad_jax.files.atomic import DISK_ERRNOS, exception_chain
from salad_jax.train import preemption
from salad_jax.train.preemption import Terminated


def quiet_logs() -> None:
  """Orbax and JAX log every step at INFO; keep the console readable unless --verbosity is given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def fail(message: str, hint: str = "") -> None:
  """Prints `error: message` (+ `hint: ...`) on stderr and exits with status 2."""
  print(f"error: {str(message).strip()}", file=sys.stderr)
  if hint:
    print(f"hint: {hint}", file=sys.stderr)
  sys.stderr.flush()
  sys.exit(2)


def start_jax(device: str | None = None) -> None:
  """Forces a JAX platform (`--device cpu|cuda|gpu|tpu`) before the backend starts, then joins
  jax.distributed when its environment is set; a platform JAX does not have is one line."""
  import jax

  from salad_jax import sharding

  if device:
    jax.config.update("jax_platforms", {"gpu": "cuda"}.get(device, device))
  sharding.maybe_initialize_distributed()
  if device:
    try:
      jax.devices()
    except Exception as e:  # RuntimeError, or an AssertionError when no such plugin is installed
      detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise errors.UserError(
        f"--device {device}: JAX has no such device here ({detail})",
        "omit --device to use what JAX finds (for GPUs: pip install 'jax[cuda12]')",
      ) from None


def _one_line(text: str) -> str:
  """The informative line of an error text that may embed a traceback."""
  lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
  if any(ln.startswith("Traceback") for ln in lines):
    lines = lines[-1:]  # "ValueError: ..." at the end of the embedded traceback
  return " ".join(lines)


_ALIAS_HELP = re.compile(r"Alias for --(\S+)\.")


def _spelled_flag(token: str, flag_values) -> str | None:
  """The defined flag that `token` spells (`--name`, `--name=...`, `-name`, `--noname` for a
  bool, `--config.x.y` for a config file flag's override), else None."""
  if not token.startswith("-") or token.strip("-") == "":
    return None
  name = token.lstrip("-").split("=", 1)[0]
  known = flag_values._flags()  # noqa: SLF001 (absl has no public listing)
  if name in known:
    return name
  if name.startswith("no") and name[2:] in known and known[name[2:]].boolean:
    return name[2:]
  roots = [n for n, f in known.items() if "." not in n and _is_config_flag(f)]
  if any(name.startswith((f"{r}.", f"no{r}.")) for r in roots):
    return name  # an override: defined only once absl parses the config file
  return None


def _is_config_flag(flag) -> bool:
  return type(flag).__module__.startswith("ml_collections")


def check_flag_values(argv: Sequence[str], flag_values=flags.FLAGS) -> None:
  """Refuses what absl silently takes: a flag that needs a value followed by another flag
  (`--output_dir --save_descriptors` made a folder named `--save_descriptors`), a value that
  spells one of the program's flags (`--output_dir=--save_descriptors`), and a flag given
  under two names (`--val_datasets MSLS --datasets sped` kept one list).

  Only flags defined in `flag_values` are looked at (config overrides once their config is
  parsed); raises `UserError` naming both flags.
  """
  known = flag_values._flags()  # noqa: SLF001
  first: dict[str, tuple[str, str]] = {}  # flag -> (name used, token) of its first mention
  i = 1
  while i < len(argv):
    token = argv[i]
    if token == "--":
      break
    name = _spelled_flag(token, flag_values)
    flag = known.get(name) if name else None
    i += 1
    if flag is None:
      continue
    target = _ALIAS_HELP.fullmatch(flag.help or "")
    canonical = target.group(1) if target else flag.name
    said = token if "=" in token or flag.boolean or i >= len(argv) else f"{token} {argv[i]}"
    used, earlier = first.setdefault(canonical, (name, said))
    if used != name:
      lists = isinstance(flag.parser, flags.ListParser)
      raise errors.UserError(
        f"{earlier} and {said} set the same flag (--{canonical}): only the last one would be used",
        f"give one list: --{canonical} followed by every value you mean"
        if lists
        else f"give one of them (--{canonical})",
      )
    if flag.boolean:
      continue
    eq, value = "=" in token, token.split("=", 1)[1] if "=" in token else None
    if not eq:
      if i >= len(argv):
        continue  # absl says the value is missing
      value, i = argv[i], i + 1
    parts = value.split(",") if isinstance(flag.parser, flags.ListParser) else [value]
    other = next((o for p in parts if (o := _spelled_flag(p, flag_values))), None)
    if other is not None:
      raise errors.UserError(
        f"{token}: the value of --{name} is the flag --{other}"
        if eq
        else f"--{name} has no value: it is followed by the flag {value.split('=')[0]}",
        f"give --{name} its value; a path that really starts with '-' can be written ./{value}",
      )
    if not eq and re.fullmatch(r"--[A-Za-z_][\w.-]*(=.*)?", value):  # a misspelled flag, swallowed
      raise errors.UserError(
        f"--{name} has no value: it is followed by {value}, which looks like a flag (the "
        f"program has no --{value[2:].split('=')[0]})",
        f"give --{name} its value; a value that really starts with '--' can be written "
        f"--{name}={value}",
      )


def _check_flag_values(argv: list[str]) -> None:
  try:
    expanded = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)  # --flagfile
  except Exception:  # noqa: BLE001 (absl reports a bad --flagfile itself)
    expanded = argv
  try:
    check_flag_values(expanded)
  except errors.UserError as e:
    fail(e.message, e.hint)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with flag and config-override errors as one line; a flag missing its
  value (followed by another flag) is refused before and after (`check_flag_values`)."""
  _check_flag_values(argv)
  try:
    parsed = flags.FLAGS(argv)
    _check_flag_values(argv)  # config overrides are defined now
    return parsed
  except flags.Error as e:
    _check_flag_values(argv)  # a swallowed flag explains e.g. "--workdir must have a value"
    fail(_one_line(str(e)), "see --helpshort for the flags")
  except AttributeError as e:  # a config override naming a key the config does not have
    text = _one_line(str(e)).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    fail(f"config override: no such setting {text}", "see the config file for the available keys")
  except Exception as e:  # anything a config file raises is the user's input
    if os.environ.get("SALAD_JAX_TRACEBACK") == "1":
      raise
    fail(_one_line(f"{type(e).__name__}: {e}"))


def _load_config(name: str) -> None:
  """Config files are loaded lazily: load now, so a bad one is reported before any work."""
  try:
    getattr(flags.FLAGS, name).to_dict()
  except Exception as e:
    if os.environ.get("SALAD_JAX_TRACEBACK") == "1":
      raise
    text = str(e)
    if "Failed loading config file" in text:
      path = next((ln.strip() for ln in text.splitlines() if ln.strip().endswith(".py")), "")
      detail = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("[Errno")), "")
      fail(
        f"--{name}: cannot load config file {path} {detail}".strip(),
        "give a config .py file, e.g. --config configs/gsv.py",
      )
    fail(f"--{name}: {_one_line(text)}")


MEMORY_HINT = (
  "evaluate.py: a smaller --batch_size or --image_size; train.py: "
  "--config.model.remat=blocks, --config.model.dtype=bfloat16, --config.mesh.fsdp=N or "
  "fewer --config.data.places_per_batch (README: Memory per device)"
)


def _os_error_line(exc: BaseException) -> str | None:
  """One line for an exception caused by a full disk, a quota, a read-only file system or a
  missing permission (an OSError anywhere in its __cause__/__context__ chain), else None."""
  for e in exception_chain(exc):
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
      where = f" {e.filename}" if e.filename else ""
      return f"cannot write{where}: {DISK_ERRNOS[e.errno]}"
  return None


def run(main: Callable[[Sequence[str]], None], config_flags: Sequence[str] = ()) -> None:
  """`app.run(main)` where a user's mistake is one line on stderr (exit 2), not a traceback.

  User mistakes: bad flags and config overrides, errors in the config files named in
  `config_flags`, `app.UsageError`, and `errors.USER_ERRORS` raised by the library.
  `SALAD_JAX_TRACEBACK=1` re-raises them with their traceback.
  """

  def wrapped(argv):
    debug = os.environ.get("SALAD_JAX_TRACEBACK") == "1"
    for name in config_flags:
      _load_config(name)
    try:
      return main(argv)
    except app.UsageError as e:
      if debug:
        raise
      fail(str(e), "see --helpshort for the flags")
    except errors.USER_ERRORS as e:
      if debug:
        raise
      fail(
        e.message if isinstance(e, errors.UserError) else str(e),
        e.hint if isinstance(e, errors.UserError) else "",
      )
    except KeyboardInterrupt as e:
      if isinstance(e, Terminated):
        print(e.message, file=sys.stderr, flush=True)
        sys.exit(preemption.EXIT_STATUS)
      print("interrupted", file=sys.stderr)
      sys.exit(130)
    except MemoryError as e:  # host memory: numpy could not allocate a batch or an array
      if debug:
        raise
      fail(f"out of host memory: {_one_line(str(e)) or type(e).__name__}", MEMORY_HINT)
    except Exception as e:  # a full disk or a read-only file system is the user's to fix
      if not debug and "RESOURCE_EXHAUSTED" in str(e):  # XLA: the device's memory
        fail(f"out of device memory: {_one_line(str(e))[:300]}", MEMORY_HINT)
      line = _os_error_line(e)
      if line is None or debug:
        raise
      fail(line, "free some space or choose a place you can write to")

  preemption.install()  # SIGTERM: Ctrl-C-like, or a flag the trainer checks (preemption.py)
  app.run(wrapped, flags_parser=_parse_flags)
