"""COCO run-length encoded masks: validation, decoding, and conversion into an exactly equivalent list
of polygons.

Why polygons: the pipelines rasterise polygons after the geometric transform, straight at the output
resolution (``dali_scp.raster``, the same code on CPU and GPU). A mask split into axis-aligned
rectangles on pixel edges is, under the rasteriser's rule (pixel centre inside, union over the parts
of an object), the same mask at the original resolution, and after the affine jitter it is resampled
exactly like a polygon object; copy-paste, boxes and the GPU path need nothing new.

The rectangles are horizontal runs of one row, merged down the rows while a run stays identical: the
rasteriser scans rows, so its work is two crossings per run per row, the same as for the object's
outline traced as a polygon. Size: about 4 vertices per row of the object.
"""
from __future__ import annotations

import numpy as np


def rle_runs(counts: str) -> list:
    """Decode COCO's compressed RLE string into run lengths (the format pycocotools writes), so a broken
    string is reported instead of silently decoding to garbage."""
    if not isinstance(counts, str):
        raise TypeError(f"counts must be a string or a list, not {type(counts).__name__}")
    runs, p = [], 0
    while p < len(counts):
        x = k = 0
        more = True
        while more:
            if p >= len(counts):
                raise ValueError("truncated counts string")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {counts[p]!r} in counts")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs



def compressed_run_totals(counts: list, chunk_chars: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """For many compressed RLE strings at once: (pixels each one's runs cover [int64], whether each is
    well formed [bool]: characters in range, no number cut off at its end, no negative run; what
    ``rle_runs`` accepts). A COCO results file holds one string per detection (500,000 at COCO's size);
    decoding them one by one in Python takes a minute, this takes seconds: NumPy over the concatenated
    strings, ``chunk_chars`` characters at a time."""
    n = len(counts)
    totals, ok = np.zeros(n, np.int64), np.zeros(n, bool)
    lens = np.fromiter(map(len, counts), np.int64, n)
    ends = np.cumsum(lens)
    a = 0
    while a < n:
        b = max(int(np.searchsorted(ends, (ends[a - 1] if a else 0) + chunk_chars, side="right")), a + 1)
        totals[a:b], ok[a:b] = _run_totals_chunk(counts[a:b], lens[a:b])
        a = b
    return totals, ok


def _run_totals_chunk(counts: list, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(counts)
    totals, bad = np.zeros(n, np.int64), np.zeros(n, bool)
    try:
        c = np.frombuffer("".join(counts).encode("ascii"), np.uint8) - np.uint8(48)  # < 48 wraps to >= 208
    except UnicodeEncodeError:  # a character outside ASCII: one by one (rare, and an error anyway)
        for k, s in enumerate(counts):
            try:
                runs = rle_runs(s)
            except ValueError:
                bad[k] = True
                continue
            totals[k], bad[k] = sum(runs), any(r < 0 for r in runs)
        return totals, ~bad
    if not len(c):
        return totals, ~bad
    ends = np.cumsum(lens)  # one past each string's last character
    wrong = np.flatnonzero(c >= 64)  # characters rle_runs refuses (usually none)
    bad[np.searchsorted(ends, wrong, side="right")] = True
    term = (c & 0x20) == 0  # the last character of a number
    last = ends[lens > 0] - 1
    bad[lens > 0] |= ~term[last]  # the string ends inside a number ...
    term[last] = True  # ... which then ends with it (the next string's first number stays its own)
    num_end = np.flatnonzero(term)
    num_start = np.empty_like(num_end)
    num_start[0], num_start[1:] = 0, num_end[:-1] + 1
    nlen = num_end - num_start + 1
    x = (c[num_start] & 0x1F).astype(np.int64)  # 5 bits a character, first character lowest
    for k in range(1, min(int(nlen.max()), 7)):  # most numbers have one or two characters
        more = np.flatnonzero(nlen > k)
        x[more] += (c[num_start[more] + k] & 0x1F).astype(np.int64) << (5 * k)
    neg = np.flatnonzero(c[num_end] & 0x10)
    x[neg] -= np.int64(1) << (5 * np.minimum(nlen[neg], 7))  # a negative number
    first = np.empty(n + 1, np.int64)  # each string's first number; first[n]: how many in all
    first[0], first[1:] = 0, np.searchsorted(num_end, ends - 1, side="right")
    per = np.diff(first)
    m = np.arange(len(x)) - np.repeat(first[:-1], per)  # the number's place in its string
    # COCO's delta coding: run m > 2 is x[m] + run m-2, i.e. running sums over x[1], x[3], ... and over
    # x[2], x[4], ... within the string
    odd = (m & 1).astype(bool)
    even = ~odd & (m >= 2)
    co, ce = np.cumsum(np.where(odd, x, 0)), np.cumsum(np.where(even, x, 0))
    before = np.maximum(first[:-1] - 1, 0)
    co0 = np.repeat(np.where(first[:-1] > 0, co[before], 0), per)  # the sums before the string
    ce0 = np.repeat(np.where(first[:-1] > 0, ce[before], 0), per)
    runs = np.where(odd, co - co0, np.where(even, ce - ce0, x))
    flagged = np.flatnonzero((runs < 0) | (nlen > 7))  # 7 characters: 35 bits, beyond any image
    bad[np.searchsorted(first[1:], flagged, side="right")] = True
    has = per > 0
    totals[has] = np.add.reduceat(runs, first[:-1][has])
    return totals, ~bad

def parse(seg, height: int, width: int) -> list:
    """Run lengths of an RLE segmentation (compressed string or uncompressed list counts) for an image
    of ``height`` x ``width``; ValueError saying what is wrong otherwise."""
    if not (isinstance(seg, dict) and "size" in seg and "counts" in seg):
        raise ValueError("RLE segmentation lacks 'size' or 'counts'")
    size = seg["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise ValueError(f"RLE size {size!r} is not [height, width]")
    if list(size) != [height, width]:
        raise ValueError(f"RLE size {list(size)} differs from the image's [{height}, {width}]")
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
            raise ValueError("uncompressed RLE counts are not all integers")
        runs = counts
    else:
        try:
            runs = rle_runs(counts)
        except (TypeError, ValueError) as e:
            raise ValueError(f"malformed RLE counts ({e})") from e
    if any(v < 0 for v in runs):
        raise ValueError("RLE counts contain a negative run")
    if sum(runs) != height * width:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels, the image has {height * width}")
    return runs


def decode(runs: list, height: int, width: int) -> tuple[np.ndarray, int]:
    """The mask of the columns that hold foreground: (mask [height, w'] bool, first column). COCO's runs
    alternate background/foreground in column-major order."""
    runs = np.asarray(runs, np.int64)
    ends = np.cumsum(runs)
    starts = ends - runs
    fg = np.arange(len(runs)) % 2 == 1
    fg &= runs > 0
    if not fg.any():
        return np.zeros((height, 0), bool), 0
    c0 = int(starts[fg].min()) // height
    c1 = (int(ends[fg].max()) - 1) // height + 1
    lo = c0 * height
    flat = np.zeros((c1 - c0) * height, bool)
    for s, e in zip(starts[fg] - lo, ends[fg] - lo):
        flat[s:e] = True
    return flat.reshape(c1 - c0, height).T, c0


def mask_to_rectangles(mask: np.ndarray, x_offset: int = 0) -> list:
    """Axis-aligned rectangles [x0, y0, x1, y0, x1, y1, x0, y1] (integer pixel edges) whose union is
    exactly ``mask``: each row's runs, merged down consecutive rows while identical."""
    m = np.asarray(mask, bool)
    if not m.any():
        return []
    d = np.diff(m.astype(np.int8), axis=1, prepend=0, append=0)
    rs, xs = np.nonzero(d == 1)
    _, xe = np.nonzero(d == -1)  # row-major: the i-th end closes the i-th start
    order = np.lexsort((rs, xe, xs))  # chains of one run (same x0, x1) in row order
    rs, xs, xe = rs[order], xs[order], xe[order]
    new = np.ones(len(rs), bool)
    new[1:] = (xs[1:] != xs[:-1]) | (xe[1:] != xe[:-1]) | (rs[1:] != rs[:-1] + 1)
    first = np.nonzero(new)[0]
    last = np.append(first[1:], len(rs)) - 1
    x0, x1 = xs[first] + x_offset, xe[first] + x_offset
    y0, y1 = rs[first], rs[last] + 1
    rect = np.stack([x0, y0, x1, y0, x1, y1, x0, y1], 1)
    return rect.tolist()


def to_polygons(seg, height: int, width: int) -> list:
    """Validated RLE -> list of rectangle polygons (empty list for an empty mask)."""
    runs = parse(seg, height, width)
    mask, c0 = decode(runs, height, width)
    return mask_to_rectangles(mask, c0)


def to_mask(seg, height: int, width: int) -> np.ndarray:
    """Full-size mask [height, width] uint8 of a validated RLE."""
    mask, c0 = decode(parse(seg, height, width), height, width)
    out = np.zeros((height, width), np.uint8)
    out[:, c0:c0 + mask.shape[1]] = mask
    return out


def encode(mask: np.ndarray) -> dict:
    """Compressed RLE dict with a str ``counts`` (JSON-ready), via pycocotools."""
    from pycocotools import mask as mask_utils
    r = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    return dict(size=[int(v) for v in r["size"]], counts=r["counts"].decode("ascii"))
