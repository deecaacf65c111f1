"""trainkit.evaluation.eval_loader: each process's share of the validation rows, without repeats."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from datasets import Dataset

from trainkit.data import IGNORE_INDEX
from trainkit.evaluation import eval_loader


def shares(rows, world: int, batch_size: int = 2, max_batches: int | None = None) -> list[list[dict]]:
    return [list(eval_loader(rows, batch_size, SimpleNamespace(process_index=rank, num_processes=world), max_batches,
                             collate_fn=list).dataset)
            for rank in range(world)]


@pytest.mark.parametrize("as_dataset", [False, True])
@pytest.mark.parametrize("world,max_batches", [(1, None), (2, None), (3, None), (2, 2), (4, 1)])
def test_every_row_once_and_the_same_count_on_every_process(as_dataset, world, max_batches):
    rows = [{"input_ids": [i, i + 1, i + 2], "labels": [IGNORE_INDEX, i + 1, i + 2]} for i in range(7)]
    data = Dataset.from_list(rows) if as_dataset else rows
    parts = shares(data, world, max_batches=max_batches)
    evaluated = rows[:2 * max_batches] if max_batches else rows  # batches of 2, counted over all processes
    assert len({len(p) for p in parts}) == 1  # each process runs the same number of forwards
    labelled = [r for p in parts for r in p if any(x != IGNORE_INDEX for x in r["labels"])]
    assert sorted(labelled, key=lambda r: r["input_ids"]) == evaluated  # every row once, none repeated
    fillers = [r for p in parts for r in p if all(x == IGNORE_INDEX for x in r["labels"])]
    assert len(fillers) == len(parts) * len(parts[0]) - len(evaluated)  # the rest carries no loss
