"""MetricWriter: JSONL lines, sample PNGs and TensorBoard event files (tensorboardX, no TensorFlow)."""
import glob
import json
import os
import struct
import sys

import numpy as np
from PIL import Image
from tensorboardX.proto import event_pb2

from vosr_jax import logging_utils


def test_writes_jsonl_png_and_tensorboard_events(tmp_path):
  writer = logging_utils.MetricWriter(str(tmp_path))
  writer.write_scalars(3, {"train/loss": np.float32(0.5), "perf/img_per_sec": 12})
  writer.write_scalars(4, {"train/loss": 0.25})
  image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
  writer.write_image(4, "eval_lr_sr_hr", image)
  writer.close()
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [(l["step"], l["train/loss"]) for l in lines] == [(3, 0.5), (4, 0.25)]
  assert lines[0]["perf/img_per_sec"] == 12.0
  np.testing.assert_array_equal(
      np.asarray(Image.open(tmp_path / "samples" / "eval_lr_sr_hr_00000004.png")), image)
  events = glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
  assert len(events) == 1
  assert ("train/loss", 4, 0.25) in set(_scalars(events[0]))
  assert "tensorflow" not in sys.modules


def _scalars(path):
  """(tag, step, value) of every scalar in a TFRecord event file (length, crc, data, crc)."""
  data = open(path, "rb").read()
  pos = 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
    pos += 12 + length + 4
    for value in event.summary.value:
      if value.HasField("simple_value"):
        yield value.tag, event.step, value.simple_value
