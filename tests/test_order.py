"""The training order as the loader delivers it: seeded, a fresh permutation every epoch, each image once
per epoch over all processes, repeat factors as LVIS defines them, exact resume across windows."""
import json
import math
import os

import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr

from dali_scp.dataset import resolve
from dali_scp.order import TrainingOrder, repeat_factors
from pipelines.iterator import CocoLoader

N_MANY = 1200  # enough images that |rho| < 0.1 means "unrelated" (its spread is 1/sqrt(N - 1) ~ 0.03)


@pytest.fixture(scope="module")
def many_root(tmp_path_factory):
    """N_MANY images (hard links to four tiny JPEGs) with one square each: cheap to read in bulk."""
    root = tmp_path_factory.mktemp("many")
    (root / "train2017").mkdir()
    (root / "val2017").mkdir()
    srcs = []
    for k in range(4):
        p = root / f"src{k}.jpg"
        Image.new("RGB", (40 + 8 * k, 32), (40 * k, 90, 200)).save(p)
        srcs.append((p, 40 + 8 * k))
    images, anns = [], []
    for i in range(N_MANY):
        src, w = srcs[i % 4]
        name = f"{i:06d}.jpg"
        os.link(src, root / "train2017" / name)
        images.append(dict(id=i, file_name=name, width=w, height=32))  # ids from 0, as some exports number them
        anns.append(dict(id=i + 1, image_id=i, category_id=7, bbox=[4, 4, 16, 16], area=256, iscrowd=0,
                         segmentation=[[4, 4, 20, 4, 20, 20, 4, 20]]))
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(
        dict(images=images, annotations=anns, categories=[dict(id=7, name="square")])))
    return root


def read_ids(split, n, **kw):
    """The first n image ids one loader delivers."""
    loader = CocoLoader("none", split, batch_size=40, out_size=32, infinite=True, num_threads=1, **kw)
    ids = []
    for _, targets in loader:
        ids += [t["image_id"] for t in targets]
        if len(ids) >= n:
            return ids[:n]


def test_seeds_and_epochs_read_unrelated_orders_each_image_once(many_root):
    split = resolve(many_root)
    a = read_ids(split, 2 * N_MANY, seed=1)
    b = read_ids(split, N_MANY, seed=2)
    again = read_ids(split, N_MANY, seed=1)
    assert a[:N_MANY] == again, "the same seed must give the same order"
    for first, second in ((a[:N_MANY], b), (a[:N_MANY], a[N_MANY:])):
        assert sorted(first) == sorted(second) == list(range(N_MANY)), "every image once per epoch"
        pos = np.empty(N_MANY)
        pos[second] = np.arange(N_MANY)
        rho = spearmanr(np.arange(N_MANY), pos[first]).statistic
        assert abs(rho) < 0.1, rho


def test_processes_split_each_epoch(many_root):
    """Two processes: over one epoch of each, every image exactly once in all (torch's DistributedSampler)."""
    split = resolve(many_root)
    half = N_MANY // 2
    r0 = read_ids(split, 2 * half, seed=5, shard_id=0, num_shards=2)
    r1 = read_ids(split, 2 * half, seed=5, shard_id=1, num_shards=2)
    assert sorted(r0[:half] + r1[:half]) == list(range(N_MANY))
    assert sorted(r0[half:] + r1[half:]) == list(range(N_MANY))
    assert r0[:half] != r0[half:half * 2]


def test_windows_follow_one_stream(many_root):
    """Reading in windows of 3 batches is the same stream as one big window, and epochs still end inside
    batches (1200 = 30 batches of 40, so a shard of 600 crosses an epoch boundary in batch 15)."""
    split = resolve(many_root)
    small = read_ids(split, 1400, seed=3, window_batches=3)
    big = read_ids(split, 1400, seed=3)
    assert small == big


def test_old_stream_state_is_refused_with_a_clear_message(small_root):
    with pytest.raises(ValueError, match="older dali-scp"):
        CocoLoader("none", resolve(small_root(3)), batch_size=2, out_size=64, infinite=True, checkpoint=b"\x00dali")


def _by_hand_repeat_factors(image_cats, t):
    """LVIS's definition written out plainly (Gupta et al. 2019, section 4.2)."""
    n = len(image_cats)
    cats = {c for cs in image_cats for c in cs}
    f = {c: sum(c in cs for cs in image_cats) / n for c in cats}
    return [max([1.0] + [max(1.0, math.sqrt(t / f[c])) for c in cs]) for cs in image_cats]


def _csr(image_cats):
    ptr = np.concatenate([[0], np.cumsum([len(c) for c in image_cats])])
    return ptr, np.array([c for cs in image_cats for c in sorted(cs)], np.int64)


def test_repeat_factors_follow_the_lvis_formula():
    rng = np.random.default_rng(0)
    # a long tail: category c is in roughly 40 / (c + 1) percent of the images; some images hold none
    image_cats = [{c for c in range(30) if rng.random() < 0.4 / (c + 1)} for _ in range(500)]
    for t in (0.001, 0.01, 0.1):
        expected = _by_hand_repeat_factors(image_cats, t)
        np.testing.assert_allclose(repeat_factors(*_csr(image_cats), t), expected, rtol=1e-12)
    assert np.all(repeat_factors(*_csr(image_cats), 0.0) == 1.0)


def test_realised_repeats_match_their_expectation():
    """Over 200 epochs each image's mean count per epoch estimates r(I); the extra copy is a Bernoulli
    (frac r) draw per epoch, so the standard error of that mean is sqrt(p (1 - p) / 200). The total over
    all images and each group of images sharing a repeat factor lie within 3 standard errors; single
    images within 4.5 (300 images: 3 would be exceeded by chance by about one of them)."""
    rng = np.random.default_rng(1)
    image_cats = [{c for c in range(12) if rng.random() < 0.5 / (c + 1) ** 1.5} for _ in range(300)]
    r = repeat_factors(*_csr(image_cats), 0.2)
    assert r.max() > 2.5 and np.mean(r > 1) > 0.2, "the case must exercise repeats"
    epochs = 200
    counts = np.zeros(len(r))
    order = TrainingOrder(len(r), seed=9, repeat_factors=r)
    for e in range(epochs):
        counts += np.bincount(order.epoch(e), minlength=len(r))
    var = (r - np.floor(r)) * (1 - (r - np.floor(r))) / epochs
    dev = counts / epochs - r
    assert abs(dev.sum()) <= 3 * np.sqrt(var.sum())
    for value in np.unique(r):
        g = r == value
        assert abs(dev[g].sum()) <= 3 * np.sqrt(var[g].sum()) + 1e-12, value
    assert np.all(np.abs(dev) <= 4.5 * np.sqrt(var) + 1e-12)
    # a process's share: two processes together read each epoch's draws exactly once
    a, b = (TrainingOrder(len(r), 9, k, 2, r) for k in (0, 1))
    full = order
    assert sorted(np.concatenate([a.epoch(3), b.epoch(3)])) == sorted(full.epoch(3))
    # and epochs are shuffled anew: positions of the first copies are unrelated between epochs
    e0, e1 = full.epoch(0), full.epoch(1)
    first0 = {int(i): k for k, i in reversed(list(enumerate(e0)))}
    first1 = {int(i): k for k, i in reversed(list(enumerate(e1)))}
    rho = spearmanr([first0[i] for i in range(len(r))], [first1[i] for i in range(len(r))]).statistic
    assert abs(rho) < 0.2, rho
