"""The held-out validation part of a site's training images (used to select hyper-parameters).

Selection must never look at the test split, so every site's ``train`` split is divided once into
a training part and a validation part: ``val_fraction`` of its images (``common.dataset.kwargs``),
drawn with ``val_seed``. Where images come in groups (the slices of one volume, the images of
one study or patient) whole groups go to one side, so no study is in both parts.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence

from relaylearn.errors import DataError


def validation_split(num_items: int, fraction: float, seed: int, groups: Sequence[Hashable] | None = None) -> tuple[list[int], list[int]]:
    """Indices (train, validation) of ``num_items`` items, each sorted, disjoint, together all items.

    ``groups[i]`` (optional) is item i's study / subject id: a group is never split. Groups are
    shuffled with ``random.Random(seed)`` and moved to validation until it holds at least
    ``max(1, round(fraction · num_items))`` items, so with uneven groups the fraction is
    approximate; at least one group always stays for training. ``fraction == 0`` → no validation.
    """
    if not 0 <= fraction < 1:
        raise DataError(f"val_fraction {fraction}: expected 0 <= val_fraction < 1")
    if groups is None:
        groups = list(range(num_items))
    if len(groups) != num_items:
        raise DataError(f"validation split: {len(groups)} group ids for {num_items} items")
    everything = list(range(num_items))
    if fraction == 0 or num_items == 0:
        return everything, []
    members: dict[Hashable, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    if len(members) < 2:
        raise DataError(f"cannot hold out a validation part of {num_items} image(s) in {len(members)} study: set val_fraction: 0")
    order = sorted(members, key=str)  # independent of the file order; str() so mixed id types sort
    random.Random(seed).shuffle(order)
    target = max(1, round(fraction * num_items))
    validation: list[int] = []
    for group in order[:-1]:  # the last group always trains
        if len(validation) >= target:
            break
        validation.extend(members[group])
    held_out = set(validation)
    return [i for i in everything if i not in held_out], sorted(validation)
