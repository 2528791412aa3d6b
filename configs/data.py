"""Data config: HQ sources and the grain pipeline (`vosr_jax.data.pipeline`).

Train configs include it as `config.data = data.get_config()`. Sources are set per run, e.g.
  --config.data.sources=/data/train_list.txt            (official list file: 'path, weight' lines)
or in Python: `config.data.sources = ['/data/DIV2K_HR, 2', 'tfds:my_hq:train, 1']` or dicts
`{'path': ..., 'weight': ...}` / `{'tfds': name, 'split': ..., 'data_dir': ..., 'image_key': ...}`
(the forms are listed in `vosr_jax/data/sources.py`).
"""
import ml_collections


def get_config():
  """Returns the data ConfigDict with every field and its default."""
  config = ml_collections.ConfigDict()
  # A list-file path (str) or a list of 'path[, weight]' strings / dicts. Unset: an error at start.
  config.sources = ml_collections.config_dict.placeholder(object)
  config.tfds_data_dir = ""  # Default data_dir for tfds sources ('' = tfds' own default).
  # False: source k is drawn with probability weight_k / sum(weights) (official webdataset mode).
  # True: with probability weight_k * size_k / sum (official txt mode, each list repeated weight x).
  config.weight_by_size = False
  config.resolution = 512  # HQ crop size in pixels (docs/official.md §7.2).
  config.flip = False  # Random horizontal flips; the official code has none.
  config.shuffle = True  # Shuffle each source, reshuffled every epoch.
  config.seed = 0  # Shuffle and crop randomness: batches are a function of (seed, process, step).
  config.num_workers = 2  # Decoding worker processes per host (0: decode in the main process).
  config.num_threads = 2  # Reader threads per worker.
  config.prefetch = 2  # Batches buffered per worker.
  config.warn_every = 1000  # Log skipped/converted/upscaled image counts once every this many.
  return config
