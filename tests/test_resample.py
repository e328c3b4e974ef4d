"""The CPU pipelines' resampler (``dali_scp.resample``: torch) against DALI's ``fn.resize`` over the same
source region, which the GPU pipelines keep; and both inside the pipeline: the same seed draws the same
geometry whichever resamples, so masks, boxes, labels and geometry agree bit for bit."""
import numpy as np
import pytest

from dali_scp.resample import Resampler, Window

S = 96  # canvas


def _cases():
    """(image h, w, window) as the jitter draws them (``pipelines.blocks.scale_jitter``: each axis resized
    to whole pixels, so a scale per axis; the offset uniform over 0..margin): downscales down to 0.12
    (antialiasing), upscales, flips, windows on either edge, a scale of exactly 1, and windows whose rows
    (columns) end where the image does while the scale is not 1 (torch keeps such a dimension unresampled
    unless told otherwise)."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(24):
        h, w = int(rng.integers(40, 160)), int(rng.integers(40, 160))
        r = [0.12, 0.45, 0.93, 1.0, 1.31, 2.6][k % 6]
        nh, nw = max(int(np.floor(h * r + 0.5)), 1), max(int(np.floor(w * r + 0.5)), 1)
        oh, ow = min(nh, S), min(nw, S)
        top = int(np.floor(rng.random() * (nh - oh + 1)))
        left = int(np.floor(rng.random() * (nw - ow + 1)))
        out.append((h, w, nh / h, nw / w, top, left, oh, ow, bool(k % 4 >= 2)))
    out.append((100, 70, 1.1, 77 / 70, 10, 3, 90, 70, False))   # top + height == h, scale 1.1
    out.append((60, 100, 54 / 60, 0.9, 0, 10, 54, 80, True))    # left + width == 90 columns of the resized image
    out.append((50, 64, 1.5, 1.5, 10, 14, 40, 50, True))        # both end on the image's last row and column
    out.append((41, 57, 5 / 41, 7 / 57, 0, 0, 5, 7, False))     # the axes' scales 0.122 and 0.123
    return out


def _window(h, w, sy, sx, top, left, oh, ow, flip) -> Window:
    y0, y1, x0, x1 = top / sy, (top + oh) / sy, left / sx, (left + ow) / sx
    if flip:
        x0, x1 = x1, x0
    return Window(y1, x1, y0, x0, oh, ow, sy, sx, top, left, flip)


def _dali_resize(images, windows):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None)
    def pipe():
        imgs = fn.external_source(source=[images], cycle=True, layout="HWC")
        start = fn.external_source(source=[[np.float32([w.y0, w.x0]) for w in windows]], cycle=True)
        end = fn.external_source(source=[[np.float32([w.y1, w.x1]) for w in windows]], cycle=True)
        size = fn.external_source(source=[[np.float32([w.height, w.width]) for w in windows]], cycle=True)
        return fn.resize(imgs, size=size, roi_start=start, roi_end=end, interp_type=types.INTERP_LINEAR,
                         antialias=True)

    p = pipe()
    p.build()
    return [np.array(t) for t in p.run()[0]]


def test_torch_resampling_equals_dalis_resize_over_the_same_region():
    rng = np.random.default_rng(1)
    cases = _cases()
    images, windows = [], []
    for h, w, *rest in cases:
        yy, xx = np.mgrid[0:h, 0:w]  # smooth ramps, sharp blocks and noise: every frequency
        img = np.stack([(xx * 7) % 256, (yy * 5) % 256, ((xx + 2 * yy) * 3) % 256], -1).astype(np.int16)
        img[h // 4: h // 2, w // 3: 2 * w // 3] = (250, 10, 128)
        images.append(np.clip(img + rng.integers(-25, 26, img.shape), 0, 255).astype(np.uint8))
        windows.append(_window(h, w, *rest))
    expected = _dali_resize(images, windows)
    resample = Resampler()
    for img, win, want in zip(images, windows, expected):
        out = np.full((S, S, 3), 7, np.uint8)
        resample(img, win, out, pad_value=3)
        got = out[:win.height, :win.width]
        assert got.shape == want.shape, win
        d = np.abs(got.astype(np.int16) - want.astype(np.int16))
        # rounding inside (torch's 16-bit fixed-point weights, DALI's floats); on the outermost rows and
        # columns a downscale's filter (1 / scale source pixels wide) reaches past the image, which the
        # two libraries extend differently
        assert d[1:-1, 1:-1].max(initial=0) <= 1, (win, d[1:-1, 1:-1].max())
        assert d.max() <= 32, (win, d.max())
        assert (out[win.height:] == 3).all() and (out[:, win.width:] == 3).all(), "padding"


@pytest.mark.parametrize("name", ["ssj_scp", "lsj"])
def test_either_resampler_gives_the_same_geometry_and_targets(name, syn_train):
    """The GPU pipelines resample with DALI, the CPU ones with torch: one seed must still draw the same
    crops, flips and pastes in both (DALI seeds its random operators by their place in the graph)."""
    from pipelines import coco, stages
    out = {}
    for resampler in ("dali", "torch"):
        pipe = coco.build(name, syn_train, batch_size=4, seed=5, out_size=192, resampler=resampler)
        out[resampler] = [[[np.array(t) for t in o] for o in pipe.run()] for _ in range(3)]
        stages.raise_if_failed()
    from pipelines.outputs import OUTPUTS
    for a, b in zip(out["dali"], out["torch"]):
        for k, name_ in enumerate(OUTPUTS):
            for x, y in zip(a[k], b[k]):
                if name_ == "images":
                    d = np.abs(x.astype(np.int16) - y.astype(np.int16))
                    assert d.mean() < 0.5 and np.quantile(d, 0.999) <= 2, (d.mean(), d.max())
                else:
                    np.testing.assert_array_equal(x, y, err_msg=name_)
    flips = [float(g[3]) for batch in out["torch"] for g in batch[OUTPUTS.index("geometry")]]
    assert 0 < sum(flips) < len(flips), "some samples flipped, some not"
