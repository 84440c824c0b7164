"""Grow a trained VerSemi network's weights to a task table with more tasks (appended at the end).

The backbone is task-agnostic and keeps its weights. What depends on the number of prompts or classes:

- ``heads.<s>.controller``: input columns are [pooled context, one-hot prompt]; its output rows are the three
  dynamic layers' parameters, the last layer with one row block per output class (``max`` classes over the
  prompts). Old prompts keep their columns, the synthetic prompt moves from index T_old to T_new, each new
  prompt's column starts as the synthetic prompt's. Rows of output classes the old network did not have
  (a new task with more classes than any old one) start as class 1's rows.
- ``heads.<s>.static``: one row block of output classes per prompt; old prompts keep theirs, the synthetic
  prompt moves, a new prompt starts as the synthetic prompt's background (class 0) and "any foreground"
  (class 1, for every foreground class).
- ``task_classifier.1``: one row per task; a new task's row starts at weight 0 with a bias below every old
  task's logit on features of norm up to :data:`ROUTING_NORM_BOUND` (the standardised, scaled features have
  a norm near 1), so no input is routed to the new task before it is trained.

So right after growing, every old prompt (and the synthetic one) gives the same outputs as before, and the
prompt-free forward routes old tasks' images as before. The new prompts start as the synthetic task, which
already segments "any foreground" (VerSemi's synthetic task, Lu et al., TMI 2025).
"""

from __future__ import annotations

import torch

ROUTING_NORM_BOUND = 4.0
_CLASSIFIER_MARGIN = 1.0


class GrowError(ValueError):
    """The old weights do not fit the old table or the new network."""


def _prompt_source(p_new: int, old_tasks: int, new_tasks: int) -> int:
    """The old prompt whose parameters prompt ``p_new`` of the grown network starts from."""
    if p_new < old_tasks:
        return p_new
    return old_tasks  # new tasks and the synthetic prompt (index new_tasks): the old synthetic prompt


def _class_source(c: int, old_out: int) -> int:
    return c if c < old_out else 1


def grow_controller(weight: torch.Tensor, bias: torch.Tensor, new_weight: torch.Tensor, old_tasks: int,
                    new_tasks: int, hidden: int, old_out: int, new_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Controller (n_params, context + prompts) of the old head -> the grown head's, see the module docstring."""
    old_prompts, context = old_tasks + 1, weight.shape[1] - old_tasks - 1
    shared = 2 * (hidden * hidden + hidden)  # rows of the two hidden dynamic layers
    if weight.shape[0] != shared + old_out * hidden + old_out or context < 1:
        raise GrowError(f"controller weight {tuple(weight.shape)} does not fit {old_prompts} prompts, "
                        f"{old_out} outputs and {hidden} hidden channels")
    rows = list(range(shared))
    rows += [shared + _class_source(c, old_out) * hidden + i for c in range(new_out) for i in range(hidden)]
    rows += [shared + old_out * hidden + _class_source(c, old_out) for c in range(new_out)]
    cols = list(range(context)) + [context + _prompt_source(p, old_tasks, new_tasks) for p in range(new_tasks + 1)]
    out_w = weight[rows][:, cols]
    if out_w.shape != new_weight.shape:
        raise GrowError(f"grown controller {tuple(out_w.shape)} differs from the new network's "
                        f"{tuple(new_weight.shape)}")
    return out_w.clone(), bias[rows].clone()


def grow_static(weight: torch.Tensor, bias: torch.Tensor, old_tasks: int, new_tasks: int, old_out: int,
                new_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Static per-prompt output layer (prompts x outputs, in, ...) -> the grown one."""
    if weight.shape[0] != (old_tasks + 1) * old_out:
        raise GrowError(f"static layer {tuple(weight.shape)} does not fit {old_tasks + 1} prompts x {old_out}")
    rows = []
    for p in range(new_tasks + 1):
        src = _prompt_source(p, old_tasks, new_tasks)
        for c in range(new_out):
            # a new prompt's foreground classes all start as the synthetic task's "any foreground"
            rows.append(src * old_out + (min(c, 1) if src == old_tasks else _class_source(c, old_out)))
    return weight[rows].clone(), bias[rows].clone()


def grow_classifier(weight: torch.Tensor, bias: torch.Tensor, new_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Task classifier (T_old, features) -> (T_new, features): old rows kept, new rows never win at first."""
    old_tasks = weight.shape[0]
    floor = (bias - ROUTING_NORM_BOUND * weight.norm(dim=1)).min() - _CLASSIFIER_MARGIN
    w = torch.cat([weight, weight.new_zeros((new_tasks - old_tasks, weight.shape[1]))])
    b = torch.cat([bias, floor.expand(new_tasks - old_tasks).to(bias.dtype)])
    return w, b


def grow_state_dict(old: dict[str, torch.Tensor], template: dict[str, torch.Tensor], old_tasks: int,
                    new_tasks: int) -> dict[str, torch.Tensor]:
    """The weights of a trained network with ``old_tasks`` tasks, grown to ``template`` (the state dict of the
    same architecture built for ``new_tasks`` >= ``old_tasks`` tasks, the old ones first).

    Every key of ``template`` is filled: from the same key where the shapes agree, by the rules of the module
    docstring for the prompt- and task-dependent ones. Any other difference raises :class:`GrowError`.
    """
    if new_tasks < old_tasks:
        raise GrowError(f"cannot shrink {old_tasks} tasks to {new_tasks}")
    missing = sorted(set(template) - set(old))
    if missing:
        raise GrowError(f"the old weights lack {len(missing)} key(s) of the network: {', '.join(missing[:5])}")
    out: dict[str, torch.Tensor] = {}
    heads = sorted({k.split(".")[1] for k in template if k.startswith("heads.")}, key=int)
    for s in heads:
        p = f"heads.{s}."
        hidden = template[p + "pre.weight"].shape[0]
        if p + "static.weight" in template:
            old_out = old[p + "static.weight"].shape[0] // (old_tasks + 1)
            new_out = template[p + "static.weight"].shape[0] // (new_tasks + 1)
            out[p + "static.weight"], out[p + "static.bias"] = grow_static(
                old[p + "static.weight"], old[p + "static.bias"], old_tasks, new_tasks, old_out, new_out)
        else:  # dynamic-only head: the output count follows from the controller's rows
            shared = 2 * (hidden * hidden + hidden)
            old_out = (old[p + "controller.weight"].shape[0] - shared) // (hidden + 1)
            new_out = (template[p + "controller.weight"].shape[0] - shared) // (hidden + 1)
        out[p + "controller.weight"], out[p + "controller.bias"] = grow_controller(
            old[p + "controller.weight"], old[p + "controller.bias"], template[p + "controller.weight"],
            old_tasks, new_tasks, hidden, old_out, new_out)
    out["task_classifier.1.weight"], out["task_classifier.1.bias"] = grow_classifier(
        old["task_classifier.1.weight"], old["task_classifier.1.bias"], new_tasks)
    for k, v in template.items():
        if k in out:
            if out[k].shape != v.shape:
                raise GrowError(f"{k}: grown {tuple(out[k].shape)}, the new network has {tuple(v.shape)}")
            continue
        if old[k].shape != v.shape:
            raise GrowError(f"{k}: {tuple(old[k].shape)} in the old weights, {tuple(v.shape)} in the new network; "
                            "only the prompt- and task-dependent layers may differ")
        out[k] = old[k].clone()
    return out
