"""Part 10d, `kv_cache_capacity`: how many tokens of KV cache fit on an accelerator after the weights.

Every case is worked out by hand below it and checks the whole report. Each one leaves a
remainder in both divisions (tokens, and the longest context or the largest batch), so that a
rounding up shows, and each has fewer kv heads than layers or a number of bytes other than 1, so
that a factor left out shows.
"""
import pytest

from tinytorch.core.attention import kv_cache_capacity

GRADES = pytest.mark.grades("test-serving-memory")
GIB = 2**30


@GRADES
def test_the_worked_toy_model():
    # 2 x 2 layers x 4 kv heads x 8 x 2 bytes = 256 bytes a token; 100,000 parameters x 2 bytes = 200,000;
    # 1,048,576 - 200,000 = 848,576 bytes, 3,314.75 tokens: 3,314; 4 sequences of 828; 3 of 1,000.
    report = kv_cache_capacity(2**20, 100_000, num_layers=2, num_kv_heads=4, head_dim=8, batch_size=4,
                               context_length=1000)
    assert report == {"bytes_per_token": 256, "weight_bytes": 200_000, "cache_bytes": 848_576, "max_tokens": 3314,
                      "longest_context": 828, "largest_batch": 3}, f"the worked toy model: got {report}"


@GRADES
def test_a_llama_2_7b_like_model_on_24_gib():
    # 2 x 32 x 32 x 128 x 2 = 524,288 bytes (512 KiB) a token; 6,738,415,616 x 2 = 13,476,831,232 bytes of
    # weights; 24 GiB = 25,769,803,776 leaves 12,292,972,544 bytes: 23,446.98 tokens, so 23,446;
    # 4 sequences of 5,861; 5 sequences of 4,096.
    report = kv_cache_capacity(24 * GIB, 6_738_415_616, num_layers=32, num_kv_heads=32, head_dim=128, batch_size=4,
                               context_length=4096)
    assert report == {"bytes_per_token": 524_288, "weight_bytes": 13_476_831_232, "cache_bytes": 12_292_972_544,
                      "max_tokens": 23_446, "longest_context": 5_861, "largest_batch": 5}, f"got {report}"
    # On a 12 GiB card (12,884,901,888 bytes) the 13.5 GB of weights do not even fit: no cache at all.
    small = kv_cache_capacity(12 * GIB, 6_738_415_616, num_layers=32, num_kv_heads=32, head_dim=128, context_length=4096)
    assert (small["cache_bytes"], small["max_tokens"], small["largest_batch"]) == (0, 0, 0), f"12 GiB: got {small}"


@GRADES
def test_a_llama_3_8b_like_model_on_80_gib():
    # 2 x 32 x 8 x 128 x 2 = 131,072 bytes (128 KiB) a token; 8,030,261,248 x 2 = 16,060,522,496 bytes;
    # 80 GiB = 85,899,345,920 leaves 69,838,823,424 bytes: 532,827.9 tokens; 3 sequences of 177,609;
    # 65 sequences of 8,192.
    report = kv_cache_capacity(80 * GIB, 8_030_261_248, num_layers=32, num_kv_heads=8, head_dim=128, batch_size=3,
                               context_length=8192)
    assert report == {"bytes_per_token": 131_072, "weight_bytes": 16_060_522_496, "cache_bytes": 69_838_823_424,
                      "max_tokens": 532_827, "longest_context": 177_609, "largest_batch": 65}, f"got {report}"
    # On a 12 GiB card the 16.1 GB of weights do not fit: no cache at all.
    small = kv_cache_capacity(12 * GIB, 8_030_261_248, num_layers=32, num_kv_heads=8, head_dim=128, context_length=8192)
    assert (small["cache_bytes"], small["max_tokens"], small["largest_batch"]) == (0, 0, 0), f"12 GiB: got {small}"


@GRADES
def test_float32_and_weights_that_fill_the_card():
    # fp32: 2 x 3 x 2 x 16 x 4 = 768 bytes a token; 1,000 parameters x 4 = 4,000 bytes; 1,000,000 bytes leave
    # 996,000: 1,296.9 tokens; 7 sequences of 185; 12 of 100.
    report = kv_cache_capacity(1_000_000, 1_000, num_layers=3, num_kv_heads=2, head_dim=16, bytes_per_number=4,
                               batch_size=7, context_length=100)
    assert report == {"bytes_per_token": 768, "weight_bytes": 4_000, "cache_bytes": 996_000, "max_tokens": 1296,
                      "longest_context": 185, "largest_batch": 12}, f"got {report}"
    # 600,000,000 fp16 parameters are 1.2 GB: on 1 GB nothing is left for the cache.
    full = kv_cache_capacity(10**9, 600_000_000, num_layers=2, num_kv_heads=1, head_dim=4, context_length=8)
    assert (full["cache_bytes"], full["max_tokens"], full["longest_context"], full["largest_batch"]) == (0, 0, 0, 0), \
        f"weights larger than the card leave no cache: got {full}"


# ---------------------------------------------------------------- not graded: the provided checks
@pytest.mark.parametrize("name, kwargs", [("num_layers", {"num_layers": 0}), ("batch_size", {"batch_size": 0}),
                                          ("context_length", {"context_length": 0}),
                                          ("bytes_per_number", {"bytes_per_number": 0})])
def test_sizes_below_their_minimum_raise(name, kwargs):
    arguments = dict(memory_bytes=GIB, num_parameters=1, num_layers=1, num_kv_heads=1, head_dim=1)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=f"{name} must be >= 1"):
        kv_cache_capacity(**arguments)


def test_non_integers_raise():
    with pytest.raises(TypeError, match="num_parameters must be an integer, got float 6700000000.0"):
        kv_cache_capacity(GIB, 6.7e9, num_layers=32, num_kv_heads=32, head_dim=128)


def test_without_a_context_there_is_no_batch():
    assert kv_cache_capacity(GIB, 0, num_layers=1, num_kv_heads=1, head_dim=1)["largest_batch"] is None
