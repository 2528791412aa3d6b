"""Tests for vosr_jax.data.sources and vosr_jax.data.pipeline (grain)."""
import io
import logging
import os
import sys
import tarfile

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from skimage import data as skdata

from configs import data as data_configs
from vosr_jax.data import pipeline, sources

RES = 16


def _config(srcs, **overrides):
  config = data_configs.get_config()
  config.sources = srcs
  config.resolution = RES
  config.num_workers = 0
  config.num_threads = 1
  config.update(overrides)
  return config


def _solid(value, size=(RES, RES)):
  """An RGB image whose pixels all equal `value` (identifies the record after a crop)."""
  return Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8))


def _encoded(img, fmt):
  buf = io.BytesIO()
  img.save(buf, fmt)
  return buf.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """A folder tree of small real photos in every accepted format, and a non-image file."""
  root = tmp_path_factory.mktemp("photos")
  (root / "sub" / "deeper").mkdir(parents=True)
  names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field"]
  exts = [".png", ".jpg", ".jpeg", ".webp", ".bmp"]
  for i, (name, ext) in enumerate(zip(names, exts)):
    folder = [root, root / "sub", root / "sub" / "deeper"][i % 3]
    Image.fromarray(getattr(skdata, name)()).resize((24, 20)).save(folder / f"{name}{ext}")
  (root / "notes.txt").write_text("not an image")
  return root


def _id_folder(root, ids):
  """A folder of solid images, one per id (pixel value = id)."""
  root.mkdir(parents=True, exist_ok=True)
  for i in ids:
    _solid(i).save(root / f"{i:03d}.png")
  return str(root)


def test_folder_recursive_batches(photos):
  source = sources.open_source(sources.SourceSpec(path=str(photos)))
  assert len(source) == 5  # All five extensions, in sub-folders; notes.txt is ignored.
  # One folder given as a plain string (the CLI form) is a single source.
  it = pipeline.make_train_iterator(_config(str(photos)), 3, process_index=0, process_count=1)
  for _ in range(4):  # Past one epoch: the stream repeats.
    batch = next(it)
    assert batch["hq"].shape == (3, RES, RES, 3) and batch["hq"].dtype == np.uint8


def test_upscale_and_crop_follow_spec_7_2(tmp_path):
  img = Image.fromarray(skdata.astronaut()).resize((30, 12))  # Short side 12 < RES.
  img.save(tmp_path / "small.png")
  ds = pipeline.make_dataset(_config([str(tmp_path)], resolution=24), process_index=0,
                             process_count=1)
  big = np.asarray(img.resize((60, 24), Image.BICUBIC))  # Short side to 24, sizes rounded.
  windows = {big[:, x:x + 24].tobytes() for x in range(60 - 24 + 1)}
  crops = [ds[i]["hq"] for i in range(20)]
  assert all(c.shape == (24, 24, 3) and c.tobytes() in windows for c in crops)
  assert len({c.tobytes() for c in crops}) > 1  # The crop position is random.


def test_flip_off_by_default_and_optional():
  image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
  rng = np.random.default_rng(0)
  assert all((pipeline.random_crop(image, 4, rng) == image).all() for _ in range(10))
  flips = [(pipeline.random_crop(image, 4, rng, flip=True) == image[:, ::-1]).all()
           for _ in range(40)]
  assert 5 < sum(flips) < 35


def test_mixing_frequencies_follow_weights(tmp_path):
  # Sizes 30 and 70: grain's index shuffle is slow on sources of a few records (~10 ms a draw).
  a = _id_folder(tmp_path / "a", range(10, 40))
  b = _id_folder(tmp_path / "b", range(150, 220))
  list_file = tmp_path / "train_list.txt"
  list_file.write_text(f"# official format\n{a}, 1\n\nb, 3\n")  # Relative to the list file.
  for srcs in (str(list_file), [f"{a}, 1", {"path": b, "weight": 3}]):
    ds = pipeline.make_dataset(_config(srcs), process_index=0, process_count=1)
    from_b = np.mean([ds[i]["hq"][0, 0, 0] >= 150 for i in range(200)])
    assert abs(from_b - 0.75) < 0.02
  # txt-mode semantics: weight x size.
  ds = pipeline.make_dataset(_config(str(list_file), weight_by_size=True), process_index=0,
                             process_count=1)
  from_b = np.mean([ds[i]["hq"][0, 0, 0] >= 150 for i in range(200)])
  assert abs(from_b - 210 / 240) < 0.02


def test_process_shards_disjoint_and_cover(tmp_path):
  ids = list(range(1, 11))
  folder = _id_folder(tmp_path / "ids", ids)
  seen = []
  for p in range(3):
    ds = pipeline.make_dataset(_config([folder], seed=p), process_index=p, process_count=3)
    shard_size = len(range(p, len(ids), 3))
    epoch = [int(ds[i]["hq"][0, 0, 0]) for i in range(shard_size)]
    assert len(set(epoch)) == shard_size  # One epoch is a permutation of the shard.
    next_epoch = [int(ds[i]["hq"][0, 0, 0]) for i in range(shard_size, 2 * shard_size)]
    assert sorted(next_epoch) == sorted(epoch)  # Shards stay fixed across epochs.
    seen.append(set(epoch))
  assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
  assert set.union(*seen) == set(ids)


def test_resume_in_process_and_through_orbax(photos, tmp_path):
  config = _config([str(photos)], seed=3)
  it = pipeline.make_train_iterator(config, 2, process_index=0, process_count=1)
  for _ in range(3):
    next(it)
  state = it.get_state()
  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  manager.save(7, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = [next(it)["hq"] for _ in range(4)]
  it.set_state(state)
  assert all((next(it)["hq"] == e).all() for e in expected)
  fresh = pipeline.make_train_iterator(config, 2, process_index=0, process_count=1)
  manager.restore(7, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  assert all((next(fresh)["hq"] == e).all() for e in expected)


def test_resume_with_worker_processes_through_orbax(photos, tmp_path):
  config = _config([str(photos)], seed=5, num_workers=2)
  it = pipeline.make_train_iterator(config, 2, process_index=0, process_count=1)
  for _ in range(3):
    next(it)
  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  manager.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = [next(it)["hq"] for _ in range(4)]
  fresh = pipeline.make_train_iterator(config, 2, process_index=0, process_count=1)
  manager.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  assert all((next(fresh)["hq"] == e).all() for e in expected)


def _bad_inputs(root):
  """The bad-input table: name -> (bytes, expected outcome)."""
  photo = Image.fromarray(skdata.chelsea()).resize((24, 20))
  jpeg = _encoded(photo, "JPEG")
  gray16 = Image.fromarray(np.array([[65535, 25700] * 10] * 20, np.uint16))
  table = {
      "good.jpg": (jpeg, "ok"),
      "corrupt.jpg": (jpeg[:20] + bytes(200) + jpeg[220:], "skipped"),
      "truncated.jpg": (jpeg[: len(jpeg) // 2], "skipped"),
      "zero.png": (b"", "skipped"),
      "text.png": (b"this is not an image\n", "skipped"),
      "gray.png": (_encoded(photo.convert("L"), "PNG"), "converted"),
      "rgba.png": (_encoded(photo.convert("RGBA"), "PNG"), "converted"),
      "palette.png": (_encoded(photo.convert("P"), "PNG"), "converted"),
      "gray16.png": (_encoded(gray16, "PNG"), "converted"),
      "small.bmp": (_encoded(photo.resize((9, 7)), "BMP"), "upscaled"),
  }
  root.mkdir()
  for name, (content, _) in table.items():
    (root / name).write_bytes(content)
  return table


def test_bad_inputs_converted_or_skipped_with_counted_warnings(tmp_path, caplog):
  table = _bad_inputs(tmp_path / "bad")
  source = sources.open_source(sources.SourceSpec(path=str(tmp_path / "bad")))
  transform = pipeline.DecodeCrop([source], [len(source)], RES, False, warn_every=2)
  rng = np.random.default_rng(0)
  with caplog.at_level(logging.WARNING):
    outputs = {os.path.basename(source.key(i)): transform.random_map((0, i), rng)
               for i in range(len(source))}
  for name, (_, outcome) in table.items():
    out = outputs[name]
    assert (out is None) == (outcome == "skipped"), name
    if out is not None:
      assert out["hq"].shape == (RES, RES, 3) and out["hq"].dtype == np.uint8, name
  assert transform.counts["skipped"] == 4
  assert transform.counts["converted to RGB"] == 4
  assert transform.counts["upscaled"] == 1
  skip_logs = [r for r in caplog.records if "skipped" in r.getMessage()]
  assert len(skip_logs) == 3  # Logged at counts 1, 2 and 4 (warn_every=2).
  # 16-bit values are scaled from the 16-bit range, not clipped.
  assert set(np.unique(outputs["gray16.png"]["hq"])) <= {255, 100}
  # The whole pipeline runs on the folder.
  it = pipeline.make_train_iterator(_config([str(tmp_path / "bad")]), 4, process_index=0,
                                    process_count=1)
  assert next(it)["hq"].shape == (4, RES, RES, 3)


def test_source_without_usable_image_is_a_clear_error(tmp_path):
  bad = tmp_path / "all_bad"
  bad.mkdir()
  for i in range(3):
    (bad / f"{i}.jpg").write_bytes(b"garbage")
  it = pipeline.make_train_iterator(_config([str(bad)]), 2, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="all_bad.*yielded no usable image"):
    next(it)


def test_configuration_errors_name_the_problem(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "readme.md").write_text("no images")
  with pytest.raises(ValueError, match="empty.*contains no image files"):
    pipeline.make_dataset(_config([str(empty)]), process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    pipeline.make_dataset(_config([str(tmp_path / "nowhere")]), process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match="missing_list.txt"):
    pipeline.make_dataset(_config(str(tmp_path / "missing_list.txt")))
  malformed = tmp_path / "list.txt"
  malformed.write_text(f"{empty}, 1\n{empty}, heavy\n")
  with pytest.raises(ValueError, match=r"list.txt:2: .*'path, weight'"):
    pipeline.make_dataset(_config(str(malformed)))
  with pytest.raises(ValueError, match="weights must be positive"):
    pipeline.make_dataset(_config([f"{empty}, 0"]))
  with pytest.raises(ValueError, match="config.data.sources is not set"):
    pipeline.make_dataset(data_configs.get_config())
  few = _id_folder(tmp_path / "few", [1, 2])
  with pytest.raises(ValueError, match="fewer than the 3 processes"):
    pipeline.make_dataset(_config([few]), process_index=2, process_count=3)


def test_webdataset_tar_shards(tmp_path):
  values = iter(range(1, 100))
  shards = []
  for s in range(2):
    shards.append(tmp_path / f"shard-{s:06d}.tar")
    with tarfile.open(shards[-1], "w") as tar:
      for k in range(3):
        for name, content in ((f"{s}_{k}.jpg", _encoded(_solid(next(values)), "PNG")),
                              (f"{s}_{k}.cls", b"0"), (f"{s}_{k}.extra.png", b"second image")):
          info = tarfile.TarInfo(name)
          info.size = len(content)
          tar.addfile(info, io.BytesIO(content))
  pattern = str(tmp_path / "shard-{000000..000001}.tar")
  source = sources.open_source(sources.SourceSpec(path=pattern))
  assert len(source) == 6  # One image per sample key; .cls and the second image are ignored.
  assert Image.open(io.BytesIO(source.read(4))).getpixel((0, 0)) == (5, 5, 5)
  ds = pipeline.make_dataset(_config([pattern, str(tmp_path / "*.tar")]), process_index=0,
                             process_count=1)
  assert {int(ds[i]["hq"][0, 0, 0]) for i in range(24)} == set(range(1, 7))


class TinyHqImages(tfds.core.GeneratorBasedBuilder):
  """Five solid images in a `Tensor(uint8)` feature: an array_record dataset built without TF."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    image = tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib")
    features = tfds.features.FeaturesDict({"image": image})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(5):
      yield i, {"image": np.full((RES + i, RES + 2, 3), 50 + i, np.uint8)}


def test_tfds_array_record_source_without_tensorflow(tmp_path, photos):
  data_dir = str(tmp_path / "tfds")
  TinyHqImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  ds = pipeline.make_dataset(_config(["tfds:tiny_hq_images:train"], tfds_data_dir=data_dir),
                             process_index=0, process_count=1)
  assert {int(ds[i]["hq"][0, 0, 0]) for i in range(5)} == set(range(50, 55))
  config = _config([{"tfds": "tiny_hq_images", "data_dir": data_dir, "weight": 1},
                    {"path": str(photos), "weight": 1}])
  it = pipeline.make_train_iterator(config, 4, process_index=0, process_count=1)
  assert next(it)["hq"].shape == (4, RES, RES, 3)
  assert "tensorflow" not in sys.modules


def test_benchmark_pipeline_reports_throughput(photos):
  result = pipeline.benchmark_pipeline(str(photos), _config(None), batch_size=2, num_batches=2,
                                       warmup_batches=1)
  assert result["images"] == 4 and result["batch_size"] == 2
  assert result["images_per_s"] == pytest.approx(2 / result["median_s"])
