"""The loader users run today, written by us so the comparison is fair and on the same files: a PyTorch
``DataLoader`` with worker processes, PIL decode, pycocotools masks at full resolution, scale jittering
on image and masks, and copy-paste in the collate function (as torchvision's reference
``SimpleCopyPaste``), with mmdetection's occlusion rule. Competent, not a straw man: masks are resized
once with nearest neighbour, cropping is slicing, workers are persistent, memory pinned when a GPU
exists, tensors are shared with the main process rather than pickled.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from dali_scp.copy_paste import draw_choices
from dali_scp.presets import CopyPaste, PipelinePreset


class JitterDataset(torch.utils.data.Dataset):
    def __init__(self, ann_file, images_dir, preset: PipelinePreset, seed: int = 0):
        doc = json.loads(Path(ann_file).read_text())
        self.images = doc["images"]
        self.anns = {}
        for a in doc["annotations"]:
            if not a.get("iscrowd", 0):
                self.anns.setdefault(a["image_id"], []).append(a)
        self.dir = Path(images_dir)
        self.cfg = preset.jitter
        self.seed = seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        info = self.images[i]
        rng = random.Random(self.seed * 1_000_003 + i)
        img = to_rgb(Image.open(self.dir / info["file_name"]))
        w, h = img.size
        anns = self.anns.get(info["id"], [])
        S = self.cfg.out_size
        lo, hi = self.cfg.scale_range
        s = rng.uniform(lo, hi)
        r = min(S * s / h, S * s / w)
        nh, nw = max(int(h * r + 0.5), 1), max(int(w * r + 0.5), 1)
        img = torch.from_numpy(np.array(img.resize((nw, nh), Image.BILINEAR))).permute(2, 0, 1)
        if anns:
            masks = np.stack([mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w)))
                              for a in anns])
            masks = F.interpolate(torch.from_numpy(masks)[None], size=(nh, nw), mode="nearest")[0]
        else:
            masks = torch.zeros((0, nh, nw), dtype=torch.uint8)
        ch, cw = min(S, nh), min(S, nw)
        oy, ox = rng.randint(0, nh - ch), rng.randint(0, nw - cw)
        img, masks = img[:, oy:oy + ch, ox:ox + cw], masks[:, oy:oy + ch, ox:ox + cw]
        if rng.random() < self.cfg.flip_prob:
            img, masks = img.flip(-1), masks.flip(-1)
        out_img = torch.zeros((3, S, S), dtype=torch.uint8)
        out_img[:, :ch, :cw] = img
        keep = masks.flatten(1).any(1).bool() if len(masks) else torch.zeros(0, dtype=torch.bool)
        out_m = torch.zeros((int(keep.sum()), S, S), dtype=torch.uint8)
        out_m[:, :ch, :cw] = masks[keep]
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)[keep] if anns else \
            torch.zeros(0, dtype=torch.int64)
        return out_img, dict(boxes=_boxes(out_m), labels=labels, masks=out_m, image_id=info["id"])


def to_rgb(img: Image.Image) -> Image.Image:
    """Stored pixels as RGB, as DALI's decoder gives them (EXIF orientation not applied; the checked
    annotations are in stored pixels). 16-bit grayscale is scaled to 8 bits as DALI does (PIL's own
    conversion clips it at 255)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, np.float64) / 257.0
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def _boxes(masks: torch.Tensor) -> torch.Tensor:
    if len(masks) == 0:
        return torch.zeros((0, 4))
    b = torch.zeros((len(masks), 4))
    rows, cols = masks.any(2), masks.any(1)
    for i in range(len(masks)):
        y, x = torch.nonzero(rows[i]).flatten(), torch.nonzero(cols[i]).flatten()
        if len(y):
            b[i] = torch.tensor([x[0], y[0], x[-1] + 1, y[-1] + 1])
    return b


class CopyPasteCollate:
    """Copy-paste across the batch in the collate function, on dense full-resolution masks."""

    def __init__(self, cfg: CopyPaste | None, seed: int = 0):
        self.cfg, self.rng = cfg, np.random.default_rng(seed)

    def __call__(self, batch):
        images = [b[0] for b in batch]
        targets = [b[1] for b in batch]
        if self.cfg is None or len(batch) < 2:
            return torch.stack(images), targets
        # the same random choices as our pipelines (one copy-paste contract); the compositing below is
        # the torchvision-reference style users run in their collate functions
        choices = draw_choices(self.rng, [len(t["labels"]) for t in targets], self.cfg)
        out_i, out_t = [], []
        for d in range(len(batch)):
            s, t = int(choices.src[d]), targets[d]
            if s < 0 or len(choices.picks[d]) == 0:
                out_i.append(images[d]), out_t.append(t)
                continue
            ts = targets[s]
            sel = torch.from_numpy(choices.picks[d])
            pm = ts["masks"][sel]
            alpha = pm.any(0).bool()
            out_i.append(torch.where(alpha[None], images[s], images[d]))
            dm = t["masks"] * (~alpha)[None]
            db = _boxes(dm)
            area = dm.flatten(1).sum(1)
            keep = ((db - t["boxes"]).abs().le(self.cfg.bbox_occluded_thr).all(1) | (area > self.cfg.mask_occluded_thr)) & (area > 0)
            out_t.append(dict(boxes=torch.cat([db[keep], ts["boxes"][sel]]), labels=torch.cat([t["labels"][keep], ts["labels"][sel]]),
                              masks=torch.cat([dm[keep], pm]), image_id=t["image_id"]))
        return torch.stack(out_i), out_t


def baseline_loader(ann_file, images_dir, preset: PipelinePreset, batch_size: int = 8, workers: int = 2, seed: int = 0,
                    check: bool = True):
    """Reads the dataset check's filtered copy of ``ann_file`` (``check=False``: ``ann_file`` is that copy
    already), so images and annotations are the ones our pipelines read, in the same frame. Batches
    are always full: indices are drawn as an endless sequence of permutations (mmdetection's infinite
    sampler), so a dataset smaller than a batch still yields batches."""
    if check:
        from dali_scp.check import checked_annotations
        ann_file, _ = checked_annotations(ann_file, images_dir, progress=False)
    ds = JitterDataset(ann_file, images_dir, preset, seed)
    if len(ds) == 0:
        raise ValueError(f"{ann_file}: no images to load")
    g = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(ds, num_samples=1 << 40, generator=g)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
        collate_fn=CopyPasteCollate(preset.copy_paste, seed),
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
        drop_last=True)
