"""Predict each case under its own task's prompt, through nnU-Net's public predictor API.

nnU-Net's predictors call the network patch by patch and know nothing of prompts. Within
:meth:`VerSemiNetwork.prompted` (see ``network/head.py``) the prompt-free forward returns one task's output
only. Every place that predicts "each case under its own prompt" (the benchmark, ``--task`` / ``--task auto``
prediction, final validation) switches the prompt right before nnU-Net predicts the case, through that
context manager and the helpers here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence


def plain_network(predictor_or_network):
    """The VerSemi network behind an nnU-Net predictor (or a torch.compile wrapper)."""
    net = getattr(predictor_or_network, "network", predictor_or_network)
    return getattr(net, "_orig_mod", net)


def prompted(predictor_or_network, prompt: int | None) -> contextlib.AbstractContextManager:
    """:meth:`VerSemiNetwork.prompted` of the network behind a predictor."""
    return plain_network(predictor_or_network).prompted(prompt)


class PromptPerCase:
    """Switches the network's prompt case by case within one block, each through
    :meth:`VerSemiNetwork.prompted` (so the prompt before the block comes back after it, also on error)."""

    def __init__(self, predictor_or_network):
        self.net = plain_network(predictor_or_network)
        self._current: contextlib.AbstractContextManager | None = None

    def __call__(self, prompt: int | None) -> None:
        self.close()
        self._current = self.net.prompted(prompt)
        self._current.__enter__()

    def close(self) -> None:
        if self._current is not None:
            self._current.__exit__(None, None, None)
            self._current = None

    def __enter__(self) -> PromptPerCase:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def switch_prompt_per_item(net, items: Iterable[dict], prompt_of: Callable[[str], int | None]) -> Iterator[dict]:
    """nnU-Net's ``predict_from_data_iterator`` predicts each item of its iterator as it is yielded, in
    order: set the prompt of the item's case (the output file's name) right before yielding it."""
    with PromptPerCase(net) as switch:
        for item in items:
            switch(prompt_of(os.path.basename(item["ofile"])))
            yield item


def predict_files_under_prompts(predictor, image_lists: Sequence[Sequence[str]], output_truncated: Sequence[str],
                                prompt_of: Callable[[str], int | None] | None, num_processes: int) -> None:
    """Union-format image files -> merged label maps at ``output_truncated`` (+ the dataset's file ending),
    each case under ``prompt_of(case name)`` (``prompt_of`` None: any nnU-Net model, no prompts).
    ``num_processes`` <= 1: in this process, grouped by prompt; otherwise one nnU-Net preprocessing/export
    pool for all cases (a pool per task costs minutes on a busy CPU)."""
    cases = [os.path.basename(o) for o in output_truncated]
    if num_processes <= 1:
        groups = {}
        for i, c in enumerate(cases):
            groups.setdefault(None if prompt_of is None else prompt_of(c), []).append(i)
        for p, idx in groups.items():
            with contextlib.nullcontext() if prompt_of is None else prompted(predictor, p):
                predictor.predict_from_files_sequential([list(image_lists[i]) for i in idx],
                                                        [output_truncated[i] for i in idx], False, True)
        return
    from nnunetv2.inference.data_iterators import preprocessing_iterator_fromfiles

    items = preprocessing_iterator_fromfiles(
        [list(files) for files in image_lists], None, list(output_truncated), predictor.plans_manager,
        predictor.dataset_json, predictor.configuration_manager, num_processes, predictor.device.type == "cuda",
        False)
    if prompt_of is None:
        predictor.predict_from_data_iterator(items, False, num_processes)
        return
    with prompted(predictor, None):
        predictor.predict_from_data_iterator(switch_prompt_per_item(predictor, items, prompt_of), False,
                                             num_processes)
