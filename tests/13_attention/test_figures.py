"""The module's pictures: each one draws the numbers, colours and counts it claims to."""
import io
import re
import subprocess
import sys
from types import SimpleNamespace

import matplotlib
import numpy as np
from expected import ref
import pytest

from tinytorch.core._attention_figures import (
    _block_fill, _cache_states, _tile_kinds, draw_attention_flow, draw_block_tables, draw_blocked_loop, draw_head_split,
    draw_kv_cache, generation_spikes, plot_generation, plot_head_weights, plot_scaling, plot_serving_memory)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def axes_titled(figure, prefix):
    (axes,) = [axes for axes in figure.axes if axes.get_title().startswith(prefix)]
    return axes


def printed_numbers(axes):
    return np.array([float(text.get_text()) for text in axes.texts])


def small_attention(T=3, S=4, d=4, dv=2, seed=0):
    rng = np.random.default_rng(seed)
    query, key, value = rng.standard_normal((T, d)), rng.standard_normal((S, d)), rng.standard_normal((S, dv))
    weights = ref.masked_softmax(query @ key.T / np.sqrt(d))
    return query, key, value, weights, weights @ value


def test_importing_the_figures_needs_no_matplotlib():
    result = subprocess.run([sys.executable, "-c", "import sys, tinytorch.core._attention_figures; "
                             "print(sorted(name for name in sys.modules if name.startswith('matplotlib')))"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n" and result.stderr == ""


def test_drawing_twice_gives_the_same_picture():
    def png(figure):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=40)
        return buffer.getvalue()

    assert png(draw_attention_flow(*small_attention())) == png(draw_attention_flow(*small_attention()))


# ---------------------------------------------------------------- draw_attention_flow
def test_flow_prints_the_scores_and_weights_it_is_given():
    query, key, value, weights, output = small_attention()
    figure = draw_attention_flow(query, key, value, weights, output)
    scores = query @ key.T / 2.0                                          # √d = 2
    np.testing.assert_array_equal(printed_numbers(axes_titled(figure, "scores")), np.round(scores, 2).ravel())
    np.testing.assert_array_equal(printed_numbers(axes_titled(figure, "weights")), np.round(ref.masked_softmax(scores), 2).ravel())
    np.testing.assert_array_equal(printed_numbers(axes_titled(figure, "Kᵀ")), np.round(key.T, 2).ravel())
    np.testing.assert_array_equal(printed_numbers(axes_titled(figure, "output")), np.round(output, 2).ravel())


def test_flow_titles_give_each_shape_and_the_labels_name_the_steps():
    figure = draw_attention_flow(*small_attention(T=2, S=5, d=3, dv=4))
    titles = [axes.get_title() for axes in figure.axes]
    assert titles == ["Q\n(2, 3)", "Kᵀ\n(3, 5)", "scores = Q Kᵀ / √3\n(2, 5)", "weights = softmax(scores)\n(2, 5)",
                      "V\n(5, 4)", "output\n(2, 4)"]
    labels = [text.get_text() for text in figure.texts if not text.get_text().startswith("output =")]
    assert sorted(labels) == sorted(["×", "/ √d\n→", "softmax\n→", "×", "="])


def test_flow_accepts_lists():
    query, key, value, weights, output = (array.tolist() for array in small_attention())
    assert len(draw_attention_flow(query, key, value, weights, output).axes) == 6


def test_flow_rejects_mismatched_shapes_and_non_numbers():
    query, key, value, weights, output = small_attention()
    with pytest.raises(ValueError, match=r"weights must have shape \(3, 4\).*got \(4, 3\)"):
        draw_attention_flow(query, key, value, weights.T, output)
    with pytest.raises(ValueError, match=r"key must have shape \(4, 4\)"):
        draw_attention_flow(query, key[:, :3], value, weights, output)
    with pytest.raises(ValueError, match=r"query must have 2 axes, got shape \(4,\)"):
        draw_attention_flow(query[0], key, value, weights, output)
    with pytest.raises(TypeError, match="value must be an array of numbers, got str"):
        draw_attention_flow(query, key, "values", weights, output)
    with pytest.raises(ValueError, match="T must be <= 8 to draw legibly, got 9"):
        draw_attention_flow(*small_attention(T=9))


# ---------------------------------------------------------------- draw_head_split
def test_head_split_colours_each_column_by_its_head():
    figure = draw_head_split(12, 3, seq_len=5)
    grid = axes_titled(figure, "x: (T, E) = (5, 12)").images[0].get_array()
    np.testing.assert_array_equal(grid, np.broadcast_to(np.arange(12) // 4, (5, 12)))
    for h in range(3):
        head = axes_titled(figure, f"head {h}: (5, 4)")
        np.testing.assert_array_equal(head.images[0].get_array(), np.full((5, 4), h))
        assert [label.get_text() for label in head.get_xticklabels()] == [str(c) for c in range(4 * h, 4 * h + 4)]
    assert figure.texts[0].get_text().startswith("(B, T, E) → (B, T, H, hd) → (B, H, T, hd)")


def test_head_split_rejects_an_embed_dim_the_heads_do_not_divide():
    with pytest.raises(ValueError, match="embed_dim must be divisible by num_heads, got 10 % 4 = 2"):
        draw_head_split(10, 4)
    with pytest.raises(TypeError, match="num_heads must be an integer, got float 2.0"):
        draw_head_split(8, 2.0)
    with pytest.raises(ValueError, match="num_heads must be <= 8"):
        draw_head_split(32, 16)


# ---------------------------------------------------------------- draw_kv_cache
def test_cache_rows_match_the_calls_made():
    prompt, steps, capacity = 3, 4, 9
    expected = np.zeros((steps + 1, capacity), dtype=int)                 # 0 empty, 1 cached, 2 written
    expected[0, :prompt] = 2
    for step in range(1, steps + 1):
        for position in range(capacity):
            if position < prompt + step - 1:
                expected[step, position] = 1
            elif position == prompt + step - 1:
                expected[step, position] = 2
    np.testing.assert_array_equal(_cache_states(prompt, steps, capacity), expected)
    figure = draw_kv_cache(prompt, steps, capacity)
    np.testing.assert_array_equal(figure.axes[0].images[0].get_array(), expected)


def test_cache_labels_each_query_and_the_keys_it_sees():
    axes = draw_kv_cache(3, 2, 6).axes[0]
    assert [label.get_text() for label in axes.get_yticklabels()] == [
        "prefill: queries 0..2", "step 1: query 3", "step 2: query 4"]
    texts = [text.get_text() for text in axes.texts]
    assert texts.count("q") == 3 + 2
    assert [text for text in texts if "sees" in text] == [
        "query i sees keys 0..i", "sees keys 0..3", "sees keys 0..4"]
    assert len(axes.get_legend().get_texts()) == 3


def test_cache_rejects_more_tokens_than_it_holds():
    with pytest.raises(ValueError, match=r"prompt_length \+ steps must be <= max_seq_length, got 5 \+ 4 > 8"):
        draw_kv_cache(5, 4, 8)
    with pytest.raises(ValueError, match="prompt_length must be >= 1, got 0"):
        draw_kv_cache(0, 2, 8)


# ---------------------------------------------------------------- draw_blocked_loop
def brute_force_tile_kinds(seq_len, key_len, block_size, causal):
    """0 skipped, 1 partly masked, 2 full, from a boolean mask sliced tile by tile."""
    visible = np.array([[j <= i + key_len - seq_len or not causal for j in range(key_len)] for i in range(seq_len)])
    kinds = []
    for q in range(0, seq_len, block_size):
        row = []
        for k in range(0, key_len, block_size):
            tile = visible[q:q + block_size, k:k + block_size]
            row.append(2 if tile.all() else 1 if tile.any() else 0)
        kinds.append(row)
    return np.array(kinds)


@pytest.mark.parametrize("seq_len, key_len, block_size", [
    (16, 16, 4), (10, 10, 3), (7, 19, 4), (5, 5, 8), (12, 9, 5), (1, 6, 2), (9, 9, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_tile_kinds_match_a_brute_force_count(seq_len, key_len, block_size, causal):
    expected = brute_force_tile_kinds(seq_len, key_len, block_size, causal)
    np.testing.assert_array_equal(_tile_kinds(seq_len, key_len, block_size, causal), expected)


@pytest.mark.parametrize("causal", [True, False])
def test_blocked_loop_title_counts_the_tiles(causal):
    figure = draw_blocked_loop(10, 14, 4, causal=causal)
    expected = brute_force_tile_kinds(10, 14, 4, causal)
    computed, total, partial, skipped = map(int, re.search(
        r"(\d+) of (\d+) tiles computed \((\d+) with masked entries\), (\d+) skipped", figure.texts[0].get_text()).groups())
    assert (computed, total, partial, skipped) == (
        (expected > 0).sum(), expected.size, (expected == 1).sum(), (expected == 0).sum())
    assert skipped == (3 if causal else 0)


def test_blocked_loop_colours_each_score_by_what_happens_to_it():
    entries = draw_blocked_loop(4, 4, 2).axes[0].images[0].get_array()
    np.testing.assert_array_equal(entries, [[2, 1, 0, 0],                # 0 skipped, 1 masked, 2 used
                                            [2, 2, 0, 0],
                                            [2, 2, 2, 1],
                                            [2, 2, 2, 2]])


def test_blocked_loop_rejects_bad_arguments():
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        draw_blocked_loop(8, 8, 0)
    with pytest.raises(TypeError, match="causal must be True or False, got str 'yes'"):
        draw_blocked_loop(8, 8, 2, causal="yes")


# ---------------------------------------------------------------- plot_scaling
def scaling_rows(exponent, spread=True):
    rows = [{"seq_len": n, "time_ms": 0.003 * n ** exponent, "peak_memory_mb": 0.5 * n} for n in (64, 128, 256, 512)]
    for row in rows if spread else []:
        row["time_spread_ms"] = 0.1 * row["time_ms"]
    return rows


def fits(**exponents):
    return {name: {"time_exponent": time, "memory_exponent": memory} for name, (time, memory) in exponents.items()}


def test_scaling_legend_shows_the_fitted_slopes_it_is_given():
    figure = plot_scaling({"math": scaling_rows(2), "fast": scaling_rows(1.5, spread=False)},
                          fits(math=(2.0, 1.0), fast=(1.5, 1.0)))
    time_axes, memory_axes = figure.axes
    assert [text.get_text() for text in time_axes.get_legend().get_texts()] == ["math: slope 2.00", "fast: slope 1.50"]
    assert [text.get_text() for text in memory_axes.get_legend().get_texts()] == ["math: slope 1.00", "fast: slope 1.00"]
    assert list(time_axes.get_xticks()) == [64, 128, 256, 512]
    assert time_axes.get_xscale() == time_axes.get_yscale() == "log"


def test_scaling_draws_error_bars_only_where_spreads_are_given():
    time_axes = plot_scaling({"math": scaling_rows(2), "fast": scaling_rows(2, spread=False)},
                             fits(math=(2.0, 1.0), fast=(2.0, 1.0))).axes[0]
    math_bars, fast_bars = time_axes.containers
    assert math_bars.has_yerr and not fast_bars.has_yerr


def test_scaling_rejects_unusable_results():
    with pytest.raises(TypeError, match="results must be a non-empty dict"):
        plot_scaling([], {})
    with pytest.raises(ValueError, match=r"results\['math'\] must be a list of dicts with keys"):
        plot_scaling({"math": [{"seq_len": 64, "time_ms": 1.0}]}, fits(math=(2.0, 1.0)))
    with pytest.raises(ValueError, match=r"fits must hold one fit per kernel of results, \['math'\]"):
        plot_scaling({"math": scaling_rows(2)}, fits(fast=(2.0, 1.0)))


# ---------------------------------------------------------------- plot_generation
def generation(new_tokens=5):
    return {"prompt_length": 4, "new_tokens": new_tokens, "cached_token_ms": [0.1] * new_tokens,
            "recompute_token_ms": [float(n) for n in range(new_tokens)], "speedup": 20.04}


def test_generation_plots_each_token_at_its_sequence_length():
    axes = plot_generation(generation()).axes[0]
    recompute, recompute_spikes, cached, cached_spikes = axes.get_lines()
    np.testing.assert_array_equal(recompute.get_xdata(), [5, 6, 7, 8, 9])
    np.testing.assert_array_equal(recompute.get_ydata(), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(cached.get_ydata(), [0.1] * 5)
    assert len(recompute_spikes.get_xdata()) == len(cached_spikes.get_xdata()) == 0
    assert axes.get_title() == ("Generation, measured: the cache's median step is 20.0x faster (spikes left out); "
                                "in total, spikes included, 20.0x")


def test_a_spike_is_a_step_over_three_times_its_neighbours_median():
    times = [1.0, 1.1, 0.9, 3.5, 1.0, 1.0, 2.9, 1.0, 1.0, 1.0, 1.2, 8.0]
    np.testing.assert_array_equal(generation_spikes(times), [t in (3.5, 8.0) for t in times])
    steady_growth = np.linspace(1.0, 40.0, 96)                   # recomputing: slower every step, never a spike
    assert not generation_spikes(steady_growth).any()
    spiky = {**generation(), "cached_token_ms": [0.1, 0.1, 0.5, 0.1, 0.1], "speedup": 12.0}
    _, _, cached, cached_spikes = plot_generation(spiky).axes[0].get_lines()
    np.testing.assert_array_equal(cached_spikes.get_xdata(), [7])
    assert "median step is 20.0x faster (spikes left out); in total, spikes included, 12.0x" in \
        plot_generation(spiky).axes[0].get_title()


def test_generation_rejects_missing_keys_and_wrong_lengths():
    with pytest.raises(ValueError, match=r"generation is missing keys \['speedup'\]"):
        plot_generation({key: value for key, value in generation().items() if key != "speedup"})
    with pytest.raises(ValueError, match=r"generation\['cached_token_ms'\] must hold one time per new token \(6\), got 5"):
        plot_generation({**generation(), "new_tokens": 6, "recompute_token_ms": [1.0] * 6})
    with pytest.raises(TypeError, match="generation must be a dict"):
        plot_generation([1, 2])


# ---------------------------------------------------------------- plot_head_weights
def test_head_weights_draw_one_map_per_head_with_the_tokens():
    weights = ref.masked_softmax(np.random.default_rng(1).standard_normal((3, 4, 4)))
    tokens = ["the", "cat", "sat", "down"]
    figure = plot_head_weights(weights, tokens, title="no mask")
    maps, colour_bar = figure.axes[:-1], figure.axes[-1]
    assert [axes.get_title() for axes in maps] == ["head 0", "head 1", "head 2"]
    for h, axes in enumerate(maps):
        np.testing.assert_array_equal(axes.images[0].get_array(), weights[h])
        assert axes.images[0].get_clim()[0] == 0
        assert [label.get_text() for label in axes.get_xticklabels()] == tokens
        assert axes.get_xlabel() == "key"
    assert colour_bar.get_ylabel() == "attention weight"
    assert figure.texts[0].get_text() == "no mask"


def test_head_weights_reject_tokens_that_do_not_match():
    with pytest.raises(ValueError, match=r"tokens must name the 4 positions of weights \(2, 4, 4\), got 3"):
        plot_head_weights(np.zeros((2, 4, 4)), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"weights must have 3 axes, got shape \(4, 4\)"):
        plot_head_weights(np.zeros((4, 4)), list("abcd"))


# ---------------------------------------------------------------- draw_block_tables
def worked_cache():
    """The worked example of Part 10 after B's copy-on-write, as plain data (no student code)."""
    return SimpleNamespace(num_blocks=8, block_size=4, block_tables={0: [0, 1], 1: [0, 2]}, lengths={0: 7, 1: 8},
                           ref_counts=np.array([2, 1, 1, 0, 0, 0, 0, 0]), free_blocks=[3, 4, 5, 6, 7])


def test_block_fill_counts_each_blocks_tokens_and_holders():
    cache = worked_cache()
    assert _block_fill(cache.block_tables, cache.lengths, 4) == {0: (4, [0, 1]), 1: (3, [0]), 2: (4, [1])}


def test_block_tables_draw_every_table_entry_and_every_slot():
    figure = draw_block_tables(worked_cache(), title="worked example")
    tables_axes, pool_axes = figure.axes
    assert [text.get_text() for text in tables_axes.texts if text.get_text().isdigit()] == ["0", "1", "0", "2"]
    notes = [text.get_text() for text in pool_axes.texts if text.get_text().startswith(("refs", "free"))]
    assert notes == ["refs 2: seq 0, 1", "refs 1: seq 0", "refs 1: seq 1"] + ["free"] * 5
    filled = [patch for patch in pool_axes.patches if patch.get_facecolor()[:3] != (1.0, 1.0, 1.0)]
    assert len(pool_axes.patches) == 8 * 4 and len(filled) == 4 + 3 + 4
    assert "pool: 8 blocks of 4 slots, 5 free" in [text.get_text() for text in pool_axes.texts]
    assert figure.texts[-1].get_text() == "worked example"


def test_block_tables_reject_what_is_not_a_paged_cache():
    with pytest.raises(TypeError, match="cache must be a PagedKVCache"):
        draw_block_tables(object())
    too_many = worked_cache()
    too_many.num_blocks = 40
    with pytest.raises(ValueError, match="num_blocks must be <= 32 to draw legibly, got 40"):
        draw_block_tables(too_many)


# ---------------------------------------------------------------- plot_serving_memory
def test_serving_memory_titles_give_each_schemes_figures():
    histories = {"reserved": {"tokens": [4, 5, 3, 4], "allocated": [8, 8, 8, 8], "running": [1, 1, 1, 1]},
                 "paged": {"tokens": [7, 9], "allocated": [8, 10], "running": [2, 2]}}
    figure = plot_serving_memory(histories, 12)
    assert [axes.get_title() for axes in figure.axes] == [
        "reserved: 50% of the held memory holds real tokens; at most 1 requests at once; all served in 4 steps",
        "paged: 89% of the held memory holds real tokens; at most 2 requests at once; all served in 2 steps"]
    assert [line.get_ydata()[0] for axes in figure.axes for line in axes.get_lines()] == [12, 12]


def test_serving_memory_rejects_incomplete_histories():
    with pytest.raises(ValueError, match=r"histories\['paged'\] is missing \['running'\]"):
        plot_serving_memory({"paged": {"tokens": [1], "allocated": [2]}}, 4)
    with pytest.raises(ValueError, match="one number per step"):
        plot_serving_memory({"paged": {"tokens": [1], "allocated": [2, 2], "running": [1]}}, 4)
    with pytest.raises(TypeError, match="histories must be a non-empty dict"):
        plot_serving_memory({}, 4)
