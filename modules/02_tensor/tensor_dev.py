# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Module 02: Tensor
#
# > A small NumPy-backed Tensor: dtype rules, broadcasting arithmetic, matmul, reshapes and reductions.

# %%
#| default_exp core.tensor

# %% [markdown]
# A tensor here is nothing more than an $n$-dimensional NumPy array with a few rules on top.
# NumPy already does the numerical work; the `Tensor` class fixes *which* dtype the numbers are
# kept in, gives every later module one type to pass around, and reports bad input with messages
# that name the offending values. There is no autograd in this module: a `Tensor` only holds data.
#
# ## Storage: which dtype a tensor keeps
#
# Deep-learning code almost always computes in 32-bit floats: half the memory of float64 and fast
# on every accelerator. NumPy, however, turns every Python float into float64. So the rule is:
#
# * floating data (Python floats, float16 or float64 arrays) is stored as **float32**;
# * integer data keeps an integer dtype (Python ints become int64) and bool stays bool;
# * an explicit `dtype` wins over both rules;
# * anything that is not a number (strings, arbitrary objects) is rejected with a `TypeError`.
#
# Like `np.asarray`, nothing is copied when the data already has the right dtype.

# %%
#| export
import numpy as np

_NUMERIC_KINDS = "biuf"  # NumPy dtype kinds: bool, signed int, unsigned int, float


def _as_storage(data, dtype=None):
    """The NumPy array a Tensor stores for `data`, following the dtype rules above."""
    if dtype is not None:
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"Tensor: {dtype!r} is not a dtype NumPy understands") from None
        if dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(f"Tensor: dtype must be bool, integer or floating, got {dtype}")
    array = np.asarray(data)
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(
            f"Tensor: data must be numeric, got {type(data).__name__} holding dtype {array.dtype}"
        )
    if dtype is None and array.dtype.kind == "f":
        dtype = np.float32
    return array if dtype is None else array.astype(dtype, copy=False)


# %%
def test_unit_storage():
    assert _as_storage([1.5, 2.0]).dtype == np.float32
    assert _as_storage(np.array([1.0, 2.0], dtype=np.float64)).dtype == np.float32
    assert _as_storage(3).dtype == np.int64
    assert _as_storage([True, False]).dtype == np.bool_
    assert _as_storage([1, 2], dtype="float64").dtype == np.float64
    np.testing.assert_array_equal(_as_storage([[1, 2], [3, 4]], dtype=np.float32), [[1.0, 2.0], [3.0, 4.0]])
    kept = np.zeros(3, dtype=np.float32)
    assert _as_storage(kept) is kept  # right dtype already: no copy
    for bad_data in (["a", "b"], None):
        try:
            _as_storage(bad_data)
        except TypeError as error:
            assert "numeric" in str(error)
        else:
            raise AssertionError(f"{bad_data!r} was accepted")
    try:
        _as_storage([1.0], dtype="no-such-type")
    except TypeError as error:
        assert "no-such-type" in str(error)
    else:
        raise AssertionError("an unknown dtype was accepted")


test_unit_storage()

# %% [markdown]
# ## The Tensor class
#
# **Elementwise arithmetic.** For $z = x \circ y$ with $\circ \in \{+, -, \times, \div\}$, NumPy
# *broadcasts* the two shapes: aligned from the right, each pair of dimensions must be equal or
# one of them must be 1, and a size-1 dimension is repeated. A `(2, 3)` tensor plus a `(3,)` bias
# adds the bias to both rows. Operands may be Tensors, NumPy arrays or Python numbers, on either
# side (`2 - t` calls `t.__rsub__(2)`). Setting `__array_ufunc__ = None` tells NumPy to hand
# `array + tensor` over to the Tensor instead of trying to handle it itself.
#
# A floating result takes the floating dtype of the Tensor operand(s), so float32 stays float32
# even when the other operand is a float64 array; a floating result from integer tensors (for
# example `1 / t`) becomes float32 like any other floating data.
#
# **Matrix product.** For $A \in \mathbb{R}^{m \times k}$ and $B \in \mathbb{R}^{k \times n}$,
# $(AB)_{ij} = \sum_{l=1}^{k} A_{il} B_{lj}$. The inner dimension $k$ must agree; leading
# dimensions of higher-rank operands are treated as a batch and broadcast, as in `np.matmul`.
#
# **Shape and reductions.** `reshape` keeps the elements in row-major order and only changes how
# they are grouped, so the number of elements must not change. `transpose` permutes axes (with no
# arguments it reverses them, so a matrix becomes $A^\top$). `sum`, `mean` and `max` reduce over
# `axis` (all axes by default); `keepdims=True` keeps the reduced axes with size 1, which is what
# makes results like `x - x.max(axis=-1, keepdims=True)` broadcast back against `x`.
#
# Every operation returns a new `Tensor`; the class never changes data behind your back.
#
# Arithmetic follows IEEE floating point, silently: NaN and inf propagate (`inf - inf` is NaN,
# `1 / 0` is inf) without NumPy's warnings. A `Tensor` is a container and holds whatever numbers
# it is given; the layers built on it (modules 12 and 13) reject NaN and inf in their inputs with
# a `ValueError` that names the argument.

# %%
#| export
class Tensor:
    """An n-dimensional array of numbers, stored as a NumPy array in `.data`."""

    __array_ufunc__ = None  # make NumPy defer `array + tensor` to Tensor.__radd__ and friends

    def __init__(self, data, dtype=None):
        if isinstance(data, Tensor):
            dtype = data.dtype if dtype is None else dtype
            data = data.data
        self.data = _as_storage(data, dtype)

    def _wrap(self, value, other=None):
        """A Tensor holding an operation's result; a floating result gets the Tensors' float dtype."""
        value = np.asarray(value)
        if value.dtype.kind == "f":
            floats = [t.dtype for t in (self, other) if isinstance(t, Tensor) and t.dtype.kind == "f"]
            value = value.astype(np.result_type(*floats) if floats else np.float32, copy=False)
        return Tensor(value, dtype=value.dtype)

    # ---- what the tensor holds
    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return self.data.size

    def numpy(self):
        """The underlying NumPy array (not a copy)."""
        return self.data

    def __array__(self, dtype=None, copy=None):
        return np.array(self.data, dtype=dtype, copy=copy)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        if isinstance(index, Tensor):
            index = index.data
        return self._wrap(self.data[index])

    def __repr__(self):
        body = np.array2string(self.data, separator=", ", prefix="Tensor(")
        return f"Tensor({body}, shape={self.shape}, dtype={self.dtype})"

    # ---- elementwise arithmetic, with NumPy broadcasting
    def _elementwise(self, op, other, reflected=False):
        operand = other.data if isinstance(other, Tensor) else other
        with np.errstate(all="ignore"):          # IEEE arithmetic: inf - inf is nan, 1 / 0 is inf, silently
            value = op(operand, self.data) if reflected else op(self.data, operand)
        return self._wrap(value, other)

    def __add__(self, other):
        return self._elementwise(np.add, other)

    def __radd__(self, other):
        return self._elementwise(np.add, other, reflected=True)

    def __sub__(self, other):
        return self._elementwise(np.subtract, other)

    def __rsub__(self, other):
        return self._elementwise(np.subtract, other, reflected=True)

    def __mul__(self, other):
        return self._elementwise(np.multiply, other)

    def __rmul__(self, other):
        return self._elementwise(np.multiply, other, reflected=True)

    def __truediv__(self, other):
        return self._elementwise(np.true_divide, other)

    def __rtruediv__(self, other):
        return self._elementwise(np.true_divide, other, reflected=True)

    def __neg__(self):
        return self._wrap(-self.data)

    # ---- matrix product
    def matmul(self, other):
        """The matrix product `self @ other`."""
        return self._elementwise(_checked_matmul, other)

    def __matmul__(self, other):
        return self.matmul(other)

    def __rmatmul__(self, other):
        return self._elementwise(_checked_matmul, other, reflected=True)

    # ---- shape
    def reshape(self, *shape):
        """Same elements, new shape: `t.reshape(2, 3)` or `t.reshape((2, 3))`; one size may be -1."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        try:
            return self._wrap(self.data.reshape(shape))
        except ValueError:
            raise ValueError(
                f"reshape: cannot reshape shape {self.shape} ({self.size} elements) into shape {shape}"
            ) from None

    def transpose(self, *axes):
        """Permute the axes; with no arguments, reverse them (a matrix becomes its transpose)."""
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return self._wrap(self.data.transpose(axes or None))

    # ---- reductions
    def sum(self, axis=None, keepdims=False):
        with np.errstate(all="ignore"):
            return self._wrap(self.data.sum(axis=axis, keepdims=keepdims))

    def mean(self, axis=None, keepdims=False):
        with np.errstate(all="ignore"):
            return self._wrap(self.data.mean(axis=axis, keepdims=keepdims))

    def max(self, axis=None, keepdims=False):
        return self._wrap(self.data.max(axis=axis, keepdims=keepdims))


def _checked_matmul(a, b):
    """`a @ b` for NumPy operands, with an error that names both shapes."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: operands must have at least 1 dimension, got {a.shape} @ {b.shape}")
    inner_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if a.shape[-1] != inner_b:
        raise ValueError(f"matmul: inner dimensions differ: {a.shape} @ {b.shape}")
    return a @ b


# %% [markdown]
# ### Checking construction and dtypes
#
# The properties mirror NumPy's, and a Tensor built from a Tensor keeps its dtype.

# %%
def test_unit_construction():
    t = Tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert t.shape == (2, 3) and t.ndim == 2 and t.size == 6 and len(t) == 2
    assert t.dtype == np.float32
    np.testing.assert_array_equal(t.numpy(), [[1, 2, 3], [4, 5, 6]])
    assert Tensor(np.arange(3.0)).dtype == np.float32
    assert Tensor([1, 2]).dtype == np.int64
    assert Tensor([1, 2], dtype=np.float64).dtype == np.float64
    copy = Tensor(t)
    assert copy.dtype == np.float32
    np.testing.assert_array_equal(copy.data, t.data)
    row = t[1]
    assert isinstance(row, Tensor)
    np.testing.assert_array_equal(row.data, [4.0, 5.0, 6.0])
    assert repr(Tensor([[1.0, 2.0]])) == "Tensor([[1., 2.]], shape=(1, 2), dtype=float32)"


test_unit_construction()

# %% [markdown]
# ### Checking arithmetic and broadcasting
#
# A `(2, 3)` matrix plus a `(3,)` vector adds the vector to each row; `1 - t` and `2 / t` use the
# reflected operators; float32 survives Python floats and float64 arrays.

# %%
def test_unit_arithmetic():
    x = Tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b = Tensor([10.0, 20.0, 30.0])
    np.testing.assert_array_equal((x + b).data, [[11, 22, 33], [14, 25, 36]])
    np.testing.assert_array_equal((x * 2).data, [[2, 4, 6], [8, 10, 12]])
    np.testing.assert_array_equal((1 - x).data, [[0, -1, -2], [-3, -4, -5]])
    np.testing.assert_allclose((2 / x).data, [[2, 1, 2 / 3], [0.5, 0.4, 1 / 3]], rtol=1e-6)
    np.testing.assert_array_equal((-x).data, -x.data)
    assert (x + 0.5).dtype == np.float32
    mixed = np.array([1.0, 1.0, 1.0]) + x  # float64 array on the left
    assert isinstance(mixed, Tensor) and mixed.dtype == np.float32
    assert (Tensor([1, 2]) + 1).dtype == np.int64
    assert (Tensor([1, 2]) / 2).dtype == np.float32


test_unit_arithmetic()

# %% [markdown]
# ### Checking matmul
#
# By hand:
#
# $$\begin{pmatrix}1 & 2\\3 & 4\end{pmatrix}\begin{pmatrix}5\\6\end{pmatrix}
# = \begin{pmatrix}1 \cdot 5 + 2 \cdot 6\\3 \cdot 5 + 4 \cdot 6\end{pmatrix}
# = \begin{pmatrix}17\\39\end{pmatrix}.$$

# %%
def test_unit_matmul():
    a = Tensor([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal((a @ Tensor([[5.0], [6.0]])).data, [[17.0], [39.0]])
    np.testing.assert_array_equal(a.matmul([5.0, 6.0]).data, [17.0, 39.0])
    np.testing.assert_array_equal((np.eye(2) @ a).data, a.data)
    try:
        Tensor(np.ones((2, 3))) @ Tensor(np.ones((4, 5)))
    except ValueError as error:
        assert "(2, 3) @ (4, 5)" in str(error)
    else:
        raise AssertionError("mismatched inner dimensions were accepted")


test_unit_matmul()

# %% [markdown]
# ### Checking reshape, transpose and reductions

# %%
def test_unit_shape_and_reductions():
    t = Tensor(np.arange(6.0))
    m = t.reshape(2, 3)
    np.testing.assert_array_equal(m.data, [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(t.reshape((3, -1)).data, [[0, 1], [2, 3], [4, 5]])
    np.testing.assert_array_equal(m.transpose().data, [[0, 3], [1, 4], [2, 5]])
    np.testing.assert_array_equal(m.sum(axis=0).data, [3, 5, 7])
    np.testing.assert_array_equal(m.max(axis=1, keepdims=True).data, [[2], [5]])
    np.testing.assert_allclose(m.mean().data, 2.5)
    assert m.mean().dtype == np.float32
    try:
        t.reshape(4, 2)
    except ValueError as error:
        assert "(6,)" in str(error) and "(4, 2)" in str(error)
    else:
        raise AssertionError("an impossible reshape was accepted")


test_unit_shape_and_reductions()

# %% [markdown]
# ## A layer's parameters
#
# Every layer in later modules keeps its learned Tensors in a list, `layer.parameters`, which an
# optimiser walks and a model concatenates with `parameters.extend(block.parameters)`. PyTorch
# code writes the same thing as a call, `layer.parameters()`. A `ParameterList` is an ordinary
# `list` whose call returns the list itself, so both spellings work and give the same Tensors
# (the same objects, not copies: updating them in place updates the layer).

# %%
#| export
class ParameterList(list):
    """A list of a layer's parameter Tensors that can also be called: `layer.parameters()` is the list."""

    def __call__(self):
        return self


# %%
def test_unit_parameter_list():
    weight, bias = Tensor(np.ones((2, 3))), Tensor(np.zeros(3))
    params = ParameterList([weight, bias])
    assert isinstance(params, list) and params() is params
    assert params[0] is weight and params()[1] is bias
    collected = [Tensor([1.0])]
    collected.extend(params)
    assert len(collected) == 3 and collected[1] is weight


test_unit_parameter_list()
