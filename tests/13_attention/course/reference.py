"""The one float64 reference the grading tests compare against, written independently of the module.

Everything is a plain loop or a column slice: one query row at a time, one head at a time, one
batch row at a time. Nothing here calls `tinytorch`, and nothing reuses the module's reshapes,
so a bug in the student's code cannot also be in the expected values. `test_reference.py`
checks these functions against numbers worked out by hand.

Tests reach it through the `ref` fixture, or `import attention_reference`: `conftest.py` loads
this file by path and registers it under that name (pytest imports test files with
`--import-mode=importlib`, so a sibling module is not importable by its file name).
"""
import math

import numpy as np


def as_float64(x):
    """A Tensor (anything with `.data`), array or nested list as a float64 array."""
    return np.asarray(getattr(x, "data", x), dtype=np.float64)


def softmax_row(scores, keep=None):
    """Softmax of one row of scores over the kept entries; -inf counts as masked; all masked gives zeros."""
    scores = np.asarray(scores, dtype=np.float64)
    allowed = [j for j in range(len(scores))
               if (keep is None or keep[j]) and scores[j] != -math.inf]
    weights = np.zeros(len(scores))
    if not allowed:
        return weights
    top = max(scores[j] for j in allowed)
    exps = {j: math.exp(scores[j] - top) for j in allowed}
    total = sum(exps.values())
    for j in allowed:
        weights[j] = exps[j] / total
    return weights


def masked_softmax(scores, keep=None):
    """`softmax_row` applied to every row (last axis) of `scores`; `keep` broadcasts to it."""
    scores = as_float64(scores)
    keep = np.ones(scores.shape, bool) if keep is None else np.broadcast_to(as_float64(keep) != 0, scores.shape)
    weights = np.zeros(scores.shape)
    for index in np.ndindex(*scores.shape[:-1]):
        weights[index] = softmax_row(scores[index], keep[index])
    return weights


def attention(q, k, v, keep=None, scale=None):
    """softmax(scale * q . k) v, one query at a time. Leading axes broadcast; returns (output, weights)."""
    q, k, v = as_float64(q), as_float64(k), as_float64(v)
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    T, S, d_v = q.shape[-2], k.shape[-2], v.shape[-1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    keep = np.ones((T, S), bool) if keep is None else as_float64(keep) != 0
    keep = np.broadcast_to(keep, lead + (T, S))
    q, k, v = (np.broadcast_to(a, lead + a.shape[-2:]) for a in (q, k, v))
    output, weights = np.zeros(lead + (T, d_v)), np.zeros(lead + (T, S))
    for index in np.ndindex(*lead):
        for i in range(T):
            scores = np.array([scale * float(np.dot(q[index][i], k[index][j])) for j in range(S)])
            row = softmax_row(scores, keep[index][i])
            weights[index][i] = row
            for j in range(S):
                output[index][i] += row[j] * v[index][j]
    return output, weights


def attention_formula(q, k, v, keep=None, scale=None):
    """`attention` written as array formulas, for shapes too large for the loop; tested equal to it."""
    q, k, v = as_float64(q), as_float64(k), as_float64(v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.einsum("...td,...sd->...ts", q, k) * scale
    keep = np.ones(scores.shape, bool) if keep is None else np.broadcast_to(as_float64(keep) != 0, scores.shape)
    top = np.max(np.where(keep, scores, -np.inf), axis=-1, keepdims=True, initial=-np.inf)
    exps = np.where(keep, np.exp(np.where(keep, scores, 0.0) - np.where(np.isfinite(top), top, 0.0)), 0.0)
    totals = exps.sum(axis=-1, keepdims=True)
    weights = exps / np.where(totals > 0, totals, 1.0)
    return weights @ v, weights


def causal_mask(seq_len, key_len=None):
    """(T, S) 0/1: query i sits at position i + (S - T) and sees keys at or before it."""
    key_len = seq_len if key_len is None else key_len
    offset = key_len - seq_len
    return np.array([[1.0 if j <= i + offset else 0.0 for j in range(key_len)] for i in range(seq_len)])


def padding_mask(lengths, key_len):
    """(B, 1, 1, S) 0/1: row b sees its first lengths[b] keys."""
    mask = np.zeros((len(lengths), 1, 1, key_len))
    for b, length in enumerate(lengths):
        for j in range(key_len):
            mask[b, 0, 0, j] = 1.0 if j < length else 0.0
    return mask


def split_heads(x, num_heads):
    """(B, T, E) -> (B, H, T, hd): head h is the column slice h*hd:(h+1)*hd."""
    x = as_float64(x)
    width = x.shape[2] // num_heads
    out = np.zeros((x.shape[0], num_heads, x.shape[1], width))
    for h in range(num_heads):
        out[:, h] = x[:, :, h * width:(h + 1) * width]
    return out


def merge_heads(x):
    """(B, H, T, hd) -> (B, T, H*hd): the heads side by side as column slices."""
    x = as_float64(x)
    width = x.shape[3]
    out = np.zeros((x.shape[0], x.shape[2], x.shape[1] * width))
    for h in range(x.shape[1]):
        out[:, :, h * width:(h + 1) * width] = x[:, h]
    return out


def repeat_kv_heads(x, num_heads):
    """(B, Hkv, S, hd) -> (B, H, S, hd): query head h reads kv head h // (H // Hkv)."""
    x = as_float64(x)
    group = num_heads // x.shape[1]
    return np.stack([x[:, h // group] for h in range(num_heads)], axis=1)


def init_weights(seed, embed_dim, num_heads, num_kv_heads=None):
    """The weights the layer's contract names: from default_rng(seed), in order w_q, w_k, w_v, w_o,
    standard normal float32 times float32(1/sqrt(E)); keys and values have Hkv*hd columns."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    kv_dim = num_kv_heads * (embed_dim // num_heads)
    rng = np.random.default_rng(seed)
    spread = np.float32(1 / math.sqrt(embed_dim))
    shapes = [(embed_dim, embed_dim), (embed_dim, kv_dim), (embed_dim, kv_dim), (embed_dim, embed_dim)]
    return [rng.standard_normal(shape, dtype=np.float32) * spread for shape in shapes]


def multihead(weights, num_heads, num_kv_heads, x_q, x_k=None, x_v=None, keep=None):
    """Multi-head attention batch row by batch row and head by head, on column slices.

    `weights` is [w_q, w_k, w_v, w_o]; `keep` broadcasts to (B, H, T, S).
    Returns (output (B, T, E), weights (B, H, T, S)).
    """
    x_q = as_float64(x_q)
    x_k = x_q if x_k is None else as_float64(x_k)
    x_v = x_k if x_v is None else as_float64(x_v)
    w_q, w_k, w_v, w_o = (as_float64(w) for w in weights)
    (B, T, E), S = x_q.shape, x_k.shape[1]
    hd = E // num_heads
    group = num_heads // num_kv_heads
    keep = np.ones((B, num_heads, T, S), bool) if keep is None else np.broadcast_to(
        as_float64(keep) != 0, (B, num_heads, T, S))
    output, all_weights = np.zeros((B, T, E)), np.zeros((B, num_heads, T, S))
    for row in range(B):
        q_all, k_all, v_all = x_q[row] @ w_q, x_k[row] @ w_k, x_v[row] @ w_v
        context = np.zeros((T, E))
        for h in range(num_heads):
            g = h // group
            q, k, v = (q_all[:, h * hd:(h + 1) * hd], k_all[:, g * hd:(g + 1) * hd], v_all[:, g * hd:(g + 1) * hd])
            context[:, h * hd:(h + 1) * hd], all_weights[row, h] = attention(q, k, v, keep[row, h])
        output[row] = context @ w_o
    return output, all_weights


def layer_weights(layer):
    """[w_q, w_k, w_v, w_o] of a MultiHeadAttention, as float64 arrays."""
    return [as_float64(w) for w in (layer.w_q, layer.w_k, layer.w_v, layer.w_o)]


def cached_keys_values(weights, num_heads, num_kv_heads, x):
    """What a cache row holds after the sequence x (T, E): (Hkv, T, hd) keys and values."""
    x = as_float64(x)
    E = x.shape[1]
    hd = E // num_heads
    keys, values = x @ as_float64(weights[1]), x @ as_float64(weights[2])
    return (np.stack([keys[:, g * hd:(g + 1) * hd] for g in range(num_kv_heads)]),
            np.stack([values[:, g * hd:(g + 1) * hd] for g in range(num_kv_heads)]))


def cached_visible(lengths_after, new_len, longest):
    """(B, 1, T, L) bool: query i of row b sits at lengths_after[b] - T + i and sees keys at or before it."""
    visible = np.zeros((len(lengths_after), 1, new_len, longest), bool)
    for b, length in enumerate(lengths_after):
        for i in range(new_len):
            position = length - new_len + i
            for j in range(longest):
                visible[b, 0, i, j] = j <= position
    return visible


def serving(requests, budget_tokens, max_seq_length, block_size=None):
    """Part 10's serving rules, one step at a time. Returns (tokens, allocated, running, finish_step,
    preemptions): three lists with one number per step, one finish step per request, and a count."""
    def held(length):                                     # slots a request of `length` tokens holds
        return max_seq_length if block_size is None else -(-int(length) // block_size) * block_size

    arrival, prompt, output = (list(map(int, column)) for column in np.asarray(requests).T) if len(requests) \
        else ([], [], [])
    queue = list(range(len(arrival)))                     # waiting, in the order they will be admitted
    active, size = [], {}                                 # running, oldest first; tokens each holds
    generated, finish = [0] * len(arrival), [-1] * len(arrival)
    tokens, allocated, running, preemptions, step = [], [], [], 0, 0
    while queue or active:
        for r in list(active):                            # rule 1: each running request, oldest first
            if r not in active:                           # preempted earlier in this step
                continue
            while sum(held(size[x]) for x in active) - held(size[r]) + held(size[r] + 1) > budget_tokens:
                victim = active.pop()                     # the newest gives back its slots
                del size[victim]
                queue.insert(0, victim)
                preemptions += 1
                if victim == r:
                    break
            if r in active:
                size[r] += 1
                generated[r] += 1
        while queue and arrival[queue[0]] <= step:        # rule 2: admit in order, while it fits
            r = queue[0]
            if sum(held(size[x]) for x in active) + held(prompt[r] + generated[r] + 1) > budget_tokens:
                break
            queue.pop(0)
            active.append(r)
            size[r] = prompt[r] + generated[r] + 1
            generated[r] += 1
        tokens.append(sum(size.values()))                 # rule 3: record the step
        allocated.append(sum(held(size[x]) for x in active))
        running.append(len(active))
        for r in [r for r in active if generated[r] == output[r]]:   # rule 4: finish
            active.remove(r)
            del size[r]
            finish[r] = step
        step += 1
    return (np.array(tokens, dtype=np.int64), np.array(allocated, dtype=np.int64),
            np.array(running, dtype=np.int64), np.array(finish, dtype=np.int64), np.array(preemptions))


# ---------------------------------------------------------------- training: gradients (Part 11)
def sum_to_shape(gradient, shape):
    """A gradient of a broadcast input, summed back to the input's shape, one axis at a time."""
    gradient = np.asarray(gradient, dtype=np.float64)
    while gradient.ndim > len(shape):
        gradient = gradient.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and gradient.shape[axis] != 1:
            gradient = gradient.sum(axis=axis, keepdims=True)
    return gradient


def attention_gradients(q, k, v, d_output, keep=None, scale=None):
    """(dq, dk, dv) of sum(d_output * attention(q, k, v, keep, scale)[0]), entry by entry, in float64.

    Per query row i with weights p: dv_j += p_j dO_i; dp_j = dO_i . v_j; ds_j = p_j (dp_j - sum_l p_l dp_l);
    dq_i += scale ds_j k_j; dk_j += scale ds_j q_i. Each gradient comes back in its input's shape.
    """
    q, k, v, d_output = as_float64(q), as_float64(k), as_float64(v), as_float64(d_output)
    shapes = (q.shape, k.shape, v.shape)
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    T, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    keep = np.broadcast_to(np.ones((T, S), bool) if keep is None else as_float64(keep) != 0, lead + (T, S))
    q, k, v = (np.broadcast_to(a, lead + a.shape[-2:]) for a in (q, k, v))
    d_output = np.broadcast_to(d_output, lead + (T, v.shape[-1]))
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for index in np.ndindex(*lead):
        for i in range(T):
            p = softmax_row([scale * float(np.dot(q[index][i], k[index][j])) for j in range(S)], keep[index][i])
            dp = [float(np.dot(d_output[index][i], v[index][j])) for j in range(S)]
            mean = sum(p[j] * dp[j] for j in range(S))
            for j in range(S):
                dv[index][j] += p[j] * d_output[index][i]
                ds = p[j] * (dp[j] - mean)
                dq[index][i] += scale * ds * k[index][j]
                dk[index][j] += scale * ds * q[index][i]
    return tuple(sum_to_shape(g, shape) for g, shape in zip((dq, dk, dv), shapes))


def finite_difference_gradients(q, k, v, d_output, keep=None, scale=None, step=1e-6):
    """(dq, dk, dv) by central differences of sum(d_output * attention_formula(...)[0]), in float64."""
    arrays = [np.array(as_float64(a)) for a in (q, k, v)]
    d_output = as_float64(d_output)

    def loss():
        return float(np.sum(d_output * attention_formula(*arrays, keep, scale)[0]))

    gradients = []
    for array in arrays:
        gradient = np.zeros(array.shape)
        for index in np.ndindex(*array.shape):
            kept = array[index]
            array[index] = kept + step
            up = loss()
            array[index] = kept - step
            down = loss()
            array[index] = kept
            gradient[index] = (up - down) / (2 * step)
        gradients.append(gradient)
    return tuple(gradients)


def logsumexp(q, k, keep=None, scale=None):
    """(lead..., T): log of the sum of exp(score) over the keys each row may see; -inf for a row that sees none."""
    q, k = as_float64(q), as_float64(k)
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    T, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    keep = np.broadcast_to(np.ones((T, S), bool) if keep is None else as_float64(keep) != 0, lead + (T, S))
    q, k = (np.broadcast_to(a, lead + a.shape[-2:]) for a in (q, k))
    result = np.full(lead + (T,), -math.inf)
    for index in np.ndindex(*lead):
        for i in range(T):
            scores = [scale * float(np.dot(q[index][i], k[index][j])) for j in range(S) if keep[index][i][j]]
            if scores:
                top = max(scores)
                result[index][i] = top + math.log(sum(math.exp(s - top) for s in scores))
    return result


def repeat_kv_heads_gradient(d_x, num_kv_heads):
    """(B, H, S, hd) -> (B, Hkv, S, hd): kv head g receives the sum over the query heads h with h // G == g."""
    d_x = as_float64(d_x)
    group = d_x.shape[1] // num_kv_heads
    out = np.zeros((d_x.shape[0], num_kv_heads) + d_x.shape[2:])
    for h in range(d_x.shape[1]):
        out[:, h // group] += d_x[:, h]
    return out
