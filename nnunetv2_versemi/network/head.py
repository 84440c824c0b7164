"""Prompt-conditioned dynamic head (DoDNet style) and the VerSemi network around nnU-Net's planned U-Net.

VerSemi (Lu et al., "Segment Together", TMI 2025) conditions only the segmentation head on a one-hot task
prompt; the encoder-decoder is task-agnostic. So one backbone pass serves every prompt: the head is applied
per prompt to the same decoder features, which is what makes this implementation cheaper than running the
whole network once per prompt.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from nnunetv2_versemi.network.checkpoints import CheckpointNotice, convert_state_dict

# margin by which channels a prompted forward leaves out stay below the task's lowest logit: they never win
# the argmax and stay finite (nnU-Net accumulates sliding-window logits in fp16 with Gaussian weights ~10)
_ABSENT_MARGIN = 10.0


class DynamicHead(nn.Module):
    """One deep-supervision scale of the dynamic head.

    decoder features -> 1x1 conv to ``hidden`` channels -> three dynamic 1x1 convs (hidden->hidden, ReLU,
    hidden->hidden, ReLU, hidden->out) whose weights come from a controller fed with the pooled bottleneck
    features and the one-hot prompt (DoDNet, as in VerSemi). Every prompt gets ``max(out_channels)``
    outputs; a prompt with fewer classes uses the first ones.

    ``static=True`` (default) adds a static path: one 1x1 conv per prompt on the decoder features, initialised
    like nnU-Net's own output layer, and the controller rows that generate the last dynamic layer start at
    zero. The head then starts as nnU-Net's per-task output layer and learns at its pace under nnU-Net's
    SGD, while the dynamic convs add what the context can tell. With ``static=False`` it is the official
    dynamic-only head, which learns much more slowly under SGD: with nnU-Net's instance-normalised backbone
    the pooled context is almost the same for every image, so the generated kernels barely differ between
    prompts at first (measurements in docs/METHOD.md).
    """

    def __init__(self, in_channels: int, context_channels: int, num_prompts: int, out_channels: int,
                 conv_op: type[nn.Module], hidden: int = 8, static: bool = True):
        super().__init__()
        if in_channels < 1 or context_channels < 1 or num_prompts < 2 or out_channels < 2 or hidden < 1:
            raise ValueError(
                f"DynamicHead needs positive channel counts, >= 2 prompts and >= 2 outputs, got in={in_channels}, "
                f"context={context_channels}, prompts={num_prompts}, out={out_channels}, hidden={hidden}"
            )
        self.num_prompts = num_prompts
        self.out_channels = out_channels
        self.hidden = hidden
        self.pre = conv_op(in_channels, hidden, 1, 1, 0, bias=True)
        self._shapes = [(hidden, hidden), (hidden, hidden), (out_channels, hidden)]
        n_params = sum(o * i + o for o, i in self._shapes)
        self.controller = nn.Linear(context_channels + num_prompts, n_params)
        self.static = None
        if static:
            self.static = conv_op(in_channels, num_prompts * out_channels, 1, 1, 0, bias=True)
            # nnU-Net's initialisation of its output layer (InitWeights_He(1e-2): Kaiming normal, zero bias)
            nn.init.kaiming_normal_(self.static.weight, a=1e-2)
            nn.init.zeros_(self.static.bias)
            last = n_params - (out_channels * hidden + out_channels)
            with torch.no_grad():
                self.controller.weight[last:].zero_()
                self.controller.bias[last:].zero_()

    def dynamic_params(self, context: torch.Tensor, prompts: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Weights and biases of the three dynamic layers, each (B, P, out, in) and (B, P, out, 1)."""
        b, p = prompts.shape
        onehot = F.one_hot(prompts, self.num_prompts).to(context.dtype)
        ctx = context[:, None, :].expand(b, p, context.shape[1])
        flat = self.controller(torch.cat((ctx, onehot), dim=-1))
        out, start = [], 0
        for o, i in self._shapes:
            w = flat[..., start:start + o * i].reshape(b, p, o, i)
            start += o * i
            bias = flat[..., start:start + o].reshape(b, p, o, 1)
            start += o
            out.append((w, bias))
        return out

    def forward(self, features: torch.Tensor, context: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """features (B, C, *S), context (B, Cb), prompts (B, P) long -> logits (B, P, out_channels, *S)."""
        b, p = prompts.shape
        spatial = features.shape[2:]
        x = self.pre(features).flatten(2)[:, None]  # (B, 1, hidden, N), broadcast over prompts
        (w1, b1), (w2, b2), (w3, b3) = self.dynamic_params(context, prompts)
        x = F.relu(torch.matmul(w1, x) + b1)
        x = F.relu(torch.matmul(w2, x) + b2)
        x = torch.matmul(w3, x) + b3
        if self.static is not None:
            # (B, prompts x out, N) -> each sample's requested prompts (B, P, out, N)
            static = self.static(features).flatten(2).unflatten(1, (self.num_prompts, self.out_channels))
            x = x + static[torch.arange(b, device=prompts.device)[:, None], prompts]
        return x.reshape(b, p, self.out_channels, *spatial)


RECOGNITION_INPUTS = ("stages", "bottleneck")
ROUTINGS = ("recognised", "all_heads")


class ScaledStandardize(nn.Module):
    """Per-channel standardisation of (N, C) features (a batch norm without affine parameters: batch statistics
    in training, running ones in eval), scaled by 1/sqrt(C) so the standardised vector has a norm near 1.

    Without the scale, a linear layer behind it under nnU-Net's SGD (learning rate 0.01, momentum 0.99) moves its
    logits by about C times the learning rate per step: it overshoots, and while the backbone's features
    drift it ends confidently wrong (cross-entropy near 10, measured). With it, the logits move by about the
    learning rate per step.

    Not a ``BatchNorm1d`` subclass (same buffers and state-dict keys as one, so checkpoints load either way):
    under ``-num_gpus`` nnU-Net converts every batch norm into a plain ``SyncBatchNorm``, which would drop the
    scale and the one-sample fallback.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.scale = num_features ** -0.5
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one sample (batch size 1, e.g. a 3d CPU preset): no batch statistics, use the running ones
        batch_stats = self.training and x.shape[0] >= 2
        if batch_stats:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, None, None, batch_stats, self.momentum,
                            self.eps) * self.scale


class VerSemiNetwork(nn.Module):
    """nnU-Net's planned U-Net as a task-agnostic backbone plus a dynamic head at every decoder scale, and a
    task classifier on the pooled bottleneck features.

    ``forward(x)`` without prompts returns merged-label-space logits (what stock nnU-Net inference calls); what
    it answers is set for a block with :meth:`prompted` (its task probabilities are collected with
    :meth:`recording_task_probabilities`):
      - ``prompted(t)``: only task t's channels are filled (its own logits at its merged positions);
      - no prompt, routing "recognised" (default): the same, with t the task the classifier recognises in each
        input patch (top-1). Task heads never see other tasks' images in training, so on a foreign image their
        output is arbitrary: routing keeps them off it;
      - ``prompted(None, routing="all_heads")``: every task head runs; the argmax is
        background where every task predicts background, else the foreground class of the task with the
        largest margin of foreground over background probability. Right when one image shows structures of
        several tasks (e.g. two organs of one CT, each labeled in another dataset); checkpoints without a
        task classifier load with this routing.
    ``forward(x, prompts)`` returns raw head outputs for training, see :meth:`forward`.
    """

    def __init__(self, backbone: nn.Module, num_classes_per_prompt: Sequence[int],
                 merged_values_per_task: Sequence[Sequence[int]], hidden: int = 8, static_head: bool = True,
                 recognition_input: str = "stages"):
        super().__init__()
        if not (hasattr(backbone, "encoder") and hasattr(backbone, "decoder")
                and hasattr(backbone.decoder, "seg_layers")):
            raise ValueError(
                f"The backbone {type(backbone).__name__} is not an encoder/decoder U-Net with seg_layers "
                "(PlainConvUNet or ResidualEncoderUNet from dynamic_network_architectures)"
            )
        if len(merged_values_per_task) != len(num_classes_per_prompt) - 1:
            raise ValueError("merged_values_per_task needs one entry per real task (prompts minus the synthetic one)")
        for n, vals in zip(num_classes_per_prompt, merged_values_per_task):
            if n != len(vals) + 1:
                raise ValueError(f"A task with {len(vals)} foreground classes needs {len(vals) + 1} outputs, got {n}")
        self.backbone = backbone
        # the decoder then returns features instead of logits at every scale
        backbone.decoder.seg_layers = nn.ModuleList([nn.Identity() for _ in backbone.decoder.seg_layers])
        channels = list(backbone.encoder.output_channels)
        self.num_classes_per_prompt = [int(n) for n in num_classes_per_prompt]
        self.num_tasks = len(self.num_classes_per_prompt) - 1
        self.synthetic_prompt = self.num_tasks
        self.merged_values_per_task = [[int(v) for v in vals] for vals in merged_values_per_task]
        self.num_merged = 1 + sum(len(v) for v in self.merged_values_per_task)
        out = max(self.num_classes_per_prompt)
        self.heads = nn.ModuleList(
            DynamicHead(channels[s], channels[-1], len(self.num_classes_per_prompt), out,
                        backbone.encoder.conv_op, hidden, static=static_head)
            for s in range(len(channels) - 1)
        )
        # which task an image (patch) comes from: from the pooled features of every encoder stage ("stages";
        # the early stages carry a dataset's intensity and texture, the bottleneck what the patch shows), or
        # of the bottleneck alone ("bottleneck", the first layout). Behind nnU-Net's instance norms these differ
        # little between images (std across images ~0.03 around ~0.2-0.4): standardised first, they are
        # linearly separable by task (docs/METHOD.md)
        if recognition_input not in RECOGNITION_INPUTS:
            raise ValueError(f"recognition_input must be one of {RECOGNITION_INPUTS}, got {recognition_input!r}")
        self._stage_channels = channels
        self.recognition_input = recognition_input
        self.task_classifier = self._new_classifier()
        self.recognition_detach = True  # the classifier's loss does not reach the backbone (docs/METHOD.md)
        self.routing = "recognised"
        self.prompt: int | None = None
        self._task_probability_sinks: list[list[torch.Tensor]] = []  # -> recording_task_probabilities()
        self._checkpoint_notes_given: set[str] = set()

    # nnU-Net toggles deep supervision through `.decoder.deep_supervision`
    @property
    def decoder(self) -> nn.Module:
        return self.backbone.decoder

    @property
    def encoder(self) -> nn.Module:
        return self.backbone.encoder

    def _new_classifier(self) -> nn.Sequential:
        """The task classifier for ``recognition_input``; its linear layer starts at zero (uniform output)."""
        n_in = sum(self._stage_channels) if self.recognition_input == "stages" else self._stage_channels[-1]
        classifier = nn.Sequential(ScaledStandardize(n_in), nn.Linear(n_in, self.num_tasks))
        nn.init.zeros_(classifier[1].weight)
        nn.init.zeros_(classifier[1].bias)
        return classifier

    def _recognition_features(self, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, C) input of the task classifier: the spatial mean of every encoder stage, or of the bottleneck."""
        used = skips if self.recognition_input == "stages" else skips[-1:]
        return torch.cat([s.mean(dim=tuple(range(2, s.ndim))) for s in used], dim=1)

    def _backbone_pass(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        skips = self.backbone.encoder(x)
        feats = self.backbone.decoder(skips)
        if not isinstance(feats, (list, tuple)):
            feats = [feats]
        context = skips[-1].mean(dim=tuple(range(2, skips[-1].ndim)))
        return list(feats), context, skips

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One backbone pass: decoder features per output scale (full resolution first) and the pooled
        bottleneck context that conditions the controller."""
        feats, context, _ = self._backbone_pass(x)
        return feats, context

    def apply_heads(self, feats: list[torch.Tensor], context: torch.Tensor,
                    prompts: torch.Tensor) -> list[torch.Tensor]:
        return [head(f, context, prompts) for head, f in zip(self.heads, feats)]

    def forward(self, x: torch.Tensor, prompts: torch.Tensor | Sequence[torch.Tensor] | None = None,
                recognition: bool = False):
        """
        prompts=None: merged-space logits (one tensor, or a list per scale with deep supervision).
        prompts (B, P) long tensor: list per scale of (B, P, max_classes, *S) head outputs; a prompt with
            n classes uses the first n channels.
        prompts as a sequence of (B_g, P_g) tensors whose B_g add up to B: the batch is split into groups
            along dim 0 (one backbone pass for all), and a list (per group) of such lists is returned.
        recognition=True: returns (that output, the task classifier's logits (B, T)), from the same backbone
            pass; with ``recognition_detach`` the classifier sees the features without their gradient.
        """
        feats, context, skips = self._backbone_pass(x)
        routed = prompts is None and self.prompt is None and self.routing == "recognised"
        task_logits = None
        if recognition or routed:  # the classifier runs only where its output is used
            rec = self._recognition_features(skips)
            task_logits = self.task_classifier(rec.detach() if self.recognition_detach else rec)
        if prompts is None:
            out = self._prompt_free(feats, context, task_logits)
        elif isinstance(prompts, torch.Tensor):
            out = self.apply_heads(feats, context, prompts)
        else:
            sizes = [p.shape[0] for p in prompts]
            if sum(sizes) != x.shape[0]:
                raise ValueError(f"Prompt groups cover {sum(sizes)} samples, the batch has {x.shape[0]}")
            out, start = [], 0
            for p, n in zip(prompts, sizes):
                sl = slice(start, start + n)
                out.append(self.apply_heads([f[sl] for f in feats], context[sl], p))
                start += n
        return (out, task_logits) if recognition else out

    def _prompt_free(self, feats: list[torch.Tensor], context: torch.Tensor, task_logits: torch.Tensor | None):
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        tasks = None
        if self.prompt is None and self.routing == "recognised":
            probs = torch.softmax(task_logits.float(), dim=1)
            for sink in self._task_probability_sinks:
                sink.append(probs.detach())
            tasks = probs.argmax(dim=1)
        out = [self._merged(f, context, s, tasks) for s, f in enumerate(feats)]
        return out if self.backbone.decoder.deep_supervision else out[0]

    def recognise(self, x: torch.Tensor) -> torch.Tensor:
        """Task probabilities (B, T) of input patches: the encoder and the classifier only."""
        skips = self.backbone.encoder(x)
        return torch.softmax(self.task_classifier(self._recognition_features(skips)).float(), dim=1)

    @override
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Weights of earlier versions are converted to this network's layout first (network/checkpoints.py);
        each conversion is announced once per network (nnU-Net's predictor reloads the weights per case)."""
        converted = convert_state_dict(self, state_dict)
        for note in converted.notes:
            if note not in self._checkpoint_notes_given:
                self._checkpoint_notes_given.add(note)
                warnings.warn(note, CheckpointNotice, stacklevel=2)
        if converted.routing is not None:
            self.routing = converted.routing
        return super().load_state_dict(converted.state_dict, strict=strict, assign=assign)

    @contextlib.contextmanager
    def prompted(self, prompt: int | None, routing: str | None = None) -> Iterator[None]:
        """Within the block the prompt-free forward (what nnU-Net's predictors call) answers for task ``prompt``
        only (None: every task, routed by recognition, or by ``routing`` when given); the previous prompt and
        routing come back afterwards, also on error. The one way callers set what the prompt-free forward
        does."""
        if routing is not None and routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        before = self.prompt, self.routing
        self.prompt, self.routing = prompt, routing or self.routing
        try:
            yield
        finally:
            self.prompt, self.routing = before

    @contextlib.contextmanager
    def recording_task_probabilities(self) -> Iterator[list[torch.Tensor]]:
        """Within the block, every prompt-free forward routed by recognition appends its task probabilities
        (B, T) of the input patches to the list this yields."""
        seen: list[torch.Tensor] = []
        self._task_probability_sinks.append(seen)
        try:
            yield seen
        finally:
            self._task_probability_sinks.remove(seen)

    def task_prompts(self, batch_size: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.num_tasks, device=device)[None].expand(batch_size, -1)

    def _merged(self, feat: torch.Tensor, context: torch.Tensor, scale: int,
                tasks: torch.Tensor | None = None) -> torch.Tensor:
        """Merged-space logits of one scale: under ``self.prompt``, else under each sample's ``tasks`` (B,),
        else from every task head."""
        b = feat.shape[0]
        head = self.heads[scale]
        if self.prompt is not None:
            tasks = torch.full((b,), int(self.prompt), device=feat.device, dtype=torch.long)
        if tasks is None:
            logits = head(feat, context, self.task_prompts(b, feat.device))
            return merge_task_logits(logits, self.num_classes_per_prompt[:-1], self.merged_values_per_task)
        logits = head(feat, context, tasks[:, None])[:, 0]
        out = logits.new_empty((b, self.num_merged, *feat.shape[2:]))
        for t in tasks.unique().tolist():
            sel = tasks == t
            own = logits[sel, :self.num_classes_per_prompt[t]]
            # channels of other tasks stay below this task's lowest logit: they never win the argmax
            out[sel] = (own.min(dim=1, keepdim=True).values - _ABSENT_MARGIN).expand(
                -1, self.num_merged, *feat.shape[2:]).to(out.dtype)
            sub = out[sel]
            sub[:, 0] = own[:, 0]
            sub[:, self.merged_values_per_task[t]] = own[:, 1:]
            out[sel] = sub
        return out


def merge_task_logits(task_logits: torch.Tensor, num_classes: Sequence[int],
                      merged_values: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, T, max_classes, *S) per-task logits -> (B, M, *S) merged-space scores.

    Score of merged class (t, k) = q_t[k] - q_t[0] (q_t = softmax of task t); background score =
    min over tasks of (q_t[0] - max_k q_t[k]). The argmax is therefore background exactly when every task
    predicts background, else the foreground class of the most confident task (largest margin over its own
    background). The scores lie in [-1, 1]; they rank, they are not calibrated probabilities.
    """
    b, t_count = task_logits.shape[:2]
    num_merged = 1 + sum(len(v) for v in merged_values)
    out = task_logits.new_empty((b, num_merged, *task_logits.shape[3:]))
    bg = None
    for t in range(t_count):
        q = torch.softmax(task_logits[:, t, :num_classes[t]].float(), dim=1)
        margins = q[:, 1:] - q[:, :1]
        out[:, list(merged_values[t])] = margins.to(out.dtype)
        task_bg = -margins.max(dim=1).values
        bg = task_bg if bg is None else torch.minimum(bg, task_bg)
    out[:, 0] = bg.to(out.dtype)
    return out
