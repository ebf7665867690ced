"""Part 10a, `PagedKVCache`: block tables, the free list, reference counts, forks and copy-on-write.

Every graded case replays a short history of appends, forks and frees. After each step it
checks what the cache returns against what was appended (the concatenation of the chunks, in
order, copied to a child at its fork) and checks the bookkeeping by properties that hold for
any correct cache:

- a sequence of length L holds ceil(L / block_size) blocks, each at most once;
- a block's reference count is the number of block tables that hold it;
- the free list holds exactly the blocks no table holds, each once, so that free and used
  blocks always add up to the pool;
- after the last sequence is freed, the whole pool is free again.

Most cases fork a sequence whose last block is partly filled and then write to both sides, and
most end by freeing everything, so a cache without copy-on-write, or one that leaks or never
releases a block, fails most of them. Keys and values use two kv heads, so a read that mixes up
heads and blocks shows. Every case but the worked example starts from a pool whose free list is
shuffled, as in a server after many sequences came and went, so the block tables are out of id
order and a read that sorts them, or takes a sequence's blocks in id order, shows.
"""
import re

import numpy as np
import pytest

from tinytorch.core.attention import PagedKVCache
from tinytorch.core.tensor import Tensor

GRADES = pytest.mark.grades("test-paged-kv-cache")
HEADS, HEAD_DIM = 2, 3


def blocks_for(length, block_size):
    return -(-length // block_size)


class Replay:
    """A cache, and what each of its sequences must hold: the chunks appended to it, in order."""

    def __init__(self, num_blocks, block_size, seed=0, shuffled=True):
        self.cache = PagedKVCache(num_blocks=num_blocks, block_size=block_size, num_heads=HEADS, head_dim=HEAD_DIM)
        self.rng = np.random.default_rng(seed)
        if shuffled:                                     # blocks handed out in this order: tables out of id order
            self.cache.free_blocks[:] = [int(block) for block in self.rng.permutation(num_blocks)]
        self.expected = {}                               # sequence id -> (keys, values), (Hkv, length, hd)
        self.history = []

    def new(self):
        sequence = self.cache.add_sequence()
        self.expected[sequence] = (np.zeros((HEADS, 0, HEAD_DIM)), np.zeros((HEADS, 0, HEAD_DIM)))
        return sequence

    def append(self, sequence, length):
        keys = self.rng.normal(size=(HEADS, length, HEAD_DIM)).astype(np.float32)
        values = self.rng.normal(size=(HEADS, length, HEAD_DIM)).astype(np.float32)
        returned_keys, returned_values = self.cache.append_tokens(sequence, keys, values)
        old_keys, old_values = self.expected[sequence]
        self.expected[sequence] = (np.concatenate([old_keys, keys], axis=1), np.concatenate([old_values, values], axis=1))
        self.history.append(f"append {length} to {sequence}")
        assert isinstance(returned_keys, Tensor) and isinstance(returned_values, Tensor)
        self._compare(sequence, returned_keys.data, returned_values.data, "append_tokens returned")
        self.check()

    def fork(self, sequence):
        child = self.cache.fork(sequence)
        assert child not in self.expected, f"fork returned id {child}, which is already a sequence"
        self.expected[child] = self.expected[sequence]
        self.history.append(f"fork {sequence} -> {child}")
        self.check()
        return child

    def free(self, sequence):
        self.cache.free(sequence)
        del self.expected[sequence]
        self.history.append(f"free {sequence}")
        self.check()

    def free_all(self):
        for sequence in list(self.expected):
            self.free(sequence)
        assert sorted(self.cache.free_blocks) == list(range(self.cache.num_blocks)), \
            f"{self.case}: after freeing every sequence the whole pool must be free, got {self.cache.free_blocks}"

    @property
    def case(self):
        return "after " + ", ".join(self.history)

    def _compare(self, sequence, keys, values, what):
        expected_keys, expected_values = self.expected[sequence]
        assert keys.shape == expected_keys.shape, \
            f"{self.case}: {what} keys of sequence {sequence} with shape {keys.shape}, expected {expected_keys.shape}"
        np.testing.assert_array_equal(keys, expected_keys, err_msg=f"{self.case}: {what} keys of sequence {sequence}")
        np.testing.assert_array_equal(values, expected_values,
                                      err_msg=f"{self.case}: {what} values of sequence {sequence}")

    def check(self):
        """Every live sequence reads back what was appended to it, and the bookkeeping holds."""
        cache, case = self.cache, self.case
        for sequence in self.expected:
            keys, values = cache.get_sequence(sequence)
            self._compare(sequence, keys.data, values.data, "get_sequence")
        assert sorted(cache.block_tables) == sorted(self.expected), \
            f"{case}: block tables for {sorted(cache.block_tables)}, expected {sorted(self.expected)}"
        holders = np.zeros(cache.num_blocks, dtype=np.int64)
        for sequence, table in cache.block_tables.items():
            length = self.expected[sequence][0].shape[1]
            assert cache.lengths[sequence] == length, f"{case}: length of {sequence} {cache.lengths[sequence]}, expected {length}"
            assert len(table) == blocks_for(length, cache.block_size), \
                f"{case}: sequence {sequence} of {length} tokens holds {len(table)} blocks, expected " \
                f"ceil({length} / {cache.block_size}) = {blocks_for(length, cache.block_size)}"
            assert len(set(table)) == len(table), f"{case}: sequence {sequence} holds a block twice: {table}"
            holders[table] += 1
        np.testing.assert_array_equal(cache.ref_counts, holders,
                                      err_msg=f"{case}: reference counts must count the tables holding each block")
        free = list(cache.free_blocks)
        assert len(set(free)) == len(free), f"{case}: the free list holds a block twice: {free}"
        assert sorted(free) == np.flatnonzero(holders == 0).tolist(), \
            f"{case}: the free list must hold exactly the blocks no table holds: free {sorted(free)}, " \
            f"unheld {np.flatnonzero(holders == 0).tolist()}"

    def used(self):
        return self.cache.num_blocks - len(self.cache.free_blocks)


def state(cache):
    """Everything a PagedKVCache holds, copied."""
    return {"key_blocks": cache.key_blocks.copy(), "value_blocks": cache.value_blocks.copy(),
            "free_blocks": list(cache.free_blocks), "ref_counts": cache.ref_counts.copy(),
            "block_tables": {s: list(table) for s, table in cache.block_tables.items()},
            "lengths": dict(cache.lengths), "finished": set(cache.finished), "batch": list(cache.batch),
            "next_sequence_id": cache.next_sequence_id}


def assert_same_state(before, after, case):
    for name, kept in before.items():
        if isinstance(kept, np.ndarray):
            np.testing.assert_array_equal(after[name], kept, err_msg=f"{case} changed {name}")
        else:
            assert after[name] == kept, f"{case} changed {name}: {kept} became {after[name]}"


# ---------------------------------------------------------------- graded
@GRADES
def test_the_worked_example_block_by_block():
    """Appends of 5, 1 and 1 to A, B = fork(A), B and A each append one token, free A, C's table out of id order."""
    replay = Replay(num_blocks=8, block_size=4, shuffled=False)
    cache, a = replay.cache, replay.new()
    for length in (5, 1, 1):
        replay.append(a, length)
    assert cache.block_tables[a] == [0, 1] and cache.free_blocks == [2, 3, 4, 5, 6, 7], \
        f"A after appends of 5, 1, 1: table {cache.block_tables[a]}, free {cache.free_blocks}"
    b = replay.fork(a)
    assert cache.block_tables[b] == [0, 1] and cache.free_blocks == [2, 3, 4, 5, 6, 7], "a fork takes no block"
    replay.append(b, 1)
    assert (cache.block_tables[a], cache.block_tables[b]) == ([0, 1], [0, 2]), \
        f"B writes to shared, partly filled block 1: it copies it to block 2; tables A {cache.block_tables[a]}, " \
        f"B {cache.block_tables[b]}"
    replay.append(a, 1)
    assert cache.block_tables[a] == [0, 1] and cache.free_blocks == [3, 4, 5, 6, 7], \
        f"A then holds block 1 alone and writes in place: table {cache.block_tables[a]}, free {cache.free_blocks}"
    replay.free(a)
    assert cache.free_blocks == [3, 4, 5, 6, 7, 1], f"free(A) returns block 1 only, to the end: {cache.free_blocks}"
    c = replay.new()
    replay.append(c, 4)
    replay.append(c, 20)                             # blocks 4, 5, 6, 7, then the freed block 1
    assert cache.block_tables[c] == [3, 4, 5, 6, 7, 1], \
        f"C takes blocks from the front of the free list [3, 4, 5, 6, 7, 1]: table {cache.block_tables[c]}"
    replay.free(b)
    replay.free_all()


@GRADES
@pytest.mark.parametrize("block_size, before_fork, parent_after, child_after", [
    (4, [3, 4, 2], [1, 6], [2, 1, 1]),              # fork at 9 tokens: block 2 holds 1 of 4
    (3, [7], [2, 2, 5], [1, 3]),                    # fork at 7 tokens: block 2 holds 1 of 3
    (5, [2, 1, 1], [9, 1], [6]),                    # fork at 4 tokens, inside block 0
])
def test_chunks_across_blocks_with_a_fork(block_size, before_fork, parent_after, child_after):
    """Chunks that start and end anywhere in a block, a fork mid-block, both sides going on, then frees."""
    replay = Replay(num_blocks=16, block_size=block_size, seed=block_size)
    parent = replay.new()
    for length in before_fork:
        replay.append(parent, length)
    child = replay.fork(parent)
    for parent_length, child_length in zip(parent_after, child_after):
        replay.append(child, child_length)
        replay.append(parent, parent_length)
    for child_length in child_after[len(parent_after):]:
        replay.append(child, child_length)
    for parent_length in parent_after[len(child_after):]:
        replay.append(parent, parent_length)
    replay.free(parent)
    replay.append(child, 2)                          # the child goes on alone
    replay.free_all()


@GRADES
def test_samples_of_one_prompt_share_its_blocks():
    """4 samples of a 10-token prompt in blocks of 4: the 2 full prompt blocks are held once."""
    replay = Replay(num_blocks=16, block_size=4, seed=1)
    prompt = replay.new()
    replay.append(prompt, 10)                                        # blocks: 4 + 4 + 2
    samples = [prompt] + [replay.fork(prompt) for _ in range(3)]
    assert replay.used() == 3, f"a fork takes no block: {replay.used()} blocks in use, expected 3"
    for sample in samples:
        replay.append(sample, 1)
    # The shared third block is copied by the first three writers; the last writes in place.
    assert replay.used() == 6, f"after one token per sample: 2 shared + 4 blocks of 3 tokens = 6, got {replay.used()}"
    for sample in samples:
        replay.append(sample, 3)                                     # 14 tokens: a fourth block each
    assert replay.used() == 10, f"2 shared + 4 samples x 2 blocks = 10 blocks, got {replay.used()}"
    expected_used = [8, 6, 4, 0]                                     # each sample frees its own 2; the last the prompt's
    for sample, used in zip(samples, expected_used):
        replay.free(sample)
        assert replay.used() == used, f"{replay.case}: {replay.used()} blocks in use, expected {used}"


@GRADES
def test_forks_of_forks_and_of_a_full_block():
    """A fork whose parent's last block is full copies nothing; a fork of a fork shares with both."""
    replay = Replay(num_blocks=20, block_size=3, seed=2)
    root = replay.new()
    replay.append(root, 6)                                           # two full blocks
    child = replay.fork(root)
    replay.append(child, 2)                                          # a new block; nothing to copy
    assert replay.used() == 3, f"the child's tokens go to a new block, nothing is copied: {replay.used()} in use"
    grandchild = replay.fork(child)
    replay.append(grandchild, 4)                                     # copies the child's partly filled block
    assert replay.used() == 5, f"root 2 + child 1 + the grandchild's copy and 1 more = 5 blocks, got {replay.used()}"
    replay.append(root, 1)
    replay.append(child, 1)
    replay.free(child)
    replay.append(grandchild, 3)
    replay.free(root)
    replay.free_all()


@GRADES
def test_freeing_a_parent_keeps_what_its_children_hold():
    replay = Replay(num_blocks=12, block_size=4, seed=3)
    parent = replay.new()
    replay.append(parent, 7)
    first, second = replay.fork(parent), replay.fork(parent)
    replay.append(first, 2)
    replay.free(parent)                                              # the children still hold its blocks
    assert replay.used() == 4, \
        f"block 0 shared, block 1 the second child's, the first child's copy and its next block: {replay.used()}"
    replay.append(second, 5)
    replay.append(first, 3)
    replay.free(second)
    replay.append(first, 4)
    replay.free_all()


@GRADES
def test_a_reused_pool_leaks_nothing_of_earlier_sequences():
    """Sequences come and go; freed blocks are handed out again and every sequence reads only its own tokens."""
    replay = Replay(num_blocks=6, block_size=4, seed=4)
    for round_ in range(3):
        first = replay.new()
        replay.append(first, 6)
        second = replay.fork(first)
        replay.append(second, 5)
        replay.append(first, 3)
        third = replay.new()
        replay.append(third, 1 + round_)
        replay.free(first)
        replay.append(second, 2)
        replay.free_all()


@GRADES
def test_a_refused_call_after_forks_changes_nothing():
    """After a history with forks and frees: out of blocks, past the pool, freed and unknown sequences all raise."""
    replay = Replay(num_blocks=8, block_size=4, seed=5)
    cache = replay.cache
    a = replay.new()
    replay.append(a, 6)
    b = replay.fork(a)
    replay.append(b, 3)
    c = replay.new()
    replay.append(c, 9)
    replay.free(a)
    # Now b holds 9 tokens in 3 blocks, c 9 in 3: 2 blocks are free.
    refusals = {
        "appending 12 tokens to b (21 tokens: 3 new blocks, 2 free)":
            (lambda: cache.append_tokens(b, np.zeros((HEADS, 12, HEAD_DIM)), np.zeros((HEADS, 12, HEAD_DIM))),
             "out of blocks"),
        "appending 24 tokens to c (33 > 32 tokens)":
            (lambda: cache.append_tokens(c, np.zeros((HEADS, 24, HEAD_DIM)), np.zeros((HEADS, 24, HEAD_DIM))),
             "can ever hold"),
        "freeing a again": (lambda: cache.free(a), "already freed"),
        "forking the freed a": (lambda: cache.fork(a), "already freed"),
        "reading sequence 99": (lambda: cache.get_sequence(99), "not in the cache"),
    }
    for case, (call, message) in refusals.items():
        before = state(cache)
        with pytest.raises(ValueError, match=message):
            call()
        assert_same_state(before, state(cache), case)
        replay.check()
    replay.append(b, 7)                                              # what fits still works
    replay.free_all()


# ---------------------------------------------------------------- not graded: the provided checks and report
def test_memory_report_of_the_worked_example():
    cache = PagedKVCache(num_blocks=8, block_size=4, num_heads=2, head_dim=3)
    a = cache.add_sequence()
    cache.append_tokens(a, np.ones((2, 7, 3)), np.ones((2, 7, 3)))
    b = cache.fork(a)
    cache.append_tokens(b, np.ones((2, 1, 3)), np.ones((2, 1, 3)))
    usage = cache.get_memory_usage()
    assert usage["bytes_per_block"] == 2 * 2 * 4 * 3 * 4 and usage["bytes_per_token"] == 2 * 2 * 3 * 4
    assert usage["blocks_used"] == 3 and usage["blocks_free"] == 5
    assert usage["tokens_stored"] == 4 + 3 + 4 and usage["tokens_in_sequences"] == 15
    assert usage["last_block_waste"] == 1 and usage["utilization"] == 11 / 12
    assert usage["total_mb"] == 8 * 96 * 2 / 2**20


def test_repr_names_the_sizes_and_tables():
    cache = PagedKVCache(num_blocks=4, block_size=2, num_heads=1, head_dim=1)
    cache.add_sequence()
    assert repr(cache) == "PagedKVCache(num_blocks=4, block_size=2, num_heads=1, head_dim=1, free=4, block_tables={0: []})"


def test_unknown_and_badly_typed_sequences_raise():
    cache = PagedKVCache(num_blocks=4, block_size=2, num_heads=1, head_dim=1)
    with pytest.raises(ValueError, match=re.escape("sequence 0 is not in the cache; live sequences: []")):
        cache.get_sequence(0)
    for bad in (0.0, "0", True, None):
        with pytest.raises(TypeError, match="sequence_id must be an integer"):
            cache.fork(bad)
    with pytest.raises(TypeError, match="sequence_ids must be a list"):
        cache.set_batch(3)
    first = cache.add_sequence()
    with pytest.raises(ValueError, match="each sequence once"):
        cache.set_batch([first, first])


@pytest.mark.parametrize("shape", [(2, 1, 1), (1, 1, 2), (1, 3), (1, 1, 1, 1)])
def test_new_tokens_of_the_wrong_shape_raise_and_change_nothing(shape):
    cache = PagedKVCache(num_blocks=4, block_size=2, num_heads=1, head_dim=1)
    sequence = cache.add_sequence()
    before = state(cache)
    with pytest.raises(ValueError, match="new_keys has shape"):
        cache.append_tokens(sequence, np.zeros(shape), np.zeros(shape))
    with pytest.raises(ValueError, match="new_values has shape"):
        cache.append_tokens(sequence, np.zeros((1, 1, 1)), np.zeros((1, 2, 1)))
    with pytest.raises(ValueError, match="NaN or inf"):
        cache.append_tokens(sequence, np.full((1, 1, 1), np.nan), np.zeros((1, 1, 1)))
    assert_same_state(before, state(cache), f"appending keys of shape {shape}")


def test_an_empty_pool_refuses_with_the_numbers():
    cache = PagedKVCache(num_blocks=2, block_size=2, num_heads=1, head_dim=1)
    first, second = cache.add_sequence(), cache.add_sequence()
    cache.append_tokens(first, np.ones((1, 3, 1)), np.ones((1, 3, 1)))
    before = state(cache)
    with pytest.raises(ValueError, match=re.escape("out of blocks: appending 1 tokens to sequence 1 needs 1 new blocks "
                                                   "and 0 copies of shared blocks, but only 0 of num_blocks=2 are free")):
        cache.append_tokens(second, np.ones((1, 1, 1)), np.ones((1, 1, 1)))
    with pytest.raises(ValueError, match=re.escape("sequence 0 holds 3 tokens; appending 2 would need 5, more than the "
                                                   "pool can ever hold: num_blocks=2 x block_size=2 = 4 tokens")):
        cache.append_tokens(first, np.ones((1, 2, 1)), np.ones((1, 2, 1)))
    assert_same_state(before, state(cache), "a refused append")


@pytest.mark.parametrize("name, args", [("num_blocks", (0, 2, 1, 1)), ("block_size", (1, 0, 1, 1)),
                                        ("num_heads", (1, 1, 0, 1)), ("head_dim", (1, 1, 1, 0))])
def test_bad_sizes_raise(name, args):
    with pytest.raises(ValueError, match=f"{name} must be >= 1"):
        PagedKVCache(*args)
