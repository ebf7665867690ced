"""Module 12 against PyTorch 2.13 (CPU): nn.Embedding with and without padding_idx.

Each test skips when torch is not installed (CI installs it). Tolerance: exact for lookups of the
same float32 table.
"""
import numpy as np
import pytest

from tinytorch.core.embeddings import Embedding, LearnedPositionalEmbedding


def torch_embedding_with_our_table(torch, emb, padding_idx=None):
    """A torch.nn.Embedding holding a copy of `emb`'s float32 table."""
    layer = torch.nn.Embedding(emb.vocab_size, emb.embedding_dim, padding_idx=padding_idx)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(emb.weight.data.copy()))
    return layer


@pytest.mark.parametrize("padding_idx", [None, 0, 5, -2])
def test_lookup_equals_torch_for_the_same_table(padding_idx):
    torch = pytest.importorskip("torch")
    emb = Embedding(8, 6, padding_idx=padding_idx, seed=0)
    reference = torch_embedding_with_our_table(torch, emb, padding_idx)
    ids = np.random.default_rng(1).integers(0, 8, size=(3, 11))
    ids[0, :4] = emb.padding_idx if padding_idx is not None else 0
    expected = reference(torch.from_numpy(ids)).detach().numpy()
    np.testing.assert_array_equal(emb(ids).data, expected)


@pytest.mark.parametrize("padding_idx", [0, 3, -1])
def test_padding_row_at_creation_matches_torch(padding_idx):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    reference = torch.nn.Embedding(5, 4, padding_idx=padding_idx)
    emb = Embedding(5, 4, padding_idx=padding_idx, seed=0)
    assert emb.padding_idx == reference.padding_idx  # both store a negative index as vocab_size + index
    zero_rows = np.flatnonzero(~reference.weight.detach().numpy().any(axis=1))
    np.testing.assert_array_equal(np.flatnonzero(~emb.weight.data.any(axis=1)), zero_rows)


def test_padding_row_gets_no_gradient_in_torch_and_does_not_move_our_output():
    # PyTorch's contract: the padding row's gradient is zero. Ours: the output does not depend on that
    # row at all, which is what a zero gradient means. Check both on the same ids and upstream gradient.
    torch = pytest.importorskip("torch")
    emb = Embedding(6, 3, padding_idx=2, seed=4)
    reference = torch_embedding_with_our_table(torch, emb, padding_idx=2)
    ids = np.array([[2, 0, 2, 5], [1, 2, 5, 5]])
    upstream = np.random.default_rng(5).standard_normal((2, 4, 3)).astype(np.float32)
    (reference(torch.from_numpy(ids)) * torch.from_numpy(upstream)).sum().backward()
    torch_grad = reference.weight.grad.numpy()
    numpy_grad = np.zeros((6, 3), dtype=np.float32)
    np.add.at(numpy_grad, ids, upstream)  # d(sum(out * upstream)) / d(table) for a plain lookup ...
    numpy_grad[2] = 0.0  # ... with the padding row held constant
    np.testing.assert_allclose(torch_grad, numpy_grad, rtol=1e-6, atol=1e-6)
    # Our output, as a function of each row: moving a row by delta moves the loss by delta . grad[row].
    loss = float((emb(ids).data * upstream).sum())
    for row in range(6):
        delta = np.array([0.25, -0.5, 1.0], dtype=np.float32)
        emb.weight.data[row] += delta
        moved = float((emb(ids).data * upstream).sum())
        emb.weight.data[row] -= delta
        np.testing.assert_allclose(moved - loss, delta @ torch_grad[row], rtol=1e-4, atol=1e-5)


def test_learned_positions_equal_torch_embedding_of_arange():
    torch = pytest.importorskip("torch")
    learned = LearnedPositionalEmbedding(16, 8, seed=2)
    reference = torch_embedding_with_our_table(torch, learned.position_embedding)
    x = np.random.default_rng(3).standard_normal((2, 10, 8)).astype(np.float32)
    expected = (torch.from_numpy(x) + reference(torch.arange(10))).detach().numpy()
    np.testing.assert_allclose(learned(x).data, expected, rtol=1e-6, atol=1e-6)
