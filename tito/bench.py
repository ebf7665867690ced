"""`tito bench`: module 13's attention timed side by side with PyTorch on the CPU.

Every figure is measured in this process with time.perf_counter (memory with tracemalloc).
Paired workloads alternate their two sides run by run and report the median of the per-run
ratios (11 runs), which holds up on a noisy machine far better than a ratio of two separate
medians. Every label names the sizes that were actually run.

`tito bench --profiler-check` is a separate mode: it keeps one core busy with another process
and checks that the lesson's AttentionProfiler still measures the math path's scaling well.
PyTorch runs with the same number of threads as NumPy's kernels and with
OMP_WAIT_POLICY=PASSIVE, which is faster for PyTorch on this kind of machine: its worker
threads otherwise spin between operations and starve the thread that issues them.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field

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
    repeats: int = 11
    peak_size: int = 2048


QUICK = Sizes(batch=1, heads=2, seq=64, head_dim=16, embed=64, prompt=8, new_tokens=16, long_seq=256,
              sweep=(32, 64, 128), repeats=3, peak_size=256)
FLOP_BOUND_SLACK = 1.05   # the causal/unmasked multi-head ratio may exceed its FLOP bound by 5%


@dataclass
class Row:
    workload: str
    ours_ms: float
    reference: str
    reference_ms: float | None
    ratio: float | None              # median of per-run ours / reference
    flops: float
    target: str = ""
    met: bool | None = None
    extra: dict = field(default_factory=dict)


def _time(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def paired(ours, reference, repeats: int) -> tuple[float, float, float]:
    """Median seconds of each side and the median per-run ratio, the two run alternately."""
    ours(), reference()  # warm up: page faults, thread pools, lazy initialisation
    ours_times, reference_times, ratios = [], [], []
    for run in range(repeats):
        pair = (ours, reference) if run % 2 == 0 else (reference, ours)
        first, second = _time(pair[0]), _time(pair[1])
        a, b = (first, second) if run % 2 == 0 else (second, first)
        ours_times.append(a)
        reference_times.append(b)
        ratios.append(a / b)
    return float(np.median(ours_times)), float(np.median(reference_times)), float(np.median(ratios))


def median_time(function, repeats: int) -> float:
    """Median seconds of `function()` over `repeats` runs, after one warm-up run."""
    from tinytorch.core.attention import AttentionProfiler

    return AttentionProfiler(repeats=repeats, warmup=1).time_call(function)


def peak_bytes(function) -> int:
    """Peak bytes allocated while `function()` runs, above those allocated when it starts."""
    from tinytorch.core.attention import AttentionProfiler

    return AttentionProfiler.peak_memory(function)


def matmul_peak_gflops(size: int) -> float:
    """The machine's float32 matmul throughput through NumPy's BLAS: the physical limit here."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    return 2 * size**3 / median_time(lambda: a @ b, 5) / 1e9


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def _machine(peak: float) -> dict:
    from threadpoolctl import threadpool_info

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    blas = [f"{info['internal_api']} {info['version']} ({info['num_threads']} threads)"
            for info in threadpool_info() if info["user_api"] == "blas"]
    info = {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "blas": ", ".join(blas), "matmul_gflops": peak,
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "")}
    if torch_available():
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return info


# ----------------------------------------------------------------------------- workloads
def _mha_input(s: Sizes) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((s.batch, s.seq, s.embed), dtype=np.float32)


def _our_mha(s: Sizes, causal: bool):
    """A call of our MultiHeadAttention on the benchmark input, with or without a causal mask."""
    from tinytorch.core.attention import MultiHeadAttention, create_causal_mask

    layer, x = MultiHeadAttention(s.embed, s.heads, seed=0).eval(), _mha_input(s)
    mask = create_causal_mask(s.seq) if causal else None
    return lambda: layer(x, mask=mask)


def _mha_pair(s: Sizes, causal: bool):
    """Our MultiHeadAttention and PyTorch's, with the same weights, on the same input."""
    import torch

    from tinytorch.core.attention import MultiHeadAttention

    weights = MultiHeadAttention(s.embed, s.heads, seed=0)       # the same seed as _our_mha's layer
    theirs = torch.nn.MultiheadAttention(s.embed, s.heads, bias=False, batch_first=True).eval()
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.from_numpy(np.concatenate([w.data.T for w in weights.parameters[:3]])))
        theirs.out_proj.weight.copy_(torch.from_numpy(weights.w_o.data.T))
    tx = torch.from_numpy(_mha_input(s))
    hidden = torch.ones(s.seq, s.seq, dtype=torch.bool).triu(1) if causal else None   # PyTorch: True = may NOT attend

    def run_theirs():
        with torch.no_grad():
            return theirs(tx, tx, tx, attn_mask=hidden, need_weights=False, is_causal=causal)[0]

    return _our_mha(s, causal), run_theirs


def _mha_flops(s: Sizes, causal: bool) -> float:
    pairs = s.seq * (s.seq + 1) / 2 if causal else s.seq * s.seq
    return s.batch * (4 * 2 * s.seq * s.embed * s.embed + 2 * 2 * s.heads * pairs * (s.embed // s.heads))


def _generation(s: Sizes):
    """Three ways to generate: our cache, our recompute-everything, a PyTorch cache loop."""
    from tinytorch.core.attention import KVCache, MultiHeadAttention, create_causal_mask

    layer = MultiHeadAttention(s.embed, s.heads, seed=0).eval()
    total, hd = s.prompt + s.new_tokens, s.embed // s.heads
    x = np.random.default_rng(2).standard_normal((1, total, s.embed), dtype=np.float32)

    def cached():
        cache = KVCache(1, total, s.heads, hd)
        layer(x[:, :s.prompt], kv_cache=cache)
        for t in range(s.prompt, total):
            layer(x[:, t:t + 1], kv_cache=cache)

    def recompute():
        for t in range(s.prompt, total):
            layer(x[:, :t + 1], mask=create_causal_mask(t + 1))

    theirs = None
    if torch_available():
        import torch
        import torch.nn.functional as F

        w_q, w_k, w_v, w_o = (torch.from_numpy(np.ascontiguousarray(w.data.T)) for w in layer.parameters)
        tx = torch.from_numpy(x)

        def heads(t, n):  # (1, n, E) -> (1, H, n, hd)
            return t.view(1, n, s.heads, hd).transpose(1, 2)

        def theirs():
            with torch.no_grad():
                keys, values = torch.zeros(1, s.heads, total, hd), torch.zeros(1, s.heads, total, hd)
                prompt = tx[:, :s.prompt]
                q, k, v = (heads(F.linear(prompt, w), s.prompt) for w in (w_q, w_k, w_v))
                keys[:, :, :s.prompt], values[:, :, :s.prompt] = k, v
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                F.linear(out.transpose(1, 2).reshape(1, s.prompt, s.embed), w_o)
                for t in range(s.prompt, total):
                    token = tx[:, t:t + 1]
                    q, k, v = (heads(F.linear(token, w), 1) for w in (w_q, w_k, w_v))
                    keys[:, :, t:t + 1], values[:, :, t:t + 1] = k, v
                    out = F.scaled_dot_product_attention(q, keys[:, :, :t + 1], values[:, :, :t + 1])
                    F.linear(out.transpose(1, 2).reshape(1, 1, s.embed), w_o)

    per_token = [4 * 2 * s.embed * s.embed + 2 * 2 * s.embed * (t + 1) for t in range(s.prompt, total)]
    return cached, recompute, theirs, float(sum(per_token))


def run_bench(quick: bool = False) -> dict:
    if torch_available():
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first torch import
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    from tinytorch.core.attention import (ScaledDotProductAttention, attention_backend, create_causal_mask,
                                          set_attention_backend)

    set_attention_backend("fast")             # the benchmark measures the tuned kernel, switched on by choice
    s = QUICK if quick else Sizes()
    peak = matmul_peak_gflops(s.peak_size)
    rows: list[Row] = []
    have_torch = torch_available()
    rng = np.random.default_rng(0)

    # 1. scaled dot-product attention, plain and causal
    shape = f"{s.batch} x {s.heads} heads x {s.seq} x {s.head_dim}"
    q, k, v = (rng.standard_normal((s.batch, s.heads, s.seq, s.head_dim), dtype=np.float32) for _ in range(3))
    sdpa = ScaledDotProductAttention().eval()
    causal_mask = create_causal_mask(s.seq)
    sdpa_flops = 4.0 * s.batch * s.heads * s.seq * s.seq * s.head_dim
    causal_flops = sdpa_flops * (s.seq + 1) / (2 * s.seq)
    if have_torch:
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
        for causal in (False, True):
            theirs = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
            ours = (lambda: sdpa(q, k, v, mask=causal_mask)) if causal else (lambda: sdpa(q, k, v))
            ours_s, ref_s, ratio = paired(ours, theirs, s.repeats)
            rows.append(Row(f"{'causal ' if causal else ''}scaled dot-product attention, {shape}", ours_s * 1e3,
                            "PyTorch, is_causal=True" if causal else "PyTorch", ref_s * 1e3, ratio,
                            causal_flops if causal else sdpa_flops, "<= 1.0x PyTorch", ratio <= 1.0))
    else:
        rows.append(Row(f"scaled dot-product attention, {shape}", median_time(lambda: sdpa(q, k, v), s.repeats) * 1e3,
                        "", None, None, sdpa_flops))
    ours_s, ref_s, ratio = paired(lambda: sdpa(q, k, v, mask=causal_mask), lambda: sdpa(q, k, v), s.repeats)
    rows.append(Row("causal vs unmasked attention core (ours)", ours_s * 1e3, "ours, no mask", ref_s * 1e3, ratio,
                    causal_flops, "<= 0.65x unmasked", ratio <= 0.65))

    # 2 and 3. multi-head attention, plain and causal
    layer_shape = f"{s.batch} x {s.seq}, E = {s.embed}, {s.heads} heads"
    if have_torch:
        for causal in (False, True):
            ours, theirs = _mha_pair(s, causal)
            ours_s, ref_s, ratio = paired(ours, theirs, s.repeats)
            name = f"{'causal ' if causal else ''}multi-head attention, {layer_shape}"
            rows.append(Row(name, ours_s * 1e3, "PyTorch", ref_s * 1e3, ratio, _mha_flops(s, causal),
                            "" if causal else "<= 0.8x PyTorch", None if causal else ratio <= 0.8))
    plain, masked = _our_mha(s, causal=False), _our_mha(s, causal=True)
    ours_s, ref_s, ratio = paired(masked, plain, s.repeats)
    bound = _mha_flops(s, True) / _mha_flops(s, False)
    rows.append(Row("causal vs unmasked multi-head (ours)", ours_s * 1e3, "ours, no mask", ref_s * 1e3, ratio,
                    _mha_flops(s, True), f"<= {FLOP_BOUND_SLACK:.2f} x FLOP bound {bound:.3f}",
                    ratio <= FLOP_BOUND_SLACK * bound, {"flop_bound": bound}))

    # 4. generation
    cached, recompute, theirs, generation_flops = _generation(s)
    steps = f"{s.prompt}-token prefill + {s.new_tokens} tokens"
    recompute_repeats = max(3, s.repeats // 2)
    cached_s, recompute_s, ratio = paired(cached, recompute, recompute_repeats)
    rows.append(Row(f"generation, KV cache, {steps}", cached_s * 1e3, "ours, recompute",
                    recompute_s * 1e3, ratio, generation_flops, ">= 20x faster than recompute", 1 / ratio >= 20,
                    {"speedup": 1 / ratio}))
    if theirs is not None:
        cached_s, ref_s, ratio = paired(cached, theirs, s.repeats)
        rows.append(Row(f"generation, KV cache, {steps}", cached_s * 1e3, "PyTorch cache loop",
                        ref_s * 1e3, ratio, generation_flops, "<= 1.0x PyTorch", ratio <= 1.0))

    # 5. blocked against plain attention on a long sequence
    lq, lk, lv = (rng.standard_normal((1, s.heads, s.long_seq, s.head_dim), dtype=np.float32) for _ in range(3))
    blocked = ScaledDotProductAttention(block_size=256 if not quick else 64).eval()
    plain = ScaledDotProductAttention().eval()

    def run_plain():
        with attention_backend("math"):
            plain(lq, lk, lv)

    run_blocked = lambda: blocked(lq, lk, lv)
    long_flops = 4.0 * s.heads * s.long_seq * s.long_seq * s.head_dim
    blocked_s, plain_s, ratio = paired(run_blocked, run_plain, max(3, s.repeats // 2))
    blocked_peak, plain_peak = peak_bytes(run_blocked), peak_bytes(run_plain)
    fast_peak = peak_bytes(lambda: plain(lq, lk, lv))
    rows.append(Row(f"blocked attention, 1 x {s.heads} heads x {s.long_seq} x {s.head_dim}: time", blocked_s * 1e3, "plain (math) path",
                    plain_s * 1e3, ratio, long_flops, "no slower than plain", ratio <= 1.0))
    rows.append(Row(f"blocked attention, T = {s.long_seq}: peak MiB", blocked_peak / 2**20, "plain (math) path",
                    plain_peak / 2**20, blocked_peak / plain_peak, 0.0, "<= 1/8 of plain",
                    blocked_peak <= plain_peak / 8, {"fast_path_peak_mib": fast_peak / 2**20}))

    # 6. the scaling sweep
    sweep = []
    for seq in s.sweep:
        sq, sk, sv = (rng.standard_normal((1, s.heads, seq, s.head_dim), dtype=np.float32) for _ in range(3))
        point = {"seq_len": seq}
        repeats = 3
        point["fast_ms"] = median_time(lambda: plain(sq, sk, sv), repeats) * 1e3
        point["blocked_ms"] = median_time(lambda: blocked(sq, sk, sv), repeats) * 1e3
        with attention_backend("math"):
            point["math_ms"] = median_time(lambda: plain(sq, sk, sv), repeats) * 1e3
            point["math_peak_mib"] = peak_bytes(lambda: plain(sq, sk, sv)) / 2**20
        point["fast_peak_mib"] = peak_bytes(lambda: plain(sq, sk, sv)) / 2**20
        point["blocked_peak_mib"] = peak_bytes(lambda: blocked(sq, sk, sv)) / 2**20
        if have_torch:
            tq, tk, tv = (torch.from_numpy(a) for a in (sq, sk, sv))
            point["pytorch_ms"] = median_time(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv),
                                              repeats) * 1e3
        sweep.append(point)

    if quick:  # the targets are set for the full sizes; at smoke-test sizes they mean nothing
        for row in rows:
            row.met = None
    return {"quick": quick, "machine": _machine(peak), "sweep_heads": s.heads, "sweep_head_dim": s.head_dim,
            "rows": [row.__dict__ for row in rows], "sweep": sweep}


def format_table(result: dict) -> str:
    peak = result["machine"]["matmul_gflops"]
    header = (f"{'workload':<60} {'ours ms':>9} {'ref ms':>9} {'ratio':>6} {'GFLOP/s':>8} {'of peak':>8}  "
              f"{'target':<32} {'met':<3}  reference")
    lines = [header, "-" * len(header)]
    for row in result["rows"]:
        is_memory = "MiB" in row["workload"]
        gflops = "" if is_memory else f"{row['flops'] / (row['ours_ms'] / 1e3) / 1e9:8.1f}"
        fraction = "" if is_memory else f"{row['flops'] / (row['ours_ms'] / 1e3) / 1e9 / peak:8.0%}"
        reference = "" if row["reference_ms"] is None else f"{row['reference_ms']:9.2f}"
        ratio = "" if row["ratio"] is None else f"{row['ratio']:6.2f}"
        met = {True: "yes", False: "NO", None: ""}[row["met"]]
        lines.append(f"{row['workload']:<60} {row['ours_ms']:9.2f} {reference:>9} {ratio:>6} {gflops:>8} "
                     f"{fraction:>8}  {row['target']:<32} {met:<3}  {row['reference']}")
    machine = result["machine"]
    lines.append("")
    lines.append(f"machine: {machine['cpu']}, {machine['cores']} cores, numpy {machine['numpy']} ({machine['blas']}), "
                 + (f"PyTorch {machine['torch']} ({machine['torch_threads']} threads), " if "torch" in machine
                    else "PyTorch not installed, ")
                 + f"float32 matmul peak {peak:.0f} GFLOP/s")
    lines.append("ratios are medians of per-run ratios, the two sides run alternately; memory from tracemalloc")
    lines.append("")
    columns = [key for key in result["sweep"][0] if key != "seq_len"]
    lines.append(f"sweep, T = sequence length, 1 x {result['sweep_heads']} heads x T x {result['sweep_head_dim']}")
    lines.append(f"{'T':>6} " + " ".join(f"{key:>16}" for key in columns))
    for point in result["sweep"]:
        lines.append(f"{point['seq_len']:>6} " + " ".join(f"{point[key]:16.2f}" for key in columns))
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
                    run["cliff_ratio"][name] = paired(long, lambda: [short() for _ in range(4)], 11)[2]
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
