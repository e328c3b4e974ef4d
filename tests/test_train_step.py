"""The seed recipe's training step equals mmdetection's own: loss terms, every parameter's gradient, BN
statistics, and the samplers as they draw.

``tests/data/mmdet_train_reference.npz`` is written by ``scripts/mmdet_train_reference.py`` in the side
environment with mmdetection 3.3 (its docstring says how and what): the seed config's model narrowed (ResNet-50
at 1/8 width, FPN and heads 32 channels, 8 classes, BN for SyncBN) with seeded weights, one train-mode step on a
batch of the project's own ``ssj_scp`` output, and mmdetection's real samplers drawn 200 times. Here the same
weights are rebuilt (sha256 checked), imported with ``trainer.import_weights``, and ``r50_ssj_scp_90k``'s model,
narrowed the same way, runs forward and backward on the same batch. The random subset choices are made the same
by one device (``RecordedOrder``): both sides' samplers take, among the candidates they would draw from, those of
lowest rank in the reference's ``sample_keys``; nothing else on either side is changed.
"""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from reference_files import load_reference, reference_script, seeded_mmdet_checkpoint
from dali_scp.presets import recipe
from trainer import import_weights
from trainer import mmdet_style as mm
from trainer.model import build_model, to_model_inputs
from trainer.train_loop import total_loss

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "tests" / "data" / "mmdet_train_reference.npz"
# the network in float64 as the reference's (its DTYPE says why); measured differences in brackets
LOSS_RTOL = 1e-5    # every loss term, relative (<= 1.7e-7)
GRAD_RTOL = 1e-4    # per tensor: max |ours - theirs| / max |theirs| (<= 4.9e-7: the reference keeps 2^-21 of max |theirs|)
BN_RTOL = 1e-5      # BN running mean / var after the step, per tensor as the gradients (0)
BOX_ATOL = 0.01     # px, training proposals paired one to one (0)
ACC_ATOL = 1e-4     # percent: acc counts RoIs, so equal up to rounding (0)
DRAWS = 100         # of our samplers (the reference: 200 of mmdetection's); means within 3 standard errors (<= 1.9)
# ours <- mmdetection's loss names
TERMS = dict(loss_rpn_cls="loss_objectness", loss_rpn_bbox="loss_rpn_box_reg", loss_cls="loss_classifier",
             loss_bbox="loss_box_reg", loss_mask="loss_mask", acc="acc")
# the recipe fields whose torchvision choice changes a training step on this batch (mask_paste and init do
# not enter it; sampler: test_gt_boxes_join_the_candidates_after_matching)
STEP_FIELDS = ("normalize", "box_loss", "matcher", "mask_targets", "anchors", "roi_align", "box_decode")


script = reference_script("mmdet_train_reference")


@pytest.fixture(scope="module")
def ref():
    return load_reference(REF)


@pytest.fixture(scope="module")
def batch(ref):
    """(images uint8 [B, S, S, 3], targets) as the training loader hands them over."""
    counts = ref["counts"].tolist()
    s = ref["info"]["image_size"]
    masks = np.unpackbits(ref["masks"], axis=-1)[..., :s]
    split = lambda a: np.split(a, np.cumsum(counts)[:-1])  # noqa: E731
    targets = [dict(boxes=torch.from_numpy(b), labels=torch.from_numpy(lab), masks=torch.from_numpy(m),
                    pasted=torch.from_numpy(p))
               for b, lab, m, p in zip(split(ref["boxes"]), split(ref["labels"]), split(masks), split(ref["pasted"]))]
    return torch.from_numpy(ref["images"]), targets


def seed_recipe(ref, **fields):
    """``r50_ssj_scp_90k`` narrowed as the reference: image size, backbone width, FPN and heads."""
    info = ref["info"]
    return replace(recipe("r50_ssj_scp_90k"), image_size=info["image_size"], backbone_width=info["backbone_width"],
                   fpn_channels=info["narrow"]["fpn_channels"], head_channels=info["narrow"]["head_channels"], **fields)


@pytest.fixture(scope="module")
def weights(ref, tmp_path_factory):
    """mmdetection's seeded checkpoint, rebuilt bit for bit and imported as a user imports released weights."""
    info = ref["info"]
    path = seeded_mmdet_checkpoint(info, tmp_path_factory.mktemp("train_step") / "seed_narrow.pth")
    imp = import_weights.convert(path, seed_recipe(ref))
    assert imp.state["recipe"]["backbone_width"] == info["backbone_width"] and not imp.missing and not imp.unused
    return imp.state["model"]


def mmdet_named(ref, flat_values: dict) -> dict:
    """mmdetection-named tensors -> this project's names and class layout, as ``trainer.import_weights`` does
    for weights (rows of the background: zero)."""
    sd, unused = import_weights.rename_mmdet(flat_values)
    assert not unused
    if import_weights.CLS + ".weight" in sd:
        import_weights.mmdet_class_layout(sd, REF)
    return sd


@pytest.fixture(scope="module")
def ref_grads(ref):
    info, planes, start = ref["info"], ref["grad_planes"], 0
    out = {}
    for name, shape in info["params"]:
        n = int(np.prod(shape))
        out[name] = script.unpack_gradient(info["grad_steps"][name], planes[:, start:start + n], shape)
        start += n
    assert start == planes.shape[1]
    return mmdet_named(ref, out)


# ------------------------------------------------------------------ the device, this side
class RecordedOrder(mm.RandomSampler):
    """This project's ``RandomSampler`` with its draw taking the reference's order: ``keys(image, n)`` ranks the
    ``n`` candidates of ``image``. Records the labels it was given and what it took."""

    def __init__(self, sampler, keys):
        super().__init__(sampler.batch_size_per_image, sampler.positive_fraction)
        self.keys, self.seen = keys, []

    def __call__(self, labels):
        self.n = [len(lab) for lab in labels]
        pos, neg = super().__call__(labels)
        self.seen.append(dict(labels=[lab.clone() for lab in labels], pos=pos, neg=neg))
        return pos, neg

    def random_choice(self, gallery, num, image):
        return script.ranked_choice(self.keys(image, self.n[image]), gallery, num)


def pair_boxes(theirs: torch.Tensor, ours: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One to one: for each of our boxes, in order, the nearest of theirs not yet taken, and the largest
    coordinate difference. One to one because proposals repeat (a weakly trained RPN gives the whole image
    several times): each copy must keep its own candidate key, or the samplers' recorded order breaks."""
    cost = (theirs[:, None] - ours[None]).abs().amax(-1)
    pair, worst = torch.empty(len(ours), dtype=torch.int64), 0.0
    for j in range(len(ours)):
        d, i = cost[:, j].min(0)
        pair[j], worst = i, max(worst, float(d))
        cost[i] = float("inf")
    return pair, worst


def train_step(ref, batch, weights, backward: bool = True, **fields) -> dict:
    """One forward (and backward) of ``seed_recipe(**fields)``'s model on the batch, samplers in the recorded
    order; float64 as the reference (pixels normalised in float32, as in training)."""
    torch.manual_seed(0)
    dtype = getattr(torch, ref["info"]["dtype"])
    model = build_model(seed_recipe(ref, **fields), ref["info"]["num_classes"] + 1)
    model.load_state_dict(weights)
    model.to(dtype)
    normalize = model.transform.normalize
    model.transform.normalize = lambda image: normalize(image).to(dtype)  # as the reference: normalised in float32
    images, targets = batch
    seen = dict(proposals=[])

    def rcnn_keys(image, n):
        """Theirs are [gt; their proposals]: ours are paired to theirs by box (near-equal scores may order
        the proposals differently)."""
        n_gt = len(targets[image]["boxes"])
        theirs = torch.from_numpy(ref[f"proposals{image}"])
        keys = script.sample_keys("rcnn", image, n_gt + len(theirs))
        pair, _ = pair_boxes(theirs, seen["proposals"][image])
        return torch.cat([keys[:n_gt], keys[n_gt + pair]])

    model.rpn.fg_bg_sampler = RecordedOrder(model.rpn.fg_bg_sampler, lambda image, n: script.sample_keys("rpn", image, n))
    model.roi_heads.fg_bg_sampler = RecordedOrder(model.roi_heads.fg_bg_sampler, rcnn_keys)
    select = model.roi_heads.select_training_samples

    def select_recorded(proposals, targets):
        seen["proposals"] = [p.detach().clone() for p in proposals]
        return select(proposals, targets)

    model.roi_heads.select_training_samples = select_recorded
    model.train()
    images, targets = to_model_inputs(images, targets)
    losses = model(images, [dict(t, boxes=t["boxes"].to(dtype)) for t in targets])
    if backward:
        total_loss(losses).backward()
    return dict(losses={k: float(v.detach()) for k, v in losses.items()}, model=model, proposals=seen["proposals"],
                grads={k: p.grad for k, p in model.named_parameters()} if backward else None,
                rpn=model.rpn.fg_bg_sampler.seen[0], rcnn=model.roi_heads.fg_bg_sampler.seen[0])


@pytest.fixture(scope="module")
def step(ref, batch, weights):
    return train_step(ref, batch, weights)


def rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max-norm of the difference over max-norm of the reference."""
    d = float((ours.double() - theirs.double()).abs().max())
    m = float(theirs.double().abs().max())
    return d / m if m > 0 else d


def mismatches(ref, ref_grads, st) -> list:
    """Every loss term (and gradient, after a backward) of step ``st`` outside the tolerances, as text."""
    out = []
    for theirs, ours in TERMS.items():
        a, b = st["losses"].get(ours, float("nan")), ref["info"]["losses"][theirs]
        if not (abs(a - b) <= (ACC_ATOL if theirs == "acc" else LOSS_RTOL * abs(b))):
            out.append(f"{theirs}: {a:.7g} vs {b:.7g}")
    for k, g in (st["grads"] or {}).items():
        r = rel(g if g is not None else torch.zeros_like(ref_grads[k]), ref_grads[k])
        if not r <= GRAD_RTOL:
            out.append(f"grad {k}: {r:.2e}")
    return out


# ------------------------------------------------------------------ the batch and the step
def test_the_batch_is_ssj_scp_output_with_what_the_comparison_needs(ref, batch):
    """>= 2 images of 256-512 px; pasted objects; boxes the tight boxes of their masks; objects from a few px
    to over 96; one image holding a single small object."""
    images, targets = batch
    assert images.shape[0] >= 2 and 256 <= images.shape[1] == images.shape[2] <= 512
    assert sum(int(t["pasted"].sum()) for t in targets) >= 3
    for t in targets:
        m = t["masks"].bool()
        ys, xs = m.any(2), m.any(1)
        tight = torch.stack([xs.float().argmax(1), ys.float().argmax(1), m.shape[2] - xs.flip(1).float().argmax(1),
                             m.shape[1] - ys.flip(1).float().argmax(1)], 1)
        assert torch.equal(tight.float(), t["boxes"])
    side = torch.cat([(t["boxes"][:, 2:] - t["boxes"][:, :2]).prod(1).sqrt() for t in targets])
    assert side.min() < 8 and side.max() > 96
    assert any(len(t["boxes"]) == 1 and float(side[0]) < 32 for t, side in
               ((t, (t["boxes"][:, 2:] - t["boxes"][:, :2]).prod(1).sqrt()) for t in targets))


def test_training_proposals_equal_mmdetections(ref, step):
    for i, ours in enumerate(step["proposals"]):
        theirs = torch.from_numpy(ref[f"proposals{i}"])
        pair, d = pair_boxes(theirs, ours)
        assert len(ours) == len(theirs) == 1000 and d <= BOX_ATOL


def test_every_anchor_and_roi_candidate_is_assigned_and_sampled_as_by_mmdetection(ref, batch, step):
    """Labels of all 25,575 anchors and all [gt; proposals] candidates per image, and the sampled subsets."""
    _, targets = batch
    for i, t in enumerate(targets):
        a = torch.from_numpy(ref[f"rpn_assigned{i}"]).long()
        theirs = torch.where(a >= 0, 1.0, torch.where(a == -1, 0.0, -1.0))
        assert torch.equal(step["rpn"]["labels"][i], theirs)
        taken = torch.where(step["rpn"]["pos"][i])[0], torch.where(step["rpn"]["neg"][i])[0]
        assert torch.equal(taken[0], torch.from_numpy(ref[f"rpn_pos{i}"]))
        assert torch.equal(taken[1], torch.from_numpy(ref[f"rpn_neg{i}"]))
        n_gt = len(t["boxes"])
        a = torch.from_numpy(ref[f"rcnn_assigned{i}"]).long()
        pair, _ = pair_boxes(torch.from_numpy(ref[f"proposals{i}"]), step["proposals"][i])
        a = torch.cat([a[:n_gt], a[n_gt + pair]])  # in our candidates' order
        theirs = torch.where(a >= 0, t["labels"][a.clamp(min=0)], torch.where(a == -1, 0, -1))
        assert torch.equal(step["rcnn"]["labels"][i], theirs)
        order = torch.cat([torch.arange(n_gt), n_gt + pair])
        for k in ("pos", "neg"):
            ours = order[torch.where(step["rcnn"][k][i])[0]].sort().values
            assert torch.equal(ours, torch.from_numpy(ref[f"rcnn_{k}{i}"])), k


@pytest.mark.parametrize("term", list(TERMS))
def test_loss_term_equals_mmdetections(ref, step, term):
    ours, theirs = step["losses"][TERMS[term]], ref["info"]["losses"][term]
    assert theirs > 0
    assert abs(ours - theirs) <= (ACC_ATOL if term == "acc" else LOSS_RTOL * theirs), (ours, theirs)


def test_every_parameters_gradient_equals_mmdetections(ref, ref_grads, step):
    assert set(step["grads"]) == set(ref_grads) and len(ref_grads) > 200
    worst = sorted(((rel(g, ref_grads[k]), k) for k, g in step["grads"].items()), reverse=True)
    assert worst[0][0] <= GRAD_RTOL, worst[:5]


def test_bn_running_statistics_after_the_step_equal_mmdetections(ref, step):
    info, flat, start, theirs = ref["info"], ref["buffers"], 0, {}
    for name, shape in info["buffer_keys"]:
        n = int(np.prod(shape)) if shape else 1
        theirs[name] = torch.from_numpy(flat[start:start + n].reshape(shape))
        start += n
    theirs = mmdet_named(ref, theirs)
    ours = {k: v for k, v in step["model"].state_dict().items() if "running" in k or "num_batches" in k}
    assert set(ours) == set(theirs) and len(ours) > 100
    for k, v in ours.items():
        if k.endswith("num_batches_tracked"):
            assert int(v) == int(theirs[k]) == 1, k
        else:
            assert rel(v, theirs[k]) <= BN_RTOL, (k, rel(v, theirs[k]))


@pytest.mark.parametrize("field", STEP_FIELDS)
def test_torchvisions_choice_of_a_field_fails_the_comparison(ref, batch, weights, ref_grads, step, field):
    """Each recipe field that enters a training step, switched to torchvision's arithmetic, is caught: by a
    loss term, or (box_decode, normalize: losses within 6e-6) by the gradients."""
    assert not mismatches(ref, ref_grads, step)
    switched = train_step(ref, batch, weights, backward=False, **{field: "torchvision"})
    if not mismatches(ref, ref_grads, switched):
        switched = train_step(ref, batch, weights, **{field: "torchvision"})
    assert mismatches(ref, ref_grads, switched)


# ------------------------------------------------------------------ the samplers as they draw
@pytest.fixture(scope="module")
def candidates(ref, batch):
    """Per sampler setting of the reference, [(candidates, gt target)] in the reference's dtype: anchors with
    each image's gt (``rpn``) and with the dense grid of gt (``rpn_dense``); the RPN's proposals of the step,
    alone (``rcnn``) and with 30 jittered copies of each gt (``rcnn_dense``)."""
    from torchvision.models.detection.image_list import ImageList
    dtype = getattr(torch, ref["info"]["dtype"])
    s = ref["info"]["image_size"]
    model = build_model(seed_recipe(ref), ref["info"]["num_classes"] + 1)
    feats = [torch.zeros(1, 1, s // k, s // k, dtype=dtype) for k in (4, 8, 16, 32, 64)]
    anchors = model.rpn.anchor_generator(ImageList(torch.zeros(1, 3, s, s), [(s, s)]), feats)[0]
    gts = [dict(t, boxes=t["boxes"].to(dtype)) for t in batch[1]]
    dense = torch.from_numpy(ref["dense_gt"])
    dense_t = dict(boxes=dense, labels=torch.ones(len(dense), dtype=torch.long))
    props = [torch.from_numpy(ref[f"proposals{i}"]) for i in range(len(gts))]
    nested = dict(boxes=torch.from_numpy(ref["nested_gt"]), labels=torch.from_numpy(ref["nested_labels"]) + 1)
    nested["masks"] = torch.zeros(len(nested["boxes"]), s, s, dtype=torch.uint8)  # unread; RoIHeads checks they exist
    return dict(rpn=[(anchors, t) for t in gts], rpn_dense=[(anchors, dense_t)],
                rcnn=[(p, t) for p, t in zip(props, gts)],
                rcnn_dense=[(torch.cat([p, torch.from_numpy(ref[f"dense{i}"])]), t) for i, (p, t) in
                            enumerate(zip(props, gts))],
                rcnn_nested=[(torch.from_numpy(ref["nested"]), nested)])


def draw_stats(model, setting: str, cands, target, draws: int) -> np.ndarray:
    """Our model's own assignment and sampler, ``draws`` times: [draws, SAMPLE_STATS] as the reference's."""
    out = np.zeros((draws, len(script.SAMPLE_STATS)))
    gt = target["boxes"]
    if setting.startswith("rpn"):
        iou = box_iou(gt, cands)
        matched = model.rpn.proposal_matcher(iou)
        (labels,), _ = model.rpn.assign_targets_to_anchors([cands], [target])
        best = iou.max(0).values
        for d in range(draws):
            (pos,), (neg,) = model.rpn.fg_bg_sampler([labels])
            pos, neg = torch.where(pos)[0], torch.where(neg)[0]
            out[d] = script.sample_stats(best[pos], best[neg], matched[pos], torch.zeros(len(pos), dtype=torch.bool))
        return out
    for d in range(draws):
        (boxes,), (matched,), (labels,), _ = model.roi_heads.select_training_samples([cands], [target])
        pos, neg = labels > 0, labels == 0
        best = box_iou(boxes, gt).max(1).values
        is_gt = (boxes[pos][:, None] == gt[None]).all(-1).any(1)
        out[d] = script.sample_stats(best[pos], best[neg], matched[pos], is_gt)
    return out


@pytest.mark.parametrize("setting", script.SETTINGS)
def test_samplers_draw_as_mmdetections(ref, candidates, setting):
    """The RPN's (256, positive fraction 0.5) and the box head's (512, 0.25, gt added as proposals) real random
    samplers, 100 draws against the reference's real RandomSamplers' 200: per image, the mean numbers of positives
    and negatives - and what the positives are (distinct gts hit, gt boxes among them, mean IoU of positives
    and of negatives) - equal mmdetection's within 3 standard errors (exactly, where neither side varies)."""
    theirs = ref[f"draws_{setting}"]
    model = build_model(seed_recipe(ref), ref["info"]["num_classes"] + 1)
    torch.manual_seed(1)
    for i, (cands, target) in enumerate(candidates[setting]):
        ours = draw_stats(model, setting, cands, target, DRAWS)
        se = np.sqrt(ours.var(0, ddof=1) / len(ours) + theirs[:, i].var(0, ddof=1) / len(theirs))
        diff = np.abs(ours.mean(0) - theirs[:, i].mean(0))
        assert np.all(diff <= 3 * se + 1e-12), dict(zip(script.SAMPLE_STATS, zip(ours.mean(0), theirs[:, i].mean(0), se)))
    if setting.endswith("dense"):  # the caps bind: 128 positives of 256 (RPN), of 512 (box head)
        assert theirs[:, :, 0].max() == 128 and np.ptp(theirs[:, :, 2:], axis=0).max() > 0


def test_assignment_thresholds_and_samplers_are_the_seeds(ref):
    """As the seed config states them (read by the reference script) and as our built model holds them."""
    info = ref["info"]
    assert info["assigners"] == dict(rpn=dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True),
                                     rcnn=dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=True))
    assert info["samplers"] == dict(rpn=dict(num=256, pos_fraction=0.5, neg_pos_ub=-1, add_gt_as_proposals=False),
                                    rcnn=dict(num=512, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True))
    model = build_model(seed_recipe(ref), info["num_classes"] + 1)
    for stage, mine in (("rpn", model.rpn), ("rcnn", model.roi_heads)):
        a, s = info["assigners"][stage], info["samplers"][stage]
        m = mine.proposal_matcher
        assert isinstance(m, mm.MaxIoUMatcher) and m.low_quality == a["match_low_quality"]
        assert (m.high_threshold, m.low_threshold, m.min_pos_iou) == (a["pos_iou_thr"], a["neg_iou_thr"], a["min_pos_iou"])
        sampler = mine.fg_bg_sampler
        assert isinstance(sampler, mm.RandomSampler)
        assert (sampler.batch_size_per_image, sampler.positive_fraction) == (s["num"], s["pos_fraction"])
    assert model.roi_heads.sampler == "mmdet"  # gt added as proposals, after matching


def full_assignment(ref, cands, target, image, **fields) -> torch.Tensor:
    """The box head's assignment of every [gt; candidates] candidate, in the reference's order (gt index, -1
    negative, -2 ignored), read off ``select_training_samples`` with a sampler that takes everything."""
    model = build_model(seed_recipe(ref, **fields), ref["info"]["num_classes"] + 1)
    take_all = RecordedOrder(mm.RandomSampler(10 ** 9, 1.0), None)
    model.roi_heads.fg_bg_sampler = take_all
    _, (matched,), _, _ = model.roi_heads.select_training_samples([cands], [target])
    pos, neg = take_all.seen[0]["pos"][0].bool(), take_all.seen[0]["neg"][0].bool()
    mmdet = model.roi_heads.sampler == "mmdet"
    kept = torch.cat([torch.where(pos)[0], torch.where(neg)[0]]) if mmdet else torch.where(pos | neg)[0]
    out = torch.full((len(pos),), -2)
    out[kept] = matched
    out[neg] = -1
    if mmdet:  # [gt; proposals], as mmdetection
        return out
    return torch.cat([out[len(cands):], out[:len(cands)]])  # torchvision's [proposals; gt]


def test_rpn_assignment_of_a_dense_grid_of_objects_equals_mmdetections(ref, candidates):
    (anchors, target), = candidates["rpn_dense"]
    model = build_model(seed_recipe(ref), ref["info"]["num_classes"] + 1)
    ours = model.rpn.proposal_matcher(box_iou(target["boxes"], anchors))
    theirs = torch.from_numpy(ref["rpn_dense_assigned0"]).long()
    assert torch.equal(ours, theirs) and (theirs >= 0).sum() > 128


@pytest.mark.parametrize("setting", ["rcnn_dense", "rcnn_nested"])
def test_gt_boxes_join_the_candidates_after_matching(ref, candidates, setting):
    """Every candidate of every image assigned as by mmdetection: with 30 jittered copies of each gt among the
    step's proposals, and with occluded objects (a box and the part of it left visible). torchvision's way (gt
    appended before matching: every gt is its own best match, so no proposal is reassigned to the gt it best
    matches by the low-quality rule) assigns proposals of occluded objects to the occluder."""
    differ = 0
    for i, (cands, target) in enumerate(candidates[setting]):
        theirs = torch.from_numpy(ref[f"{setting}_assigned{i}"]).long()
        assert torch.equal(full_assignment(ref, cands, target, i), theirs)
        differ += int((full_assignment(ref, cands, target, i, sampler="torchvision") != theirs).sum())
    assert differ > 0 if setting == "rcnn_nested" else differ == 0


# ------------------------------------------------------------------ the seed recipe trains end to end
SIZE_FIELDS = {"name", "image_size", "backbone_width", "fpn_channels", "head_channels", "rois_per_image", "total_batch",
               "lr", "max_iters", "warmup_iters", "steps", "eval_resize", "checkpoint_every", "log_every"}


def test_the_smoke_recipe_is_the_seed_recipe_at_cpu_size():
    """``r50_ssj_scp_smoke`` differs from ``r50_ssj_scp_90k`` in sizes only: every arithmetic field, the pipeline,
    the optimiser, the RPN's proposals, the warmup factor and the step shape are the seed's."""
    seed, smoke = recipe("r50_ssj_scp_90k").as_dict(), recipe("r50_ssj_scp_smoke").as_dict()
    assert {k for k in seed if seed[k] != smoke[k]} == SIZE_FIELDS
    assert smoke["lr"] / smoke["total_batch"] == pytest.approx(seed["lr"] / seed["total_batch"])  # linear scaling
    assert [int(f * smoke["max_iters"]) for f in (0.9, 0.95, 0.975)] == list(smoke["steps"])
    assert [s / seed["max_iters"] for s in seed["steps"]] == [0.9, 0.95, 0.975]


def test_the_seed_recipe_at_cpu_size_trains_50_iterations_with_a_falling_loss(tmp_path):
    """``python -m trainer.run --preset r50_ssj_scp_smoke`` on demo images (16): ResNet-50 (1/8 width) with every
    mmdetection choice, ssj_scp at 256^2, the seed's optimiser and schedule; per-iteration losses fall (the
    classifier learns the background first, the RPN's objectness and the masks too)."""
    from dali_scp.synthetic import generate
    from trainer import run as run_mod
    root = generate(tmp_path / "demo", train=16, val=2, seed=0, demo=True)
    out = tmp_path / "run"
    summary = run_mod.train(run_mod.parse_args(["--preset", "r50_ssj_scp_smoke", "--coco-root", str(root), "--no-eval",
                                                "--threads", "2", "--out", str(out)]))
    assert summary["iteration"] == 50
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["backbone"] == "resnet50" and config["recipe"]["pipeline"] == "ssj_scp"
    assert config["resolved"]["total_batch"] == 2 and config["resolved"]["lr"] == pytest.approx(0.1 * 2 / 64)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    per_iter = {k: [x[k] for x in lines if k in x] for k in ("loss", "loss_objectness", "loss_mask", "acc")}
    assert len(per_iter["loss"]) == 50
    first, last = ({k: np.mean(v[s]) for k, v in per_iter.items()} for s in (slice(0, 5), slice(-10, None)))
    assert last["loss"] < 0.75 * first["loss"], per_iter["loss"]
    assert last["loss_objectness"] < 0.98 * first["loss_objectness"] and last["loss_mask"] < 0.9 * first["loss_mask"]
    assert last["acc"] > first["acc"]
