"""The paged slot storage shared by the DMC cache and the baseline policies, through its public API: allocation,
release, reuse, locating and writing slots, sequence selection, byte counts."""

import pytest
import torch

from dmc.paged_slots import PagedSlots


def _store(batch=2, heads=3, block=4):
    s = PagedSlots(heads, 8, block)
    s.init_pool(batch, torch.float32, torch.device("cpu"))
    s.is_initialized = True
    return s


def test_runs_then_single_blocks_are_distinct_and_counted():
    s = _store()
    s.allocate_runs(torch.tensor([[2, 0, 1], [3, 1, 0]]))
    held = s.block_table[s.block_table >= 0]
    assert held.numel() == 7 and held.unique().numel() == 7
    assert (s.block_table[0, 1] == -1).all() and (s.block_table[0, 0, :2] >= 0).all()
    s.allocate(torch.tensor([[False, True, False], [False, False, True]]), torch.tensor([[0, 0, 0], [0, 0, 0]]))
    assert s.block_table[0, 1, 0] >= 0 and s.block_table[1, 2, 0] >= 0
    assert s.allocated_bytes() == 2 * 9 * 4 * 8 * 4


def test_released_blocks_are_reused_before_the_pool_grows():
    s = _store()
    s.allocate_runs(torch.tensor([[2, 2, 2], [2, 2, 2]]))
    before_pool, before_mark = s.k_pool.shape[0], s.used_blocks
    freed = s.block_table[[0, 1], [1, 2], [1, 0]].clone()
    s.release(torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([1, 0]))
    assert s.allocated_bytes() == 2 * 10 * 4 * 8 * 4
    s.allocate(torch.tensor([[True, False, False], [False, False, False]]), torch.tensor([[2, 0, 0], [0, 0, 0]]))
    assert int(s.block_table[0, 0, 2]) in freed.tolist()
    assert s.used_blocks == before_mark and s.k_pool.shape[0] == before_pool
    held = s.block_table[s.block_table >= 0]
    assert held.unique().numel() == held.numel() == 11


def test_select_rows_compacts_the_pool_and_keeps_contents():
    s = _store(batch=2, heads=1, block=2)
    s.allocate_runs(torch.tensor([[2], [1]]))
    s.lens = torch.tensor([[3], [2]])
    for b, n in ((0, 3), (1, 2)):
        for slot in range(n):
            s.write(torch.tensor([b]), torch.tensor([0]), torch.tensor([slot]),
                     torch.full((1, 8), 10.0 * b + slot), torch.full((1, 8), -1.0))
    s.select_sequences(torch.tensor([1, 1, 0]))
    assert s.lens.flatten().tolist() == [2, 2, 3] and s.used_blocks == 4
    first_block_row2 = s.block_table[2, 0, 0]
    assert s.k_pool[first_block_row2, 1, 0] == 1.0 and s.k_pool[s.block_table[0, 0, 0], 1, 0] == 11.0


def test_write_lands_where_locate_says_and_nowhere_else():
    s = _store(batch=2, heads=2, block=3)
    s.allocate_runs(torch.tensor([[2, 1], [1, 2]]))
    b, h, slot = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]), torch.tensor([4, 0, 5])
    keys = torch.arange(3 * 8, dtype=torch.float32).view(3, 8) + 1
    s.write(b, h, slot, keys, -keys)
    block, offset = s.locate(b, h, slot)
    assert torch.equal(block, s.block_table[b, h, slot // 3]) and offset.tolist() == [1, 0, 2]
    assert torch.equal(s.k_pool[block, offset], keys) and torch.equal(s.v_pool[block, offset], -keys)
    assert int((s.k_pool != 0).any(-1).sum()) == 3  # every other slot of the pool is still zero


def test_writing_a_slot_without_a_block_raises_instead_of_landing_in_the_last_block():
    """An unallocated table entry is -1; as an index it would wrap onto the pool's last block, another pair's."""
    s = _store(batch=2, heads=2, block=3)
    s.allocate_runs(torch.tensor([[2, 1], [1, 2]]))
    with pytest.raises(RuntimeError, match=r"pair \(0, 1\) has no block for slot 3"):
        s.write(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([1, 3]), torch.ones(2, 8), torch.ones(2, 8))
    assert not bool(s.k_pool.any())  # nothing was written, not even the valid pair's slot


def test_reserve_grows_by_zero_filled_blocks_and_keeps_contents():
    s = _store(batch=1, heads=1, block=2)
    s.allocate_runs(torch.tensor([[1]]))
    s.write(torch.tensor([0]), torch.tensor([0]), torch.tensor([1]), torch.ones(1, 8), torch.ones(1, 8))
    held = s.k_pool.shape[0]
    s.reserve(5)
    assert s.k_pool.shape[0] >= s.used_blocks + 5 > held
    assert s.k_pool[s.block_table[0, 0, 0], 1].eq(1).all() and s.k_pool.sum() == 8
    assert s.pool_bytes() == 2 * s.k_pool.numel() * 4 and s.allocated_bytes() == 2 * 1 * 2 * 8 * 4


def test_insert_then_release_a_sequence_moves_its_slots_and_frees_its_blocks():
    src = _store(batch=2, heads=2, block=2)
    src.allocate_runs(torch.tensor([[1, 2], [2, 1]]))
    src.lens = torch.tensor([[2, 3], [4, 1]])
    for h, n in ((0, 4), (1, 1)):
        for slot in range(n):
            src.write(torch.tensor([1]), torch.tensor([h]), torch.tensor([slot]),
                      torch.full((1, 8), 10.0 * h + slot), torch.full((1, 8), -1.0 - slot))
    dst = _store(batch=1, heads=2, block=2)
    dst.allocate_runs(torch.tensor([[3, 0]]))  # sequence 0 busy: the copy must not land on its blocks
    dst.add_sequences(2)
    assert dst.block_table.shape[0] == 3 and (dst.block_table[1:] == -1).all() and (dst.lens[1:] == 0).all()
    dst.insert_sequence(2, src, 1)
    assert dst.lens[2].tolist() == [4, 1] and dst.allocated_bytes() == 2 * 6 * 2 * 8 * 4
    for h, n in ((0, 4), (1, 1)):
        for slot in range(n):
            block, offset = dst.locate(torch.tensor([2]), torch.tensor([h]), torch.tensor([slot]))
            assert dst.k_pool[block, offset, 0] == 10.0 * h + slot and dst.v_pool[block, offset, 0] == -1.0 - slot
    assert set(dst.block_table[2][dst.block_table[2] >= 0].tolist()).isdisjoint(dst.block_table[0].flatten().tolist())
    with pytest.raises(ValueError, match="release_sequence"):
        dst.insert_sequence(2, src, 1)
    dst.release_sequence(2)
    assert (dst.block_table[2] == -1).all() and (dst.lens[2] == 0).all()
    assert dst.allocated_bytes() == 2 * 3 * 2 * 8 * 4  # only sequence 0's blocks remain handed out
    dst.insert_sequence(1, src, 1)  # the freed blocks are reused before the pool grows
    assert dst.used_blocks == 6


def _inverse_of_table(s):
    """The (pair, column) of every block below the high-water mark, rebuilt from the table by a loop."""
    pair = [-1] * s.used_blocks
    col = [None] * s.used_blocks
    B, H, W = s.block_table.shape
    for b in range(B):
        for h in range(H):
            for j in range(W):
                block = int(s.block_table[b, h, j])
                if block >= 0:
                    pair[block], col[block] = b * H + h, j
    return pair, col


def _assert_owners_match(s):
    pair, col = s.owners()
    want_pair, want_col = _inverse_of_table(s)
    assert pair.tolist() == want_pair
    assert [c for c, p in zip(col.tolist(), want_pair) if p >= 0] == [c for c in want_col if c is not None]


def test_owners_follow_every_change_of_the_table():
    # decode attention reads owners() instead of inverting the table each step: every mutation must keep it
    s = _store(batch=3, heads=2, block=2)
    s.allocate_runs(torch.tensor([[2, 1], [0, 3], [1, 1]]))
    _assert_owners_match(s)
    s.allocate(torch.tensor([[True, False], [True, True], [False, True]]), torch.tensor([[2, 0], [0, 3], [0, 1]]))
    _assert_owners_match(s)
    s.release(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([1, 3]))
    _assert_owners_match(s)
    s.allocate(torch.tensor([[False, True], [False, False], [True, False]]), torch.tensor([[0, 1], [0, 0], [1, 0]]))
    _assert_owners_match(s)  # reused blocks get their new owner
    s.select_sequences(torch.tensor([2, 0, 0]))
    _assert_owners_match(s)
    s.release_sequence(1)
    _assert_owners_match(s)
    other = _store(batch=1, heads=2, block=2)
    other.allocate_runs(torch.tensor([[1, 2]]))
    s.insert_sequence(1, other, 0)
    _assert_owners_match(s)
    s.add_sequences(2)
    _assert_owners_match(s)
