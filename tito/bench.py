"""`tito bench`: module 13's attention timed against PyTorch on the CPU, each in its own process.

The honest mode. Every round starts two fresh worker processes, one for our kernel (switched on
explicitly with `set_attention_backend("fast")`) and one for PyTorch, one after the other, and
alternates which goes first. Each runs at its library's defaults: nothing here sets thread
counts or OMP_WAIT_POLICY, so neither side's threads compete with the other's. A worker times
each workload (time.perf_counter, memory with tracemalloc) and reports the median of its runs;
a ratio is the median over the rounds of the per-round ratios, with the spread (lowest and
highest) beside it. Every label names the sizes that were run.

`tito bench --ablation` switches each technique of the tuned kernel on and off in turn, in one
process (ours only), in alternating blocks of runs, and reports the gain on the goal rows. `tito bench --profiler-check` keeps one
core busy with another process and checks that the lesson's AttentionProfiler still measures the
math path's scaling well.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Sizes:
    """Workload sizes: the full benchmark, or `--quick` ones that run in seconds."""

    batch: int = 4
    heads: int = 8
    seq: int = 512
    head_dim: int = 64
    embed: int = 512
    prompt: int = 128
    new_tokens: int = 384
    long_seq: int = 4096
    sweep: tuple = (128, 256, 512, 1024, 2048, 4096)
    repeats: int = 11        # timed runs per workload in a worker, after one warm-up
    rounds: int = 5          # alternating pairs of worker processes
    peak_size: int = 2048


QUICK = Sizes(batch=1, heads=2, seq=64, head_dim=16, embed=64, prompt=8, new_tokens=16, long_seq=256,
              sweep=(32, 64, 128), repeats=3, rounds=2, peak_size=256)
ROOFLINE_GOAL = 1.10      # SDPA and the layer: at most 10% over what NumPy itself needs here, perfectly parallel
ABLATION_PAIRS = 9        # alternating pairs of blocks of runs, with and without a technique
QUICK_ABLATION_PAIRS = 2  # with --quick: a smoke test
VERDICT_PAIRS = 5         # fewer pairs than this give gains but no verdict
ABLATION_REPEATS = 5      # timed runs per block
SETTLE_SECONDS = 0.15     # untimed runs at the start of a block: longer than OpenBLAS's threads spin (~0.1 s)
KEEP_THRESHOLD = 0.05     # a technique pays on a row if it gains at least 5% there, beyond the control's spread


@dataclass
class Row:
    workload: str
    ours_ms: float
    reference: str
    reference_ms: float | None
    ratio: float | None              # median over rounds of the per-round ours / reference
    flops: float
    target: str = ""
    met: bool | None = None
    spread: tuple | None = None      # the lowest and highest per-round ratio
    extra: dict = field(default_factory=dict)
    roofline_ms: float | None = None     # what NumPy itself needs for the same work here, perfectly parallel
    roofline_ratio: float | None = None  # median over rounds of ours / roofline, measured in the same worker


def timed_median(function, repeats: int) -> float:
    """Median seconds of `function()` over `repeats` timed runs, with no warm-up."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def median_time(function, repeats: int) -> float:
    """Median seconds of `function()` over `repeats` runs, after one warm-up run."""
    function()
    return timed_median(function, repeats)


def paired(first, second, repeats: int) -> tuple[float, float, list[float]]:
    """Median seconds of each of two functions run alternately in this process, and the per-run ratios."""
    first(), second()
    a_times, b_times, ratios = [], [], []
    for run in range(repeats):
        order = (0, 1) if run % 2 == 0 else (1, 0)
        times = [0.0, 0.0]
        for index in order:
            start = time.perf_counter()
            (first, second)[index]()
            times[index] = time.perf_counter() - start
        a_times.append(times[0])
        b_times.append(times[1])
        ratios.append(times[0] / times[1])
    return float(np.median(a_times)), float(np.median(b_times)), ratios


def peak_bytes(function) -> int:
    """Peak bytes allocated while `function()` runs, above those allocated when it starts."""
    from tinytorch.core.attention import AttentionProfiler

    return AttentionProfiler.peak_memory(function)


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def load_average() -> float | None:
    """The 1-minute load average (other processes' demand on the cores), where the system reports it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_model() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return model


# ----------------------------------------------------------------------------- workloads
def _qkv(s: Sizes, seq: int | None = None, batch: int | None = None, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (s.batch if batch is None else batch, s.heads, s.seq if seq is None else seq, s.head_dim)
    return tuple(rng.standard_normal(shape, dtype=np.float32) for _ in range(3))


def _mha_input(s: Sizes) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((s.batch, s.seq, s.embed), dtype=np.float32)


def _generation_input(s: Sizes) -> np.ndarray:
    return np.random.default_rng(2).standard_normal((1, s.prompt + s.new_tokens, s.embed), dtype=np.float32)


def _weights(s: Sizes) -> list[np.ndarray]:
    """w_q, w_k, w_v, w_o (E, E), as `MultiHeadAttention(E, H, seed=0)` draws them, for x @ w."""
    from tinytorch.core.attention import MultiHeadAttention

    return [w.data for w in MultiHeadAttention(s.embed, s.heads, seed=0).parameters]


def _mha_flops(s: Sizes, causal: bool) -> float:
    pairs = s.seq * (s.seq + 1) / 2 if causal else s.seq * s.seq
    return s.batch * (4 * 2 * s.seq * s.embed * s.embed + 2 * 2 * s.heads * pairs * (s.embed // s.heads))


def _generation_flops(s: Sizes) -> float:
    return float(sum(4 * 2 * s.embed * s.embed + 2 * 2 * s.embed * (t + 1) for t in range(s.prompt, s.prompt + s.new_tokens)))


def _our_workloads(s: Sizes) -> dict:
    """Our side's calls, through the layers as a user calls them: SDPA plain and causal, the layer plain
    and causal, cached generation. They run whatever backend (and techniques) the caller chose."""
    from tinytorch.core.attention import (KVCache, MultiHeadAttention, ScaledDotProductAttention,
                                          create_causal_mask)

    q, k, v = _qkv(s)
    sdpa, causal = ScaledDotProductAttention().eval(), create_causal_mask(s.seq)
    layer, x = MultiHeadAttention(s.embed, s.heads, seed=0).eval(), _mha_input(s)
    total, hd = s.prompt + s.new_tokens, s.embed // s.heads
    tokens = _generation_input(s)
    attend = {False: lambda: sdpa(q, k, v), True: lambda: sdpa(q, k, v, mask=causal)}
    layer_call = {False: lambda: layer(x), True: lambda: layer(x, mask=causal)}
    step = lambda chunk, cache: layer(chunk, kv_cache=cache)

    def cached():
        cache = KVCache(1, total, s.heads, hd)
        step(tokens[:, :s.prompt], cache)
        for t in range(s.prompt, total):
            step(tokens[:, t:t + 1], cache)

    return {"sdpa": attend[False], "sdpa_causal": attend[True], "mha": layer_call[False],
            "mha_causal": layer_call[True], "generation": cached}


def roofline(s: Sizes, repeats: int) -> dict:
    """What NumPy itself needs for the SDPA and multi-head workloads on this machine, perfectly parallel.

    The single-thread time (BLAS held at one thread) of the same batched products Q·Kᵀ and P·V, of
    `np.exp` over the same (scaled) scores, and, for the layer, of its four projections, divided by
    the number of cores. Medians of `repeats` calls each, in ms.
    """
    from tinytorch.core._attention_kernel import POOL, cores

    q, k, v = _qkv(s)
    q = q * np.float32(1.0 / np.sqrt(s.head_dim))
    keys_t = np.ascontiguousarray(np.swapaxes(k, -1, -2))                       # (B, H, hd, S)
    scores = np.matmul(q, keys_t)                                               # (B, H, T, S)
    weights = np.empty_like(scores)
    context = np.empty_like(q)
    x = _mha_input(s).reshape(s.batch * s.seq, s.embed)
    projected = np.empty_like(x)
    with POOL.blas_on_one_thread():
        parts = {"scores_ms": median_time(lambda: np.matmul(q, keys_t, out=scores), repeats),
                 "exp_ms": median_time(lambda: np.exp(scores, out=weights), repeats),
                 "values_ms": median_time(lambda: np.matmul(weights, v, out=context), repeats),
                 "projections_ms": sum(median_time(lambda w=w: np.matmul(x, w, out=projected), repeats)
                                       for w in _weights(s))}
    parts = {name: seconds * 1e3 for name, seconds in parts.items()}
    n = cores()
    attention_ms = parts["scores_ms"] + parts["exp_ms"] + parts["values_ms"]
    return {"cores": n, "one_thread": parts, "sdpa": attention_ms / n,
            "mha": (attention_ms + parts["projections_ms"]) / n}


def _torch_workloads(s: Sizes) -> dict:
    """PyTorch's side, as a user writes it: F.scaled_dot_product_attention, nn.MultiheadAttention, and two
    cached generation loops (one fused QKV projection, or three), each into a preallocated cache."""
    import torch
    import torch.nn.functional as F

    tq, tk, tv = (torch.from_numpy(a) for a in _qkv(s))
    w_q, w_k, w_v, w_o = _weights(s)
    mha = torch.nn.MultiheadAttention(s.embed, s.heads, bias=False, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.from_numpy(np.concatenate([w_q.T, w_k.T, w_v.T])))
        mha.out_proj.weight.copy_(torch.from_numpy(np.ascontiguousarray(w_o.T)))
    tx = torch.from_numpy(_mha_input(s))
    hidden = torch.ones(s.seq, s.seq, dtype=torch.bool).triu(1)       # PyTorch: True = may NOT attend
    total, hd, E, H = s.prompt + s.new_tokens, s.embed // s.heads, s.embed, s.heads
    tokens = torch.from_numpy(_generation_input(s))
    lin = {name: torch.from_numpy(np.ascontiguousarray(w.T)) for name, w in zip("qkvo", (w_q, w_k, w_v, w_o))}
    w_qkv = torch.cat([lin["q"], lin["k"], lin["v"]])                  # (3E, E): one projection for Q, K and V

    def sdpa(causal):
        def run():
            with torch.inference_mode():
                return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        return run

    def layer(causal):
        def run():
            with torch.inference_mode():
                return mha(tx, tx, tx, attn_mask=hidden if causal else None, need_weights=False, is_causal=causal)[0]
        return run

    def generate(fused: bool):
        def project(chunk):                                            # (1, n, E) -> 3 x (1, H, n, hd)
            n = chunk.shape[1]
            if fused:
                q, k, v = F.linear(chunk, w_qkv).view(1, n, 3, H, hd).permute(2, 0, 3, 1, 4)
                return q, k, v
            return tuple(F.linear(chunk, lin[name]).view(1, n, H, hd).transpose(1, 2) for name in "qkv")

        def run():
            with torch.inference_mode():
                keys, values = torch.empty(1, H, total, hd), torch.empty(1, H, total, hd)
                q, k, v = project(tokens[:, :s.prompt])
                keys[:, :, :s.prompt], values[:, :, :s.prompt] = k, v
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                F.linear(out.transpose(1, 2).reshape(1, s.prompt, E), lin["o"])
                for t in range(s.prompt, total):
                    q, k, v = project(tokens[:, t:t + 1])
                    keys[:, :, t:t + 1], values[:, :, t:t + 1] = k, v
                    out = F.scaled_dot_product_attention(q, keys[:, :, :t + 1], values[:, :, :t + 1])
                    F.linear(out.view(1, 1, E), lin["o"])
        return run

    return {"sdpa": sdpa(False), "sdpa_causal": sdpa(True), "mha": layer(False), "mha_causal": layer(True),
            "generation_fused": generate(True), "generation_separate": generate(False)}


def _our_extras(s: Sizes) -> dict:
    """Ours only, once: cache against recompute, blocked against plain at a long sequence, the sweep, the peak."""
    from tinytorch.core.attention import (KVCache, MultiHeadAttention, ScaledDotProductAttention, attention_backend,
                                          create_causal_mask)

    result = {}
    layer, total = MultiHeadAttention(s.embed, s.heads, seed=0).eval(), s.prompt + s.new_tokens
    tokens = _generation_input(s)

    def cached():
        cache = KVCache(1, total, s.heads, s.embed // s.heads)
        layer(tokens[:, :s.prompt], kv_cache=cache)
        for t in range(s.prompt, total):
            layer(tokens[:, t:t + 1], kv_cache=cache)

    def recompute():
        for t in range(s.prompt, total):
            layer(tokens[:, :t + 1], mask=create_causal_mask(t + 1))

    cached_s, recompute_s, ratios = paired(cached, recompute, 3)
    result["recompute"] = {"cached_ms": cached_s * 1e3, "recompute_ms": recompute_s * 1e3, "ratios": ratios}

    lq, lk, lv = _qkv(s, seq=s.long_seq, batch=1, seed=3)
    blocked = ScaledDotProductAttention(block_size=256 if s.seq >= 512 else 64).eval()
    plain = ScaledDotProductAttention().eval()

    def run_plain():
        with attention_backend("math"):
            plain(lq, lk, lv)

    def run_blocked():
        with attention_backend("math"):                          # the student's blocked loop, not the kernel
            blocked(lq, lk, lv)

    blocked_s, plain_s, ratios = paired(run_blocked, run_plain, 3)
    result["blocked"] = {"blocked_ms": blocked_s * 1e3, "plain_ms": plain_s * 1e3, "ratios": ratios,
                         "blocked_peak_mib": peak_bytes(run_blocked) / 2**20,
                         "plain_peak_mib": peak_bytes(run_plain) / 2**20,
                         "fast_peak_mib": peak_bytes(lambda: plain(lq, lk, lv)) / 2**20}

    sweep = []
    for seq in s.sweep:
        sq, sk, sv = _qkv(s, seq=seq, batch=1, seed=4)
        point = {"seq_len": seq, "fast_ms": median_time(lambda: plain(sq, sk, sv), 3) * 1e3}
        with attention_backend("math"):
            point["blocked_ms"] = median_time(lambda: blocked(sq, sk, sv), 3) * 1e3
            point["math_ms"] = median_time(lambda: plain(sq, sk, sv), 3) * 1e3
            point["math_peak_mib"] = peak_bytes(lambda: plain(sq, sk, sv)) / 2**20
            point["blocked_peak_mib"] = peak_bytes(lambda: blocked(sq, sk, sv)) / 2**20
        point["fast_peak_mib"] = peak_bytes(lambda: plain(sq, sk, sv)) / 2**20
        sweep.append(point)
    result["sweep"] = sweep

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((s.peak_size, s.peak_size), dtype=np.float32) for _ in range(2))
    result["matmul_gflops"] = 2 * s.peak_size**3 / median_time(lambda: a @ b, 5) / 1e9
    return result


def _torch_sweep(s: Sizes) -> list[float]:
    import torch
    import torch.nn.functional as F

    times = []
    for seq in s.sweep:
        tq, tk, tv = (torch.from_numpy(a) for a in _qkv(s, seq=seq, batch=1, seed=4))

        def run():
            with torch.inference_mode():
                F.scaled_dot_product_attention(tq, tk, tv)
        times.append(median_time(run, 3) * 1e3)
    return times


def worker(side: str, quick: bool, extras: bool) -> dict:
    """One side's measurements in this (fresh) process: the median ms of every workload, and its library."""
    s = QUICK if quick else Sizes()
    result = {"side": side, "load_before": load_average()}
    if side == "ours":
        from tinytorch.core.attention import set_attention_backend

        set_attention_backend("fast")                     # the tuned kernel, switched on by choice
        workloads = _our_workloads(s)
        result["ms"] = {name: median_time(call, s.repeats) * 1e3 for name, call in workloads.items()}
        plain_s, causal_s, ratios = paired(workloads["sdpa"], workloads["sdpa_causal"], s.repeats)
        result["core_causal_ratios"] = [1 / r for r in ratios]
        plain_s, causal_s, ratios = paired(workloads["mha"], workloads["mha_causal"], s.repeats)
        result["layer_causal_ratios"] = [1 / r for r in ratios]
        result["library"] = machine_line()
        result["roofline_ms"] = roofline(s, s.repeats)
        if extras:
            result["extras"] = _our_extras(s)
    else:
        import torch

        workloads = _torch_workloads(s)
        result["ms"] = {name: median_time(call, s.repeats) * 1e3 for name, call in workloads.items()}
        result["library"] = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                             "torch_simd": torch.backends.cpu.get_cpu_capability(),
                             "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)")}
        if extras:
            result["sweep_ms"] = _torch_sweep(s)
    result["load_after"] = load_average()
    return result


def _in_fresh_process(arguments: list[str], what: str) -> dict:
    """`python -m tito.bench ARGUMENTS` in a fresh Python process with this one's environment, untouched:
    the JSON it prints last."""
    done = subprocess.run([sys.executable, "-m", "tito.bench", *arguments], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_worker(side: str, quick: bool, extras: bool) -> dict:
    """`worker(side)` in a fresh process."""
    return _in_fresh_process(["--worker", side] + (["--quick"] if quick else []) + (["--extras"] if extras else []),
                             f"the {side} worker")


def _spread(values) -> tuple[float, float, float]:
    return float(np.median(values)), float(min(values)), float(max(values))


def run_bench(quick: bool = False, rounds: int | None = None) -> dict:
    """The honest mode: `rounds` alternating pairs of fresh worker processes, ours and PyTorch's."""
    s = QUICK if quick else Sizes()
    rounds = s.rounds if rounds is None else rounds
    have_torch = torch_available()
    sides = ["ours", "torch"] if have_torch else ["ours"]
    results = {"ours": [], "torch": []}
    for number in range(rounds):
        for side in (sides if number % 2 == 0 else sides[::-1]):
            results[side].append(_run_worker(side, quick, extras=number == 0))
    ours, theirs = results["ours"], results["torch"]

    def ours_ms(name):
        return float(np.median([r["ms"][name] for r in ours]))

    rows: list[Row] = []
    shape = f"{s.batch} x {s.heads} heads x {s.seq} x {s.head_dim}"
    layer_shape = f"{s.batch} x {s.seq}, E = {s.embed}, {s.heads} heads"
    sdpa_flops = 4.0 * s.batch * s.heads * s.seq * s.seq * s.head_dim
    causal_flops = sdpa_flops * (s.seq + 1) / (2 * s.seq)
    steps = f"{s.prompt}-token prefill + {s.new_tokens} tokens"
    avx512 = ours[0]["library"]["simd"] == "AVX-512"       # the goals against PyTorch that hold on AVX-512 only
    torch_goal = "; <= 1.0x PyTorch" if avx512 else ""
    versus = []          # (row name, our workload, their workload(s), reference label, flops, target, limit)
    versus.append((f"scaled dot-product attention, {shape}", "sdpa", ["sdpa"], "PyTorch", sdpa_flops,
                   f"<= {ROOFLINE_GOAL:.2f}x roofline" + torch_goal, 1.0 if avx512 else None))
    versus.append((f"causal scaled dot-product attention, {shape}", "sdpa_causal", ["sdpa_causal"],
                   "PyTorch, is_causal=True", causal_flops, "<= 0.9x PyTorch", 0.9))
    versus.append((f"multi-head attention, {layer_shape}", "mha", ["mha"], "PyTorch nn.MultiheadAttention",
                   _mha_flops(s, False), f"<= {ROOFLINE_GOAL:.2f}x roofline" + torch_goal, 1.0 if avx512 else None))
    versus.append((f"causal multi-head attention, {layer_shape}", "mha_causal", ["mha_causal"],
                   "PyTorch nn.MultiheadAttention", _mha_flops(s, True), "", None))
    versus.append((f"generation, KV cache, {steps}", "generation", ["generation_fused", "generation_separate"],
                   "PyTorch's faster cache loop", _generation_flops(s), "<= 1.0x PyTorch", 1.0))
    for name, mine, refs, label, flops, target, limit in versus:
        if not have_torch:
            row = Row(name, ours_ms(mine), "", None, None, flops, target)
        else:
            per_round = [(o["ms"][mine], min(t["ms"][ref] for ref in refs)) for o, t in zip(ours, theirs)]
            median, low, high = _spread([a / b for a, b in per_round])
            extra = {ref: float(np.median([t["ms"][ref] for t in theirs])) for ref in refs} if len(refs) > 1 else {}
            row = Row(name, ours_ms(mine), label, float(np.median([b for _, b in per_round])), median, flops,
                      target, None if limit is None else median <= limit, (low, high), extra)
        if mine in ours[0]["roofline_ms"]:                   # SDPA and the layer: against what NumPy allows here
            row.roofline_ms = float(np.median([o["roofline_ms"][mine] for o in ours]))
            row.roofline_ratio = float(np.median([o["ms"][mine] / o["roofline_ms"][mine] for o in ours]))
            row.met = (row.met is not False) and row.roofline_ratio <= ROOFLINE_GOAL
        rows.append(row)
    ordered = rows[:2]
    median, low, high = _spread([float(np.median(r["core_causal_ratios"])) for r in ours])
    ordered.append(Row("causal vs unmasked attention core (ours)", ours_ms("sdpa_causal"), "ours, no mask",
                       ours_ms("sdpa"), median, causal_flops, "", None, (low, high)))
    ordered += rows[2:4]
    bound = _mha_flops(s, True) / _mha_flops(s, False)
    median, low, high = _spread([float(np.median(r["layer_causal_ratios"])) for r in ours])
    ordered.append(Row("causal vs unmasked multi-head (ours)", ours_ms("mha_causal"), "ours, no mask", ours_ms("mha"),
                       median, _mha_flops(s, True), f"(FLOP bound {bound:.3f})", None, (low, high),
                       {"flop_bound": bound}))
    extras = ours[0]["extras"]
    recompute = extras["recompute"]
    median, low, high = _spread(recompute["ratios"])
    ordered.append(Row(f"generation, KV cache, {steps}", recompute["cached_ms"], "ours, recompute",
                       recompute["recompute_ms"], median, _generation_flops(s), ">= 20x faster than recompute",
                       1 / median >= 20, (low, high), {"speedup": 1 / median}))
    ordered += rows[4:]
    blocked = extras["blocked"]
    median, low, high = _spread(blocked["ratios"])
    ordered.append(Row(f"blocked attention, 1 x {s.heads} heads x {s.long_seq} x {s.head_dim}: time",
                       blocked["blocked_ms"], "plain (math) path", blocked["plain_ms"], median,
                       4.0 * s.heads * s.long_seq**2 * s.head_dim, "no slower than plain", median <= 1.0, (low, high)))
    ordered.append(Row(f"blocked attention, T = {s.long_seq}: peak MiB", blocked["blocked_peak_mib"],
                       "plain (math) path", blocked["plain_peak_mib"],
                       blocked["blocked_peak_mib"] / blocked["plain_peak_mib"], 0.0, "<= 1/8 of plain",
                       blocked["blocked_peak_mib"] <= blocked["plain_peak_mib"] / 8,
                       extra={"fast_path_peak_mib": blocked["fast_peak_mib"]}))
    sweep = extras["sweep"]
    if have_torch:
        for point, ms in zip(sweep, theirs[0]["sweep_ms"]):
            point["pytorch_ms"] = ms
    if quick:  # the targets are set for the full sizes; at smoke-test sizes they mean nothing
        for row in ordered:
            row.met = None
    loads = [value for r in ours + theirs for value in (r["load_before"], r["load_after"]) if value is not None]
    machine = {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
               **ours[0]["library"], **(theirs[0]["library"] if theirs else {}),
               "matmul_gflops": extras["matmul_gflops"], "load_1min": (min(loads), max(loads)) if loads else None}
    return {"mode": "separate processes", "quick": quick, "rounds": rounds, "machine": machine,
            "sweep_heads": s.heads, "sweep_head_dim": s.head_dim, "rows": [asdict(row) for row in ordered],
            "sweep": sweep, "workers": results}


def format_table(result: dict) -> str:
    peak = result["machine"]["matmul_gflops"]
    header = (f"{'workload':<60} {'ours ms':>9} {'ref ms':>9} {'ratio':>6} {'spread':>11} {'roofline':>8} "
              f"{'x roof':>6} {'of peak':>8}  {'target':<36} {'met':<3}  reference")
    lines = [format_machine(result["machine"]), "", header, "-" * len(header)]
    for row in result["rows"]:
        is_memory = "MiB" in row["workload"]
        fraction = "" if is_memory else f"{row['flops'] / (row['ours_ms'] / 1e3) / 1e9 / peak:8.0%}"
        reference = "" if row["reference_ms"] is None else f"{row['reference_ms']:9.2f}"
        ratio = "" if row["ratio"] is None else f"{row['ratio']:6.3f}"
        spread = "" if not row["spread"] else f"{row['spread'][0]:.2f}-{row['spread'][1]:.2f}"
        met = {True: "yes", False: "NO", None: ""}[row["met"]]
        roof = "" if row.get("roofline_ms") is None else f"{row['roofline_ms']:8.2f}"
        roof_ratio = "" if row.get("roofline_ratio") is None else f"{row['roofline_ratio']:6.3f}"
        lines.append(f"{row['workload']:<60} {row['ours_ms']:9.2f} {reference:>9} {ratio:>6} {spread:>11} "
                     f"{roof:>8} {roof_ratio:>6} {fraction:>8}  {row['target']:<36} {met:<3}  {row['reference']}")
        if len(row["extra"]) == 2 and "generation_fused" in row["extra"]:
            lines.append(f"{'':<60} {'':>9} {'':>9}        PyTorch loops: fused QKV "
                         f"{row['extra']['generation_fused']:.1f} ms, separate {row['extra']['generation_separate']:.1f} ms")
    machine = result["machine"]
    lines.append("")
    lines.append(f"float32 matmul peak {peak:.0f} GFLOP/s (NumPy, this machine); roofline = NumPy's own single-thread "
                 f"time for the same products, exp and projections, divided by {machine['cores']} cores, measured in "
                 f"each of our workers")
    lines.append(f"mode: each side in its own fresh process at its library's defaults, {result['rounds']} alternating "
                 "rounds; a ratio is the median of the per-round ratios, spread = lowest-highest round; "
                 "memory from tracemalloc")
    lines.append("")
    columns = [key for key in result["sweep"][0] if key != "seq_len"]
    lines.append(f"sweep (ours: one process, medians of 3 calls), 1 x {result['sweep_heads']} heads x T x "
                 f"{result['sweep_head_dim']}")
    lines.append(f"{'T':>6} " + " ".join(f"{key:>16}" for key in columns))
    for point in result["sweep"]:
        lines.append(f"{point['seq_len']:>6} " + " ".join(f"{point[key]:16.2f}" for key in columns))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the backward passes (Part 11)
BACKWARD_GOALS = {"memory": 1 / 8, "time": 3.0}   # recomputing backward: <= 1/8 the memory, <= 3x the forward's time


def backward_check(seq_len: int = 2048, num_heads: int = 8, head_dim: int = 64, block_size: int = 128,
                   rounds: int = 3, repeats: int = 3) -> dict:
    """Part 11's goals at one size, without a mask and causal, with BLAS held at one thread.

    Memory: the recomputing backward's peak plus its logsumexp, over the backward from saved weights'
    peak plus the weights (tracemalloc). Time: the recomputing backward over the blocked forward with
    its logsumexp (medians of `repeats` calls); each ratio is the median over `rounds` sweeps.
    """
    from tinytorch.core import attention
    from tinytorch.core._attention_training import measure_backward_scaling
    from tinytorch.core.attention import AttentionProfiler

    load_before = load_average()
    rows = []
    for causal in (False, True):
        runs = [measure_backward_scaling(attention, AttentionProfiler(repeats=repeats, warmup=1), [seq_len],
                                         num_heads=num_heads, head_dim=head_dim, block_size=block_size, causal=causal)
                for _ in range(rounds)]
        first = {name: run[0] for name, run in runs[0].items()}
        memory = [run["recomputed"][0]["peak_memory_mb"] / run["saved weights"][0]["peak_memory_mb"] for run in runs]
        time = [run["recomputed"][0]["time_ms"] / run["blocked forward"][0]["time_ms"] for run in runs]
        rows.append({"mask": "causal" if causal else "none",
                     "forward_ms": float(np.median([run["blocked forward"][0]["time_ms"] for run in runs])),
                     "saved_ms": float(np.median([run["saved weights"][0]["time_ms"] for run in runs])),
                     "recomputed_ms": float(np.median([run["recomputed"][0]["time_ms"] for run in runs])),
                     "saved_mib": first["saved weights"]["peak_memory_mb"],
                     "recomputed_mib": first["recomputed"]["peak_memory_mb"],
                     "memory_ratio": float(np.median(memory)), "time_ratio": float(np.median(time)),
                     "time_ratios": time})
    loads = [value for value in (load_before, load_average()) if value is not None]
    from threadpoolctl import threadpool_info
    machine = {"cpu": _cpu_model(), "cores": os.cpu_count(), "numpy": np.__version__,
               "blas": ", ".join(f"{info['internal_api']} {info['version']}" for info in threadpool_info()
                                 if info["user_api"] == "blas"),
               "load_1min": (min(loads), max(loads)) if loads else None}
    passed = all(row["memory_ratio"] <= BACKWARD_GOALS["memory"] and row["time_ratio"] <= BACKWARD_GOALS["time"]
                 for row in rows)
    return {"seq_len": seq_len, "num_heads": num_heads, "head_dim": head_dim, "block_size": block_size,
            "rounds": rounds, "rows": rows, "machine": machine, "passed": passed}


def format_backward_check(result: dict) -> str:
    lines = [f"backward passes at T = S = {result['seq_len']}, {result['num_heads']} heads x {result['head_dim']}, "
             f"blocks of {result['block_size']}, BLAS on one thread; medians of {result['rounds']} sweeps",
             f"{'mask':<7} {'forward ms':>11} {'saved ms':>9} {'recomp ms':>10} {'saved MiB':>10} {'recomp MiB':>11} "
             f"{'memory':>7} {'time':>6} {'time per sweep':>20}  goals (<= 1/8, <= 3x)"]
    for row in result["rows"]:
        met = row["memory_ratio"] <= BACKWARD_GOALS["memory"] and row["time_ratio"] <= BACKWARD_GOALS["time"]
        lines.append(f"{row['mask']:<7} {row['forward_ms']:11.1f} {row['saved_ms']:9.1f} {row['recomputed_ms']:10.1f} "
                     f"{row['saved_mib']:10.1f} {row['recomputed_mib']:11.1f} {row['memory_ratio']:7.3f} "
                     f"{row['time_ratio']:5.2f}x {', '.join(f'{r:.2f}' for r in row['time_ratios']):>20}  "
                     f"{'met' if met else 'MISSED'}")
    machine, load = result["machine"], result["machine"]["load_1min"]
    lines.append(f"machine: {machine['cpu']}, {machine['cores']} cores, numpy {machine['numpy']} ({machine['blas']})"
                 + (f", 1-minute load {load[0]:.2f}-{load[1]:.2f} during the run" if load else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- ablation
GOAL_ROWS = {"sdpa": "SDPA", "sdpa_causal": "causal SDPA", "mha": "multi-head", "mha_causal": "causal multi-head",
             "generation": "cached generation"}


def _on_fast_backend(calls: dict, techniques) -> dict:
    """Each call run through the layers on the fast backend with these techniques."""
    from tinytorch.core.attention import attention_backend

    def on_fast(call):
        def run():
            with attention_backend("fast", techniques):
                return call()
        return run

    return {name: on_fast(call) for name, call in calls.items()}


def machine_line() -> dict:
    """This process's machine: CPU, cores, NumPy's SIMD level and BLAS, and the kernel's default techniques."""
    from threadpoolctl import threadpool_info

    from tinytorch.core._attention_kernel import Techniques, cpu_features, simd_level

    chosen = Techniques()
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "simd": simd_level(cpu_features()),
            "numpy": np.__version__, "blas": ", ".join(
                f"{info['internal_api']} {info['version']} {info.get('architecture') or ''} "
                f"({info['num_threads']} threads)".replace("  ", " ")
                for info in threadpool_info() if info["user_api"] == "blas"),
            "techniques_on": [name for name, on in asdict(chosen).items() if on],
            "techniques_off": [name for name, on in asdict(chosen).items() if not on]}


def format_machine(machine: dict) -> str:
    line = (f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['simd']}, numpy {machine['numpy']} "
            f"({machine['blas']})")
    if machine.get("torch"):
        line += (f", PyTorch {machine['torch']} ({machine.get('torch_simd', '?')}, {machine['torch_threads']} threads, "
                 f"OMP_WAIT_POLICY {machine['omp_wait_policy']})")
    if machine.get("load_1min"):
        low, high = machine["load_1min"]
        line += f"; 1-minute load {low:.2f}-{high:.2f} during the run"
    off = machine["techniques_off"]
    return line + f"\nkernel techniques by default: off: {', '.join(off) if off else 'none'}"


def blocks(first, second, pairs: int, repeats: int) -> list[float]:
    """Per pair of blocks, median seconds of `first()` over median seconds of `second()`, in this process.

    A block is one function's `repeats` timed runs; the pairs alternate which block goes first. Each
    block starts with untimed runs for at least SETTLE_SECONDS, so that none of its runs is timed
    while the other function's effects linger: a run with BLAS on several threads leaves OpenBLAS's
    threads spinning (for 2^28 cycles, its THREAD_TIMEOUT, about 0.1 s), and a run on the worker
    pool right after it shares a core with them.
    """
    def block(function) -> float:
        start = time.perf_counter()
        function()
        while time.perf_counter() - start < SETTLE_SECONDS:
            function()
        return timed_median(function, repeats)

    ratios = []
    for number in range(pairs):
        if number % 2 == 0:
            a = block(first)
            b = block(second)
        else:
            b = block(second)
            a = block(first)
        ratios.append(a / b)
    return ratios


CONTROL = "(control)"      # the ablation's first row: the default techniques on both sides


def _gain_cell(gains: list[float]) -> dict:
    q25, median, q75 = (float(x) for x in np.percentile(gains, [25, 50, 75]))
    return {"gain": median, "low": float(min(gains)), "high": float(max(gains)), "q25": q25, "q75": q75}


def run_ablation(quick: bool = False, pairs: int | None = None, names=None, rows=None) -> dict:
    """Each technique of the tuned kernel switched on and off, the others on by default:
    its gain on every goal row, beside a control that runs the same techniques on both sides.

    The gain of a pair of blocks (`blocks`) is (median time without the technique) / (median time
    with it) - 1. The control's gains are what the machine's noise alone gives, for identical
    code. On a row, a technique pays when the median of its gains over the pairs is at least
    KEEP_THRESHOLD and their middle half (25th to 75th percentile) lies wholly above the control's,
    and loses when the median is at most -KEEP_THRESHOLD and the middle half lies wholly below it;
    anything else is no clear effect. Fewer than VERDICT_PAIRS pairs (`--quick`) give the gains
    but no verdict.
    """
    from dataclasses import replace

    from tinytorch.core._attention_kernel import Techniques

    s = QUICK if quick else Sizes()
    pairs = (QUICK_ABLATION_PAIRS if quick else ABLATION_PAIRS) if pairs is None else pairs
    repeats = QUICK.repeats if quick else ABLATION_REPEATS
    rows = list(rows or GOAL_ROWS)
    chosen = Techniques()
    judged = pairs >= VERDICT_PAIRS
    load_before = load_average()
    calls = _our_workloads(s)            # one set of arrays and layers: only the techniques differ between sides
    same = _on_fast_backend(calls, chosen)
    control = {row: _gain_cell([r - 1 for r in blocks(same[row], same[row], pairs, repeats)]) for row in rows}
    table = {}
    for name in names or Techniques.__dataclass_fields__:
        with_it = _on_fast_backend(calls, replace(chosen, **{name: True}))
        without = _on_fast_backend(calls, replace(chosen, **{name: False}))
        table[name] = {}
        for row in rows:
            cell = _gain_cell([r - 1 for r in blocks(without[row], with_it[row], pairs, repeats)])
            cell["pays"] = judged and cell["gain"] >= KEEP_THRESHOLD and cell["q25"] > control[row]["q75"]
            cell["loses"] = judged and cell["gain"] <= -KEEP_THRESHOLD and cell["q75"] < control[row]["q25"]
            table[name][row] = cell
        cells = [table[name][row] for row in rows]
        table[name]["default"] = getattr(chosen, name)
        table[name]["pays"] = any(cell["pays"] for cell in cells)
        table[name]["loses"] = any(cell["loses"] for cell in cells)
    machine = machine_line()
    loads = [x for x in (load_before, load_average()) if x is not None]
    machine["load_1min"] = (min(loads), max(loads)) if loads else None
    return {"quick": quick, "pairs": pairs, "repeats": repeats, "judged": judged, "machine": machine,
            "control": control, "techniques": table}


def format_ablation(result: dict) -> str:
    width = 22

    def cells_line(cells: dict) -> str:
        return "".join(f"{cells[key]['gain']:>+8.1%} ({cells[key]['q25']:+.0%}..{cells[key]['q75']:+.0%})"
                       f"{'+' if cells[key].get('pays') else '-' if cells[key].get('loses') else ' '}".rjust(width)
                       if key in cells else "".rjust(width) for key in GOAL_ROWS)

    lines = [format_machine(result["machine"]),
             f"{'technique':<19}" + "".join(f"{label:>{width}}" for label in GOAL_ROWS.values())
             + "  default verdict",
             f"{CONTROL:<19}{cells_line(result['control'])}  {'':<6}  the noise: the same techniques on both sides"]
    for name, cells in result["techniques"].items():
        verdict = ("too few pairs to judge" if not result["judged"]
                   else "ON BUT LOSES on a goal row" if cells["default"] and cells["loses"]
                   else "would pay, but off" if not cells["default"] and cells["pays"] and not cells["loses"]
                   else "pays" if cells["pays"] else "no clear effect here")
        lines.append(f"{name:<19}{cells_line(cells)}  {'on' if cells['default'] else 'off':<6}  {verdict}")
    lines.append(f"gain = time without the technique / time with it - 1 (the others on, as by default), "
                 f"median of {result['pairs']} alternating pairs of blocks, each the median of {result['repeats']} runs "
                 f"after {SETTLE_SECONDS} s of untimed ones (25th..75th percentile), through the layers; "
                 f"+ pays, - loses: a median of at least {KEEP_THRESHOLD:.0%} either way with the middle half of the "
                 f"pairs wholly beyond the control's")
    return "\n".join(lines)


def plot_sweep(result: dict, path) -> None:
    """Log-log plot of the sweep: time and peak memory against sequence length, with fitted slopes."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = result["sweep"]
    lengths = np.array([point["seq_len"] for point in sweep])
    figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for axes, keys, label in ((time_axes, ["math_ms", "fast_ms", "blocked_ms", "pytorch_ms"], "time (ms)"),
                              (memory_axes, ["math_peak_mib", "fast_peak_mib", "blocked_peak_mib"],
                               "peak memory (MiB, tracemalloc)")):
        for key in keys:
            if key not in sweep[0]:
                continue
            values = np.array([point[key] for point in sweep])
            tail = slice(len(lengths) // 2, None)
            slope = np.polyfit(np.log(lengths[tail]), np.log(np.maximum(values[tail], 1e-9)), 1)[0]
            axes.loglog(lengths, values, "o-", label=f"{key.split('_')[0]} (slope {slope:.2f})")
        axes.set_xticks(lengths, [str(n) for n in lengths])
        axes.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axes.set_xlabel("sequence length T")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    figure.suptitle(f"Attention, 1 x {result['sweep_heads']} heads x T x {result['sweep_head_dim']}, float32, "
                    f"{result['machine']['cpu']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(figure)


# ----------------------------------------------------------------------------- profiler check
PROFILER_LENGTHS = (128, 256, 512, 1024)
TIME_EXPONENT_RANGE = (1.7, 2.3)     # attention's time grows as T^2; these bounds allow for overheads and caches
MEMORY_EXPONENT_RANGE = (1.8, 2.2)   # the math path stores the (T, T) scores
CLIFF_RATIO = 2.0                    # time per score at T=512 may be at most twice that at T=256


# Spins until its standard input closes, which happens when the check ends or its process dies
# in any way, so that it cannot outlive the check.
BUSY_LOOP = """import os, sys, threading
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
while True:
    pass
"""


def _busy_core() -> subprocess.Popen:
    """Another process that keeps one core busy, as a shared machine does, until its stdin closes."""
    return subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.PIPE)


def profiler_check(runs: int = 3, load: bool = True) -> dict:
    """AttentionProfiler's sweep of the math path, `runs` times, with one core busy elsewhere when `load`.

    Each run fits the time and memory exponents over T = 128..1024 (B=1, H=8, hd=64) and
    compares the time per score at T=512 with that at T=256 on the math, fast and blocked paths
    (the median ratio of 11 alternating runs).
    """
    from tinytorch.core.attention import (AttentionProfiler, ScaledDotProductAttention, attention_backend,
                                          single_threaded_blas)

    profiler = AttentionProfiler(repeats=7, warmup=1)
    plain, blocked = ScaledDotProductAttention().eval(), ScaledDotProductAttention(block_size=128).eval()
    paths = {"math": (plain, "math"), "fast": (plain, "fast"), "blocked": (blocked, "fast")}
    busy = _busy_core() if load else None
    result = {"load": load, "runs": []}
    try:
        time.sleep(0.5 if load else 0.0)                 # let the busy process start spinning
        for _ in range(runs):
            with attention_backend("math"):
                sweep = profiler.measure_attention_scaling(plain, PROFILER_LENGTHS)
            fit = AttentionProfiler.analyze_quadratic_scaling(sweep)
            run = {"time_exponent": fit["time_exponent"], "memory_exponent": fit["memory_exponent"],
                   "time_ms": [row["time_ms"] for row in sweep], "cliff_ratio": {}}
            for name, (layer, backend) in paths.items():
                short, _ = profiler._workload(layer, 256, 1, 8, 64, False)
                long, _ = profiler._workload(layer, 512, 1, 8, 64, False)
                with attention_backend(backend), single_threaded_blas():   # as the profiler holds BLAS
                    # one T=512 call has 4x the scores of a T=256 one: alternate it with 4 of those
                    run["cliff_ratio"][name] = float(np.median(paired(long, lambda: [short() for _ in range(4)], 11)[2]))
            run["passed"] = (TIME_EXPONENT_RANGE[0] <= run["time_exponent"] <= TIME_EXPONENT_RANGE[1]
                             and MEMORY_EXPONENT_RANGE[0] <= run["memory_exponent"] <= MEMORY_EXPONENT_RANGE[1]
                             and max(run["cliff_ratio"].values()) <= CLIFF_RATIO)
            result["runs"].append(run)
    finally:
        if busy is not None:
            busy.stdin.close()
            busy.wait()
    result["passed"] = all(run["passed"] for run in result["runs"])
    return result


def format_profiler_check(result: dict) -> str:
    lines = [f"AttentionProfiler, math path, B=1 H=8 hd=64, T = {', '.join(map(str, PROFILER_LENGTHS))}; "
             + ("one core kept busy by another process" if result["load"] else "no added load"),
             f"{'run':>3} {'time exp':>9} {'memory exp':>11}  {'ms per T':<34} "
             f"{'T=512 / T=256 time per score (math, fast, blocked)':<52} ok"]
    for number, run in enumerate(result["runs"], 1):
        times = ", ".join(f"{t:.1f}" for t in run["time_ms"])
        cliffs = ", ".join(f"{run['cliff_ratio'][name]:.2f}" for name in ("math", "fast", "blocked"))
        lines.append(f"{number:>3} {run['time_exponent']:9.2f} {run['memory_exponent']:11.2f}  {times:<34} "
                     f"{cliffs:<52} {'yes' if run['passed'] else 'NO'}")
    lines.append(f"targets: time exponent in {list(TIME_EXPONENT_RANGE)}, memory exponent in "
                 f"{list(MEMORY_EXPONENT_RANGE)}, time per score ratio <= {CLIFF_RATIO}")
    return "\n".join(lines)


def _worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tito.bench")
    parser.add_argument("--worker", choices=["ours", "torch"], required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--extras", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(worker(args.worker, args.quick, args.extras)))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
