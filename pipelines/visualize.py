"""Draw what an augmentation pipeline hands the model: a grid of augmented samples with mask overlays,
tight boxes and class names. Objects pasted by copy-paste get a dashed yellow box and a ``+`` before
their name, original objects a solid box in their mask colour; the padding beyond the valid (jittered)
region is hatched darker.

    python -m pipelines.visualize --pipeline ssj_scp --out grid.png
"""
from __future__ import annotations

import argparse
import colorsys
import logging
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dali_scp import dataset as ds
from dali_scp.presets import PIPELINES

log = logging.getLogger(__name__)


def _colour(i: int):
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _outline(m: np.ndarray) -> np.ndarray:
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def _dashed_rect(draw, box, fill, width=2, dash=8):
    x0, y0, x1, y1 = box
    for (a, b, c, d) in ((x0, y0, x1, y0), (x1, y0, x1, y1), (x1, y1, x0, y1), (x0, y1, x0, y0)):
        n = max(int(max(abs(c - a), abs(d - b)) // dash), 1)
        for k in range(0, n, 2):
            t0, t1 = k / n, min((k + 1) / n, 1.0)
            draw.line([a + (c - a) * t0, b + (d - b) * t0, a + (c - a) * t1, b + (d - b) * t1], fill=fill, width=width)


def render_sample(image: np.ndarray, target: dict, names, tile: int = 512) -> Image.Image:
    """image [S, S, 3] uint8; target with numpy boxes/labels/masks/pasted and a ``Geometry``."""
    img = image.astype(np.float32)
    S = img.shape[0]
    masks = target["masks"].astype(bool)
    for i, m in enumerate(masks):
        c = np.array(_colour(i), np.float32)
        img[m] = img[m] * 0.5 + c * 0.5
        img[_outline(m)] = c
    geo = target["geometry"]
    pad = np.ones((S, S), bool)
    pad[: geo.valid_h, : geo.valid_w] = False
    hatch = ((np.add.outer(np.arange(S), np.arange(S)) // 12) % 2 == 0)
    img[pad & hatch] *= 0.55
    scale = tile / S
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).resize((tile, tile), Image.BILINEAR)
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for i, (box, lab) in enumerate(zip(target["boxes"], target["labels"])):
        b = [float(v) * scale for v in box]
        pasted = bool(target["pasted"][i])
        name = ("+" if pasted else "") + names(int(lab))
        if pasted:
            _dashed_rect(draw, b, (255, 230, 0))
        else:
            draw.rectangle(b, outline=_colour(i), width=2)
        tx, ty = b[0] + 2, max(b[1] - 11, 0)
        draw.rectangle([tx - 1, ty, tx + 6 * len(name) + 1, ty + 10], fill=(0, 0, 0))
        draw.text((tx, ty - 1), name, fill=(255, 255, 255), font=font)
    return out


def make_grid(pipeline: str, coco_root=None, device: str = "cpu", n: int = 8, seed: int = 0, tile: int = 384,
              cols: int = 4, split: str = "train2017", dataset: str = "coco") -> Image.Image:
    from dali_scp.check import checked_annotations
    from pipelines.iterator import CocoLoader
    sp = ds.resolve(coco_root, split, dataset)
    ann, rep = checked_annotations(sp.annotations, sp.images_dir)
    if rep.kept_images == 0:
        raise ValueError(f"{sp.annotations}: no image left to draw (see `python -m dali_scp.check`)")
    if n > rep.kept_images:  # draw what there is: one batch of every image, none twice
        log.info("%s has %d usable images; drawing %d, not %d", sp.annotations, rep.kept_images, rep.kept_images, n)
        n = rep.kept_images
    loader = CocoLoader(pipeline, sp, batch_size=n, device=device, seed=seed, annotations=str(ann))
    images, targets = next(iter(loader))
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    header = 22
    grid = Image.new("RGB", (cols * tile, rows * (tile + header)), (25, 25, 25))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        t = {k: (v.cpu().numpy() if hasattr(v, "cpu") else v) for k, v in targets[i].items()}
        tile_img = render_sample(images[i].cpu().numpy(), t, sp.name_of_label, tile)
        x, y = (i % cols) * tile, (i // cols) * (tile + header)
        grid.paste(tile_img, (x, y + header))
        n_p, geo = int(t["pasted"].sum()), t["geometry"]
        draw.text((x + 4, y + 5), f"image {t['image_id']}  {len(t['labels'])} objects ({n_p} pasted)"
                  f"  resize x{geo.scale:.2f}{'  flipped' if geo.flipped else ''}",
                  fill=(230, 230, 230))
    return grid


def main(argv=None) -> int:
    from dali_scp import cli
    return cli.run(_main, argv)


def _main(argv=None) -> int:
    from dali_scp import cli
    p = cli.ArgumentParser(prog="python -m pipelines.visualize", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default="ssj_scp", choices=list(PIPELINES), help="augmentation preset")
    p.add_argument("--coco-root", default=None, help="COCO root (default: the embedded synthetic dataset)")
    p.add_argument("--split", default="train2017")
    cli.add_dataset_flag(p)
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--num", type=cli.COUNT, default=8,
                   help="samples (= batch size, copy-paste pairs within it; at most the dataset's images)")
    p.add_argument("--seed", type=cli.SEED, default=0)
    p.add_argument("--tile", type=cli.PIXELS, default=384, help="tile size in px")
    p.add_argument("--out", required=True, help="output PNG")
    cli.add_debug_flag(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    grid = make_grid(a.pipeline, a.coco_root, a.device, a.num, a.seed, a.tile, split=a.split, dataset=a.dataset)
    try:
        grid.save(a.out)
    except (OSError, ValueError) as e:
        raise ValueError(f"{a.out}: cannot write the picture ({e})") from e
    print(f"wrote {a.out} ({grid.size[0]}x{grid.size[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
