"""Part 11's provided tools: the gradient check, the reversal demonstration, the backward sweep and its figure.

None of these grades a part: they check provided code, some of it run through the student's functions.
"""
import numpy as np
import pytest

from tinytorch.core import attention
from tinytorch.core._attention_figures import plot_training
from tinytorch.core._attention_training import (cross_entropy, gradient_check, measure_backward_scaling,
                                                numerical_gradients, projection_gradient, reversal_batch,
                                                train_reversal)
from tinytorch.core.attention import AttentionProfiler, attention_backward, math_attention


# ---------------------------------------------------------------- the gradient check
def test_numerical_gradients_of_known_functions():
    """sum(dO * x^2) has gradient 2 x dO; sum(dO * (a @ b)) has gradients dO b^T and a^T dO, to float64 precision."""
    rng = np.random.default_rng(0)
    x, d = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    found = numerical_gradients(lambda x: x ** 2, {"x": x}, d, ["x"], step=1e-5)
    np.testing.assert_allclose(found["x"], 2 * x * d, rtol=1e-7, atol=1e-9)
    a, b, d = rng.normal(size=(2, 3)), rng.normal(size=(3, 4)), rng.normal(size=(2, 4))
    a_before = a.copy()
    found = numerical_gradients(lambda a, b: a @ b, {"a": a, "b": b}, d, ["a", "b"], step=1e-5)
    np.testing.assert_allclose(found["a"], d @ b.T, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(found["b"], a.T @ d, rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(a, a_before, err_msg="the caller's arrays are never nudged")


def test_gradient_check_passes_the_backward_and_catches_a_planted_bug():
    rng = np.random.default_rng(1)
    q, k, v, d = (rng.normal(size=shape) for shape in ((3, 4), (5, 4), (5, 2), (3, 2)))
    _, weights = math_attention(q, k, v)
    forward = lambda query, key, value: math_attention(query, key, value)           # noqa: E731
    inputs = {"query": q, "key": k, "value": v}
    good = dict(zip(("query", "key", "value"), attention_backward(d, q, k, v, weights)))
    report = gradient_check(forward, inputs, d, good)
    assert report["passed"] and report["worst"] < 1e-3, report["errors"]
    planted = dict(good, query=good["query"].data * 2)                                # dQ scaled twice over
    report = gradient_check(forward, inputs, d, planted)
    assert not report["passed"] and report["errors"]["query"] > 0.5 and report["errors"]["key"] < 1e-3


def test_gradient_check_rejects_bad_arguments():
    with pytest.raises(TypeError, match="function must be callable"):
        numerical_gradients(np.zeros(3), {"x": np.zeros(3)}, np.zeros(3), ["x"])
    with pytest.raises(ValueError, match=r"names \['y'\] are not among the inputs \['x'\]"):
        numerical_gradients(lambda x: x, {"x": np.zeros(3)}, np.zeros(3), ["y"])
    with pytest.raises(ValueError, match=r"the gradient of x has shape \(2,\), but x has \(3,\)"):
        gradient_check(lambda x: x, {"x": np.zeros(3)}, np.zeros(3), {"x": np.zeros(2)})


# ---------------------------------------------------------------- the demonstration's pieces
def test_reversal_batch_and_the_loss_gradient():
    x, tokens, targets = reversal_batch(np.random.default_rng(2), 4, seq_len=5, vocab_size=7)
    assert x.shape == (4, 5, 12) and x.dtype == np.float32
    np.testing.assert_array_equal(targets, tokens[:, ::-1])
    np.testing.assert_array_equal(x[..., :7].argmax(-1), tokens)
    np.testing.assert_array_equal(x[..., 7:].argmax(-1), np.broadcast_to(np.arange(5), (4, 5)))
    logits = np.random.default_rng(3).normal(size=(2, 3, 4))
    targets = np.array([[0, 1, 2], [3, 0, 1]])
    loss, d_logits = cross_entropy(logits, targets)
    found = numerical_gradients(lambda z: np.array(cross_entropy(z, targets)[0]), {"z": logits}, np.array(1.0), ["z"],
                                step=1e-6)
    np.testing.assert_allclose(d_logits, found["z"], rtol=1e-4, atol=1e-7)
    assert loss == pytest.approx(-np.mean(np.log(np.take_along_axis(
        np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), targets[..., None], -1))))
    x, d_y = np.random.default_rng(4).normal(size=(2, 3, 4)), np.random.default_rng(5).normal(size=(2, 3, 5))
    np.testing.assert_allclose(projection_gradient(x, d_y), sum(x[b].T @ d_y[b] for b in range(2)), rtol=1e-12)


@pytest.mark.parametrize("recompute", [False, True])
def test_the_reversal_model_learns_with_either_backward(recompute):
    """The notebook's run: the loss falls at least 10x and the weights find the mirrored key (its time is
    printed by the notebook, not asserted: no test asserts a timing)."""
    run = train_reversal(attention, steps=300, learning_rate=1.0, seed=0, recompute=recompute)
    assert run["losses"][0] / run["losses"][-1] >= 10, f"loss {run['losses'][0]:.3f} -> {run['losses'][-1]:.4f}"
    assert run["seconds"] > 0
    assert run["accuracy"] > 0.95
    weights = run["example_weights"]
    np.testing.assert_array_equal(weights.argmax(axis=-1), np.arange(6)[::-1],
                                  err_msg="query i attends most to key 5 - i")


def test_both_backward_passes_train_identically():
    saved, recomputed = (train_reversal(attention, steps=40, seed=3, recompute=flag)["losses"] for flag in (False, True))
    np.testing.assert_allclose(saved, recomputed, rtol=1e-4)


# ---------------------------------------------------------------- the sweep and the figure
def test_backward_sweep_reports_both_passes_and_what_each_keeps():
    rows = measure_backward_scaling(attention, AttentionProfiler(repeats=1, warmup=0), [64, 128], num_heads=2, head_dim=8,
                                    block_size=32)
    assert set(rows) == {"blocked forward", "saved weights", "recomputed"}
    assert [row["seq_len"] for row in rows["recomputed"]] == [64, 128]
    assert rows["saved weights"][1]["kept_mb"] == 2 * 128 * 128 * 4 / 2**20                 # the (H, T, T) weights
    assert rows["recomputed"][1]["kept_mb"] == 2 * 128 * 4 / 2**20                         # the (H, T) logsumexp
    assert rows["recomputed"][1]["peak_memory_mb"] < rows["saved weights"][1]["peak_memory_mb"]
    assert all(row["time_ms"] > 0 for name in rows for row in rows[name])


def test_training_figure_draws_every_run_and_the_weights():
    runs = {"a": {"losses": [2.0, 1.0, 0.1], "example_tokens": np.array([3, 1]), "example_weights": np.eye(2)},
            "b": {"losses": [2.0, 0.9, 0.2], "example_tokens": np.array([3, 1]), "example_weights": np.eye(2)}}
    figure = plot_training(runs, title="t")
    loss_axes, weight_axes = figure.axes[:2]
    assert [line.get_label().split(":")[0] for line in loss_axes.get_lines()] == ["a", "b"]
    assert [label.get_text() for label in weight_axes.get_xticklabels()] == ["0:3", "1:1"]


def test_training_figure_rejects_unusable_runs():
    with pytest.raises(TypeError, match="runs must be a non-empty dict"):
        plot_training({})
    with pytest.raises(ValueError, match="must be a dict with keys"):
        plot_training({"a": {"losses": [1.0]}})
    with pytest.raises(ValueError, match=r"example_weights must be \(2, 2\) for 2 tokens, got \(3, 3\)"):
        plot_training({"a": {"losses": [1.0], "example_tokens": [0, 1], "example_weights": np.eye(3)}})
