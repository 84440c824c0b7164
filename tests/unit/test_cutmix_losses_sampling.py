import numpy as np
import pytest
import torch

from nnunetv2_versemi.training import cutmix, losses
from nnunetv2_versemi.training.sampling import draw_batch_tasks


# ------------------------------------------------------------------------------------------ CutMix
def test_mix_constant_images_exact_values():
    a = torch.full((1, 1, 4, 4), 0.25)
    b = torch.full((1, 1, 4, 4), 0.5)
    box = ((1, 3), (0, 2))
    m = cutmix.box_masks([box], (4, 4))
    x = cutmix.mix(a, b, m)
    expected = torch.full((4, 4), 0.25)
    expected[1:3, 0:2] = 0.5
    assert torch.equal(x[0, 0], expected)
    assert x.sum().item() == pytest.approx(12 * 0.25 + 4 * 0.5)


def test_labels_follow_the_same_box():
    img_a, img_b = torch.zeros(2, 1, 6, 6, 6), torch.ones(2, 1, 6, 6, 6)
    lab_a, lab_b = torch.full((2, 1, 6, 6, 6), 3), torch.full((2, 1, 6, 6, 6), 7)
    boxes = cutmix.draw_boxes(2, (6, 6, 6), (0.5, 0.5), np.random.RandomState(3))
    m = cutmix.box_masks(boxes, (6, 6, 6))
    x, y = cutmix.mix(img_a, img_b, m), cutmix.mix(lab_a, lab_b, m)
    assert y.dtype == lab_a.dtype
    assert torch.equal(x == 1, y == 7)
    assert (x == 1).sum().item() == 2 * 27  # side round(0.5 * 6) = 3 on each axis, per sample


def test_box_edge_cases():
    full = cutmix.draw_boxes(5, (4, 7), (1.0, 1.0), np.random.RandomState(0))
    assert all(b == ((0, 4), (0, 7)) for b in full)
    tiny = cutmix.draw_boxes(20, (3, 3), (0.01, 0.01), np.random.RandomState(0))
    assert all(e - s == 1 and 0 <= s < 3 for b in tiny for s, e in b)
    boxes = cutmix.draw_boxes(200, (10, 10), (0.3, 0.6), np.random.RandomState(1))
    starts = {b[0][0] for b in boxes}
    assert len(starts) > 3  # positions vary
    assert all(3 <= e - s <= 6 and 0 <= s and e <= 10 for b in boxes for s, e in b)


def test_mask_resize_to_lower_scale():
    m = cutmix.box_masks([((0, 4), (4, 8))], (8, 8))
    small = cutmix.resize_mask(m, (4, 4))
    assert small[0, 0].tolist() == [[0, 0, 1, 1]] * 2 + [[0, 0, 0, 0]] * 2


@pytest.mark.parametrize("ratio", [(0.0, 0.5), (0.6, 0.3), (0.5, 1.2)])
def test_ill_box_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        cutmix.draw_boxes(1, (8, 8), ratio)


def test_ill_box_dimensions():
    with pytest.raises(ValueError, match="axes"):
        cutmix.box_masks([((0, 2),)], (4, 4))


# ------------------------------------------------------------------------------------------- losses
def test_soft_dice_perfect_zero_otherwise_positive():
    t = torch.zeros(2, 8, 8)
    t[:, 2:5, 2:5] = 1
    assert losses.soft_dice_loss(t.clone(), t).item() == pytest.approx(0, abs=1e-6)
    assert losses.soft_dice_loss(1 - t, t).item() == pytest.approx(1, abs=1e-5)
    half = t * 0.5
    # squared (official) form: 1 - 2 sum(pq) / (sum(p^2) + sum(q^2))
    assert losses.soft_dice_loss(half, t).item() == pytest.approx(1 - 2 * 0.5 * 18 / (0.25 * 18 + 18), abs=1e-5)


def test_soft_dice_zero_at_agreement_for_soft_near_empty_maps():
    # the linear form gave 0.93 here: it rewarded sharpening, not agreement
    torch.manual_seed(0)
    p = torch.rand(4, 16, 16) * 0.1
    assert losses.soft_dice_loss(p, p.clone()).item() == pytest.approx(0, abs=1e-4)
    assert losses.soft_dice_loss(p, torch.rand(4, 16, 16) * 0.1).item() > 0.05


def test_guard_skips_empty_targets_and_keeps_graph():
    target = torch.zeros(3, 10, 10)
    target[1, :2, :5] = 0.9  # 10 % confident foreground
    target[2, 0, 0] = 0.9  # 1 % confident foreground
    target[0] = 0.4  # soft, nowhere confident
    assert losses.foreground_guard(target, 0.05).tolist() == [False, True, False]
    assert losses.foreground_guard(target, 0.01).tolist() == [False, True, True]
    assert losses.foreground_guard(target, 0.0).tolist() == [True, True, True]
    logits = torch.zeros(3, 10, 10, requires_grad=True)
    prob = torch.sigmoid(logits)
    keep = losses.foreground_guard(target, 0.05)
    loss = losses.guarded_consistency_loss(prob, target, keep)
    assert loss.item() == pytest.approx(losses.soft_dice_loss(prob[1:2], target[1:2]).item())
    loss.backward()
    assert logits.grad[1].abs().sum() > 0 and logits.grad[0].abs().sum() == 0 and logits.grad[2].abs().sum() == 0
    # every target empty: a zero loss that still backpropagates (DDP needs every parameter in the graph)
    none = losses.guarded_consistency_loss(prob, torch.zeros(3, 10, 10), losses.foreground_guard(
        torch.zeros(3, 10, 10), 0.05))
    assert none.item() == 0 and none.requires_grad


def test_soft_dice_mask_restricts_region():
    p, t = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    p[0, :, :2] = 1  # wrong outside the mask only
    t[0, :, 2:] = 1
    p[0, :, 2:] = 1
    mask = torch.zeros(1, 4, 4)
    mask[0, :, 2:] = 1
    assert losses.soft_dice_loss(p, t, mask=mask).item() == pytest.approx(0, abs=1e-6)
    assert losses.soft_dice_loss(p, t).item() > 0.3


def test_aggregate_is_max_of_task_foreground():
    logits = torch.zeros(1, 2, 3, 1)
    logits[0, 0, :, 0] = torch.tensor([0.0, 2.0, -50.0])  # task 0 (2 classes): fg = 1 - softmax[0]
    logits[0, 1, :, 0] = torch.tensor([1.0, 0.0, 3.0])  # task 1 (3 classes)
    agg = losses.aggregate_task_foreground(logits, [2, 3])
    fg0 = 1 - torch.softmax(torch.tensor([0.0, 2.0]), 0)[0]
    fg1 = 1 - torch.softmax(torch.tensor([1.0, 0.0, 3.0]), 0)[0]
    assert agg.item() == pytest.approx(max(fg0, fg1).item(), abs=1e-6)


def test_unsup_gradient_flows_to_student_not_through_detached_target():
    syn_logits = torch.randn(2, 2, 6, 6, requires_grad=True)
    task_logits = torch.randn(2, 2, 2, 6, 6, requires_grad=True)
    target = losses.aggregate_task_foreground(task_logits, [2, 2]).detach()
    loss = losses.soft_dice_loss(losses.foreground_probability(syn_logits, 2), target)
    loss.backward()
    assert syn_logits.grad.abs().sum() > 0
    assert task_logits.grad is None
    # without detaching (official behaviour) both sides receive gradient
    syn2 = syn_logits.detach().clone().requires_grad_(True)
    task2 = task_logits.detach().clone().requires_grad_(True)
    losses.soft_dice_loss(losses.foreground_probability(syn2, 2),
                          losses.aggregate_task_foreground(task2, [2, 2])).backward()
    assert task2.grad.abs().sum() > 0


def test_prompted_supervised_loss_uses_each_tasks_classes():
    seen = []

    def fake_loss(logits, targets):
        seen.append((logits[0].shape[1], targets[0].shape[0]))
        return logits[0].sum() * 0 + float(logits[0].shape[1])

    logits = [torch.zeros(3, 3, 4, 4)]
    targets = [torch.zeros(3, 1, 4, 4)]
    tasks = torch.tensor([0, 1, 1])
    total = losses.prompted_supervised_loss(logits, targets, tasks, [2, 3, 2], fake_loss)
    assert sorted(seen) == [(2, 1), (3, 2)]
    assert total.item() == pytest.approx(2 * 1 / 3 + 3 * 2 / 3)


def test_nnunet_loss_near_zero_at_perfect_prediction():
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1, weight_dice=1,
                          dice_class=MemoryEfficientSoftDiceLoss)
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    perfect = torch.cat((1 - target, target), 1) * 40 - 20
    val = losses.prompted_supervised_loss([perfect], [target], torch.tensor([0, 0]), [2, 2],
                                          lambda lg, tg: loss(lg[0], tg[0]))
    wrong = losses.prompted_supervised_loss([-perfect], [target], torch.tensor([0, 0]), [2, 2],
                                            lambda lg, tg: loss(lg[0], tg[0]))
    assert val.item() < -0.99  # nnU-Net's Dice term is -Dice
    assert wrong.item() > 0


def test_deep_supervision_weights_match_nnunet():
    w = losses.deep_supervision_weights(4)
    assert w[-1] == 0 and sum(w) == pytest.approx(1) and w[0] == pytest.approx(2 * w[1])
    assert losses.deep_supervision_sum([torch.tensor(1.0), torch.tensor(3.0)], [0.5, 0.5]).item() == 2.0


# ----------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("num_tasks,batch", [(3, 12), (3, 2), (2, 5), (4, 8), (1, 4)])
def test_batch_tasks_balanced_and_pairs_cross_tasks(num_tasks, batch):
    rng = np.random.RandomState(0)
    for _ in range(50):
        slots = draw_batch_tasks(num_tasks, batch, rng)
        counts = np.bincount(slots, minlength=num_tasks)
        if batch >= num_tasks:
            assert counts.max() - counts.min() <= 1 if batch % 2 == 0 or num_tasks == 1 else counts.max() - \
                counts.min() <= 2
        half = batch // 2
        if num_tasks > 1:
            assert all(slots[i] != slots[i + half] for i in range(half))


def test_batch_tasks_only_available():
    slots = draw_batch_tasks(4, 6, np.random.RandomState(0), available=[1, 3])
    assert set(slots) == {1, 3}
    with pytest.raises(ValueError):
        draw_batch_tasks(3, 4, np.random.RandomState(0), available=[])


def _loader(balance, case_tasks, batch_size=6):
    from types import SimpleNamespace

    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunetv2_versemi.training.sampling import TaskBalancedDataLoader

    data = SimpleNamespace(identifiers=sorted(case_tasks))
    lm = LabelManager({"background": 0, "a": 1}, regions_class_order=None)
    return TaskBalancedDataLoader(data, batch_size, (8, 8), (8, 8), lm, case_tasks=case_tasks, num_tasks=3,
                                  balance=balance)


def test_loader_balances_tasks_not_cases():
    # task 0 has 10 cases, tasks 1 and 2 one each: balanced batches still hold 2 of each task
    case_tasks = {f"A_{i}": 0 for i in range(10)} | {"B_0": 1, "C_0": 2}
    dl = _loader("tasks", case_tasks)
    np.random.seed(0)
    for _ in range(20):
        keys = dl.get_indices()
        assert sorted(np.bincount([case_tasks[k] for k in keys], minlength=3)) == [2, 2, 2]
        assert all(case_tasks[keys[i]] != case_tasks[keys[i + 3]] for i in range(3))
    dl = _loader("cases", case_tasks)
    counts = np.zeros(3)
    for _ in range(200):
        counts += np.bincount([case_tasks[k] for k in dl.get_indices()], minlength=3)
    assert counts[0] / counts.sum() > 0.7  # proportional to case counts (10 of 12)


class _CornerDataset:
    """2d cases of 32x32 with a 3x3 foreground blob in a corner: random 8x8 crops rarely hold foreground."""

    def __init__(self, case_tasks):
        self.identifiers = sorted(case_tasks)

    def load_case(self, identifier):
        data = np.random.rand(1, 1, 32, 32).astype(np.float32)
        seg = np.zeros((1, 1, 32, 32), dtype=np.int16)
        seg[0, 0, 1:4, 1:4] = 1
        locs = np.argwhere(seg > 0)
        return data, seg, None, {"class_locations": {1: locs}}


@pytest.mark.parametrize("batch_size", [4, 6])
def test_forced_foreground_serves_both_cutmix_sides(batch_size):
    """nnU-Net forces foreground into the last slots; the trainer pairs slot i with i + B/2, so the first
    half got foreground only by chance (measured 8 % of a-sides with a non-empty L_spec target)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunetv2_versemi.training.sampling import TaskBalancedDataLoader

    case_tasks = {f"A_{i}": 0 for i in range(3)} | {f"B_{i}": 1 for i in range(3)}
    dl = TaskBalancedDataLoader(_CornerDataset(case_tasks), batch_size, (8, 8), (8, 8),
                                LabelManager({"background": 0, "a": 1}, regions_class_order=None),
                                case_tasks=case_tasks, num_tasks=2, oversample_foreground_percent=0.33)
    np.random.seed(0)
    n = 300
    has_fg = np.zeros(batch_size)
    for _ in range(n):
        seg = dl.generate_train_batch()["target"]
        has_fg += (seg.flatten(1) > 0).any(1).numpy()
    rate = has_fg / n
    half = batch_size // 2
    forced = batch_size - round(batch_size * (1 - 0.33))
    # nnU-Net's overall rate of forced slots is kept: at least forced/B of the patches hold foreground
    assert rate.mean() >= forced / batch_size
    # both halves of the CutMix pairs are served alike (the old placement: first half ~0.1, last slot 1.0)
    assert abs(rate[:half].mean() - rate[half:].mean()) < 0.1
    assert rate.min() > 0.2


def test_ill_loader_arguments():
    with pytest.raises(ValueError, match="balance"):
        _loader("uniform", {"A_0": 0})
    from types import SimpleNamespace

    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunetv2_versemi.training.sampling import TaskBalancedDataLoader

    with pytest.raises(ValueError, match="without a task"):
        TaskBalancedDataLoader(SimpleNamespace(identifiers=["A_0", "X_1"]), 2, (8, 8), (8, 8),
                               LabelManager({"background": 0, "a": 1}, regions_class_order=None),
                               case_tasks={"A_0": 0}, num_tasks=1)


@pytest.mark.parametrize("batch_dice", [True, False])
def test_present_class_dice_equals_nnunet_when_all_present_and_skips_absent(batch_dice):
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.utilities.helpers import softmax_helper_dim1

    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    y = torch.randint(0, 3, (4, 1, 8, 8))
    y[:, 0, 0, :3] = torch.tensor([0, 1, 2])  # every class in every sample
    kw = dict(apply_nonlin=softmax_helper_dim1, batch_dice=batch_dice, do_bg=False, smooth=1e-5, ddp=False)
    ref = MemoryEfficientSoftDiceLoss(**kw)(x, y)
    ours = losses.PresentClassDiceLoss(**kw)(x, y)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)
    # class 2 absent everywhere: nnU-Net averages in its near-zero Dice, ours averages class 1 only
    y1 = y.clone()
    y1[y1 == 2] = 1
    only1 = losses.PresentClassDiceLoss(**kw)(x, y1)
    ref1 = MemoryEfficientSoftDiceLoss(**kw)(x, y1)
    p = torch.softmax(x, 1)[:, 1]
    t = (y1[:, 0] == 1).float()
    axes = (0, 1, 2) if batch_dice else (1, 2)
    dice1 = (2 * (p * t).sum(axes) + 1e-5) / (p.sum(axes) + t.sum(axes) + 1e-5)
    assert only1.item() == pytest.approx(-dice1.mean().item(), abs=1e-5)
    assert only1.item() < ref1.item() - 0.1
    # nothing present: 0, and still a graph
    xg = x.clone().requires_grad_(True)
    none = losses.PresentClassDiceLoss(**kw)(xg, torch.zeros_like(y))
    assert none.item() == 0 and none.requires_grad


def test_source_task_foreground_ignores_foreign_heads_false_positives():
    # 2 samples, 3 task heads, 1d "images" of 6 voxels; the box covers voxels 3..5
    fg = torch.zeros(2, 3, 6)
    fg[:, 0, 0] = 0.9  # head 0 (sample 0's own task outside the box) finds its structure
    fg[:, 1, 4] = 0.8  # head 1 (sample 0's task inside the box) finds its structure
    fg[:, 2, :] = 0.7  # head 2 fires everywhere: a head on images it never saw
    mask = torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.float32).expand(2, 1, 6)
    out = losses.source_task_foreground(fg, torch.tensor([0, 2]), torch.tensor([1, 2]), mask)
    assert torch.allclose(out[0], torch.tensor([0.9, 0, 0, 0, 0.8, 0]))
    assert torch.allclose(out[1], torch.full((6,), 0.7))  # both regions from task 2: its own head counts
    # the paper's P_agg takes head 2's false positives on sample 0
    assert torch.allclose(fg.max(dim=1).values[0], torch.tensor([0.9, 0.7, 0.7, 0.7, 0.8, 0.7]))


def test_masked_cross_entropy_counts_only_labeled_voxels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 5, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 5, 5), generator=g)
    full = losses.masked_cross_entropy(logits, target)
    assert torch.allclose(full, torch.nn.functional.cross_entropy(logits, target))
    part = target.clone()
    part[:, :, 2:] = -1  # ignored voxels: changing the logits there changes nothing
    ref = torch.nn.functional.cross_entropy(logits[:, :, :, :2], target[:, :, :2])
    assert torch.allclose(losses.masked_cross_entropy(logits, part), ref)
    bumped = logits.detach().clone()
    bumped[:, :, :, 2:] += 5 * torch.randn(2, 3, 5, 3, generator=g)
    assert torch.allclose(losses.masked_cross_entropy(bumped, part), ref)
    none = losses.masked_cross_entropy(logits, torch.full_like(target, -1))
    none.backward()
    assert none.item() == 0.0 and logits.grad is not None


def test_class_balanced_cross_entropy_weighs_each_present_class_alike():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3, 6, 6, generator=g)
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[0, 0, 0] = 1  # one voxel of a small structure against 30 of background
    target[0, 5, :] = -1  # not confident: no label
    per_voxel = torch.nn.functional.cross_entropy(logits, target.clamp(min=0), reduction="none")
    expected = (per_voxel[target == 0].mean() + per_voxel[target == 1].mean()) / 2
    balanced = losses.masked_cross_entropy(logits, target, class_balanced=True)
    assert torch.allclose(balanced, expected)
    # the plain mean gives the single voxel 1/31 of the weight
    assert torch.allclose(losses.masked_cross_entropy(logits, target), per_voxel[target >= 0].mean())
    # class 2, absent from the labels, adds no term
    assert not torch.allclose(balanced, per_voxel[target >= 0].mean())
    empty = logits.clone().requires_grad_(True)
    none = losses.masked_cross_entropy(empty, torch.full_like(target, -1), class_balanced=True)
    none.backward()
    assert none.item() == 0.0 and empty.grad is not None


@pytest.mark.parametrize("per_task_batch, num_tasks", [(4, 3), (2, 2), (6, 2)])
def test_forced_foreground_per_task_gives_each_task_nnunets_count(per_task_batch, num_tasks):
    """With task batches (``forced_per_task``) every task's group of the batch gets the forced slots nnU-Net forces
    in a batch of that task alone (1 of 4 at 0.33), instead of a batch-wide number at random positions (5 of 16,
    which gives a task 0 to 4)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunetv2_versemi.training.sampling import TaskBalancedDataLoader

    case_tasks = {f"{chr(65 + t)}_{i}": t for t in range(num_tasks) for i in range(3)}
    batch = per_task_batch * num_tasks
    dl = TaskBalancedDataLoader(_CornerDataset(case_tasks), batch, (8, 8), (8, 8),
                                LabelManager({"background": 0, "a": 1}, regions_class_order=None),
                                case_tasks=case_tasks, num_tasks=num_tasks, oversample_foreground_percent=0.33,
                                forced_per_task=True)
    expected = per_task_batch - round(per_task_batch * (1 - 0.33))
    np.random.seed(0)
    for _ in range(30):
        keys = dl.get_indices()
        tasks = [case_tasks[k] for k in keys]
        assert np.bincount(tasks).tolist() == [per_task_batch] * num_tasks
        for t in range(num_tasks):
            assert sum(tasks[i] == t for i in dl._forced_slots) == expected, (tasks, dl._forced_slots)
    # the forced slots do hold foreground: the corner blob is rarely in a random 8x8 crop of 32x32
    seg = dl.generate_train_batch()["target"]
    assert all(bool((seg[i] > 0).any()) for i in dl._forced_slots)
    with pytest.raises(ValueError, match="forced_per_task needs balance='tasks'"):
        TaskBalancedDataLoader(_CornerDataset(case_tasks), batch, (8, 8), (8, 8),
                               LabelManager({"background": 0, "a": 1}, regions_class_order=None),
                               case_tasks=case_tasks, num_tasks=num_tasks, balance="cases", forced_per_task=True)
