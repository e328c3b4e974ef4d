"""Ground truth for pipeline tests, recovered from the augmented *image* alone: every synthetic object
is drawn in a flat colour unique in its image (annotation field ``colour``) and far from the
low-saturation background, so its pixels can be found by colour after any resize/crop/flip."""
import numpy as np

COLOUR_TOL = 36  # L-inf; objects are shaded by at most +-4 and palette colours are >= 85 apart


def colour_pixels(image: np.ndarray, colour) -> np.ndarray:
    d = np.abs(image.astype(np.int16) - np.asarray(colour, np.int16)[None, None, :]).max(axis=2)
    return d <= COLOUR_TOL


def erode(m: np.ndarray, k: int = 1) -> np.ndarray:
    m = m.copy()
    for _ in range(k):
        e = m.copy()
        e[1:] &= m[:-1]
        e[:-1] &= m[1:]
        e[:, 1:] &= m[:, :-1]
        e[:, :-1] &= m[:, 1:]
        m = e
    return m


def dilate(m: np.ndarray, k: int = 1) -> np.ndarray:
    return ~erode(~m, k)


def off_edge_disagreement(mask: np.ndarray, truth: np.ndarray) -> float:
    """The share of the object's pixels where mask and colour disagree more than one pixel away from the
    mask's edge. Resampling blends the edge pixels of a thin object into its colour (a 25-px bar loses
    6% IoU that way), but a mask moved by 2 px or more disagrees off its edge."""
    m = mask.astype(bool)
    near_edge = dilate(m, 1) & ~erode(m, 1)
    far = (m ^ truth) & ~near_edge
    return float(far.sum()) / max(float(truth.sum()), 1.0)


def dominant_colour(image: np.ndarray, mask: np.ndarray):
    core = erode(mask.astype(bool), 1)
    if core.sum() < 4:
        core = mask.astype(bool)
    return np.median(image[core].reshape(-1, 3), axis=0)


def match_annotation(image, mask, anns):
    """The annotation whose colour the mask's pixels show (None if none is close)."""
    c = dominant_colour(image, mask)
    anns = [a for a in anns if "colour" in a]
    best = min(anns, key=lambda a: np.abs(np.asarray(a["colour"]) - c).max(), default=None)
    if best is None or np.abs(np.asarray(best["colour"]) - c).max() > COLOUR_TOL:
        return None
    return best


def iou(a, b):
    a, b = a.astype(bool), b.astype(bool)
    u = (a | b).sum()
    return (a & b).sum() / u if u else 1.0


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def object_pixels(image: np.ndarray, colour) -> np.ndarray:
    """The object's pixels at the 50% blend level: near its colour's core, closer to the object colour
    than to the surrounding background (resampling blends edges; this puts the edge where a rasteriser
    sampling pixel centres puts it)."""
    from scipy.ndimage import binary_dilation
    core = visible_core(image, colour)
    if not core.any():
        return core
    ring = binary_dilation(core, iterations=6) & ~binary_dilation(core, iterations=3)
    img = image.astype(np.float32)
    bg = np.median(img[ring], axis=0) if ring.any() else np.zeros(3, np.float32)
    d_obj = ((img - np.asarray(colour, np.float32)) ** 2).sum(-1)
    d_bg = ((img - bg) ** 2).sum(-1)
    return binary_dilation(core, iterations=3) & (d_obj < d_bg)


def visible_core(image: np.ndarray, colour) -> np.ndarray:
    """Colour pixels minus a 1-px erosion: drops the stray edge pixels that JPEG's chroma subsampling
    gives other saturated objects, keeps every object wider than 2 px."""
    return erode(colour_pixels(image, colour), 1)
