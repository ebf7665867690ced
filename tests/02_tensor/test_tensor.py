"""Tests for tinytorch.core.tensor, checked against hand-computed values and plain NumPy."""
import numpy as np
import pytest

from tinytorch.core.tensor import Tensor

RTOL, ATOL = 1e-6, 1e-6


# ---------------------------------------------------------------- construction and dtypes
@pytest.mark.parametrize(
    "data, expected_dtype",
    [
        (1.5, np.float32),
        ([1.0, 2.0], np.float32),
        (np.array([1.0, 2.0], dtype=np.float64), np.float32),
        (np.array([1.0, 2.0], dtype=np.float16), np.float32),
        (3, np.int64),
        ([[1, 2], [3, 4]], np.int64),
        (np.array([1, 2], dtype=np.int32), np.int32),
        (np.array([1, 2], dtype=np.uint8), np.uint8),
        ([True, False], np.bool_),
    ],
)
def test_storage_dtype_rules(data, expected_dtype):
    t = Tensor(data)
    assert t.dtype == expected_dtype
    np.testing.assert_array_equal(t.data, np.asarray(data).astype(expected_dtype))


def test_float64_values_survive_the_cast_to_float32():
    values = np.array([0.1, -2.5, 1e6, 3.141592653589793])
    t = Tensor(values)
    np.testing.assert_allclose(t.data, values, rtol=RTOL)


def test_explicit_dtype_wins():
    t = Tensor([1, 2, 3], dtype=np.float64)
    assert t.dtype == np.float64
    np.testing.assert_array_equal(t.data, [1.0, 2.0, 3.0])
    assert Tensor([1.7, -1.7], dtype="int32").dtype == np.int32
    np.testing.assert_array_equal(Tensor([1.7, -1.7], dtype="int32").data, [1, -1])


def test_properties():
    t = Tensor(np.zeros((2, 3, 4)))
    assert t.shape == (2, 3, 4)
    assert t.ndim == 3
    assert t.size == 24
    assert len(t) == 2
    assert isinstance(t.numpy(), np.ndarray)
    assert t.numpy() is t.data


def test_no_copy_when_dtype_already_right():
    array = np.arange(4, dtype=np.float32)
    t = Tensor(array)
    assert t.data is array


def test_tensor_from_tensor_keeps_values_and_dtype():
    source = Tensor([[1.0, 2.0], [3.0, 4.0]])
    again = Tensor(source)
    np.testing.assert_array_equal(again.data, [[1.0, 2.0], [3.0, 4.0]])
    assert again.dtype == np.float32
    assert Tensor(Tensor([1, 2], dtype=np.float64)).dtype == np.float64
    assert Tensor(Tensor([1, 2]), dtype=np.float32).dtype == np.float32


def test_numpy_asarray_of_a_tensor():
    t = Tensor([[1.0, 2.0]])
    np.testing.assert_array_equal(np.asarray(t), [[1.0, 2.0]])
    assert np.asarray(t).dtype == np.float32


@pytest.mark.parametrize("bad_dtype", ["not-a-dtype", "float99", 5])
def test_unknown_dtype_raises_type_error_naming_it(bad_dtype):
    with pytest.raises(TypeError, match=str(bad_dtype)):
        Tensor([1.0], dtype=bad_dtype)


@pytest.mark.parametrize("bad_dtype", [str, object, "U3"])
def test_non_numeric_dtype_raises_type_error(bad_dtype):
    with pytest.raises(TypeError, match="dtype must be bool, integer or floating"):
        Tensor([1.0], dtype=bad_dtype)


@pytest.mark.parametrize(
    "bad_data, named",
    [(["a", "b"], "list"), ("text", "str"), (None, "NoneType"), ({"a": 1}, "dict"), (object(), "object")],
)
def test_non_numeric_data_raises_type_error_naming_it(bad_data, named):
    with pytest.raises(TypeError, match=f"numeric.*{named}"):
        Tensor(bad_data)


# ---------------------------------------------------------------- indexing and repr
def test_getitem_returns_tensor_with_values():
    t = Tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    row = t[1]
    assert isinstance(row, Tensor)
    np.testing.assert_array_equal(row.data, [4.0, 5.0, 6.0])
    np.testing.assert_array_equal(t[:, 1:].data, [[2.0, 3.0], [5.0, 6.0]])
    scalar = t[0, 2]
    assert isinstance(scalar, Tensor) and scalar.shape == () and scalar.dtype == np.float32
    assert float(scalar.data) == 3.0
    np.testing.assert_array_equal(t[Tensor([1, 0])].data, [[4.0, 5.0, 6.0], [1.0, 2.0, 3.0]])


def test_repr_exact_small_case():
    assert repr(Tensor([[1.0, 2.0]])) == "Tensor([[1., 2.]], shape=(1, 2), dtype=float32)"


def test_repr_contents():
    text = repr(Tensor([[1, 2], [3, 4]]))
    assert text.startswith("Tensor([[1, 2],")
    assert "[3, 4]]" in text
    assert "shape=(2, 2)" in text
    assert "dtype=int64" in text


# ---------------------------------------------------------------- elementwise arithmetic
X = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)
B = np.array([10.0, 20.0, 30.0], dtype=np.float32)


def test_hand_computed_arithmetic():
    x, b = Tensor(X), Tensor(B)
    np.testing.assert_array_equal((x + b).data, [[11, 22, 33], [14, 25, 36]])
    np.testing.assert_array_equal((x - b).data, [[-9, -18, -27], [-6, -15, -24]])
    np.testing.assert_array_equal((x * b).data, [[10, 40, 90], [40, 100, 180]])
    np.testing.assert_allclose((b / x).data, [[10, 10, 10], [2.5, 4, 5]], rtol=RTOL)
    np.testing.assert_array_equal((-x).data, [[-1, -2, -3], [-4, -5, -6]])


@pytest.mark.parametrize(
    "op", [lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a * b, lambda a, b: a / b]
)
def test_arithmetic_matches_numpy_with_broadcasting(op):
    rng = np.random.default_rng(0)
    left = rng.standard_normal((4, 1, 3)).astype(np.float32)
    right = (rng.uniform(0.5, 2.0, size=(5, 3))).astype(np.float32)
    result = op(Tensor(left), Tensor(right))
    assert isinstance(result, Tensor)
    assert result.shape == (4, 5, 3)
    np.testing.assert_allclose(result.data, op(left, right), rtol=RTOL, atol=ATOL)


def test_reflected_operators_with_python_scalars():
    x = Tensor(X)
    np.testing.assert_array_equal((1 + x).data, X + 1)
    np.testing.assert_array_equal((10 - x).data, [[9, 8, 7], [6, 5, 4]])
    np.testing.assert_array_equal((3 * x).data, X * 3)
    np.testing.assert_allclose((6 / x).data, [[6, 3, 2], [1.5, 1.2, 1]], rtol=RTOL)
    for result in (1 + x, 10 - x, 3 * x, 6 / x):
        assert isinstance(result, Tensor) and result.dtype == np.float32


def test_reflected_operators_with_numpy_arrays_on_the_left():
    x = Tensor(X)
    left = np.array([1.0, 2.0, 3.0])  # float64
    for result, expected in (
        (left + x, left + X),
        (left - x, left - X),
        (left * x, left * X),
        (left / x, left / X),
    ):
        assert isinstance(result, Tensor)
        assert result.dtype == np.float32
        np.testing.assert_allclose(result.data, expected, rtol=RTOL)


def test_python_float_does_not_upcast_float32():
    x = Tensor(X)
    for result in (x + 0.1, x - 0.1, x * 0.1, x / 0.1, 0.1 + x, 0.1 - x, 0.1 * x, 0.1 / x):
        assert result.dtype == np.float32
    np.testing.assert_allclose((x * 0.1).data, X * 0.1, rtol=RTOL)


def test_float64_array_operand_gives_float32():
    x = Tensor(X)
    other = np.full((2, 3), 0.25, dtype=np.float64)
    result = x + other
    assert result.dtype == np.float32
    np.testing.assert_allclose(result.data, X + 0.25, rtol=RTOL)


def test_integer_arithmetic_stays_integer():
    a = Tensor([1, 2, 3])
    assert (a + 1).dtype == np.int64
    assert (a * a).dtype == np.int64
    assert (2 - a).dtype == np.int64
    np.testing.assert_array_equal((a * a).data, [1, 4, 9])
    np.testing.assert_array_equal((-a).data, [-1, -2, -3])


def test_integer_division_and_int_float_mix_give_float32():
    a = Tensor([1, 2, 4])
    half = a / 2
    assert half.dtype == np.float32
    np.testing.assert_allclose(half.data, [0.5, 1.0, 2.0], rtol=RTOL)
    assert (a + 0.5).dtype == np.float32
    assert (a + Tensor([0.5, 0.5, 0.5])).dtype == np.float32


def test_explicit_float64_tensors_stay_float64():
    a = Tensor([1.0, 2.0], dtype=np.float64)
    assert (a + a).dtype == np.float64
    assert (a * 0.5).dtype == np.float64
    assert a.reshape(2, 1).dtype == np.float64


def test_operations_do_not_modify_inputs():
    x = Tensor(X.copy())
    _ = x + 1, x * 2, -x, x.reshape(3, 2), x.transpose()
    np.testing.assert_array_equal(x.data, X)


# ---------------------------------------------------------------- matmul
def test_matmul_hand_computed():
    a = Tensor([[1.0, 2.0], [3.0, 4.0]])
    b = Tensor([[5.0, 6.0], [7.0, 8.0]])
    np.testing.assert_array_equal((a @ b).data, [[19.0, 22.0], [43.0, 50.0]])
    np.testing.assert_array_equal(a.matmul(b).data, [[19.0, 22.0], [43.0, 50.0]])
    np.testing.assert_array_equal((a @ Tensor([1.0, 1.0])).data, [3.0, 7.0])


def test_matmul_matches_numpy_including_batches():
    rng = np.random.default_rng(1)
    left = rng.standard_normal((3, 4, 5)).astype(np.float32)
    right = rng.standard_normal((5, 2)).astype(np.float32)
    result = Tensor(left) @ Tensor(right)
    assert result.shape == (3, 4, 2) and result.dtype == np.float32
    np.testing.assert_allclose(result.data, left @ right, rtol=1e-5, atol=1e-5)


def test_matmul_with_arrays_on_either_side():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])  # float64
    t = Tensor([[0.0, 1.0], [1.0, 0.0]])
    left = a @ t
    right = t @ a
    assert isinstance(left, Tensor) and isinstance(right, Tensor)
    assert left.dtype == np.float32 and right.dtype == np.float32
    np.testing.assert_array_equal(left.data, [[2.0, 1.0], [4.0, 3.0]])
    np.testing.assert_array_equal(right.data, [[3.0, 4.0], [1.0, 2.0]])


def test_matmul_inner_dimension_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"inner dimensions differ: \(2, 3\) @ \(4, 5\)"):
        Tensor(np.ones((2, 3))) @ Tensor(np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"\(2, 3\) @ \(2,\)"):
        Tensor(np.ones((2, 3))).matmul(np.ones(2))


def test_matmul_rejects_scalars():
    with pytest.raises(ValueError, match=r"\(\) @ \(2,\)"):
        Tensor(2.0) @ Tensor([1.0, 2.0])


# ---------------------------------------------------------------- reshape and transpose
def test_reshape_values_varargs_and_tuple():
    t = Tensor(np.arange(6))
    np.testing.assert_array_equal(t.reshape(2, 3).data, [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(t.reshape((3, 2)).data, [[0, 1], [2, 3], [4, 5]])
    np.testing.assert_array_equal(t.reshape([3, 2]).data, [[0, 1], [2, 3], [4, 5]])
    np.testing.assert_array_equal(t.reshape(-1, 2).data, [[0, 1], [2, 3], [4, 5]])
    assert t.reshape(2, 3).dtype == np.int64


def test_reshape_incompatible_size_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 2\)"):
        Tensor(np.zeros((2, 3))).reshape(4, 2)
    with pytest.raises(ValueError, match=r"\(6,\).*\(5,\)"):
        Tensor(np.zeros(6)).reshape((5,))


def test_transpose_values():
    m = Tensor([[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(m.transpose().data, [[1, 4], [2, 5], [3, 6]])
    cube = np.arange(24).reshape(2, 3, 4)
    t = Tensor(cube)
    np.testing.assert_array_equal(t.transpose().data, cube.transpose())
    np.testing.assert_array_equal(t.transpose(1, 0, 2).data, cube.transpose(1, 0, 2))
    np.testing.assert_array_equal(t.transpose((2, 0, 1)).data, cube.transpose(2, 0, 1))
    assert t.transpose(2, 0, 1).shape == (4, 2, 3)


# ---------------------------------------------------------------- reductions
M = np.array([[1.0, 5.0, 3.0], [4.0, 2.0, 6.0]], dtype=np.float32)


def test_reductions_hand_computed():
    m = Tensor(M)
    assert float(m.sum().data) == 21.0
    assert float(m.mean().data) == 3.5
    assert float(m.max().data) == 6.0
    np.testing.assert_array_equal(m.sum(axis=0).data, [5.0, 7.0, 9.0])
    np.testing.assert_array_equal(m.sum(axis=1).data, [9.0, 12.0])
    np.testing.assert_array_equal(m.mean(axis=1).data, [3.0, 4.0])
    np.testing.assert_array_equal(m.max(axis=0).data, [4.0, 5.0, 6.0])
    np.testing.assert_array_equal(m.max(axis=1, keepdims=True).data, [[5.0], [6.0]])
    assert m.sum(axis=0, keepdims=True).shape == (1, 3)
    assert m.mean().shape == ()
    for result in (m.sum(), m.mean(axis=0), m.max(axis=1)):
        assert isinstance(result, Tensor) and result.dtype == np.float32


@pytest.mark.parametrize("axis", [None, 0, 1, 2, -1, (0, 2)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_reductions_match_numpy(axis, keepdims):
    data = np.random.default_rng(2).standard_normal((2, 3, 4)).astype(np.float32)
    t = Tensor(data)
    for name in ("sum", "mean", "max"):
        result = getattr(t, name)(axis=axis, keepdims=keepdims)
        expected = getattr(data, name)(axis=axis, keepdims=keepdims)
        assert result.shape == np.shape(expected)
        np.testing.assert_allclose(result.data, expected, rtol=1e-5, atol=1e-6)


def test_reduction_dtypes_for_integers():
    a = Tensor([[1, 2], [3, 4]])
    assert a.sum().dtype == np.int64 and int(a.sum().data) == 10
    assert a.max().dtype == np.int64
    assert a.mean().dtype == np.float32
    np.testing.assert_allclose(a.mean(axis=0).data, [2.0, 3.0], rtol=RTOL)
    assert int(Tensor([True, False, True]).sum().data) == 2


def test_arithmetic_on_nan_and_inf_follows_ieee_without_warnings():
    import warnings

    inf, nan = np.inf, np.nan
    a, b = Tensor([inf, 1.0, nan, 1.0]), Tensor([inf, 0.0, 1.0, -inf])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal((a - b).data, [nan, 1.0, nan, inf])
        np.testing.assert_array_equal((a / b).data, [nan, inf, nan, -0.0])
        np.testing.assert_array_equal((a * Tensor([0.0, 1.0, 1.0, 0.0])).data, [nan, 1.0, nan, 0.0])
        assert np.isnan((a - b).sum().data) and np.isnan(Tensor([inf, -inf]).mean().data)
        assert np.isnan((Tensor([[nan, 1.0]]) @ Tensor([[1.0], [2.0]])).data).all()
