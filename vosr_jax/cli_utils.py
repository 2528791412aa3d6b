"""Pieces shared by the command-line tools: file writes that never leave a partial file, checks of
output destinations before any compute, range checks of numeric flags, and one-line usage errors
(exit status 2) for the absl tools (`python -m vosr_jax.main`, `python -m vosr_jax.bench`).

Atomic writes go through `.<name>.<pid>.tmp` in the destination folder (same file system, so the
final `os.replace` is atomic) and take the user's umask like any other file. A process killed
mid-write leaves its temporary behind; the next write of the same name in that folder removes
the temporaries of processes that no longer run.
"""
import contextlib
import difflib
import errno
import importlib.util
import json
import math
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


# The config files of this checkout (configs/ next to the vosr_jax package; not installed with it).
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(path, arg=None):
  """`get_config(arg)` (or `get_config()`) of the config file `path`, loaded as a file, the way
  `--config=FILE:ARG` of `python -m vosr_jax.main` loads it (the folder above `configs/` is on
  the import path meanwhile, for `from configs import ...` inside the file).

  Raises:
    FileNotFoundError: no such file.
  """
  return load_config_module(path, lambda module: (
      module.get_config() if arg is None else module.get_config(arg)))


def load_config_module(path, use=lambda module: module):
  """`use(module)` of the config file `path` loaded as a module (default: the module itself, for
  its constants), with the folder above `configs/` on the import path meanwhile.

  Raises:
    FileNotFoundError: no such file.
  """
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such config file (configs/ of a vosr-jax checkout)")
  root = os.path.dirname(os.path.dirname(path))
  with contextlib.ExitStack() as stack:
    if root not in sys.path:
      sys.path.insert(0, root)
      stack.callback(sys.path.remove, root)
    spec = importlib.util.spec_from_file_location(
        f"_vosr_config_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return use(module)


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_temporaries(folder, name=None):
  """Removes `.<name>.<pid>.tmp` files in `folder` whose process is gone; returns their paths.

  Args:
    folder: the destination folder.
    name: only the temporaries of this file name (None: all of them).
  """
  removed = []
  for entry in os.listdir(folder):
    match = _TMP.match(entry)
    if match and (name is None or match["name"] == name) and not _alive(int(match["pid"])):
      try:
        os.remove(os.path.join(folder, entry))
        removed.append(os.path.join(folder, entry))
      except FileNotFoundError:
        pass  # Another process cleaned it first.
  return removed


def atomic_write(path, write):
  """Calls `write(f)` on a binary file object and renames the result to `path`.

  Nothing is left at `path` or in its folder when `write` or the rename fails; the file gets the
  user's umask (mode 0666 & ~umask). Stale temporaries of `path` (killed writers) are removed.
  """
  folder, name = os.path.split(os.path.abspath(path))
  remove_stale_temporaries(folder, name)
  tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
  try:
    if os.path.exists(tmp):  # Left by an earlier process with this pid: new file, new mode.
      os.remove(tmp)
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write_text(path, text):
  """Writes the str `text` (UTF-8, newlines as given) to `path` through `atomic_write`."""
  atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def check_output_folder(path, flag, hint="choose another folder"):
  """Creates folder `path` if needed and checks that files can be created in it.

  Args:
    path: the destination folder.
    flag: the command-line flag that named it, for the message (e.g. '--output').
    hint: what to do about it, for the message.
  Raises:
    NotADirectoryError / PermissionError: one line naming `flag`, the path and what is wrong.
  """
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f"{flag}={path} is an existing file, not a folder; {hint}")
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_check.{os.getpid()}.tmp")
    with open(probe, "wb"):
      pass
    os.remove(probe)
  except OSError as e:
    reason = "not writable" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else e.strerror
    raise PermissionError(f"{flag}={path}: {reason}; {hint}") from e


def check_range(errors, flag, value, low=None, high=None, *, low_open=False, allow=()):
  """Appends a message to `errors` when `value` is not finite or outside [low, high].

  Args:
    errors: list of messages (one per bad flag) to append to.
    flag: e.g. '--tile-size'.
    value: int or float (None: unset, always valid).
    low, high: inclusive bounds (None: unbounded); `low_open` makes `low` exclusive.
    allow: values that are valid whatever the bounds (e.g. 0 for "off").
  """
  if value is None or value in allow:
    return
  bad = isinstance(value, float) and not math.isfinite(value)
  bad = bad or (low is not None and (value <= low if low_open else value < low))
  bad = bad or (high is not None and value > high)
  if bad:
    bounds = [f"{'>' if low_open else '>='} {low}" if low is not None else "",
              f"<= {high}" if high is not None else ""]
    extra = f" (or {' or '.join(str(a) for a in allow)})" if allow else ""
    errors.append(f"{flag}={value} must be {' and '.join(b for b in bounds if b) or 'finite'}"
                  f"{extra}")


def _field_error(config, dotted):
  """Why `config` has no field `dotted` ('a.b.c'), with the closest names; None when it has."""
  node, seen = config, []
  for part in dotted.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      where = "config" + "".join(f".{k}" for k in seen)
      close = difflib.get_close_matches(part, keys, 3, 0.6)
      hint = f"did you mean {' or '.join(close)}?" if close else \
          f"its fields: {', '.join(sorted(keys))}" if keys else "it has no fields"
      return f"--config.{dotted}: {where} has no field '{part}'; {hint}"
    node, seen = node[part], seen + [part]
  return None


def _config_named(argv):
  """The config that `--config=FILE[:ARG]` in `argv` names, loaded again (None without one)."""
  for arg, following in zip(argv, argv[1:] + [None]):
    value = arg[len("--config="):] if arg.startswith("--config=") else \
        following if arg == "--config" else None
    if value:
      return flags.FLAGS["config"].parser.parse(value)
  return None


def usage_exit(message):
  """Prints `error: message` to stderr and exits with status 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_absl_flags(argv):
  """`app.run(main, flags_parser=parse_absl_flags)`: absl's parsing with one-line usage errors and
  exit status 2, for bad flag values and for unknown `--config.FIELD` overrides (absl itself ends
  in a traceback for those, with a hint only below the top level)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    usage_exit(str(e).splitlines()[0])
  except (AttributeError, KeyError) as e:
    config = _config_named(argv)
    for arg in argv[1:]:
      if config is not None and arg.startswith("--config."):
        message = _field_error(config, arg[len("--config."):].split("=", 1)[0])
        if message:
          usage_exit(message)
    usage_exit(str(e).strip("'\""))


def emit_record(module, config_flag, record, out):
  """Prints the JSON record of a `python -m module` run (its command, config file and overrides,
  then `record`) and writes it atomically to `out` when given."""
  result = dict(
      command=f"python -m {module} " + " ".join(sys.argv[1:]),
      config=config_flags.get_config_filename(config_flag),
      config_overrides={k: str(v)
                        for k, v in config_flags.get_override_values(config_flag).items()},
      **record)
  text = json.dumps(result, indent=2)
  print(text)
  if out:
    atomic_write_text(out, text + "\n")
