"""Expected values for the tests, stored, so that no reference implementation ships to students.

The tests ask for an expected value the way they would call a reference function:
`ref.attention(q, k, v, keep)`. Each answer is stored under the test that asks and the number of
its question in that test, `test_masks.py::test_causal_mask[3-5]#0.causal_mask`, as snapshot
tests name theirs: a key never depends on how a machine rounds the inputs. Beside each answer the
store keeps a fingerprint of the inputs it was computed from, so that a question asked with other
inputs gets a clear error instead of a wrong answer.

- In the course repository, `course/reference.py` (a float64 reference written independently of
  the module, never released) recomputes every answer, and the stored copy must agree with it
  within `STORE_RTOL`; the test then gets the stored copy. So the course and a release hand every
  test the same numbers, on every machine, and every course run proves that the store is the
  reference's.
- In a student workspace, made by `tito release`, only `expected_values.npz` exists, and the
  answers are looked up.

After a change to the tests or the reference, rewrite the store from the course repository with
`TITO_RECORD_EXPECTED=1 pytest tests/13_attention` (the whole folder: the store keeps exactly the
values that run asks for).
"""
from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import numpy as np

STORE_FILE = Path(__file__).with_name("expected_values.npz")
FIXED_DATE = (1980, 1, 1, 0, 0, 0)      # zip entries carry no time of writing: the store is byte-stable

# The float64 reference against its stored copy. Another CPU's BLAS rounds the reference's dot
# products differently (FMA or not, other SIMD widths): a dot product of n terms moves by at most
# about n * 1.1e-16 of its terms' magnitude, and the softmax turns a score's absolute error into a
# relative error of the weights. The largest products here have n = 4096 and the largest scores
# are about 1e5, which bounds the difference near 1e-16 * 4096 * 1e5 = 4e-8 in the worst case and
# about 1e-15 in the measured one. The central differences of Part 11 (step 1e-6) divide a
# difference of two rounded sums by the step, so another CPU moves them by up to about
# 1e-16 / 1e-6 times their sums' size: 8.9e-10 measured, the largest of any answer. The tests
# compare float32 results with rtol >= 1e-6, so any store error below 1e-8 cannot change a grade,
# while a real change to the reference or to a test's inputs moves values by far more.
STORE_RTOL = 1e-8
# Integer and boolean answers (masks, lengths, block tables) come from exact arithmetic: compared exactly.

# The fingerprint of the inputs: per array its shape, sum, sum of squares and a position-weighted
# sum. The inputs are seeded draws, or float32 numbers computed from them; another CPU may round a
# computed input by a few float32 units in the last place, so a sum of n such numbers may move by
# n * 8 * 1.2e-7 of their largest magnitude. A different seed, shape or order moves it by far more.
INPUT_ULPS = 8
FLOAT32_EPS = float(np.finfo(np.float32).eps)


def _leaves(value, into: list) -> list:
    """The arrays and scalars of a test's inputs, in order: a Tensor or CausalMask by its array."""
    if not isinstance(value, (np.ndarray, np.generic)):
        value = getattr(value, "data", value)
    if isinstance(value, dict):
        for name in sorted(value):
            _leaves(value[name], into)
    elif isinstance(value, (list, tuple)) and not all(np.isscalar(item) for item in value):
        for item in value:
            _leaves(item, into)
    elif isinstance(value, str):
        raise TypeError(f"cannot fingerprint an input of type str ({value!r}): pass numbers and arrays")
    elif value is not None:
        into.append(np.asarray(value))
    return into


def fingerprint(args: tuple, kwargs: dict) -> np.ndarray:
    """Each input array as (size, ndim, *shape, sum, sum of squares, weighted sum, largest |x|), in float64."""
    numbers = []
    for array in _leaves([list(args), {name: kwargs[name] for name in sorted(kwargs)}], []):
        flat = np.nan_to_num(array.astype(np.float64).ravel(), nan=0.0, posinf=3e38, neginf=-3e38)
        weights = np.cos(np.arange(flat.size))                       # a permutation moves this sum
        largest = float(np.abs(flat).max()) if flat.size else 0.0
        numbers += [flat.size, array.ndim, *array.shape, flat.sum(), (flat * flat).sum(), flat @ weights, largest]
    return np.array(numbers, dtype=np.float64)


def same_inputs(stored: np.ndarray, asked: np.ndarray) -> bool:
    """Whether two fingerprints describe the same inputs, up to another CPU's float32 rounding."""
    if stored.shape != asked.shape:
        return False
    position = 0
    while position < len(stored):
        size, ndim = int(stored[position]), int(stored[position + 1])
        header = slice(position, position + 2 + ndim)
        if not np.array_equal(stored[header], asked[header]):      # size, rank and shape: exact
            return False
        total, squares, weighted, largest = stored[header.stop:header.stop + 4]
        slack = max(size, 1) * INPUT_ULPS * FLOAT32_EPS * largest
        limits = np.array([slack, 2 * slack * largest, slack, slack])
        asked_sums = asked[header.stop:header.stop + 4]
        if np.any(np.abs(asked_sums - [total, squares, weighted, largest]) > limits + 1e-300):
            return False
        position = header.stop + 4
    return True


def agrees(stored: np.ndarray, computed: np.ndarray) -> bool:
    """Whether a stored answer is the reference's, computed on this machine, within STORE_RTOL."""
    return answer_difference(stored, computed) <= STORE_RTOL


def answer_difference(stored: np.ndarray, computed: np.ndarray) -> float:
    """How far a recomputed answer is from the stored one: the relative_difference of its finite floats,
    0 for equal integers or booleans, and inf where shape, kind or a non-finite entry differs."""
    stored, computed = np.asarray(stored), np.asarray(computed)
    if stored.shape != computed.shape or stored.dtype.kind != computed.dtype.kind:
        return np.inf
    if stored.dtype.kind != "f":
        return 0.0 if np.array_equal(stored, computed) else np.inf
    finite = np.isfinite(stored)
    if not np.array_equal(finite, np.isfinite(computed)) or not np.array_equal(stored[~finite], computed[~finite],
                                                                                 equal_nan=True):
        return np.inf                                 # -inf, +inf and NaN stand where they stood
    return relative_difference(stored[finite], computed[finite])


def relative_difference(stored: np.ndarray, computed: np.ndarray) -> float:
    """The largest difference of two float arrays, in units of their largest magnitude (at least 1)."""
    if not stored.size:
        return 0.0
    scale = max(1.0, float(np.abs(stored).max()))
    return float(np.abs(stored - computed).max()) / scale


def _flatten(key: str, value, into: dict) -> None:
    """A value as named arrays: an array under `key`, a tuple or list item by item."""
    if isinstance(value, (tuple, list)):
        into[f"{key}.len"] = np.array(len(value))
        for index, item in enumerate(value):
            _flatten(f"{key}.{index}", item, into)
    else:
        into[key] = np.array(value)          # a copy: a test may change the array it was handed


def _unflatten(key: str, arrays: dict):
    if f"{key}.len" in arrays:
        return tuple(_unflatten(f"{key}.{index}", arrays) for index in range(int(arrays[f"{key}.len"])))
    return np.array(arrays[key])             # a copy: a test may change the array it was handed


def read_store(path: Path = STORE_FILE) -> dict:
    with np.load(path) as stored:
        return {name: stored[name] for name in stored.files}


def write_store(arrays: dict, path: Path = STORE_FILE) -> None:
    """Write the arrays in sorted order with fixed dates, so the same values give the same bytes.

    The archive is built in memory and replaces the store in one rename: a failed write leaves it as it was.
    """
    archive_bytes = io.BytesIO()
    with zipfile.ZipFile(archive_bytes, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=FIXED_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(archive_bytes.getvalue())
    partial.replace(path)


GRADED_PACKAGE = "tinytorch.core.attention"


def _refuse_inside_the_package(function: str) -> None:
    """Expected values answer the tests only: code under test that asks for one gets an error."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__") == GRADED_PACKAGE:
            raise RuntimeError(f"{GRADED_PACKAGE} asked for the expected value of {function}: expected values "
                               "are there to check your code, not to be its answer")
        frame = frame.f_back


class ExpectedValues:
    """`expected.NAME(*inputs)`: the reference's NAME on these inputs, looked up (and recomputed in the course).

    Args:
        stored: the store's arrays by name.
        reference: the reference module (course repository only), or None in a student workspace.
        record: collect every value asked for, to rewrite the store (course repository only).
    """

    def __init__(self, stored: dict, reference=None, record: bool = False):
        self._stored, self._reference, self._record = stored, reference, record
        self.asked: dict = {}                 # what this run asked for, flattened: the next store
        self._test: str | None = None         # the test now running, as `file.py::name[params]`
        self._questions = 0                   # how many questions that test has asked so far
        self.checked = 0                      # answers recomputed and found stored (course repository)
        self.largest_difference = 0.0         # the largest relative_difference among them

    def begin_test(self, test_id: str | None) -> None:
        """Answer the questions of this test next (None: no test is running)."""
        self._test, self._questions = test_id, 0

    def __getattr__(self, function: str):
        if function.startswith("_"):
            raise AttributeError(function)

        def expected(*args, **kwargs):
            _refuse_inside_the_package(function)
            if self._test is None:
                raise RuntimeError(f"the expected value of {function} was asked for outside a test: "
                                   "answers are stored by the test that asks")
            key = f"{self._test}#{self._questions}.{function}"
            self._questions += 1
            inputs = fingerprint(args, kwargs)
            if self._reference is None:
                return self._look_up(key, function, inputs)
            value = getattr(self._reference, function)(*args, **kwargs)
            flat = {f"{key}.inputs": inputs}
            _flatten(key, value, flat)
            self.asked.update(flat)
            if self._record:
                return value
            self._check_stored(key, function, flat)
            return self._look_up(key, function, inputs)

        return expected

    def _look_up(self, key: str, function: str, inputs: np.ndarray):
        if f"{key}.inputs" not in self._stored:
            raise LookupError(
                f"no stored expected value for question {key}: this test asks more questions, or other ones, "
                f"than the course's tests do")
        if not same_inputs(self._stored[f"{key}.inputs"], inputs):
            raise LookupError(
                f"the expected value of {function} for question {key} was stored for other inputs. The inputs "
                f"are seeded random numbers, or computed by the test, so an input that depends on your code's "
                f"output (for example a layer's weights) means your code changed it")
        return _unflatten(key, self._stored)

    def _check_stored(self, key: str, function: str, flat: dict) -> None:
        def stale(what: str) -> AssertionError:
            return AssertionError(f"expected_values.npz is stale: the reference's {function} for question {key} {what}; "
                                  f"rewrite it with TITO_RECORD_EXPECTED=1 pytest tests/13_attention")

        for name, array in flat.items():
            if name not in self._stored:
                raise stale(f"is not stored as computed ({name})")
            if name.endswith(".inputs"):
                if not same_inputs(self._stored[name], array):
                    raise stale("was stored for other inputs")
                continue
            difference = answer_difference(self._stored[name], array)
            if difference > STORE_RTOL:
                raise stale(f"is not stored as computed ({name})")
            self.largest_difference = max(self.largest_difference, difference)
        self.checked += 1


def test_id(path: Path, nodeid: str) -> str:
    """A test's name in the store: its file, relative to this folder, and its name with parameters."""
    relative = Path(path).resolve().relative_to(STORE_FILE.parent.resolve()).as_posix()
    return f"{relative}::{nodeid.split('::', 1)[1]}"


def weights_of(layer) -> list:
    """[w_q, w_k, w_v, w_o] of a MultiHeadAttention as arrays: the inputs of `ref.multihead`."""
    return [np.asarray(weight.data) for weight in (layer.w_q, layer.w_k, layer.w_v, layer.w_o)]


def with_weights(layer, seed: int):
    """Give a MultiHeadAttention the weights `ref.init_weights(seed, ...)` holds, and return the layer.

    How a layer initialises its weights is the student's decision, so a test that compares outputs
    sets the weights itself; what it expects then does not depend on that decision.
    """
    weights = ref.init_weights(seed, layer.embed_dim, layer.num_heads, layer.num_kv_heads)
    for tensor, values in zip((layer.w_q, layer.w_k, layer.w_v, layer.w_o), weights):
        if tensor.data.shape != values.shape:
            raise AssertionError(f"a weight of shape {tensor.data.shape} where {values.shape} was expected")
        tensor.data[...] = values
    return layer
