"""Command lines as VPR users type them (argparse style), rewritten for absl before it parses.

VPR-methods-evaluation (`parser.py`) and SALAD's `eval.py` take lists space-separated, argparse
`nargs="+"`: `--image_size 322 322 --recall_values 1 5 10 20`; absl takes them comma-separated:
`--image_size=322,322`. `rewrite` turns the first into the second, anywhere on the command line,
keeps the comma form as it is, and refuses what could mean two things (`--image_size=322 322`,
`--recall_values 1,5 10`). Flags of theirs that we do not have get a message saying what we do
instead (`unsupported`, e.g. `VPR_METHODS_EVALUATION`): the handler returns a note (the flag is
dropped, or replaced by ours) or raises `UserError`.
"""

from __future__ import annotations

import datetime
import os
import re
from typing import Callable, Mapping, Sequence

from absl import flags

from salad_jax.errors import UserError

_NUMBER = re.compile(r"-\d+(\.\d*)?([eE][-+]?\d+)?")
HINT = "lists: --image_size 322 322 or --image_size=322,322 (one form per flag)"


def _is_value(token: str) -> bool:
  """A bare value (not a flag); negative numbers are values, as argparse reads them here."""
  return not token.startswith("-") or bool(_NUMBER.fullmatch(token))


def flag_kinds(flag_values=flags.FLAGS) -> tuple[set[str], set[str]]:
  """(names of list flags, names of bool flags) defined in `flag_values`, aliases included."""
  lists, bools = set(), set()
  for name, flag in flag_values._flags().items():  # noqa: SLF001 (absl has no public listing)
    if isinstance(flag.parser, flags.ListParser):
      lists.add(name)
    elif flag.boolean:
      bools.add(name)
  return lists, bools


def rewrite(
  argv: Sequence[str],
  lists: set[str],
  bools: set[str] = frozenset(),
  unsupported: Mapping[str, Callable[[str | None], str]] | None = None,
) -> tuple[list[str], list[str]]:
  """argparse-style `argv` -> (absl-style argv, notes to show the user).

  `lists`: flags whose values may be space separated; `bools`: flags that take no value (as
  argparse's store_true); `unsupported`: name -> handler(value or None) returning a note, or
  (note, tokens to put in the flag's place); it raises `UserError` for what it refuses.
  """
  unsupported = unsupported or {}
  out, notes, emitted = list(argv[:1]), [], {}
  i = 1
  while i < len(argv):
    token = argv[i]
    if token == "--":
      out += argv[i:]
      break
    if not token.startswith("--") or token == "--":
      out.append(token)  # positional or single-dash: absl decides
      i += 1
      continue
    name, eq, value = token[2:].partition("=")
    values = [value] if eq else []
    j = i + 1
    while j < len(argv) and _is_value(argv[j]) and (name in lists or name in unsupported):
      values.append(argv[j])
      j += 1
    if not values and (name in lists or name in unsupported) and j < len(argv):
      raise UserError(
        f"--{name} has no value: it is followed by the flag {argv[j].split('=')[0]}",
        HINT if name in lists else f"give --{name} its value",
      )
    if name in unsupported:
      if len(values) > 1:
        raise UserError(f"--{name} {' '.join(values)}: one value expected", HINT)
      got = unsupported[name](" ".join(values) if values else None)
      note, tokens = (got, []) if isinstance(got, str) else got
      notes.append(note)
      out += tokens
      emitted.update({t[2:].split("=")[0]: name for t in tokens})
      i = j
      continue
    if name in bools and eq == "" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
      raise UserError(
        f"--{name} takes no value (got {argv[i + 1]!r})",
        f"write --{name} to turn it on, --no{name} to turn it off",
      )
    if name not in lists:
      out.append(token)
      i += 1
      continue
    parts = [p for v in values for p in v.split(",") if p]
    both = f"write --{name} {' '.join(parts)} or --{name}={','.join(parts)}"
    if eq and len(values) > 1:
      raise UserError(
        f"--{name}={value} {' '.join(values[1:])}: ambiguous, '=' takes one value", both
      )
    if not values:
      raise UserError(f"--{name} needs a value", HINT)
    if len(values) > 1 and any("," in v for v in values):
      raise UserError(f"--{name} {' '.join(values)}: ambiguous mix of commas and spaces", both)
    out.append(f"--{name}=" + ",".join(values))
    i = j
  given = {t[2:].split("=")[0] for t in argv[1:] if t.startswith("--")}
  for ours, theirs in emitted.items():
    if ours in given:
      raise UserError(f"--{theirs} and --{ours} set the same thing", "give one of them")
  return out, notes


def _ignored(flag: str, accepted: set[str], instead: str):
  """A flag of theirs we do not have: fine if its value names what we do, else an error."""

  def handle(value):
    if value is not None and value.lower() in accepted:
      return f"--{flag} {value}: ignored, {instead}"
    raise UserError(
      f"--{flag} {value or ''}: not an option of salad_jax's evaluate.py; {instead}",
      f"drop --{flag}",
    )

  return handle


def _log_dir(value):
  """Their --log_dir NAME: outputs under logs/NAME/<date_time>/, or NAME/<date_time>/ when NAME
  is absolute (ours: --output_dir)."""
  if not value:
    raise UserError("--log_dir needs a name", "e.g. --log_dir toy_experiment")
  # as their Path("logs") / log_dir / start_time: an absolute --log_dir is used as it is
  out = os.path.join("logs", value, f"{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}")
  return f"--log_dir {value}: outputs go to --output_dir {out}", [f"--output_dir={out}"]


# gmberton/VPR-methods-evaluation parser.py flags that evaluate.py has under another form
VPR_METHODS_EVALUATION = {
  "method": _ignored(
    "method",
    {"salad"},
    "the model is the SALAD checkpoint in --checkpoint (e.g. the released dino_salad.ckpt)",
  ),
  "backbone": _ignored("backbone", {"dinov2"}, "the backbone comes from --checkpoint"),
  "descriptors_dimension": _ignored(
    "descriptors_dimension", {"8448"}, "the descriptor size comes from --checkpoint"
  ),
  "log_dir": _log_dir,
}


def image_size(values: Sequence[str], flag: str = "--image_size") -> tuple[int, int]:
  """(h, w) from one value (square, as SALAD's eval.py) or two, positive. Whether the model
  takes them (DINOv2: multiples of 14; MixVPR: its map size) is checked once it is loaded."""
  try:
    size = [int(v) for v in values]
  except ValueError:
    raise UserError(
      f"{flag} {' '.join(values)}: sizes are integers", "e.g. --image_size 322 322"
    ) from None
  if len(size) not in (1, 2) or min(size) <= 0:
    raise UserError(
      f"{flag} {' '.join(values)}: one or two positive values (H W)", "e.g. --image_size 322 322"
    )
  return size[0], size[-1]
