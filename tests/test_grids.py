"""Block grids: bit-exact pack/unpack and dequantization against gguf-py and ggml itself."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gq
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.errors import UsageError
from quantizers import ggml, grids, rtn
from quantizers.grids import GRIDS, BlockFields, pack, unpack
from quantizers.tensor import QuantizedTensor, row_bytes

LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
# measured worst cases on these matrices (outlier columns x20) are ~70% of these bounds
MAX_REL_RMSE = {T.Q8_0: 0.02, T.Q4_0: 0.25, T.Q4_1: 0.2, T.Q5_0: 0.15, T.Q5_1: 0.1, T.Q4_K: 0.17,
                T.Q5_K: 0.09, T.Q6_K: 0.06, T.IQ4_NL: 0.2, T.IQ4_XS: 0.2, T.Q3_K: 0.3, T.Q2_K: 0.7}


def weights(seed: int, rows: int, cols: int, spread: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(1e-3, spread, (rows, 1)).astype(np.float32)
    w[:, rng.integers(0, cols, 3)] *= 20  # outlier columns, as real weights have
    w[0, :32] = 0.0                       # an all-zero block
    return w


matrices = st.builds(weights, st.integers(0, 2**32 - 1), st.integers(1, 6), st.sampled_from([256, 512, 768]),
                     st.floats(1e-2, 10.0))


@pytest.mark.parametrize("t", LEGACY, ids=lambda t: t.name)
@settings(max_examples=15, deadline=None)
@given(w=matrices)
def test_legacy_bytes_equal_gguf_py(t, w):
    assert np.array_equal(ggml.quantize_rows(int(t), w), gq.quantize(w, t))


@pytest.mark.parametrize("t", list(GRIDS), ids=lambda t: t.name)
@settings(max_examples=15, deadline=None)
@given(w=matrices)
def test_unpack_pack_roundtrip_and_dequantize(t, w):
    g = GRIDS[t]
    raw = ggml.quantize_rows(int(t), w)
    f = unpack(g, raw, w.shape[1])
    assert f.codes.shape == w.shape and f.codes.max() < len(g.levels)
    assert np.array_equal(pack(f), raw)
    ours = grids.dequantize_fields(f)
    # bit-identical to gguf-py's decoder and to ggml's own to_float
    assert np.array_equal(ours.view(np.uint32), gq.dequantize(raw, t).reshape(w.shape).view(np.uint32))
    assert np.array_equal(ours, ggml.dequantize_rows(int(t), raw, w.shape[1]))
    # error bounds: legacy grids cover each block's range (error <= one step, plus f16 rounding of the
    # scale); every grid keeps the relative RMS error within what its bit width allows
    if t in LEGACY:
        scale, _ = f.scale_offset()
        step = np.repeat(np.abs(scale), g.sub, axis=1) * np.diff(g.levels).max()
        assert np.all(np.abs(ours - w) <= 1.01 * step + 1e-6 * np.abs(w).max())
    assert np.sqrt(((ours - w) ** 2).mean() / (w ** 2).mean()) <= MAX_REL_RMSE[t]


@pytest.mark.parametrize("t", list(GRIDS), ids=lambda t: t.name)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_arbitrary_codes_pack_to_what_gguf_decodes(t, seed):
    """A quantizer that picks its own codes (GPTQ) gets exactly scale*level - offset from the runtime."""
    g = GRIDS[t]
    rng = np.random.default_rng(seed)
    base = unpack(g, ggml.quantize_rows(int(t), weights(seed, 3, 512, 2.0)), 512)
    codes = rng.integers(0, len(g.levels), base.codes.shape).astype(np.uint8)
    f = BlockFields(g, codes, base.params)
    raw = pack(f)
    assert np.array_equal(unpack(g, raw, 512).codes, codes)
    expect = grids.dequantize_fields(f)
    assert np.array_equal(gq.dequantize(raw, t).reshape(expect.shape), expect)
    scale, offset = f.scale_offset()
    assert np.array_equal(g.nearest_codes(expect, scale, offset)[scale.repeat(g.sub, 1) != 0],
                          codes[scale.repeat(g.sub, 1) != 0])


def test_imatrix_changes_k_quant_choice_toward_important_columns():
    w = weights(1, 16, 512, 1.0)
    imp = np.ones(512, dtype=np.float32)
    imp[:64] = 100.0
    plain = rtn.quantize("w", w, T.Q4_K).dequantize()
    weighted = rtn.quantize("w", w, T.Q4_K, importance=imp).dequantize()
    err = lambda d: float((((d - w) ** 2)[:, :64]).mean())
    assert err(weighted) < err(plain)


@pytest.mark.parametrize("t", [T.F32, T.F16, T.BF16])
def test_float_passthrough(t):
    w = weights(2, 4, 256, 1.0)
    qt = rtn.quantize("w", w, t)
    tol = {T.F32: 0, T.F16: 1e-3, T.BF16: 8e-3}[t]
    assert np.allclose(qt.dequantize(), w, rtol=tol, atol=1e-6)
    if t == T.BF16:  # same rounding as ggml / torch
        import torch
        ref = torch.from_numpy(w).to(torch.bfloat16).to(torch.float32).numpy()
        assert np.array_equal(qt.dequantize(), ref)


def test_quantized_tensor_fields_roundtrip():
    w = weights(3, 8, 256, 1.0)
    qt = rtn.quantize("w", w, T.Q6_K)
    again = QuantizedTensor.from_fields("w", qt.fields())
    assert np.array_equal(again.data, qt.data)
    assert np.array_equal(again.dequantize(), qt.dequantize())


INT_TYPES = [grids.IntType(4, 32), grids.IntType(4, 128), grids.IntType(4, 64, sym=True), grids.IntType(8, 128),
             grids.IntType(8, 16, sym=True), grids.IntType(4, 0), grids.IntType(8, 0, sym=True)]


@pytest.mark.parametrize("t", INT_TYPES, ids=lambda t: t.name)
@settings(max_examples=15, deadline=None)
@given(w=matrices)
def test_int_grid_roundtrip_and_error_bound(t, w):
    q = rtn.quantize("w", w, t)
    group = t.group_for(w.shape[1])   # per-channel: the whole row (256, 512 or 768 columns here)
    assert q.data.shape == (w.shape[0], w.shape[1] // group * (2 + 1 + group * t.bits // 8))
    assert q.data.shape[1] == row_bytes(t, w.shape[1])
    f = q.fields()
    assert np.array_equal(QuantizedTensor.from_fields("w", f).data, q.data)
    d, z = f.params["d"], f.params["z"]
    assert d.shape == z.shape == (w.shape[0], w.shape[1] // group)
    if t.sym:
        assert np.all(z == t.zero)
    # the value is MatMulNBits' (q - zero_point) * scale, computed in float32
    assert d.dtype == np.float16
    expect = (f.codes.reshape(*d.shape, -1).astype(np.float32) - z[..., None]) * d.astype(np.float32)[..., None]
    assert np.array_equal(q.dequantize(), expect.reshape(w.shape))
    # every value lies within half a step of a grid point, except where the clip search clipped it
    step = np.repeat(d.astype(np.float32), group, axis=1)
    lo, hi = (0 - np.repeat(z, group, axis=1)) * step, ((1 << t.bits) - 1 - np.repeat(z, group, axis=1)) * step
    inside = (w >= lo) & (w <= hi)
    assert np.all(np.abs(q.dequantize() - w)[inside] <= 0.5001 * step[inside] + 1e-7)


def test_int4_packing_is_matmulnbits_order():
    """Two codes per byte, element 2i in the low nibble; blocks laid out [rows, n_blocks, blob]."""
    t = grids.IntType(4, 32)
    codes = np.arange(64, dtype=np.uint8).reshape(1, 64) % 16
    f = BlockFields(grids.grid(t), codes, {"d": np.array([[1.0, 2.0]], np.float16),
                                           "z": np.array([[8, 3]], np.uint8)})
    raw = pack(f).reshape(2, -1)
    assert raw.shape == (2, 2 + 1 + 16)
    assert raw[0, 3] == (0 | 1 << 4) and raw[0, 4] == (2 | 3 << 4) and raw[1, 2] == 3
    assert np.array_equal(raw[1, :2].view(np.float16), [2.0])
    assert np.array_equal(unpack(f.grid, pack(f), 64).codes, codes)


def test_int_type_names():
    assert grids.parse_type("int4_g128") == grids.IntType(4, 128)
    assert grids.parse_type("INT8_G32_SYM") == grids.IntType(8, 32, sym=True)
    assert grids.parse_type("int4_pc") == grids.IntType(4, 0) and grids.IntType(4, 0).per_channel
    assert grids.parse_type("INT8_PC_SYM") == grids.IntType(8, grids.PER_CHANNEL, sym=True)
    assert grids.parse_type("Q4_K") == T.Q4_K
    with pytest.raises(ValueError):
        grids.IntType(4, 100)
    for bad in ("INT4_G0", "INT4_PC128", "INT4_SYM_PC", "INT6_PC"):  # per-channel has one spelling: PC
        with pytest.raises(UsageError):
            grids.parse_type(bad)
    with pytest.raises(UsageError):
        grids.parse_type("Q4_Z")


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([4, 8]), group=st.sampled_from([0, 16, 32, 64, 128, 256]), sym=st.booleans())
def test_int_type_name_round_trip(bits, group, sym):
    t = grids.IntType(bits, group, sym)
    assert grids.parse_type(t.name) == t and grids.parse_type(t.name.lower()) == t
    assert ("_PC" in t.name) == t.per_channel and t.name.endswith("_SYM") == sym


def test_per_channel_geometry_follows_the_row():
    """group_for: the row length for per-channel grids (any K a whole number of bytes), the group otherwise."""
    pc4, pc8, g64 = grids.IntType(4, 0), grids.IntType(8, 0, sym=True), grids.IntType(4, 64)
    assert [pc4.group_for(k) for k in (896, 4864, 768)] == [896, 4864, 768]
    assert pc8.group_for(895) == 895 and g64.group_for(896) == 64
    assert grids.grid(pc4, 896).block == grids.grid(pc4, 896).sub == 896
    assert row_bytes(pc4, 896) == 2 + 1 + 448 and row_bytes(pc8, 895) == 2 + 1 + 895
    assert row_bytes(g64, 896) == 14 * (2 + 1 + 32)
    with pytest.raises(ValueError, match="whole bytes"):
        pc4.group_for(895)           # two 4-bit codes per byte: an odd row would share its last byte
    with pytest.raises(ValueError, match="multiple"):
        g64.group_for(100)
    with pytest.raises(ValueError, match="row length"):
        grids.grid(pc4)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 6), k=st.sampled_from([16, 32, 64, 128, 256]),
       bits=st.sampled_from([4, 8]), sym=st.booleans(), weighted=st.booleans())
def test_per_channel_equals_the_group_of_the_row_length(seed, rows, k, bits, sym, weighted):
    """On rows whose length K is itself a valid group, INTb_PC is INTb_GK: the same bytes, the same values."""
    w = weights(seed, rows, k, 3.0)
    imp = np.random.default_rng(seed).uniform(0, 4, k).astype(np.float32) if weighted else None
    pc = rtn.quantize("w", w, grids.IntType(bits, 0, sym), importance=imp)
    gk = rtn.quantize("w", w, grids.IntType(bits, k, sym), importance=imp)
    assert np.array_equal(pc.data, gk.data)
    assert np.array_equal(pc.dequantize(), gk.dequantize())
    assert pc.type.per_channel and pc.fields().params["d"].shape == (rows, 1)


@pytest.mark.parametrize("k", [32, 128, 256])
@pytest.mark.parametrize("act_order", [False, True], ids=["sweep", "act-order"])
def test_per_channel_gptq_equals_the_group_of_the_row_length(k, act_order):
    """GPTQ on INT4_PC fixes one scale per row before the sweep; on rows of a valid group length it makes
    exactly GPTQ-on-INT4_GK's choices (same lazy-batch width, so the same float arithmetic)."""
    from quantizers.gptq import gptq
    rng = np.random.default_rng(k)
    x = rng.standard_normal((512, k)).astype(np.float32) @ rng.standard_normal((k, k)).astype(np.float32)
    h = x.T @ x / len(x)
    w = weights(k, 24, k, 1.0)
    for sym in (False, True):
        pc = gptq("w", w, h, grids.IntType(4, 0, sym), block_size=max(128, k), act_order=act_order)
        gk = gptq("w", w, h, grids.IntType(4, k, sym), block_size=max(128, k), act_order=act_order)
        assert np.array_equal(pc.data, gk.data)
        assert not np.array_equal(pc.data, rtn.quantize("w", w, grids.IntType(4, 0, sym)).data)
