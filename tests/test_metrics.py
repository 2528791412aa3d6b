"""PSNR/SSIM/NIQE against skimage, OpenCV transcriptions of BasicSR, Pillow, SciPy and BasicSR.

BasicSR's own code is used when `basicsr` is importable or when BASICSR_SRC names an extracted
basicsr 1.4.2 sdist (`pip download --no-deps basicsr==1.4.2`); those tests are skipped otherwise.
"""
import importlib.util
import io
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import color, data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vosr_jax import metrics as M

cv2 = pytest.importorskip("cv2")

CROP = 4


def _bicubic_x4(img):
  im = Image.fromarray(img)
  w, h = im.size
  return np.asarray(im.resize((w // 4, h // 4), Image.BICUBIC).resize((w, h), Image.BICUBIC))


def _jpeg(img, quality=30):
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, "JPEG", quality=quality)
  return np.asarray(Image.open(buf).convert("RGB"))


@pytest.fixture(scope="module")
def pairs():
  """(name, pred, gt): real photos degraded by bicubic x4 down/up and by JPEG q30."""
  out = []
  for name in ("astronaut", "coffee"):
    gt = getattr(data, name)()
    out += [(f"{name}-bicubic", _bicubic_x4(gt), gt), (f"{name}-jpeg", _jpeg(gt), gt)]
  return out


@pytest.fixture(scope="module")
def niqe_params():
  if not M.DEFAULT_NIQE_PARAMS.is_file():
    pytest.skip(f"packaged NIQE parameters absent: {M.DEFAULT_NIQE_PARAMS}")
  return M.load_niqe_params(M.DEFAULT_NIQE_PARAMS)


# BasicSR 1.4.2 definitions (metrics/psnr_ssim.py, metric_util.py, utils/color_util.py),
# transcribed with OpenCV. Inputs are BGR as in BasicSR; Y is computed in float32 as there.
def _bsr_to_y(img):
  img = img.astype(np.float32) / 255.0
  y = (np.dot(img, [24.966, 128.553, 65.481]) + 16.0) / 255.0
  return (y.astype(np.float32) * 255.0)[..., None]


def _bsr_prepare(img, img2, crop, y):
  img, img2 = (a[crop:-crop, crop:-crop] for a in (img, img2))
  if y:
    img, img2 = _bsr_to_y(img), _bsr_to_y(img2)
  return img.astype(np.float64), img2.astype(np.float64)


def _bsr_psnr(img, img2, crop, y):
  img, img2 = _bsr_prepare(img, img2, crop, y)
  return 10.0 * np.log10(255.0**2 / np.mean((img - img2) ** 2))


def _bsr_filter(x, window):
  return cv2.filter2D(x, -1, window)[5:-5, 5:-5]  # valid region of the 11x11 window


def _bsr_ssim(img, img2, crop, y):
  img, img2 = _bsr_prepare(img, img2, crop, y)
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  kernel = cv2.getGaussianKernel(11, 1.5)
  window = np.outer(kernel, kernel.transpose())
  vals = []
  for a, b in zip(np.moveaxis(img, -1, 0), np.moveaxis(img2, -1, 0)):
    mu1, mu2 = _bsr_filter(a, window), _bsr_filter(b, window)
    s1 = _bsr_filter(a * a, window) - mu1**2
    s2 = _bsr_filter(b * b, window) - mu2**2
    s12 = _bsr_filter(a * b, window) - mu1 * mu2
    vals.append((((2 * mu1 * mu2 + c1) * (2 * s12 + c2))
                 / ((mu1**2 + mu2**2 + c1) * (s1 + s2 + c2))).mean())
  return np.mean(vals)


@pytest.mark.parametrize("y_channel", [True, False])
def test_psnr_ssim_match_basicsr_definition(pairs, y_channel):
  for name, pred, gt in pairs:
    bgr_pred, bgr_gt = pred[..., ::-1], gt[..., ::-1]
    assert M.psnr(pred, gt, CROP, y_channel) == pytest.approx(
        _bsr_psnr(bgr_pred, bgr_gt, CROP, y_channel), abs=1e-4), name
    assert M.ssim(pred, gt, CROP, y_channel) == pytest.approx(
        _bsr_ssim(bgr_pred, bgr_gt, CROP, y_channel), abs=1e-4), name


def test_psnr_ssim_match_skimage(pairs):
  crop = lambda a: a[CROP:-CROP, CROP:-CROP]
  ssim_kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
  for name, pred, gt in pairs:
    assert M.psnr(pred, gt, CROP, False) == pytest.approx(
        peak_signal_noise_ratio(crop(gt), crop(pred), data_range=255), abs=1e-4), name
    assert M.ssim(pred, gt, CROP, False) == pytest.approx(structural_similarity(
        crop(gt).astype(np.float64), crop(pred).astype(np.float64), channel_axis=-1,
        **ssim_kw), abs=1e-4), name
    # skimage's rgb2ycbcr is the same BT.601 conversion, computed independently.
    y_pred, y_gt = (crop(color.rgb2ycbcr(a))[..., 0] for a in (pred, gt))
    assert M.psnr(pred, gt, CROP, True) == pytest.approx(
        peak_signal_noise_ratio(y_gt, y_pred, data_range=255), abs=1e-4), name
    assert M.ssim(pred, gt, CROP, True) == pytest.approx(
        structural_similarity(y_gt, y_pred, **ssim_kw), abs=1e-4), name


def test_rgb_to_y_is_bt601():
  img = data.astronaut()
  np.testing.assert_allclose(M.rgb_to_y(img), color.rgb2ycbcr(img)[..., 0], atol=1e-9)
  np.testing.assert_allclose(M.rgb_to_y(np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8)),
                             [[16.0, 235.0]])
  with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
    M.rgb_to_y(np.zeros((4, 4)))


def test_float_and_uint8_inputs_agree(pairs):
  _, pred, gt = pairs[0]
  assert M.psnr(pred.astype(np.float32), gt.astype(np.float64), CROP, True) == pytest.approx(
      M.psnr(pred, gt, CROP, True), abs=1e-9)
  assert M.ssim(pred[..., 0], gt[..., 0]) == pytest.approx(
      M.ssim(pred[..., :1], gt[..., :1]), abs=1e-12)


def test_edge_cases(pairs):
  _, pred, gt = pairs[0]
  assert M.psnr(gt, gt, CROP, True) == float("inf")
  assert M.ssim(gt, gt, CROP, True) == pytest.approx(1.0)
  with pytest.raises(ValueError, match=r"shapes differ.*\(512, 512, 3\).*\(512, 500, 3\)"):
    M.psnr(pred, gt[:, :500])
  with pytest.raises(ValueError, match="crop_border 8 leaves nothing"):
    M.ssim(pred[:16, :16], gt[:16, :16], crop_border=8)
  with pytest.raises(ValueError, match="at least 11x11"):
    M.ssim(pred[:18, :18], gt[:18, :18], crop_border=4)


def test_matlab_resize_matches_pillow_interior():
  # Pillow's antialiased bicubic (a = -0.5) equals MATLAB's away from the borders, where
  # Pillow renormalises the truncated kernel instead of reflecting.
  y = M.rgb_to_y(data.astronaut()).round()
  resize = M._matlab_resize_axis
  ours = resize(resize(y, 0.5, 0), 0.5, 1)
  pil = np.asarray(Image.fromarray(y.astype(np.float32), "F").resize((256, 256), Image.BICUBIC))
  assert ours.shape == (256, 256)
  np.testing.assert_allclose(ours[4:-4, 4:-4], pil[4:-4, 4:-4], atol=1e-3)


def test_mscn_filter_matches_scipy(niqe_params):
  ndimage = pytest.importorskip("scipy.ndimage")
  y = M.rgb_to_y(data.coffee()).round()
  np.testing.assert_allclose(
      M._filter_nearest(y, niqe_params.window),
      ndimage.convolve(y, niqe_params.window, mode="nearest"), atol=1e-9)


def test_niqe_separates_sharp_from_blurred(niqe_params):
  for name in ("astronaut", "coffee"):
    hr = getattr(data, name)()
    sharp, blurred = M.niqe(hr, niqe_params, CROP), M.niqe(_bicubic_x4(hr), niqe_params, CROP)
    assert 2.0 < sharp < blurred < 12.0, (name, sharp, blurred)


def test_niqe_params_loading(tmp_path, monkeypatch, niqe_params):
  assert niqe_params.mu.shape == (36,) and niqe_params.cov.shape == (36, 36)
  assert niqe_params.window.shape == (7, 7)
  missing = tmp_path / "nope.npz"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    M.load_niqe_params(missing)
  monkeypatch.setenv(M.NIQE_PARAMS_ENV, str(missing))
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    M.load_niqe_params()
  bad = tmp_path / "bad.npz"
  np.savez(bad, mu_pris_param=niqe_params.mu)
  with pytest.raises(ValueError, match="cov_pris_param"):
    M.load_niqe_params(bad)


def test_niqe_needs_two_blocks(niqe_params):
  with pytest.raises(ValueError, match="two 96x96 blocks"):
    M.niqe(data.astronaut()[:150, :150], niqe_params)


def _basicsr_niqe_module():
  """basicsr.metrics.niqe from an installed basicsr or from the sdist at $BASICSR_SRC."""
  if importlib.util.find_spec("basicsr") is not None:
    return importlib.import_module("basicsr.metrics.niqe")
  src = os.environ.get("BASICSR_SRC")
  if not src or not (Path(src) / "basicsr/metrics/niqe.py").is_file():
    pytest.skip("BasicSR not importable and BASICSR_SRC does not name an extracted sdist")
  pytest.importorskip("torch")
  pytest.importorskip("scipy.ndimage")
  root = Path(src) / "basicsr"
  # The package __init__ imports torchvision and all of BasicSR; stub it, load the 4 files needed.
  registry = types.SimpleNamespace(register=lambda *a, **k: (lambda f: f))
  stubs = {name: types.ModuleType(name) for name in ("basicsr", "basicsr.utils", "basicsr.metrics")}
  for pkg in stubs.values():
    pkg.__path__ = []
  stubs["basicsr.utils.registry"] = types.SimpleNamespace(METRIC_REGISTRY=registry)
  saved = {k: sys.modules.get(k) for k in list(stubs) + [
      "basicsr.utils.color_util", "basicsr.utils.matlab_functions", "basicsr.metrics.metric_util",
      "basicsr.metrics.niqe"]}
  sys.modules.update(stubs)
  try:
    mods = {}
    for name, rel in (("basicsr.utils.color_util", "utils/color_util.py"),
                      ("basicsr.utils.matlab_functions", "utils/matlab_functions.py"),
                      ("basicsr.metrics.metric_util", "metrics/metric_util.py"),
                      ("basicsr.metrics.niqe", "metrics/niqe.py")):
      if name == "basicsr.metrics.metric_util":
        stubs["basicsr.utils"].bgr2ycbcr = mods["basicsr.utils.color_util"].bgr2ycbcr
      spec = importlib.util.spec_from_file_location(name, root / rel)
      mods[name] = sys.modules[name] = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(mods[name])
    return mods["basicsr.metrics.niqe"]
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_niqe_matches_basicsr(niqe_params):
  bsr = _basicsr_niqe_module()
  for name in ("astronaut", "coffee", "chelsea"):
    for img in (getattr(data, name)(), _bicubic_x4(getattr(data, name)())):
      y = M.rgb_to_y(img)[CROP:-CROP, CROP:-CROP].round()
      ours = M.niqe(y, niqe_params)
      # Same Y in float64: BasicSR then differs only by its float32 MATLAB-imresize.
      ref64 = bsr.niqe(y, niqe_params.mu[None], niqe_params.cov, niqe_params.window)
      assert ours == pytest.approx(ref64, rel=5e-3), name
      # End to end BasicSR runs in float32 (MSCN and resize); the AGGD grid search turns that
      # into up to ~1% on images with flat regions. Ours is float64, as MATLAB and pyiqa.
      ref = bsr.calculate_niqe(img[..., ::-1], CROP)
      assert M.niqe(img, niqe_params, CROP) == pytest.approx(ref, rel=1.5e-2), name


# Flat-region noise and detail sharpness, against SciPy references written from the definitions.
def _scipy_regions(gt_y):
  ndimage = pytest.importorskip("scipy.ndimage")
  blur = lambda x, s: ndimage.gaussian_filter(x, s, mode="nearest", truncate=3.0)
  act = np.sqrt(np.maximum(blur(gt_y**2, 3.0) - blur(gt_y, 3.0) ** 2, 0))
  flat, detail = act <= np.quantile(act, 0.25), act >= np.quantile(act, 0.75)
  return (lambda x: x - blur(x, 1.5)), flat, detail


def _scipy_energy_ratio(pred_y, gt_y, region):
  highpass, flat, detail = _scipy_regions(gt_y)
  mask = flat if region == "flat" else detail
  return np.mean(highpass(pred_y)[mask] ** 2) / max(np.mean(highpass(gt_y)[mask] ** 2), 1.0)


def _scipy_gsim(pred_y, gt_y):
  ndimage = pytest.importorskip("scipy.ndimage")
  grads = [[ndimage.prewitt(y, axis=a, mode="nearest") / 3 for a in (0, 1)]
           for y in (pred_y, gt_y)]
  (p0, p1), (g0, g1) = grads
  gsim = (2 * (p0 * g0 + p1 * g1) + 170) / (p0**2 + p1**2 + g0**2 + g1**2 + 170)
  return gsim[_scipy_regions(gt_y)[2]].mean()


def _gaussian_rgb(img, sigma):
  ndimage = pytest.importorskip("scipy.ndimage")
  return ndimage.gaussian_filter(img.astype(np.float64), (sigma, sigma, 0), mode="nearest")


def _noisy(img, std, mask=None, seed=0):
  noise = np.random.default_rng(seed).normal(0, std, img.shape)
  if mask is not None:
    noise *= mask[..., None]
  return np.clip(img + noise, 0, 255)


@pytest.fixture(scope="module")
def chelsea():
  return data.chelsea()


def test_region_metrics_match_scipy_definitions(pairs):
  for name, pred, gt in pairs:
    y_pred, y_gt = (M.rgb_to_y(a)[CROP:-CROP, CROP:-CROP] for a in (pred, gt))
    assert M.flat_noise(pred, gt, CROP) == pytest.approx(
        _scipy_energy_ratio(y_pred, y_gt, "flat"), rel=1e-9), name
    assert M.detail_hf(pred, gt, CROP) == pytest.approx(
        _scipy_energy_ratio(y_pred, y_gt, "detail"), rel=1e-9), name
    assert M.detail_gsim(pred, gt, CROP) == pytest.approx(_scipy_gsim(y_pred, y_gt), rel=1e-9), name


def test_local_activity_of_a_step_edge():
  y = np.zeros((40, 40))
  y[:, 20:] = 100.0
  act = M.local_activity(y)
  assert act[:, :5].max() == pytest.approx(0.0, abs=1e-9)   # 15+ px from the edge: flat
  assert act[:, 19:21].min() == pytest.approx(50.0, rel=0.02)  # at the edge: std of 0 and 100


def test_region_metrics_of_the_reference_itself(chelsea):
  for fn in (M.flat_noise, M.detail_hf, M.detail_gsim):
    assert fn(chelsea, chelsea, CROP) == pytest.approx(1.0)
  # A grey (H, W) image is taken as Y; a brightness offset adds no high-pass energy.
  y = M.rgb_to_y(chelsea)
  assert M.detail_gsim(y + 1, y, CROP) == pytest.approx(M.detail_gsim(chelsea, chelsea, CROP))
  assert M.flat_noise(y + 1, y, CROP) == pytest.approx(1.0)
  # A textureless HR divides by the floor (1 grey level^2), not by 0.
  flat = np.full((32, 32), 128.0)
  assert M.flat_noise(flat, flat) == pytest.approx(0.0, abs=1e-12)
  noise = np.random.default_rng(0).normal(0, 1, flat.shape)
  assert M.flat_noise(flat + noise, flat) == pytest.approx(
      np.mean((noise - M._gaussian_blur(noise, 1.5)) ** 2))


def test_noise_in_flat_areas_raises_flat_noise_only(chelsea):
  flat = M.local_activity(M.rgb_to_y(chelsea)) <= np.quantile(
      M.local_activity(M.rgb_to_y(chelsea)), 0.25)
  scores = [M.flat_noise(_noisy(chelsea, s, flat), chelsea, CROP) for s in (0, 2, 4, 8)]
  assert scores[0] == pytest.approx(1.0) and scores[-1] > 5
  assert all(a < b for a, b in zip(scores, scores[1:])), scores
  noisy = _noisy(chelsea, 8, flat)
  assert M.detail_hf(noisy, chelsea, CROP) == pytest.approx(1.0, abs=0.05)


def test_blur_lowers_every_score_and_noise_lowers_gsim(pairs, chelsea):
  for fn in (M.flat_noise, M.detail_hf, M.detail_gsim):
    scores = [fn(_gaussian_rgb(chelsea, s), chelsea, CROP) for s in (0.5, 1, 2, 4)]
    assert 1 > scores[0] and all(a > b for a, b in zip(scores, scores[1:])), (fn, scores)
  for name, pred, gt in pairs:  # bicubic x4 and JPEG q30: both smoother than the HR
    assert M.flat_noise(pred, gt, CROP) < 1 and M.detail_hf(pred, gt, CROP) < 1, name
  # Noise everywhere lowers the gradient similarity of the HR and of a blurred image alike: it
  # is not rewarded as the magnitude-only GMS would reward it on a blurred image.
  bicubic = _bicubic_x4(chelsea)
  for base in (chelsea, bicubic):
    scores = [M.detail_gsim(_noisy(base, s), chelsea, CROP) for s in (0, 2, 5, 10, 20)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores


def test_region_metric_errors(chelsea):
  with pytest.raises(ValueError, match=r"flat_noise: image shapes differ"):
    M.flat_noise(chelsea[:, :100], chelsea)
  with pytest.raises(ValueError, match="detail_gsim: expected an .* 4 channels"):
    M.detail_gsim(np.zeros((20, 20, 4)), np.zeros((20, 20, 4)))
