"""The grain pipeline that turns HQ sources into batches of random crops (docs/official.md §7.2).

Per source: index range -> this process's slice `[process_index::process_count]` -> shuffle(seed)
-> repeat (reshuffled each epoch) -> tag with the source number; then the sources are mixed with
their weights (`grain.MapDataset.mix`, a fixed interleaving, so the frequencies are exactly the
normalized weights), decoded and cropped by a `random_map` whose generator grain seeds from the
config seed and the element's index, converted to an iterator, batched and prefetched by worker
processes. Every random choice is a function of (seed, process, index), so `get_state()` /
`set_state()` (and Orbax through `grain.checkpoint.CheckpointSave/CheckpointRestore`) resume
exactly, with or without workers.

Records are decoded by `image_io.decode` (EXIF orientation applied, 16-bit levels rounded to 8
bits, alpha dropped as the official loader drops it). A record that cannot be used (unreadable,
corrupt, truncated, empty, not an image) becomes `None` and grain drops it: the batch is filled
from the next indices, as deterministically as the rest. (Retrying another index instead would
draw some images twice as often.) Skips, mode conversions (grayscale, RGBA, palette, 16-bit) and
upscales of small images are counted per worker and logged (absl) on the first occurrence and then
once every `warn_every`.
"""
import collections

import grain
import jax
import ml_collections
import numpy as np
from absl import flags, logging
from PIL import Image

from vosr_jax import perf
from vosr_jax.data import image_io
from vosr_jax.data import sources as sources_lib


def _derive_seed(*entropy):
  """A 32-bit seed from integers (grain seeds must lie in [0, 2**32))."""
  return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def upscale_short_side(image, size):
  """Upscales so the shorter side is `size` (PIL BICUBIC, sizes rounded) when it is shorter (7.2).

  Args:
    image: uint8 (H, W, 3).
    size: the crop size in pixels.

  Returns:
    uint8 (H', W', 3) with min(H', W') >= size; `image` itself when no upscale is needed.
  """
  h, w = image.shape[:2]
  if min(h, w) >= size:
    return image
  scale = size / min(h, w)
  new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
  return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))


def random_crop(image, size, rng, flip=False):
  """A uniform random size x size crop of uint8 (H, W, 3), H, W >= size; optional random h-flip."""
  h, w = image.shape[:2]
  top = int(rng.integers(0, h - size + 1))
  left = int(rng.integers(0, w - size + 1))
  crop = image[top:top + size, left:left + size]
  if flip and rng.random() < 0.5:
    crop = crop[:, ::-1]
  return np.ascontiguousarray(crop)


class _Tag(grain.transforms.Map):
  """Index within source `k` -> (k, index)."""

  def __init__(self, k):
    self.k = k

  def map(self, element):
    return self.k, int(element)


class DecodeCrop(grain.transforms.RandomMap):
  """(source number, index) -> {'hq': uint8 (res, res, 3)}, or None for an unusable record.

  Attributes:
    counts: per-worker Counter of 'skipped', 'converted to RGB' and 'upscaled' records.
  """

  def __init__(self, sources, shard_sizes, resolution, flip, warn_every):
    self.sources = sources
    self.shard_sizes = shard_sizes
    self.resolution = resolution
    self.flip = flip
    self.warn_every = warn_every
    self.counts = collections.Counter()
    # Per source: indices that failed, and whether any record succeeded. A source whose whole shard
    # failed would otherwise make the pipeline spin forever looking for a usable image.
    self._failed = [set() for _ in sources]
    self._any_ok = [False] * len(sources)

  def _count(self, kind, message):
    # Counters are per worker process and only feed the log, so unlocked updates are good enough.
    self.counts[kind] += 1
    n = self.counts[kind]
    if n == 1 or n % self.warn_every == 0:
      logging.warning("vosr data: %s %d image(s) so far in this worker (latest: %s)", kind, n,
                      message)

  def random_map(self, element, rng):
    k, index = element
    source = self.sources[k]
    try:
      decoded = image_io.decode(source.read(index))
      image = decoded.rgb8()
    except Exception as e:  # Any failure of one record must skip it, never stop training.
      self._count("skipped", f"{source.key(index)}: {type(e).__name__}: {e}")
      if not self._any_ok[k]:
        self._failed[k].add(index)
        if len(self._failed[k]) >= self.shard_sizes[k]:
          raise ValueError(
              f"Data source {source.name!r} yielded no usable image: all {self.shard_sizes[k]} "
              f"records of this process's shard failed to decode (last: {source.key(index)}: "
              f"{type(e).__name__}: {e}).") from e
      return None
    if not self._any_ok[k]:
      self._any_ok[k] = True
      self._failed[k].clear()
    if decoded.mode != "RGB":
      self._count("converted to RGB", f"{source.key(index)}: mode {decoded.mode}")
    if min(image.shape[:2]) < self.resolution:
      self._count("upscaled", f"{source.key(index)}: {image.shape[1]}x{image.shape[0]}, smaller "
                  f"than the {self.resolution} px crop")
      image = upscale_short_side(image, self.resolution)
    return {"hq": random_crop(image, self.resolution, rng, self.flip)}


def _process(process_index, process_count):
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def make_dataset(data_config, *, process_index=None, process_count=None):
  """This process's infinite, weighted, shuffled stream of crops, before batching.

  Args:
    data_config: `config.data` (see configs/data.py).
    process_index, process_count: the shard to read; default `jax.process_index()/process_count()`.

  Returns:
    A `grain.MapDataset` whose elements are {'hq': uint8 (res, res, 3)} or None (unusable records,
    dropped by `to_iter_dataset`).
  """
  process_index, process_count = _process(process_index, process_count)
  specs = sources_lib.parse_sources(data_config.sources, data_config.tfds_data_dir)
  opened = [sources_lib.open_source(spec) for spec in specs]
  parts, shard_sizes, weights = [], [], []
  for k, (spec, source) in enumerate(zip(specs, opened)):
    ds = grain.MapDataset.range(len(source))[process_index::process_count]
    if len(ds) == 0:
      raise ValueError(f"Data source {source.name!r} has {len(source)} records, fewer than the "
                       f"{process_count} processes: process {process_index} would get none.")
    shard_sizes.append(len(ds))
    if data_config.shuffle:
      ds = ds.shuffle(seed=_derive_seed(data_config.seed, k))
    parts.append(ds.repeat().map(_Tag(k)))
    # txt-mode semantics of the official code: a list repeated `weight` times is drawn in
    # proportion to weight x size; otherwise (webdataset mode) in proportion to weight.
    weights.append(spec.weight * (len(source) if data_config.weight_by_size else 1))
  mixed = grain.MapDataset.mix(parts, weights) if len(parts) > 1 else parts[0]
  transform = DecodeCrop(opened, shard_sizes, data_config.resolution, data_config.flip,
                         data_config.warn_every)
  return mixed.random_map(transform, seed=_derive_seed(data_config.seed, len(specs), process_index))


def make_train_iterator(data_config, per_process_batch, *, process_index=None, process_count=None):
  """The training batch iterator of this process.

  Args:
    data_config: `config.data` (see configs/data.py).
    per_process_batch: images per batch on this process (global batch / process count).
    process_index, process_count: the shard to read; default `jax.process_index()/process_count()`.

  Returns:
    An infinite `grain.DatasetIterator` of {'hq': uint8 (per_process_batch, res, res, 3)}; its
    `get_state()/set_state()` resume exactly, and `grain.checkpoint.CheckpointSave(iterator)` saves
    it in an Orbax CheckpointManager item.
  """
  ds = make_dataset(data_config, process_index=process_index, process_count=process_count)
  read = grain.ReadOptions(num_threads=data_config.num_threads,
                           prefetch_buffer_size=data_config.prefetch * per_process_batch)
  ds = ds.to_iter_dataset(read).batch(per_process_batch, drop_remainder=True)
  if data_config.num_workers > 0:
    # grain reads its absl flags when it starts workers; outside an absl app (notebooks, tests)
    # nobody parses them, and their defaults are what we want.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.num_workers,
                                                     per_worker_buffer_size=data_config.prefetch))
  return iter(ds)


def benchmark_pipeline(folder, data_config, *, batch_size=16, num_batches=20, warmup_batches=2):
  """Measures the pipeline's throughput reading the images of one folder (`perf.time_fn` over
  `next()` of the training iterator).

  Args:
    folder: a folder of images (read recursively).
    data_config: `config.data`; its sources are replaced by `folder`, the rest (resolution,
      num_workers, ...) is used as is.
    batch_size: images per batch.
    num_batches: batches timed after the warm-up.
    warmup_batches: batches drawn first and not timed (worker start-up, first decodes).

  Returns:
    The `perf.time_fn` statistics (per batch) plus 'images_per_s' (batch_size / median),
    'images' (timed), 'batch_size', 'num_workers', 'resolution'.
  """
  # A fresh ConfigDict: `sources` may be typed as a list-file string in `data_config`.
  config = ml_collections.ConfigDict({**data_config.to_dict(), "sources": [folder]})
  iterator = make_train_iterator(config, batch_size, process_index=0, process_count=1)
  timing = perf.time_fn(lambda: next(iterator), (), num_batches, warmup_batches)
  return dict(**timing, images_per_s=batch_size / timing["median_s"],
              images=num_batches * batch_size, batch_size=batch_size,
              num_workers=config.num_workers, resolution=config.resolution)
