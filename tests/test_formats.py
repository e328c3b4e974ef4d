"""What real exports contain: PNG (RGB, RGBA, palette, grayscale, 16-bit), grayscale, CMYK, progressive
and ICC-tagged JPEGs decode in the pipelines into the RGB image expected; what DALI cannot decode that
way (GIF, float TIFF, TIFF with an Orientation tag) is reported by the check up front and excluded."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from dali_scp.check import check, checked_annotations
from quirks import save_with_orientation, write_coco

H, W = 48, 64


def _content() -> np.ndarray:
    a = np.zeros((H, W, 3), np.uint8)
    a[:, : W // 2] = (200, 30, 60)
    a[:, W // 2:] = (20, 180, 240)
    a[: H // 3] = (250, 250, 10)
    a[H // 2:, :12] = (0, 0, 0)
    a[H // 2:, 12:20] = np.linspace(0, 255, H - H // 2, dtype=np.uint8)[:, None, None]
    return a


def _png16(v: np.ndarray) -> bytes:
    """16-bit PNG (PIL writes 16-bit grayscale only): colour type 2 for [h, w, 3], 0 for [h, w]."""
    h, w = v.shape[:2]
    raw = b"".join(b"\0" + v[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2 if v.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def formats_root(tmp_path_factory):
    """file name -> expected RGB (None: must be reported as unsupported)."""
    root = tmp_path_factory.mktemp("formats")
    d = root / "train2017"
    d.mkdir()
    rgb = Image.fromarray(_content())
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    v16 = (_content().astype(np.uint16) * 257 + np.arange(W, dtype=np.uint16)[None, :, None] * 3)
    expected = {}

    def keep(name, img=None, lossy=False, **kw):
        if img is not None:
            img.save(d / name, **kw)
        expected[name] = (np.asarray(Image.open(d / name).convert("RGB")), lossy)

    keep("rgb.png", rgb)
    keep("rgba.png", rgb.convert("RGBA"))
    keep("palette.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    keep("gray.png", rgb.convert("L"))
    (d / "rgb16.png").write_bytes(_png16(v16))
    expected["rgb16.png"] = (np.round(v16 / 257).astype(np.uint8), False)
    (d / "gray16.png").write_bytes(_png16(v16[..., 0]))
    expected["gray16.png"] = (np.repeat(np.round(v16[..., :1] / 257).astype(np.uint8), 3, 2), False)
    keep("gray.jpg", rgb.convert("L"), lossy=True, quality=95)
    keep("cmyk.jpg", rgb.convert("CMYK"), lossy=True, quality=95)
    keep("progressive.jpg", rgb, lossy=True, quality=95, progressive=True)
    keep("icc.jpg", rgb, lossy=True, quality=95, icc_profile=srgb)
    rgb.save(d / "anim.gif")
    Image.fromarray(_content()[..., 0].astype(np.float32)).save(d / "float.tif")
    save_with_orientation(rgb, d / "rotated.tif", 6, format="TIFF")
    for name in ("anim.gif", "float.tif", "rotated.tif"):
        expected[name] = None
    images = [dict(id=i + 1, file_name=n, width=W, height=H) for i, n in enumerate(expected)]
    anns = [dict(id=i + 1, image_id=i + 1, category_id=3, iscrowd=0, bbox=[4, 4, 20, 20], area=400,
                 segmentation=[[4, 4, 24, 4, 24, 24, 4, 24]]) for i in range(len(images))]
    write_coco(root, "train2017", images, anns)
    return root, expected, {im["id"]: im["file_name"] for im in images}


def test_the_check_reports_exactly_what_dali_cannot_decode(formats_root):
    root, expected, names = formats_root
    rep, filtered = check(root / "annotations" / "instances_train2017.json", root / "train2017", progress=False)
    reported = {names[x.image_id]: x for x in rep.defects}
    assert set(reported) == {n for n, e in expected.items() if e is None}, [str(x) for x in rep.defects]
    assert all(x.kind == "unsupported-image" for x in reported.values())
    assert "GIF" in reported["anim.gif"].message and "Orientation tag 6" in reported["rotated.tif"].message
    assert {im["file_name"] for im in filtered["images"]} == {n for n, e in expected.items() if e is not None}


def test_the_pipelines_decode_every_accepted_file_into_the_expected_rgb(formats_root):
    from nvidia.dali import pipeline_def
    from pipelines import blocks
    root, expected, names = formats_root
    ann, rep = checked_annotations(root / "annotations" / "instances_train2017.json", root / "train2017",
                                   progress=False)

    @pipeline_def(batch_size=rep.kept_images, num_threads=1, device_id=None)
    def decode_only():
        jpegs, _, _, _, ids = blocks.coco_reader(blocks.CocoFiles(str(root / "train2017"), str(ann)), shuffle=False)
        return blocks.decode(jpegs, "cpu"), ids

    pipe = decode_only()
    pipe.build()
    out, ids = pipe.run()
    seen = set()
    for k in range(rep.kept_images):
        name = names[int(np.asarray(ids[k]).reshape(-1)[0])]
        want, lossy = expected[name]
        got = np.asarray(out[k])
        assert got.shape == want.shape, name
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= (3 if lossy else 0), (name, diff.max())
        seen.add(name)
    assert seen == {n for n, e in expected.items() if e is not None}
