import warnings

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunetv2_versemi.network.head import DynamicHead, VerSemiNetwork, merge_task_logits

# tasks: A (1 class, merged 1), B (2 classes, merged 2, 3), C (1 class, merged 4); + synthetic
NUM_CLASSES = [2, 3, 2, 2]
MERGED = [[1], [2, 3], [4]]


def _backbone(dim: int, residual: bool = False, ds: bool = True):
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    norm = nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d
    kw = dict(input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=conv, kernel_sizes=3,
              strides=[1, 2, 2], num_classes=2, n_conv_per_stage_decoder=1, conv_bias=True, norm_op=norm,
              norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, deep_supervision=ds)
    if residual:
        return ResidualEncoderUNet(n_blocks_per_stage=[1, 1, 1], **kw)
    return PlainConvUNet(n_conv_per_stage=1, **kw)


def _net(dim=2, residual=False, ds=True):
    torch.manual_seed(0)
    return VerSemiNetwork(_backbone(dim, residual, ds), NUM_CLASSES, MERGED).eval()


@pytest.mark.parametrize("dim,residual", [(2, False), (3, False), (2, True), (3, True)])
def test_one_pass_equals_per_prompt_passes(dim, residual):
    net = _net(dim, residual)
    x = torch.randn(3, 1, *([16] * dim))
    all_prompts = torch.arange(4)[None].expand(3, -1)
    with torch.no_grad():
        together = net(x, all_prompts)
        for p in range(4):
            alone = net(x, torch.full((3, 1), p))
            for s in range(len(together)):
                torch.testing.assert_close(together[s][:, p], alone[s][:, 0], rtol=1e-5, atol=1e-5)
    assert len(together) == 2  # deep supervision: one output per decoder stage
    assert together[0].shape == (3, 4, 3, *([16] * dim))
    assert together[1].shape == (3, 4, 3, *([8] * dim))


def test_grouped_prompts_equal_separate_calls():
    net = _net()
    x = torch.randn(5, 1, 16, 16)
    g1, g2 = torch.tensor([[0], [1]]), torch.tensor([[3, 0, 2]] * 3)
    with torch.no_grad():
        grouped = net(x, [g1, g2])
        torch.testing.assert_close(grouped[0][0], net(x[:2], g1)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grouped[1][0], net(x[2:], g2)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cover 2 samples"):
        net(x, [g1])


def test_prompt_changes_output_and_sample_context_matters():
    net = _net()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out = net(x, torch.arange(4)[None].expand(2, -1))[0]
    assert not torch.allclose(out[:, 0], out[:, 1])


def test_merge_contract_hand_made_logits():
    # one voxel per case along the last axis: all background / A fg / B class 2 / A and C fg, C more confident
    big = 10.0
    logits = torch.full((1, 3, 3, 4), -big)
    logits[0, :, 0, :] = big  # everybody background by default
    # voxel 1: A foreground
    logits[0, 0, :, 1] = torch.tensor([-big, big, -big])
    # voxel 2: B class 2 (local index 2 -> merged 3)
    logits[0, 1, :, 2] = torch.tensor([-big, 0, big])
    # voxel 3: A weakly foreground, C strongly foreground
    logits[0, 0, :, 3] = torch.tensor([0.0, 0.5, -big])
    logits[0, 2, :, 3] = torch.tensor([-big, big, -big])
    merged = merge_task_logits(logits, NUM_CLASSES[:3], MERGED)
    assert merged.shape == (1, 5, 4)
    assert merged.argmax(1).tolist() == [[0, 1, 3, 4]]


def test_merged_forward_background_iff_all_tasks_background():
    net = _net(ds=False)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad(), net.prompted(None, routing="all_heads"):
        merged = net(x)
        per_task = net(x, torch.arange(3)[None].expand(2, -1))[0]
    assert merged.shape == (2, 5, 16, 16)
    task_fg = torch.stack([per_task[:, t, :NUM_CLASSES[t]].argmax(1) > 0 for t in range(3)], 1).any(1)
    assert torch.equal(merged.argmax(1) > 0, task_fg)


def test_prompt_mode_fills_only_that_task():
    net = _net(ds=False)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad(), net.prompted(1):
        out = net(x)
        head = net(x, torch.tensor([[1]]))[0][:, 0]
    assert net.prompt is None  # the block restores what was there
    assert torch.equal(out[:, [0, 2, 3]], head[:, :3])
    assert (out[:, [1, 4]] < head[:, :3].min(1, keepdim=True).values).all()
    assert set(out.argmax(1).unique().tolist()) <= {0, 2, 3}


def test_recognised_routing_equals_prompted_output_per_sample():
    """Prompt-free forward, default routing: each sample is predicted exactly as under the prompt of the task
    the classifier picks for it, and the recognised probabilities are kept."""
    net = _net(ds=False)
    assert net.routing == "recognised"
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        context = net._recognition_features(net.backbone.encoder(x))
        # a classifier that sends sample 0 to task 2, samples 1 and 2 to task 1 (one feature each)
        w = torch.zeros_like(net.task_classifier[1].weight)
        w[2, 0], w[1, 1] = 1.0, 1.0
        net.task_classifier[1].weight.copy_(w)
        net.task_classifier[1].bias.zero_()
        picked = net.task_classifier(context).argmax(1)
        with net.recording_task_probabilities() as seen:
            out = net(x)
        for i, t in enumerate(picked.tolist()):
            with net.prompted(t):
                alone = net(x[i:i + 1])
            torch.testing.assert_close(out[i:i + 1], alone)
    assert len(seen) == 1  # the prompted forwards recorded nothing
    assert torch.equal(seen[0].argmax(1), picked)
    torch.testing.assert_close(seen[0].sum(1), torch.ones(3))
    with pytest.raises(ValueError, match="routing"), net.prompted(None, routing="bogus"):
        pass


def test_recognition_output_and_its_gradient():
    net = _net().train()
    x = torch.randn(2, 1, 16, 16)
    out, task_logits = net(x, torch.tensor([[0], [1]]), recognition=True)
    assert task_logits.shape == (2, 3) and len(out) == 2
    torch.nn.functional.cross_entropy(task_logits, torch.tensor([0, 2])).backward()
    assert net.task_classifier[1].weight.grad.abs().sum() > 0
    # detached by default: the recognition loss leaves the backbone untouched
    assert all(p.grad is None for p in net.backbone.parameters())
    net.zero_grad(set_to_none=True)
    net.recognition_detach = False
    torch.nn.init.normal_(net.task_classifier[1].weight)  # zero at start: no gradient reaches the features yet
    _, task_logits = net(x, torch.tensor([[0], [1]]), recognition=True)
    torch.nn.functional.cross_entropy(task_logits, torch.tensor([0, 2])).backward()
    assert next(net.backbone.encoder.parameters()).grad.abs().sum() > 0
    # recognise() is the encoder and the classifier alone, with the forward's probabilities
    net.eval()
    net.recognition_detach = True
    with torch.no_grad():
        _, logits = net(x, torch.tensor([[0], [1]]), recognition=True)
        torch.testing.assert_close(net.recognise(x), torch.softmax(logits, 1))


def test_checkpoint_without_classifier_loads_with_all_heads_routing():
    old = {k: v for k, v in _net().state_dict().items() if not k.startswith("task_classifier.")}
    net = _net()
    with pytest.warns(UserWarning, match="no task classifier"):
        net.load_state_dict(old)
    assert net.routing == "all_heads"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net.load_state_dict(old)  # nnU-Net reloads per case: one notice is enough
    assert not caught
    fresh = _net()
    fresh.load_state_dict(_net().state_dict())
    assert fresh.routing == "recognised"
    broken = dict(old)
    broken.pop(next(iter(broken)))
    with pytest.raises(RuntimeError, match="Missing key"):
        _net().load_state_dict(broken)


def test_deep_supervision_toggle_through_decoder():
    net = _net()
    net.decoder.deep_supervision = False
    with torch.no_grad():
        out = net(torch.randn(1, 1, 16, 16))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 5, 16, 16)


def test_gradient_reaches_backbone_and_controller():
    net = _net().train()
    out = net(torch.randn(2, 1, 16, 16), torch.tensor([[0], [1]]))
    out[0].sum().backward()
    assert net.heads[0].controller.weight.grad.abs().sum() > 0
    assert next(net.backbone.encoder.parameters()).grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs", [dict(in_channels=0), dict(num_prompts=1), dict(out_channels=1)])
def test_ill_head_arguments(kwargs):
    args = dict(in_channels=4, context_channels=8, num_prompts=3, out_channels=2, conv_op=nn.Conv2d)
    args.update(kwargs)
    with pytest.raises(ValueError):
        DynamicHead(**args)


def test_ill_class_counts():
    with pytest.raises(ValueError, match="needs 3 outputs"):
        VerSemiNetwork(_backbone(2), [2, 2, 2, 2], MERGED)


@pytest.mark.parametrize("dim,residual", [(2, False), (3, False), (2, True)])
def test_static_head_starts_at_nnunet_output_scale(dim, residual):
    """The foreground-minus-background logit of a fresh head varies over space as much as nnU-Net's own output
    layer on the same backbone (the dynamic-only head: ~7x less, which made it learn slowly under SGD)."""
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    x = torch.randn(4, 1, *([24] * dim))

    def spatial_std(static: bool) -> float:
        torch.manual_seed(0)
        bb = _backbone(dim, residual)
        bb.apply(InitWeights_He(1e-2))  # what get_network_from_plans(allow_init=True) does
        net = VerSemiNetwork(bb, NUM_CLASSES, MERGED, static_head=static).eval()
        with torch.no_grad():
            out = net(x, torch.arange(4)[None].expand(4, -1))[0]
        return (out[:, :, 1] - out[:, :, 0]).flatten(2).std(dim=2).mean().item()

    torch.manual_seed(0)
    ref = _backbone(dim, residual)
    ref.apply(InitWeights_He(1e-2))
    with torch.no_grad():
        o = ref.eval()(x)[0]
    nnunet = (o[:, 1] - o[:, 0]).flatten(1).std(dim=1).mean().item()
    assert 0.5 < spatial_std(True) / nnunet < 2.0
    assert spatial_std(False) / nnunet < 0.3


def test_static_head_path_is_per_prompt_and_dynamic_last_layer_starts_at_zero():
    net = _net()
    head = net.heads[0]
    assert head.static is not None and head.static.out_channels == 4 * 3  # prompts x max classes
    last = head.controller.weight.shape[0] - (3 * head.hidden + 3)
    assert head.controller.weight[last:].abs().sum() == 0 and head.controller.bias[last:].abs().sum() == 0
    # at initialisation the head is exactly the static per-prompt layer
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        feats, _ = net.features(x)
        out = net(x, torch.tensor([[2], [0]]))[0]
        static = head.static(feats[0]).unflatten(1, (4, 3))
    torch.testing.assert_close(out[0, 0], static[0, 2])
    torch.testing.assert_close(out[1, 0], static[1, 0])
    dyn = VerSemiNetwork(_backbone(2), NUM_CLASSES, MERGED, static_head=False)
    assert dyn.heads[0].static is None


def test_progress_plot_draws_recognition_per_task(tmp_path, monkeypatch):
    """The VerSemi progress plot shows each task's recognition accuracy beside its pseudo Dice."""
    import matplotlib.pyplot as plt

    from nnunetv2_versemi.tasktable import Task, TaskLabel, TaskTable
    from nnunetv2_versemi.training import plotting

    table = TaskTable(tasks=[Task(name=n, source_dataset=f"Dataset90{i}_{n}", channel_names={"0": "CT"},
                                  labels=[TaskLabel("x", 1, i + 1)], labeled=[f"{n}_a"])
                             for i, n in enumerate(("A", "B"))])
    log = {f"versemi_{k}": [0.5, 0.4, 0.3] for k in ("sup", "syn", "spec", "unsup", "cons", "rec")}
    log.update(versemi_unsup_lambda=[0, 0, 1], versemi_unsup_kept=[float("nan"), float("nan"), 0.9],
               versemi_recognition=[[0.5, 0.6], [0.9, 0.8], [1.0, 0.95]],
               dice_per_class_or_region=[[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    plotting.plot_versemi_progress(log, table, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0
    labels = [line.get_label() for line in figures[0].axes[1].get_lines()]
    assert "A: task recognised" in labels and "B: task recognised" in labels
    rec_b = next(line for line in figures[0].axes[1].get_lines() if line.get_label() == "B: task recognised")
    assert list(rec_b.get_ydata()) == [0.6, 0.8, 0.95]


def test_recognition_trains_with_batch_size_one():
    """nnU-Net plans batch size 1 (3d on small GPUs, the 3d CPU preset): the classifier must not need batch
    statistics."""
    net = _net().train()
    out, logits = net(torch.randn(1, 1, 16, 16), torch.tensor([[0]]), recognition=True)
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


def test_classifier_reads_every_encoder_stage_and_old_layout_loads():
    """The task classifier's input is the spatial mean of every encoder stage: changing only an early stage's
    features changes the recognition; a checkpoint whose classifier read the bottleneck alone is converted to
    the every-stage layout (its other stages at weight 0) and recognises as before."""
    net = _net(ds=False)
    assert net.recognition_input == "stages"
    channels = list(net.backbone.encoder.output_channels)
    assert net.task_classifier[1].in_features == sum(channels)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        skips = net.backbone.encoder(x)
        rec = net._recognition_features(skips)
        torch.testing.assert_close(rec[:, :channels[0]], skips[0].mean(dim=(2, 3)))
        torch.testing.assert_close(rec[:, -channels[-1]:], skips[-1].mean(dim=(2, 3)))
    old = _net(ds=False)
    old.recognition_input = "bottleneck"
    old.task_classifier = old._new_classifier()
    torch.nn.init.normal_(old.task_classifier[1].weight)
    old.eval()
    with torch.no_grad():
        old.task_classifier[0].running_mean.normal_()
        expected = old.recognise(x)
    fresh = _net(ds=False)
    with pytest.warns(UserWarning, match="reads the pooled bottleneck only"):
        fresh.load_state_dict(old.state_dict())
    assert fresh.recognition_input == "stages" and fresh.task_classifier[1].in_features == sum(channels)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.recognise(x), expected)
        early = x.clone()
        early[:, :, :4] += 3.0  # changes every stage's features: the converted classifier still reads the last
        torch.testing.assert_close(fresh.recognise(early), old.recognise(early))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.load_state_dict(old.state_dict())  # reloaded per case: no second notice
    assert not caught
    bottleneck_net = _net(ds=False)
    bottleneck_net.recognition_input = "bottleneck"
    bottleneck_net.task_classifier = bottleneck_net._new_classifier()
    with pytest.raises(RuntimeError, match="no conversion between them"):
        bottleneck_net.load_state_dict(_net(ds=False).state_dict())
    with pytest.raises(ValueError, match="recognition_input"):
        VerSemiNetwork(_backbone(2), NUM_CLASSES, MERGED, recognition_input="pooled")


def test_recognise_case_scores_with_running_statistics_whatever_mode_the_network_is_in():
    """nnU-Net's predictor leaves a freshly loaded network in training mode. ``--task auto`` must recognise a
    case with the classifier's running statistics: in training mode its standardisation would use the
    statistics of the case's own slices (one task), which removes what tells the tasks apart (measured: the
    demo's test cases near chance, most recognised wrongly, while stock routing was right)."""
    from types import SimpleNamespace

    import numpy as np

    from nnunetv2_versemi.inference.predict import recognise_case
    from nnunetv2_versemi.tasktable import Task, TaskLabel, TaskTable

    net = _net().train()
    standardize, linear = net.task_classifier
    g = torch.Generator().manual_seed(1)
    standardize.running_mean.copy_(torch.randn(standardize.num_features, generator=g))
    standardize.running_var.copy_(torch.rand(standardize.num_features, generator=g) + 0.5)
    linear.weight.data.copy_(torch.randn(linear.weight.shape, generator=g) * 5)
    stats = standardize.running_mean.clone()

    class Pre:  # nnU-Net's preprocessing as identity: the test is about the network's mode
        def run_case_npy(self, data, seg, props, pm, cm, dataset_json):
            return data.astype(np.float32), None, props

    cm = SimpleNamespace(patch_size=[16, 16], preprocessor_class=lambda verbose: Pre())
    predictor = SimpleNamespace(plans_manager=None, configuration_manager=cm, dataset_json={},
                                device=torch.device("cpu"))
    table = TaskTable(tasks=[Task(name=n, source_dataset=f"Dataset90{i}_{n}", channel_names={"0": "MRI"},
                                  labels=[TaskLabel("x", 1, 1 + i)], labeled=[f"{n}_a"],
                                  normalization={"scheme": "zscore"})
                             for i, n in enumerate(["A", "B", "C"])])
    image = np.random.default_rng(0).normal(size=(1, 6, 32, 32)).astype(np.float32)
    scores = recognise_case(predictor, net, image, {}, [0, 1, 2], table, batch=4)
    assert net.training  # the caller's mode comes back
    torch.testing.assert_close(standardize.running_mean, stats)  # recognising does not train the statistics

    from nnunetv2_versemi.data.normalization import prepare_raw_task_image

    seen = []
    with torch.no_grad():
        net.eval()
        for t in range(3):
            x = torch.from_numpy(prepare_raw_task_image(image, table.tasks[t])).permute(1, 0, 2, 3)
            tiles = torch.cat([x[..., i:i + 16, j:j + 16] for i in (0, 16) for j in (0, 16)])
            seen.append(net.recognise(tiles).mean(0).numpy())
    # the same z-score transform for the three tasks: one input, the classifier's own probabilities
    np.testing.assert_allclose(seen[0], seen[1], rtol=1e-5)
    np.testing.assert_allclose(scores, np.where(np.arange(3) == seen[0].argmax(), 1.0, 0.0), atol=1e-6)
    assert scores.argmax() == 0 and seen[0][0] > 0.5  # planted: task A, not near chance


def _planted_recognition(monkeypatch, schemes: list[str], seen: dict[int, list[float]]):
    from types import SimpleNamespace

    import numpy as np

    from nnunetv2_versemi.inference import predict
    from nnunetv2_versemi.tasktable import Task, TaskLabel, TaskTable

    norms = {"CT": {"scheme": "CT", "mean": 100.0, "std": 20.0, "lower": 50.0, "upper": 150.0},
             "zscore": {"scheme": "zscore"}}
    table = TaskTable(tasks=[Task(name=f"T{i}", source_dataset=f"Dataset90{i}_T{i}", channel_names={"0": s},
                                  labels=[TaskLabel("x", 1, 1 + i)], labeled=[f"T{i}_a"], normalization=norms[s])
                             for i, s in enumerate(schemes)])
    monkeypatch.setattr(predict, "_task_probabilities",
                        lambda predictor, net, pre, image, props, task, batch:
                        np.array(seen[table.names.index(task.name)]))
    predictor = SimpleNamespace(configuration_manager=SimpleNamespace(preprocessor_class=lambda verbose: None))
    return predict.recognise_case(predictor, torch.nn.Identity(), np.zeros((1, 2, 4, 4)), {}, list(seen), table)


def test_recognition_prefers_a_consistent_calibrated_hypothesis(monkeypatch):
    """The demo's CT case (measured): z-scored as the MR task's images are, it looks like MR (0.94); under its own
    Hounsfield window it looks like its own task (0.96). The CT window decides; under the other CT task's window
    the classifier leans to that task (0.38), so both CT hypotheses stay in and their probabilities compare."""
    ct, mr, mc = [0.96, 0.03, 0.01], [0.03, 0.94, 0.03], [0.28, 0.35, 0.37]
    scores = _planted_recognition(monkeypatch, ["CT", "zscore", "CT"], {0: ct, 1: mr, 2: mc})
    assert scores.argmax() == 0 and scores[1] == 0.0
    assert scores[0] == pytest.approx(0.96 / (0.96 + 0.37)) and scores.sum() == pytest.approx(1.0)


def test_recognition_of_an_mr_case_and_the_fallbacks(monkeypatch):
    # an MR case looks like MR under every transform: only the MR hypothesis is consistent
    scores = _planted_recognition(monkeypatch, ["CT", "zscore", "CT"],
                                  {0: [0.05, 0.85, 0.1], 1: [0.07, 0.81, 0.12], 2: [0.04, 0.76, 0.2]})
    assert scores.tolist() == [0.0, 1.0, 0.0]
    # no consistent hypothesis: every candidate's probability of itself counts
    scores = _planted_recognition(monkeypatch, ["CT", "zscore", "CT"],
                                  {0: [0.2, 0.7, 0.1], 1: [0.6, 0.3, 0.1], 2: [0.1, 0.6, 0.3]})
    assert scores == pytest.approx([0.25, 0.375, 0.375])
    # consistent, none calibrated: the consistent ones
    scores = _planted_recognition(monkeypatch, ["zscore", "zscore", "CT"],
                                  {0: [0.6, 0.3, 0.1], 1: [0.2, 0.7, 0.1], 2: [0.1, 0.6, 0.3]})
    assert scores == pytest.approx([0.6 / 1.3, 0.7 / 1.3, 0.0])
    # a task that is not a candidate (file format or channels) scores 0
    scores = _planted_recognition(monkeypatch, ["CT", "zscore", "CT"], {0: [0.9, 0.05, 0.05], 1: [0.1, 0.8, 0.1]})
    assert scores[2] == 0.0 and scores.argmax() == 0
