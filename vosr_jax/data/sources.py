"""HQ training image sources: folders, image-path lists, webdataset tar shards and tfds datasets.

A source is a random-access sequence of undecoded records: `len(source)` and `source.read(i)`, which
returns the encoded image bytes (files, tar members) or a decoded array (tfds `Tensor` features).
Decoding, conversion and cropping happen in `vosr_jax.data.pipeline`, inside the grain workers, so a
bad record costs one skipped element there, never a crash here. Sources are pickled into the worker
processes: they hold paths and offsets only, and the tfds reader is reopened on first use.

Which sources to read, and with what weights, comes from `config.data.sources` (see
`configs/data.py`), in one of three forms:
- a list of dicts: `{'path': ..., 'weight': 1.0}` or `{'tfds': name, 'split': ..., 'data_dir': ...,
  'image_key': ..., 'weight': ...}`;
- a list of strings `'path'` or `'path, weight'`;
- one string: the path of a list file in the official format, one `path, weight` per line (blank
  lines and `#` comments ignored; a missing weight means 1), or a single folder, tar or tfds source.
A path is a folder of images (searched recursively), a `.txt` file listing image paths (one per
line, relative paths taken from the list file's folder), a `.tar` shard, a glob (`shards/*.tar`) or
a webdataset brace range (`shard-{000000..000099}.tar`), or `tfds:NAME[:SPLIT]`.
"""
import dataclasses
import glob
import os
import re
import tarfile

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One configured source before it is opened.

  Attributes:
    path: folder, image-list `.txt`, tar shard/glob/brace range; empty for tfds.
    weight: mixing weight (> 0); relative to the other sources' weights.
    tfds: tfds dataset name ('' unless a tfds source).
    split: tfds split.
    data_dir: tfds data directory ('' for the tfds default).
    image_key: tfds feature holding the image.
  """
  path: str = ""
  weight: float = 1.0
  tfds: str = ""
  split: str = "train"
  data_dir: str = ""
  image_key: str = "image"


class FolderSource:
  """Image files under a folder (recursive, sorted), or the files named in a `.txt` list."""

  def __init__(self, path):
    self.name = path
    if os.path.isdir(path):
      paths = []
      for root, dirs, files in os.walk(path, followlinks=True):
        dirs.sort()
        paths.extend(os.path.join(root, f) for f in sorted(files)
                     if f.lower().endswith(IMAGE_EXTENSIONS))
      where = "image files (recursive; extensions " + ", ".join(IMAGE_EXTENSIONS) + ")"
    else:
      base = os.path.dirname(os.path.abspath(path))
      with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
      paths = [os.path.join(base, line) for line in lines if line and not line.startswith("#")]
      where = "image paths (one per line)"
    if not paths:
      raise ValueError(f"Data source {path!r} contains no {where}.")
    self.paths = paths

  def __len__(self):
    return len(self.paths)

  def key(self, index):
    return self.paths[index]

  def read(self, index):
    with open(self.paths[index], "rb") as f:
      return f.read()


class TarSource:
  """Webdataset tar shards: one sample per key (member name up to its first dot), its first image.

  The shards are indexed once, here (member offsets and sizes), and read by offset later, so any
  sample can be read without scanning its shard.
  """

  def __init__(self, pattern, shards):
    self.name = pattern
    self.shards = shards
    self.index = []  # (shard number, member name, data offset, size)
    for s, shard in enumerate(shards):
      seen = set()
      try:
        with tarfile.open(shard, "r:") as tar:
          for member in tar:
            base = os.path.basename(member.name)
            sample_key = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
            if (member.isfile() and base.lower().endswith(IMAGE_EXTENSIONS)
                and sample_key not in seen):
              seen.add(sample_key)
              self.index.append((s, member.name, member.offset_data, member.size))
      except tarfile.TarError as e:
        raise ValueError(f"Data source {pattern!r}: cannot read tar shard {shard!r} ({e}); "
                         "expected an uncompressed tar in the webdataset layout.") from e
    if not self.index:
      raise ValueError(f"Data source {pattern!r} ({len(shards)} tar shard(s)) contains no image "
                       f"members (extensions {', '.join(IMAGE_EXTENSIONS)}).")

  def __len__(self):
    return len(self.index)

  def key(self, index):
    s, member, _, _ = self.index[index]
    return f"{self.shards[s]}:{member}"

  def read(self, index):
    s, _, offset, size = self.index[index]
    with open(self.shards[s], "rb") as f:
      f.seek(offset)
      return f.read(size)


class TfdsSource:
  """A tfds dataset read through `tfds.data_source` (array_record; needs no TensorFlow).

  The image feature may be an encoded `Image` (decoded by tfds into an array) or a `Tensor(uint8)`
  of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).
  """

  def __init__(self, spec):
    self.spec = spec
    self.name = f"tfds:{spec.tfds}:{spec.split}"
    self._source = None
    try:
      n = len(self._open())
    except Exception as e:  # tfds raises several types for a missing or unprepared dataset.
      raise ValueError(f"Data source {self.name!r} (data_dir={spec.data_dir or 'tfds default'!r}) "
                       f"cannot be opened with tfds.data_source: {e}") from e
    if n == 0:
      raise ValueError(f"Data source {self.name!r} has no records.")
    self._len = n

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # Only tfds sources need it (and its import is slow).
      self._source = tfds.data_source(self.spec.tfds, split=self.spec.split,
                                      data_dir=self.spec.data_dir or None)
    return self._source

  def __getstate__(self):
    return {**self.__dict__, "_source": None}  # The reader is reopened in each worker.

  def __len__(self):
    return self._len

  def key(self, index):
    return f"{self.name}[{index}]"

  def read(self, index):
    record = self._open()[index]
    if self.spec.image_key not in record:
      raise KeyError(f"no feature {self.spec.image_key!r} (features: {sorted(record)})")
    value = record[self.spec.image_key]
    return value if isinstance(value, bytes) else np.asarray(value)


def expand_shards(pattern):
  """Tar shard paths for a path, glob or webdataset brace range (`a-{000..009}.tar`), sorted."""
  patterns = [pattern]
  while any(_BRACE_RANGE.search(p) for p in patterns):
    expanded = []
    for p in patterns:
      m = _BRACE_RANGE.search(p)
      if m is None:
        expanded.append(p)
        continue
      lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
      expanded.extend(p[:m.start()] + str(i).zfill(width) + p[m.end():] for i in range(lo, hi + 1))
    patterns = expanded
  paths = []
  for p in patterns:
    paths.extend(sorted(glob.glob(p)) if glob.has_magic(p) else [p])
  return paths


def read_list_file(path):
  """Parses the official list file: one `path, weight` per line. Returns a list of `SourceSpec`.

  Relative paths are taken from the list file's folder. Raises ValueError naming the file and line
  for a malformed line, and FileNotFoundError if the file is missing.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.data.sources: list file {path!r} does not exist; expected a "
                            "text file with one 'path, weight' per line.")
  base = os.path.dirname(os.path.abspath(path))
  specs = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      try:
        spec = parse_source_string(line)
      except ValueError as e:
        raise ValueError(f"{path}:{number}: {e}") from e
      if spec.path and not os.path.isabs(spec.path):
        spec = dataclasses.replace(spec, path=os.path.join(base, spec.path))
      specs.append(spec)
  if not specs:
    raise ValueError(f"config.data.sources: list file {path!r} lists no sources; expected one "
                     "'path, weight' per line.")
  return specs


def parse_source_string(text):
  """`'path'`, `'path, weight'` or `'tfds:NAME[:SPLIT][, weight]'` -> `SourceSpec`."""
  path, sep, weight_text = text.rpartition(",")
  if not sep:
    path, weight_text = text, "1"
  path = path.strip()
  try:
    weight = float(weight_text)
  except ValueError:
    raise ValueError(f"malformed source {text!r}: expected 'path, weight' with a numeric weight, "
                     f"got weight {weight_text.strip()!r}.") from None
  if not path:
    raise ValueError(f"malformed source {text!r}: empty path; expected 'path, weight'.")
  if path.startswith("tfds:"):
    name, _, split = path[len("tfds:"):].partition(":")
    return SourceSpec(tfds=name, split=split or "train", weight=weight)
  return SourceSpec(path=path, weight=weight)


def parse_sources(sources, tfds_data_dir=""):
  """Normalizes `config.data.sources` (any form in the module docstring) to a list of `SourceSpec`.

  Args:
    sources: a list-file path, or a list of strings and/or dicts.
    tfds_data_dir: default tfds data directory (`config.data.tfds_data_dir`).

  Returns:
    A non-empty list of `SourceSpec` with positive weights.
  """
  if not sources:
    raise ValueError("config.data.sources is not set: give a list-file path ('path, weight' per "
                     "line) or a list of sources (see configs/data.py).")
  if isinstance(sources, str):
    single = (os.path.isdir(sources) or sources.startswith("tfds:")
              or sources.lower().endswith(".tar"))
    specs = [parse_source_string(sources)] if single else read_list_file(sources)
  else:
    specs = []
    fields = {f.name for f in dataclasses.fields(SourceSpec)}
    for entry in sources:
      if isinstance(entry, str):
        specs.append(parse_source_string(entry))
        continue
      entry = dict(entry)
      unknown = set(entry) - fields
      if unknown or bool(entry.get("path")) == bool(entry.get("tfds")):
        raise ValueError(f"config.data.sources entry {entry!r}: expected exactly one of 'path' or "
                         f"'tfds', and only the keys {sorted(fields)}.")
      specs.append(SourceSpec(**entry))
  for spec in specs:
    if not spec.weight > 0:
      raise ValueError(f"config.data.sources: source {spec.path or spec.tfds!r} has weight "
                       f"{spec.weight}; weights must be positive.")
  return [dataclasses.replace(s, data_dir=s.data_dir or tfds_data_dir) if s.tfds else s
          for s in specs]


def open_source(spec):
  """Opens one `SourceSpec`: a `FolderSource`, `TarSource` or `TfdsSource`.

  Raises FileNotFoundError for a missing path, ValueError for a source with no images.
  """
  if spec.tfds:
    return TfdsSource(spec)
  path = spec.path
  if os.path.isdir(path) or (os.path.isfile(path) and path.lower().endswith(".txt")):
    return FolderSource(path)
  if path.lower().endswith(".tar"):
    shards = expand_shards(path)
    missing = [s for s in shards if not os.path.isfile(s)]
    if not shards or missing:
      raise FileNotFoundError(f"config.data.sources: tar shard(s) {missing or path!r} not found "
                              f"(from {path!r}).")
    return TarSource(path, shards)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.data.sources: {path!r} does not exist; expected a folder of "
                            "images, a .txt list of image paths, .tar shards or tfds:NAME.")
  raise ValueError(f"config.data.sources: {path!r} is not a folder, a .txt image list or a .tar "
                   "shard.")
