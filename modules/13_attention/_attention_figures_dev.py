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
# # Module 13: the pictures (provided)
#
# > Drawing functions the attention notebook calls, so that it shows pictures, not plotting code.
#
# Each function returns a `matplotlib.figure.Figure`; the notebook displays it. matplotlib is
# imported inside the functions, so importing `tinytorch` never needs it. Every figure is closed
# in pyplot before it is returned, so Jupyter shows it once, where the notebook displays it.

# %%
#| default_exp core._attention_figures

# %%
#| export
import numpy as np

from tinytorch.core._attention_checks import check_int

# One palette for every picture: signed numbers on a red-blue map centred on 0, weights in blues,
# and one colour per head, kernel or cache state.
_SIGNED_CMAP = "RdBu_r"
_WEIGHTS_CMAP = "Blues"
_COLOURS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
_EMPTY = "#FFFFFF"
_MAX_PRINTED = 8     # a matrix with more rows or columns than this has illegible printed numbers
_MAX_CELLS = 64      # a grid drawn cell by cell is unreadable beyond this many cells a side
_MAX_ROWS = 16       # rows labelled one by one crowd each other beyond this


def _matrix(value, name: str, ndim: int = 2) -> np.ndarray:
    """`value` as a float array with `ndim` axes; TypeError for non-numbers, ValueError for shape."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be an array of numbers, got {type(value).__name__}") from error
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} axes, got shape {array.shape}")
    return array


def _at_most(value: int, name: str, maximum: int) -> None:
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum} to draw legibly, got {value}")


def _finish(figure):
    """Close `figure` in pyplot (it stays drawable) so that Jupyter shows it only where displayed."""
    import matplotlib.pyplot as plt

    plt.close(figure)
    return figure


# %% [markdown]
# ## Queries, keys and values, with their numbers
#
# `draw_attention_flow` prints every number of one small attention call: Q and Kᵀ make the scores
# (top row), and the softmax of the scores weights the rows of V into the output (bottom row).

# %%
#| export
def _heat_map(axes, matrix, title, cmap, vmin, vmax):
    """`matrix` as coloured cells with each value printed to 2 decimals, white on dark cells."""
    image = axes.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax)
    for (row, column), number in np.ndenumerate(matrix):
        red, green, blue, _ = image.cmap(image.norm(number))
        dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
        axes.text(column, row, f"{number:.2f}", ha="center", va="center", fontsize=7,
                  color="white" if dark else "black")
    axes.set_title(title, fontsize=9)
    axes.set_xticks([])
    axes.set_yticks([])


def draw_attention_flow(query, key, value, weights, output):
    """Q, Kᵀ, the scores Q Kᵀ / √d, the weights, V and the output as annotated heat maps.

    Args:
        query: (T, d); key: (S, d); value: (S, dv); weights: (T, S); output: (T, dv).
    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    query, key, value = _matrix(query, "query"), _matrix(key, "key"), _matrix(value, "value")
    weights, output = _matrix(weights, "weights"), _matrix(output, "output")
    (T, d), (S, dv) = query.shape, value.shape
    expected = {"key": ((S, d), key), "weights": ((T, S), weights), "output": ((T, dv), output)}
    for name, (shape, array) in expected.items():
        if array.shape != shape:
            raise ValueError(f"{name} must have shape {shape} for query {query.shape} and value "
                             f"{value.shape}, got {array.shape}")
    for name, size in (("T", T), ("S", S), ("d", d), ("dv", dv)):
        _at_most(size, name, _MAX_PRINTED)
    scores = query @ key.T / np.sqrt(d)                                  # (T, S)

    # Two rows of (matrix, title, the operator after it); the operator before row 2 is the softmax.
    rows = [[(query, f"Q\n({T}, {d})", "×"), (key.T, f"Kᵀ\n({d}, {S})", "/ √d\n→"),
             (scores, f"scores = Q Kᵀ / √{d}\n({T}, {S})", "")],
            [(weights, f"weights = softmax(scores)\n({T}, {S})", "×"), (value, f"V\n({S}, {dv})", "="),
             (output, f"output\n({T}, {dv})", "")]]
    leading = ["", "softmax\n→"]
    signed_max = max(float(np.abs(matrix).max(initial=0)) for row in rows for matrix, _, _ in row) or 1.0
    gap = 1.8                                          # cells between two matrices, for the operator
    widths = [[gap] + [w for matrix, _, _ in row for w in (max(matrix.shape[1], 2), gap)] for row in rows]
    heights = [max(matrix.shape[0] for matrix, _, _ in row) for row in rows]
    total = max(sum(row) for row in widths)
    cell = 0.4                                         # inches: room for "-0.00" at 7 points
    height = cell * sum(heights) + 1.9
    figure = plt.figure(figsize=(cell * total + 0.4, height))
    left, right = 0.02, 0.98
    gap_width = gap / total * (right - left)           # in figure coordinates
    outer = figure.add_gridspec(2, 1, height_ratios=heights, hspace=0.9 / (cell * sum(heights) / 2),
                                left=left, right=right, top=1 - 0.75 / height, bottom=0.1 / height)
    for row_index, row in enumerate(rows):
        padding = total - sum(widths[row_index]) + 1e-3           # the shorter row ends in blank space
        columns = outer[row_index].subgridspec(1, len(widths[row_index]) + 1, wspace=0,
                                               width_ratios=widths[row_index] + [padding])
        for position, (matrix, title, operator) in enumerate(row):
            axes = figure.add_subplot(columns[0, 1 + 2 * position])
            if matrix is weights:
                _heat_map(axes, matrix, title, _WEIGHTS_CMAP, 0.0, 1.0)
            else:
                _heat_map(axes, matrix, title, _SIGNED_CMAP, -signed_max, signed_max)
            axes.apply_aspect()  # shrinks the box to square cells, so the operators go beside it
            box = axes.get_position()
            middle = (box.y0 + box.y1) / 2
            if position == 0 and leading[row_index]:
                figure.text(box.x0 - gap_width / 2, middle, leading[row_index], ha="center", va="center", fontsize=9)
            if operator:
                figure.text(box.x1 + gap_width / 2, middle, operator, ha="center", va="center",
                            fontsize=9 if "\n" in operator else 16)
    figure.suptitle("output = softmax(Q Kᵀ / √d) V, every number printed", fontsize=11)
    return _finish(figure)


# %% [markdown]
# ## Splitting the embedding into heads
#
# `draw_head_split` colours each feature column of a (T, E) input by the head it goes to, and draws
# the H separate (T, hd) blocks that the heads attend over.

# %%
#| export
def draw_head_split(embed_dim, num_heads, seq_len=4):
    """The (T, E) features coloured by head, and the H (T, hd) blocks they become.

    Args:
        embed_dim: E, a multiple of num_heads; num_heads: H (at most 8); seq_len: T.
    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import ConnectionPatch

    E = check_int(embed_dim, "embed_dim", 1)
    H = check_int(num_heads, "num_heads", 1)
    T = check_int(seq_len, "seq_len", 1)
    if E % H:
        raise ValueError(f"embed_dim must be divisible by num_heads, got {E} % {H} = {E % H}")
    _at_most(H, "num_heads", len(_COLOURS))
    _at_most(E, "embed_dim", _MAX_CELLS)
    _at_most(T, "seq_len", _MAX_ROWS)
    hd = E // H
    head_of_column = np.broadcast_to(np.arange(E) // hd, (T, E))        # (T, E)
    colours = ListedColormap(_COLOURS[:H])

    figure = plt.figure(figsize=(10, 3.5))
    layout = figure.add_gridspec(2, H, hspace=0.9, wspace=0.3, top=0.84)
    top = figure.add_subplot(layout[0, :])
    heads = [figure.add_subplot(layout[1, h]) for h in range(H)]
    for axes, columns in [(top, np.arange(E))] + [(heads[h], np.arange(h * hd, (h + 1) * hd)) for h in range(H)]:
        axes.imshow(head_of_column[:, columns], cmap=colours, vmin=-0.5, vmax=H - 0.5, aspect="auto")
        axes.set_xticks(np.arange(len(columns)) - 0.5, minor=True)
        axes.set_yticks(np.arange(T) - 0.5, minor=True)
        axes.grid(which="minor", color="white", linewidth=1)
        axes.tick_params(which="both", length=0, labelsize=7)
        axes.set_yticks([])
        tick_step = max(1, len(columns) // 16)
        axes.set_xticks(np.arange(0, len(columns), tick_step), [str(c) for c in columns[::tick_step]])
    top.set_title(f"x: (T, E) = ({T}, {E}), feature columns coloured by the head they go to", fontsize=9)
    for h, axes in enumerate(heads):
        axes.set_title(f"head {h}: ({T}, {hd})", fontsize=9, color=_COLOURS[h])
        arrow = ConnectionPatch(xyA=(h * hd + (hd - 1) / 2, T - 0.5), coordsA=top.transData,
                                xyB=(0.5, 1.35), coordsB=axes.transAxes, arrowstyle="->", color=_COLOURS[h],
                                shrinkA=12)
        figure.add_artist(arrow)
    figure.suptitle(f"(B, T, E) → (B, T, H, hd) → (B, H, T, hd):  E = {E} = H × hd = {H} × {hd}", fontsize=11)
    return _finish(figure)


# %% [markdown]
# ## The KV cache, call by call
#
# `draw_kv_cache` shows one row per decoding call: the prefill writes the prompt's keys and values,
# then each step writes one more position and reads everything cached before it.

# %%
#| export
_CACHE_EMPTY, _CACHE_CACHED, _CACHE_WRITTEN = 0, 1, 2


def _cache_states(prompt_length: int, steps: int, max_seq_length: int) -> np.ndarray:
    """(steps + 1, max_seq_length): per call, which positions are empty, cached before, or written."""
    states = np.full((steps + 1, max_seq_length), _CACHE_EMPTY)
    states[0, :prompt_length] = _CACHE_WRITTEN
    for step in range(1, steps + 1):
        position = prompt_length + step - 1
        states[step, :position] = _CACHE_CACHED
        states[step, position] = _CACHE_WRITTEN
    return states


def draw_kv_cache(prompt_length, steps, max_seq_length):
    """The cache's positions at each call: the prefill, then `steps` one-token steps.

    Args:
        prompt_length: tokens in the prefill; steps: one-token calls after it;
        max_seq_length: the cache's capacity, at least prompt_length + steps.
    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    P = check_int(prompt_length, "prompt_length", 1)
    steps = check_int(steps, "steps", 0)
    capacity = check_int(max_seq_length, "max_seq_length", 1)
    if P + steps > capacity:
        raise ValueError(f"prompt_length + steps must be <= max_seq_length, got {P} + {steps} > {capacity}")
    _at_most(capacity, "max_seq_length", _MAX_CELLS)
    _at_most(steps + 1, "steps + 1 (the calls drawn)", _MAX_ROWS)
    states = _cache_states(P, steps, capacity)                           # (calls, capacity)
    colours = [_EMPTY, _COLOURS[0], _COLOURS[1]]

    height = 0.4 * (steps + 1)                                           # inches for the rows
    figure, axes = plt.subplots(figsize=(10, height + 1.6))
    figure.subplots_adjust(left=0.17, right=0.83, top=1 - 0.9 / (height + 1.6), bottom=0.7 / (height + 1.6))
    axes.imshow(states, cmap=ListedColormap(colours), vmin=-0.5, vmax=2.5, aspect="auto")
    axes.set_xticks(np.arange(capacity + 1) - 0.5, minor=True)
    axes.set_yticks(np.arange(steps + 2) - 0.5, minor=True)
    axes.grid(which="minor", color="#BBBBBB", linewidth=0.8)
    axes.tick_params(which="minor", length=0)
    axes.set_xticks(range(0, capacity, max(1, capacity // 32)))
    axes.tick_params(axis="x", labelsize=7)
    labels = [f"prefill: queries 0..{P - 1}"] + [f"step {s}: query {P + s - 1}" for s in range(1, steps + 1)]
    axes.set_yticks(range(steps + 1), labels, fontsize=8)
    axes.set_xlabel("position in the cache", fontsize=9)
    for call, position in zip(*np.nonzero(states == _CACHE_WRITTEN)):
        axes.text(position, call, "q", ha="center", va="center", fontsize=8, color="white")
    for call in range(steps + 1):
        sees = "query i sees keys 0..i" if call == 0 else f"sees keys 0..{P + call - 1}"
        axes.text(capacity - 0.3, call, sees, ha="left", va="center", fontsize=8)
    legend = [Patch(facecolor=colour, edgecolor="#BBBBBB", label=label) for colour, label in
              zip(colours, ["empty", "cached by an earlier call", "written by this call (its keys and values); q marks its queries"])]
    axes.legend(handles=legend, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    figure.suptitle(f"KV cache of {capacity} positions: a {P}-token prefill, then {steps} one-token steps",
                    fontsize=10)
    return _finish(figure)


# %% [markdown]
# ## The blocked loop, tile by tile
#
# `draw_blocked_loop` shows the (T, S) scores as tiles of `block_size` × `block_size`: computed in
# full, computed with some entries masked (on the diagonal), or skipped because a causal mask hides
# them entirely.

# %%
#| export
_TILE_SKIPPED, _TILE_PARTIAL, _TILE_FULL = 0, 1, 2


def _tile_kinds(seq_len: int, key_len: int, block_size: int, causal: bool) -> np.ndarray:
    """(query blocks, key blocks): each tile skipped, computed with masked entries, or computed in full.

    Causal: query i sees keys j <= i + (key_len - seq_len).
    """
    offset = key_len - seq_len
    q_starts, k_starts = np.arange(0, seq_len, block_size), np.arange(0, key_len, block_size)
    kinds = np.full((len(q_starts), len(k_starts)), _TILE_FULL)
    if causal:
        last_query = np.minimum(q_starts + block_size, seq_len) - 1
        last_key = np.minimum(k_starts + block_size, key_len) - 1
        first_hidden = k_starts[None, :] > last_query[:, None] + offset   # even the last query sees none
        all_seen = last_key[None, :] <= q_starts[:, None] + offset        # even the first query sees all
        kinds[~all_seen] = _TILE_PARTIAL
        kinds[first_hidden] = _TILE_SKIPPED
    return kinds


def draw_blocked_loop(seq_len, key_len, block_size, causal=True):
    """The (T, S) scores as tiles: computed in full, computed with masked entries, or skipped.

    Args:
        seq_len: T queries; key_len: S keys; block_size: the tile side; causal: whether query i
        sees only keys j <= i + (S - T).
    Returns:
        The matplotlib Figure; its title counts the tiles computed and skipped.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    T = check_int(seq_len, "seq_len", 1)
    S = check_int(key_len, "key_len", 1)
    block = check_int(block_size, "block_size", 1)
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be True or False, got {type(causal).__name__} {causal!r}")
    _at_most(T, "seq_len", _MAX_CELLS)
    _at_most(S, "key_len", _MAX_CELLS)
    kinds = _tile_kinds(T, S, block, bool(causal))                       # (T blocks, S blocks)
    tiles = np.repeat(np.repeat(kinds, block, axis=0), block, axis=1)[:T, :S]
    visible = np.tri(T, S, k=S - T, dtype=bool) if causal else np.ones((T, S), dtype=bool)
    # 0 never computed, 1 computed then masked, 2 computed and used
    entries = np.where(tiles == _TILE_SKIPPED, 0, np.where(visible, 2, 1))
    colours = [_EMPTY, "#C9D3E6", _COLOURS[0]]

    figure, axes = plt.subplots(figsize=(10, 4.2))
    figure.subplots_adjust(top=0.8, bottom=0.12)
    axes.imshow(entries, cmap=ListedColormap(colours), vmin=-0.5, vmax=2.5)
    for edge in np.arange(0, T + 1, block).tolist() + [T]:
        axes.axhline(edge - 0.5, color="black", linewidth=1)
    for edge in np.arange(0, S + 1, block).tolist() + [S]:
        axes.axvline(edge - 0.5, color="black", linewidth=1)
    axes.set_xticks(range(0, S, block))
    axes.set_yticks(range(0, T, block))
    axes.tick_params(labelsize=8)
    axes.set_xlabel(f"key j (S = {S})", fontsize=9)
    axes.set_ylabel(f"query i (T = {T})", fontsize=9)
    computed, skipped = int((kinds != _TILE_SKIPPED).sum()), int((kinds == _TILE_SKIPPED).sum())
    partial = int((kinds == _TILE_PARTIAL).sum())
    figure.suptitle(f"{'causal' if causal else 'unmasked'} blocked attention, T = {T}, S = {S}, block {block}: "
                    f"{computed} of {kinds.size} tiles computed ({partial} with masked entries), {skipped} skipped",
                    fontsize=10)
    legend = [Patch(facecolor=colour, edgecolor="black", label=label) for colour, label in
              zip(colours, ["skipped: never computed", "computed, then masked", "computed and used"])]
    axes.legend(handles=legend, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    return _finish(figure)


# %% [markdown]
# ## Measured time and memory against sequence length
#
# `plot_scaling` draws the rows `AttentionProfiler.measure_attention_scaling` returns, per kernel, on
# log-log axes, with the exponents fitted by the student's `fit_exponent` in the legend.

# %%
#| export
def plot_scaling(results, fits, call: str = "forward"):
    """Time and peak memory against sequence length, log-log, one line per kernel.

    Args:
        results: kernel name -> list of dicts with seq_len, time_ms, peak_memory_mb and,
            optionally, time_spread_ms (drawn as ± error bars).
        fits: kernel name -> dict with time_exponent and memory_exponent, as
            `AttentionProfiler.analyze_quadratic_scaling` returns them.
        call: what one timed call is, for the time axis ("forward", "call").
    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    if not isinstance(results, dict) or not results:
        raise TypeError(f"results must be a non-empty dict of kernel name -> rows, got {results!r:.60}")
    if not isinstance(fits, dict) or set(fits) != set(results):
        raise ValueError(f"fits must hold one fit per kernel of results, {sorted(results)}, got {fits!r:.80}")
    figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(10, 3.8))
    measured_lengths = set()
    for index, (name, rows) in enumerate(results.items()):
        needed = ("seq_len", "time_ms", "peak_memory_mb")
        if not rows or any(not isinstance(row, dict) or any(k not in row for k in needed) for row in rows):
            raise ValueError(f"results[{name!r}] must be a list of dicts with keys {needed}, got {rows!r:.80}")
        lengths = np.array([row["seq_len"] for row in rows], dtype=float)
        times = np.array([row["time_ms"] for row in rows], dtype=float)
        memory = np.array([row["peak_memory_mb"] for row in rows], dtype=float)
        if (lengths <= 0).any() or (times <= 0).any() or (memory <= 0).any():
            raise ValueError(f"results[{name!r}] must have positive seq_len, time_ms and peak_memory_mb "
                             f"for log axes")
        spread = [row["time_spread_ms"] for row in rows] if all("time_spread_ms" in row for row in rows) else None
        colour = _COLOURS[index % len(_COLOURS)]
        time_axes.errorbar(lengths, times, yerr=spread, fmt="o-", color=colour, capsize=3,
                           label=f"{name}: slope {fits[name]['time_exponent']:.2f}")
        memory_axes.plot(lengths, memory, "o-", color=colour, label=f"{name}: slope {fits[name]['memory_exponent']:.2f}")
        measured_lengths.update(int(n) for n in lengths)
    ticks = sorted(measured_lengths)
    for axes, what in ((time_axes, f"time per {call} (ms)"), (memory_axes, "peak memory (MiB)")):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xticks(ticks, [str(n) for n in ticks])
        axes.minorticks_off()
        axes.set_xlabel("sequence length T")
        axes.set_ylabel(what)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle("Measured attention cost (fitted slope = exponent of T)", fontsize=11)
    figure.tight_layout()
    return _finish(figure)


# %% [markdown]
# ## Generating with and without the cache
#
# `plot_generation` draws the time of each generated token, with the cache and recomputing
# everything, from the dict `AttentionProfiler.compare_generation` returns.

# %%
#| export
SPIKE_FACTOR = 3     # a step this many times slower than its neighbours was the machine doing something else
SPIKE_WINDOW = 9     # the neighbours: this many steps centred on it; the per-token trend barely moves over them


def generation_spikes(times) -> np.ndarray:
    """Boolean mask of the steps slower than SPIKE_FACTOR x the median of the SPIKE_WINDOW steps around them."""
    times = np.asarray(times, dtype=float)
    half = SPIKE_WINDOW // 2
    local = np.array([np.median(times[max(0, i - half):i + half + 1]) for i in range(len(times))])
    return times > SPIKE_FACTOR * local


def plot_generation(generation):
    """Time per generated token against tokens in the sequence, cached and recomputed.

    Args:
        generation: dict with prompt_length, new_tokens, cached_token_ms, recompute_token_ms, speedup.
    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    needed = ("prompt_length", "new_tokens", "cached_token_ms", "recompute_token_ms", "speedup")
    if not isinstance(generation, dict):
        raise TypeError(f"generation must be a dict with keys {needed}, got {type(generation).__name__}")
    missing = [key for key in needed if key not in generation]
    if missing:
        raise ValueError(f"generation is missing keys {missing}; expected {needed}")
    P, N = generation["prompt_length"], generation["new_tokens"]
    for key in ("cached_token_ms", "recompute_token_ms"):
        if len(generation[key]) != N:
            raise ValueError(f"generation[{key!r}] must hold one time per new token ({N}), "
                             f"got {len(generation[key])}")
    tokens = np.arange(P + 1, P + N + 1)

    figure, axes = plt.subplots(figsize=(10, 3.5))
    medians = {}
    for key, label, colour in (("recompute_token_ms", "recompute everything", _COLOURS[1]),
                               ("cached_token_ms", "KV cache", _COLOURS[0])):
        times = np.asarray(generation[key], dtype=float)
        medians[key] = np.median(times)
        axes.plot(tokens, times, color=colour, label=f"{label} (median {medians[key]:.3g} ms)")
        spikes = generation_spikes(times)
        axes.plot(tokens[spikes], times[spikes], "x", color=colour, markersize=7,
                  label=f"{label}: {spikes.sum()} spike(s), steps over {SPIKE_FACTOR:g}x the median of their "
                        f"{SPIKE_WINDOW} neighbours")
    axes.set_xlabel("tokens in the sequence")
    axes.set_ylabel("time for the next token (ms)")
    axes.set_ylim(bottom=0)
    axes.set_title(f"Generation, measured: the cache's median step is "
                   f"{medians['recompute_token_ms'] / medians['cached_token_ms']:.1f}x faster (spikes left out); "
                   f"in total, spikes included, {generation['speedup']:.1f}x", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return _finish(figure)


# %% [markdown]
# ## What each head looks at
#
# `plot_head_weights` draws one heat map of attention weights per head, with the tokens on both axes.

# %%
#| export
def plot_head_weights(weights, tokens, title=""):
    """One heat map per head: row i is query token i, column j key token j.

    Args:
        weights: (H, T, T) attention weights; tokens: T strings; title: drawn above the maps.
    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    weights = _matrix(weights, "weights", ndim=3)
    H, T, S = weights.shape
    if T != S:
        raise ValueError(f"weights must have shape (H, T, T), got {weights.shape}")
    tokens = [str(token) for token in tokens]
    if len(tokens) != T:
        raise ValueError(f"tokens must name the {T} positions of weights {weights.shape}, got {len(tokens)}")
    columns = min(H, 4)
    rows = -(-H // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(10, 0.4 + 2.9 * rows), squeeze=False)
    vmax = float(weights.max()) or 1.0
    for h, axes in enumerate(grid.flat):
        if h >= H:
            axes.remove()
            continue
        image = axes.imshow(weights[h], cmap=_WEIGHTS_CMAP, vmin=0, vmax=vmax)
        axes.set_title(f"head {h}", fontsize=9)
        axes.set_xticks(range(T), tokens, rotation=90, fontsize=7)
        axes.set_yticks(range(T), tokens, fontsize=7)
        axes.set_xlabel("key", fontsize=8)
        if h % columns == 0:
            axes.set_ylabel("query", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.colorbar(image, ax=grid.ravel().tolist(), shrink=0.8, label="attention weight")
    return _finish(figure)


# %% [markdown]
# ## A paged KV cache: block tables and the pool
#
# `draw_block_tables` draws a `PagedKVCache` as the two things it holds: each sequence's block
# table (logical block i of the sequence → a block id of the pool), and the pool itself, block by
# block, with each slot filled or empty, each block's reference count, and which blocks are free.

# %%
#| export
_MAX_BLOCKS = 32     # a pool drawn block by block is unreadable beyond this many blocks


def _block_fill(block_tables, lengths, block_size: int) -> dict:
    """block id -> (tokens filled, the sequences that hold it), from the block tables."""
    fill = {}
    for sequence_id, table in block_tables.items():
        for index, block in enumerate(table):
            tokens = max(0, min(block_size, int(lengths[sequence_id]) - index * block_size))
            filled, holders = fill.get(block, (0, []))
            fill[block] = (max(filled, tokens), holders + [sequence_id])
    return fill


def draw_block_tables(cache, title=""):
    """A paged cache's block tables (left) and its pool of blocks (right).

    Args:
        cache: a PagedKVCache (anything with block_tables, lengths, ref_counts, free_blocks,
            num_blocks and block_size); title: drawn above the picture.
    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    for name in ("block_tables", "lengths", "ref_counts", "free_blocks", "num_blocks", "block_size"):
        if not hasattr(cache, name):
            raise TypeError(f"cache must be a PagedKVCache (with {name}), got {type(cache).__name__}")
    num_blocks, block_size = check_int(cache.num_blocks, "num_blocks", 1), check_int(cache.block_size, "block_size", 1)
    _at_most(num_blocks, "num_blocks", _MAX_BLOCKS)
    _at_most(block_size, "block_size", _MAX_PRINTED)
    sequences = sorted(cache.block_tables)
    _at_most(len(sequences), "the number of sequences", len(_COLOURS))
    colour_of = {sequence_id: _COLOURS[index] for index, sequence_id in enumerate(sequences)}
    fill = _block_fill(cache.block_tables, cache.lengths, block_size)
    widest = max([len(table) for table in cache.block_tables.values()] + [1])

    figure, (tables_axes, pool_axes) = plt.subplots(
        1, 2, figsize=(10, 0.75 + 0.32 * max(num_blocks, len(sequences) + 1)),
        gridspec_kw={"width_ratios": [max(widest, 3) + 3, block_size + 6]})
    for axes in (tables_axes, pool_axes):
        axes.set_axis_off()
        axes.invert_yaxis()

    # Left: one row per sequence, one cell per logical block holding its block id.
    for row, sequence_id in enumerate(sequences):
        table, length = cache.block_tables[sequence_id], int(cache.lengths[sequence_id])
        tables_axes.text(-0.2, row + 0.5, f"seq {sequence_id}\n{length} tokens", ha="right", va="center", fontsize=8)
        for index, block in enumerate(table):
            shared = int(cache.ref_counts[block]) > 1                    # coloured as in the pool: its first holder
            tables_axes.add_patch(Rectangle((index, row + 0.1), 0.9, 0.8, facecolor=colour_of[fill[block][1][0]],
                                            alpha=0.45 if shared else 0.9, edgecolor="black",
                                            hatch="//" if shared else None))
            tables_axes.text(index + 0.45, row + 0.5, str(block), ha="center", va="center", fontsize=9)
    tables_axes.set_xlim(-3, max(widest, 3) + 0.2)
    tables_axes.set_ylim(max(num_blocks, len(sequences)) + 0.2, -0.8)
    tables_axes.text(-3, -0.4, "block tables: logical block i -> block id", fontsize=9, va="center")

    # Right: one row per block of the pool, one cell per slot.
    free = set(int(block) for block in cache.free_blocks)
    for block in range(num_blocks):
        filled, holders = fill.get(block, (0, []))
        refs = int(cache.ref_counts[block])
        shared = refs > 1
        colour = colour_of[holders[0]] if holders else _EMPTY
        for slot in range(block_size):
            used = slot < filled
            pool_axes.add_patch(Rectangle((slot, block + 0.1), 0.9, 0.8, edgecolor="#888888",
                                          facecolor=colour if used else _EMPTY, alpha=0.45 if shared else 0.9,
                                          hatch="//" if shared and used else None))
        pool_axes.text(-0.3, block + 0.5, f"block {block}", ha="right", va="center", fontsize=8)
        note = "free" if block in free else f"refs {refs}"
        if holders:
            note += ": seq " + ", ".join(str(sequence_id) for sequence_id in holders)
        pool_axes.text(block_size + 0.2, block + 0.5, note, ha="left", va="center", fontsize=8)
    pool_axes.set_xlim(-2.5, block_size + 6)
    pool_axes.set_ylim(max(num_blocks, len(sequences)) + 0.2, -0.8)
    pool_axes.text(-2.5, -0.4, f"pool: {num_blocks} blocks of {block_size} slots, {len(free)} free",
                   fontsize=9, va="center")
    legend = [Patch(facecolor=_COLOURS[0], edgecolor="black", label="a filled slot (colour: its sequence)"),
              Patch(facecolor=_EMPTY, edgecolor="#888888", label="an empty slot"),
              Patch(facecolor=_COLOURS[0], alpha=0.45, hatch="//", edgecolor="black",
                    label="a shared block (reference count > 1)")]
    figure.legend(handles=legend, loc="lower center", ncol=3, fontsize=8, frameon=False)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.subplots_adjust(left=0.02, right=0.98, top=0.9 if title else 0.97, bottom=0.12)
    return _finish(figure)


# %% [markdown]
# ## Serving memory over time
#
# `plot_serving_memory` draws, for each way of managing the cache, the memory the running requests
# hold and the part of it that holds real token states, step by step, under one budget.

# %%
#| export
def plot_serving_memory(histories, budget_tokens):
    """Memory held by running requests and real tokens in it, per step, one panel per scheme.

    Args:
        histories: scheme name -> dict with `tokens`, `allocated` and `running` (one number per step);
        budget_tokens: the cache budget, drawn as a line.
    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    budget = check_int(budget_tokens, "budget_tokens", 1)
    if not isinstance(histories, dict) or not histories:
        raise TypeError(f"histories must be a non-empty dict of scheme name -> history, got {histories!r:.60}")
    figure, grid = plt.subplots(len(histories), 1, figsize=(10, 0.6 + 2.4 * len(histories)), sharex=True,
                                squeeze=False)
    for axes, (name, history) in zip(grid[:, 0], histories.items()):
        missing = [key for key in ("tokens", "allocated", "running") if key not in history]
        if missing:
            raise ValueError(f"histories[{name!r}] is missing {missing}")
        tokens, held = (np.asarray(history[key], dtype=float) for key in ("tokens", "allocated"))
        running = np.asarray(history["running"], dtype=float)
        if not tokens.shape == held.shape == running.shape or tokens.ndim != 1 or tokens.size == 0:
            raise ValueError(f"histories[{name!r}]: tokens, allocated and running must be one number per step, "
                             f"got shapes {tokens.shape}, {held.shape} and {running.shape}")
        steps = np.arange(tokens.size)
        axes.fill_between(steps, 0, held, color=_COLOURS[1], alpha=0.35, step="post", label="held by requests")
        axes.fill_between(steps, 0, tokens, color=_COLOURS[0], alpha=0.9, step="post", label="real token states")
        axes.axhline(budget, color="black", linewidth=1, linestyle="--", label="budget")
        share = tokens.sum() / held.sum() if held.sum() else 0.0
        axes.set_title(f"{name}: {share:.0%} of the held memory holds real tokens; at most {int(running.max())} "
                       f"requests at once; all served in {tokens.size} steps", fontsize=9)
        axes.set_ylabel("cache slots (tokens)", fontsize=8)
        axes.set_ylim(0, budget * 1.08)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7, loc="upper right")
    grid[-1, 0].set_xlabel("step (one token per running request)")
    figure.tight_layout()
    return _finish(figure)


# %% [markdown]
# ## Training attention
#
# `plot_training` draws the loss of each training run against the step, and the trained model's
# attention weights on one example, from what `train_reversal` returns.

# %%
#| export
def plot_training(runs, title=""):
    """Loss curves of training runs (log scale) and the first run's attention weights on its example.

    Args:
        runs: run name -> dict with losses (one per step), example_tokens (T,) and example_weights (T, T).
        title: a title above both panels.
    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    needed = ("losses", "example_tokens", "example_weights")
    if not isinstance(runs, dict) or not runs:
        raise TypeError(f"runs must be a non-empty dict of run name -> results, got {type(runs).__name__}")
    for name, run in runs.items():
        if not isinstance(run, dict) or any(key not in run for key in needed):
            raise ValueError(f"runs[{name!r}] must be a dict with keys {needed}")
    first = next(iter(runs.values()))
    tokens = np.asarray(first["example_tokens"])
    weights = _matrix(first["example_weights"], "example_weights")
    if weights.shape != (tokens.size, tokens.size):
        raise ValueError(f"example_weights must be ({tokens.size}, {tokens.size}) for {tokens.size} tokens, "
                         f"got {weights.shape}")
    _at_most(tokens.size, "the example's length", _MAX_ROWS)
    figure, (loss_axes, weight_axes) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    for index, (name, run) in enumerate(runs.items()):
        losses = np.asarray(run["losses"], dtype=float)
        loss_axes.plot(np.arange(1, losses.size + 1), losses, color=_COLOURS[index % len(_COLOURS)],
                       linestyle="-" if index == 0 else "--", label=f"{name}: {losses[0]:.2f} -> {losses[-1]:.3g}")
    loss_axes.set_yscale("log")
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("cross-entropy loss")
    loss_axes.grid(True, alpha=0.3)
    loss_axes.legend(fontsize=8)
    labels = [f"{position}:{token}" for position, token in enumerate(tokens)]
    weight_axes.imshow(weights, cmap=_WEIGHTS_CMAP, vmin=0.0, vmax=1.0)
    weight_axes.set_xticks(range(tokens.size), labels, fontsize=8)
    weight_axes.set_yticks(range(tokens.size), labels, fontsize=8)
    weight_axes.set_xlabel("key (position:token)")
    weight_axes.set_ylabel("query (position:token)")
    weight_axes.set_title("trained attention weights", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    return _finish(figure)
