"""The paged slot storage shared by the DMC cache and the baseline policies: allocation, release, reuse."""

import torch

from dmc.cache import PagedSlots


def _store(batch=2, heads=3, block=4):
    s = PagedSlots(heads, 8, block)
    s._init_pool(batch, torch.float32, torch.device("cpu"))
    s.is_initialized = True
    return s


def test_runs_then_single_blocks_are_distinct_and_counted():
    s = _store()
    s._allocate_runs(torch.tensor([[2, 0, 1], [3, 1, 0]]))
    held = s.block_table[s.block_table >= 0]
    assert held.numel() == 7 and held.unique().numel() == 7
    assert (s.block_table[0, 1] == -1).all() and (s.block_table[0, 0, :2] >= 0).all()
    s._allocate(torch.tensor([[False, True, False], [False, False, True]]), torch.tensor([[0, 0, 0], [0, 0, 0]]))
    assert s.block_table[0, 1, 0] >= 0 and s.block_table[1, 2, 0] >= 0
    assert s.allocated_bytes() == 2 * 9 * 4 * 8 * 4


def test_released_blocks_are_reused_before_the_pool_grows():
    s = _store()
    s._allocate_runs(torch.tensor([[2, 2, 2], [2, 2, 2]]))
    before_pool, before_mark = s.k_pool.shape[0], s.used_blocks
    freed = s.block_table[[0, 1], [1, 2], [1, 0]].clone()
    s._release(torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([1, 0]))
    assert s.allocated_bytes() == 2 * 10 * 4 * 8 * 4
    s._allocate(torch.tensor([[True, False, False], [False, False, False]]), torch.tensor([[2, 0, 0], [0, 0, 0]]))
    assert int(s.block_table[0, 0, 2]) in freed.tolist()
    assert s.used_blocks == before_mark and s.k_pool.shape[0] == before_pool
    held = s.block_table[s.block_table >= 0]
    assert held.unique().numel() == held.numel() == 11


def test_select_rows_compacts_the_pool_and_keeps_contents():
    s = _store(batch=2, heads=1, block=2)
    s._allocate_runs(torch.tensor([[2], [1]]))
    s.lens = torch.tensor([[3], [2]])
    for b, n in ((0, 3), (1, 2)):
        for slot in range(n):
            s._write(torch.tensor([b]), torch.tensor([0]), torch.tensor([slot]),
                     torch.full((1, 8), 10.0 * b + slot), torch.full((1, 8), -1.0))
    s._select_pool(torch.tensor([1, 1, 0]))
    assert s.lens.flatten().tolist() == [2, 2, 3] and s.used_blocks == 4
    first_block_row2 = s.block_table[2, 0, 0]
    assert s.k_pool[first_block_row2, 1, 0] == 1.0 and s.k_pool[s.block_table[0, 0, 0], 1, 0] == 11.0
