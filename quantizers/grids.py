"""Target grids: every GGUF block format as *codes + per-block scales/offsets*, with exact pack/unpack.

A weight ``w`` on a block grid is ``scale[sub] * levels[code] - offset[sub]`` where ``sub`` is the
sub-block (the unit that owns one scale) a column falls in. That single form covers all formats here:

=========  =====  ====  ================================================  ==========================
type       block  sub   scale                                             offset
=========  =====  ====  ================================================  ==========================
Q8_0        32    32    d                                                 0
Q4_0/Q5_0   32    32    d            (levels centred: q-8, q-16)          0
Q4_1/Q5_1   32    32    d                                                 -m
Q4_K/Q5_K   256   32    d * sc_j     (6-bit sc_j, packed in 12 bytes)     dmin * m_j
Q6_K        256   16    d * sc_j     (int8 sc_j; levels q-32)             0
Q3_K        256   16    d * (sc_j-32) (6-bit sc_j in 12 bytes; q-4)       0
Q2_K        256   16    d * sc_j     (4-bit sc_j)                         dmin * m_j (4-bit m_j)
IQ4_NL      32    32    d            (levels: the non-linear iq4 table)   0
IQ4_XS      256   32    d * (ls_j-32)                                     0
INTb_Gg      g     g    d            (levels 0..2^b-1; value (q - z) * d)  d * z
INTb_PC      K     K    d            (per channel: one block per row)      d * z
=========  =====  ====  ================================================  ==========================

``INTb_Gg[_SYM]`` (:class:`IntType`) is the plain grouped integer format of onnxruntime's
``MatMulNBits`` and OpenVINO's compressed weights: per group of ``g`` input columns a float16 scale
``d`` (what AWQ/GPTQ checkpoints and OpenVINO store; exact in a float32 graph too) and a ``b``-bit zero
point ``z`` (fixed at ``2^(b-1)`` when symmetric); ``INTb_PC[_SYM]`` is the per-channel form, one
group per output row of ``K`` columns. Its block layout is
``(d, z, qs)`` with the codes packed as MatMulNBits stores them (two per byte, low nibble first).

The float arithmetic follows ggml's ``dequantize_row_*`` operation for operation (float32 products in
the same order), so :func:`dequantize_fields` is bit-identical to what llama.cpp computes. Byte layouts
mirror ``ggml-common.h``; ``unpack(pack(f)) == f`` and ``pack(unpack(b)) == b`` (tested).

Calibrated quantizers (GPTQ/AWQ) keep a block's parameters fixed and choose codes with
:meth:`Grid.nearest_codes`, then :func:`pack` — the runtime executes exactly those values.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Union

import numpy as np
from gguf import GGMLQuantizationType as T

from qcompile.errors import UsageError

IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)
_F16 = np.dtype("<f2")


PER_CHANNEL = 0  # IntType.group of a per-channel grid: one scale (and zero point) per output row


@dataclass(frozen=True)
class IntType:
    """Integer quantization (the ONNX / OpenVINO weight format): ``bits``, ``group`` columns per scale,
    asymmetric (per-group zero point) unless ``sym``.

    ``group == PER_CHANNEL`` (0) is per-channel quantization: one scale and zero point per output row,
    over the whole row whatever its length (NNCF's ``group_size=-1``). Its geometry depends on the
    tensor, so code that needs the block length asks :meth:`group_for` with the row length.
    """
    bits: int
    group: int
    sym: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"integer grids are 4- or 8-bit, not {self.bits}")
        if self.group != PER_CHANNEL and (self.group < 16 or self.group > 256 or self.group & (self.group - 1)):
            raise ValueError(f"group size must be a power of two in 16..256 (or per-channel), not {self.group}")

    @property
    def per_channel(self) -> bool:
        return self.group == PER_CHANNEL

    @property
    def name(self) -> str:
        size = "PC" if self.per_channel else f"G{self.group}"
        return f"INT{self.bits}_{size}{'_SYM' if self.sym else ''}"

    @property
    def zero(self) -> int:
        """The fixed zero point of the symmetric form (MatMulNBits' default when none is stored)."""
        return 1 << (self.bits - 1)

    def group_for(self, cols: int) -> int:
        """Columns per scale in rows of ``cols`` values: ``cols`` itself when per-channel, else ``group``.
        Raises ValueError when such rows cannot be stored on this grid."""
        if self.per_channel:
            # a 4-bit row is stored as whole bytes (two codes per byte), like every group
            if cols < 1 or cols * self.bits % 8:
                raise ValueError(f"{self.name}: rows of {cols} columns do not fill whole bytes")
            return cols
        if cols % self.group:
            raise ValueError(f"{cols} columns is not a multiple of {self.name}'s group size {self.group}")
        return self.group

    @classmethod
    def parse(cls, name: str) -> "IntType":
        m = re.fullmatch(r"INT([48])_(?:G(\d+)|(PC))(_SYM)?", name.upper())
        # per-channel is spelled PC, not G0: one name per grid, so names round-trip
        if not m or (m.group(2) is not None and int(m.group(2)) == PER_CHANNEL):
            raise UsageError(f"not an integer grid name: {name!r} (expected e.g. INT4_G128, INT8_G32_SYM or "
                           "INT4_PC for per-channel)")
        return cls(int(m.group(1)), PER_CHANNEL if m.group(3) else int(m.group(2)), bool(m.group(4)))


Target = Union[T, IntType]


def parse_type(name: str) -> Target:
    """A target type by name: a GGML type (``Q4_K``) or an integer grid (``INT4_G128``); :class:`UsageError`
    for neither."""
    if name.upper().startswith("INT"):
        return IntType.parse(name)
    try:
        return T[name.upper()]
    except KeyError:
        raise UsageError(f"unknown quantization type {name!r} (a GGML type such as Q4_K, or an integer grid "
                         "such as INT4_G128)") from None


@dataclass(frozen=True)
class Grid:
    """A block quantization format: geometry, the level table, and its byte layout."""
    type: Target
    block: int                 # values per block (row length must be a multiple)
    sub: int                   # values per scale
    levels: np.ndarray = field(repr=False)  # float32 value of each code
    layout: np.dtype = field(repr=False)    # numpy structured dtype of one block

    @property
    def name(self) -> str:
        return self.type.name

    @property
    def bytes_per_block(self) -> int:
        return self.layout.itemsize

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes_per_block / self.block

    def nearest_codes(self, w: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """Codes whose values ``scale*level - offset`` are nearest to ``w`` (per sub-block scale/offset).

        ``w`` is [rows, cols]; ``scale``/``offset`` are [rows, cols // sub].
        """
        s = np.repeat(scale, self.sub, axis=1)
        o = np.repeat(offset, self.sub, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(s != 0, (w + o) / s, 0.0)
        lv = self.levels
        idx = np.clip(np.searchsorted((lv[1:] + lv[:-1]) / 2, t), 0, len(lv) - 1)
        return idx.astype(np.uint8)


@dataclass
class BlockFields:
    """An unpacked block-quantized matrix: codes plus the raw stored block parameters."""
    grid: Grid
    codes: np.ndarray                 # uint8 [rows, cols], index into grid.levels
    params: dict[str, np.ndarray]     # stored per-block parameters (f16 d/dmin, int sub-scales/mins)

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def scale_offset(self) -> tuple[np.ndarray, np.ndarray]:
        """Float32 (scale, offset) per sub-block, [rows, cols // sub]."""
        if isinstance(self.grid.type, IntType):
            return _so_int(self.params)
        return _SCALE_OFFSET[self.grid.type](self.params)


def _u(n: int) -> tuple:
    return ("u1", (n,))


def _dt(*fields) -> np.dtype:
    return np.dtype(list(fields))


GRIDS: dict[T, Grid] = {
    T.Q8_0: Grid(T.Q8_0, 32, 32, np.arange(-128, 128, dtype=np.float32), _dt(("d", _F16), ("qs", "i1", (32,)))),
    T.Q4_0: Grid(T.Q4_0, 32, 32, np.arange(-8, 8, dtype=np.float32), _dt(("d", _F16), ("qs", *_u(16)))),
    T.Q4_1: Grid(T.Q4_1, 32, 32, np.arange(16, dtype=np.float32), _dt(("d", _F16), ("m", _F16), ("qs", *_u(16)))),
    T.Q5_0: Grid(T.Q5_0, 32, 32, np.arange(-16, 16, dtype=np.float32),
                 _dt(("d", _F16), ("qh", "<u4"), ("qs", *_u(16)))),
    T.Q5_1: Grid(T.Q5_1, 32, 32, np.arange(32, dtype=np.float32),
                 _dt(("d", _F16), ("m", _F16), ("qh", "<u4"), ("qs", *_u(16)))),
    T.Q4_K: Grid(T.Q4_K, 256, 32, np.arange(16, dtype=np.float32),
                 _dt(("d", _F16), ("dmin", _F16), ("scales", *_u(12)), ("qs", *_u(128)))),
    T.Q5_K: Grid(T.Q5_K, 256, 32, np.arange(32, dtype=np.float32),
                 _dt(("d", _F16), ("dmin", _F16), ("scales", *_u(12)), ("qh", *_u(32)), ("qs", *_u(128)))),
    T.Q6_K: Grid(T.Q6_K, 256, 16, np.arange(-32, 32, dtype=np.float32),
                 _dt(("ql", *_u(128)), ("qh", *_u(64)), ("scales", "i1", (16,)), ("d", _F16))),
    T.Q3_K: Grid(T.Q3_K, 256, 16, np.arange(-4, 4, dtype=np.float32),
                 _dt(("hmask", *_u(32)), ("qs", *_u(64)), ("scales", *_u(12)), ("d", _F16))),
    T.Q2_K: Grid(T.Q2_K, 256, 16, np.arange(4, dtype=np.float32),
                 _dt(("scales", *_u(16)), ("qs", *_u(64)), ("d", _F16), ("dmin", _F16))),
    T.IQ4_NL: Grid(T.IQ4_NL, 32, 32, IQ4_LEVELS, _dt(("d", _F16), ("qs", *_u(16)))),
    T.IQ4_XS: Grid(T.IQ4_XS, 256, 32, IQ4_LEVELS,
                   _dt(("d", _F16), ("scales_h", "<u2"), ("scales_l", *_u(4)), ("qs", *_u(128)))),
}


@lru_cache(maxsize=None)
def _int_grid(t: IntType, group: int) -> Grid:
    layout = _dt(("d", _F16), ("z", "u1"), ("qs", *_u(group * t.bits // 8)))
    return Grid(t, group, group, np.arange(1 << t.bits, dtype=np.float32), layout)


def grid(t: Target | str, cols: int | None = None) -> Grid:
    """Look up a block grid by type or name (``"Q4_K"``, ``"INT4_G128"``). A per-channel grid's block is
    the whole row, so it needs the row length ``cols``; every other grid ignores it.

    Per-channel rows are stored as one ``(d, z, qs)`` block each, the very layout (and bytes) of a grouped
    grid whose group is the row length."""
    if isinstance(t, str):
        t = parse_type(t)
    if isinstance(t, IntType):
        if t.per_channel and cols is None:
            raise ValueError(f"{t.name}: a per-channel grid's geometry needs the row length")
        return _int_grid(t, t.group if cols is None else t.group_for(cols))
    key = T(t)
    if key not in GRIDS:
        raise KeyError(f"no block grid for {key.name}; known: {', '.join(g.name for g in GRIDS.values())}")
    return GRIDS[key]


# ---- nibble / bit helpers (vectorised over [nblocks, ...]) -------------------------------------

def _split_halves(q: np.ndarray) -> np.ndarray:
    """[n, 32] codes -> [n, 16] bytes: low nibble = first 16 values, high nibble = last 16 (Q4_0 order)."""
    return (q[:, :16] & 0xF) | ((q[:, 16:32] & 0xF) << 4)


def _join_halves(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def _k_scales_pack(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> ggml's 12-byte ``scales`` (see get_scale_min_k4)."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    return out


def _k_scales_unpack(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.empty((s.shape[0], 8), dtype=np.uint8)
    mn = np.empty_like(sc)
    sc[:, 0:4] = s[:, 0:4] & 63
    mn[:, 0:4] = s[:, 4:8] & 63
    sc[:, 4:8] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:8] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def _pack_bits(bits: np.ndarray) -> np.ndarray:
    """[n, 32] of 0/1 -> little-endian uint32 with bit j = bits[:, j]."""
    return (bits.astype(np.uint32) << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)


def _unpack_bits(word: np.ndarray) -> np.ndarray:
    return ((word[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


# ---- per-type codecs: blocks [n] structured <-> (codes [n, block], params) ------------------------

def _codec_q8_0(b):
    return (b["qs"].astype(np.int16) + 128).astype(np.uint8), {"d": b["d"]}


def _encode_q8_0(b, q, p):
    b["d"] = p["d"]
    b["qs"] = (q.astype(np.int16) - 128).astype(np.int8)


def _codec_q4(b):
    params = {"d": b["d"]}
    if "m" in b.dtype.names:
        params["m"] = b["m"]
    return _join_halves(b["qs"]), params


def _encode_q4(b, q, p):
    for k, v in p.items():
        b[k] = v
    b["qs"] = _split_halves(q)


def _codec_q5(b):
    low = _join_halves(b["qs"])
    high = _unpack_bits(b["qh"])
    params = {"d": b["d"]}
    if "m" in b.dtype.names:
        params["m"] = b["m"]
    return low | (high << 4), params


def _encode_q5(b, q, p):
    for k, v in p.items():
        b[k] = v
    b["qs"] = _split_halves(q)
    b["qh"] = _pack_bits(q >> 4)


def _codec_q4_k(b):
    sc, mn = _k_scales_unpack(b["scales"])
    qs = b["qs"].reshape(-1, 4, 32)
    q = np.stack([qs & 0xF, qs >> 4], axis=2).reshape(-1, 256)  # chunk j: 32 low nibbles, then 32 high
    return q, {"d": b["d"], "dmin": b["dmin"], "sc": sc, "mn": mn}


def _encode_q4_k(b, q, p):
    b["d"], b["dmin"] = p["d"], p["dmin"]
    b["scales"] = _k_scales_pack(p["sc"], p["mn"])
    q4 = q.reshape(-1, 4, 2, 32)
    b["qs"] = ((q4[:, :, 0] & 0xF) | ((q4[:, :, 1] & 0xF) << 4)).reshape(-1, 128)


def _codec_q5_k(b):
    q, p = _codec_q4_k(b)
    # qh[l] bit 2j -> value 64j+l, bit 2j+1 -> value 64j+32+l
    bits = (b["qh"][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [n, 8, 32]
    return q | (bits.reshape(-1, 256) << 4), p


def _encode_q5_k(b, q, p):
    _encode_q4_k(b, q & 0xF, p)
    hb = (q >> 4).reshape(-1, 8, 32).astype(np.uint8)
    b["qh"] = (hb << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)


def _codec_q6_k(b):
    ql = b["ql"].reshape(-1, 2, 2, 32)            # [n, half, ql-offset(0/32), l]
    qh = b["qh"].reshape(-1, 2, 32)               # [n, half, l]
    q = np.empty((b.shape[0], 2, 4, 32), dtype=np.uint8)
    for k in range(4):
        nib = ql[:, :, k % 2] & 0xF if k < 2 else ql[:, :, k % 2] >> 4
        q[:, :, k] = nib | (((qh >> (2 * k)) & 3) << 4)
    return q.reshape(-1, 256), {"d": b["d"], "sc": b["scales"]}


def _encode_q6_k(b, q, p):
    q4 = q.reshape(-1, 2, 4, 32)
    ql = np.empty((q.shape[0], 2, 2, 32), dtype=np.uint8)
    ql[:, :, 0] = (q4[:, :, 0] & 0xF) | ((q4[:, :, 2] & 0xF) << 4)
    ql[:, :, 1] = (q4[:, :, 1] & 0xF) | ((q4[:, :, 3] & 0xF) << 4)
    qh = np.zeros((q.shape[0], 2, 32), dtype=np.uint8)
    for k in range(4):
        qh |= ((q4[:, :, k] >> 4) & 3) << (2 * k)
    b["ql"], b["qh"] = ql.reshape(-1, 128), qh.reshape(-1, 64)
    b["scales"], b["d"] = p["sc"], p["d"]


# Q2_K / Q3_K: value v of a super-block sits in half h = v // 128, pass j = v % 128 // 32 and lane l = v % 32;
# its low two bits are bits 2j..2j+1 of qs[32h + l] (dequantize_row_q2_K/q3_K walk qs that way), and for
# Q3_K its third bit is bit 4h + j of hmask[l] (set: the code as is; clear: 4 less, which is the
# centring of the levels -4..3)
_SHIFTS = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]


def _low2_unpack(qs: np.ndarray) -> np.ndarray:
    return ((qs.reshape(-1, 2, 1, 32) >> _SHIFTS) & 3).reshape(-1, 256)


def _low2_pack(q: np.ndarray) -> np.ndarray:
    return ((q.reshape(-1, 2, 4, 32) & 3) << _SHIFTS).sum(axis=2, dtype=np.uint8).reshape(-1, 64)


_HBITS = np.arange(8, dtype=np.uint8).reshape(1, 2, 4, 1)  # hmask bit of (h, j)


def _codec_q3_k(b):
    low = _low2_unpack(b["qs"])
    high = ((b["hmask"][:, None, None, :] >> _HBITS) & 1).reshape(-1, 256)
    s = b["scales"]
    k = np.arange(16)
    lo4 = np.where(k < 8, s[:, k % 8] & 0xF, s[:, k % 8] >> 4)
    hi2 = (s[:, 8 + k % 4] >> (2 * (k // 4))) & 3
    return low | (high << 2), {"d": b["d"], "sc": (lo4 | (hi2 << 4)).astype(np.uint8)}


def _encode_q3_k(b, q, p):
    b["d"] = p["d"]
    b["qs"] = _low2_pack(q)
    b["hmask"] = (((q >> 2) & 1).reshape(-1, 2, 4, 32) << _HBITS).sum(axis=(1, 2), dtype=np.uint8)
    sc = p["sc"].astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, :8] = (sc[:, :8] & 0xF) | ((sc[:, 8:] & 0xF) << 4)
    for g in range(4):  # the top two bits of scales 4g..4g+3 in bits 2g, 2g+1 of bytes 8..11
        out[:, 8:12] |= ((sc[:, 4 * g:4 * g + 4] >> 4) & 3) << (2 * g)
    b["scales"] = out


def _codec_q2_k(b):
    s = b["scales"]
    return _low2_unpack(b["qs"]), {"d": b["d"], "dmin": b["dmin"], "sc": s & 0xF, "mn": s >> 4}


def _encode_q2_k(b, q, p):
    b["d"], b["dmin"] = p["d"], p["dmin"]
    b["scales"] = (p["sc"] & 0xF) | ((p["mn"] & 0xF) << 4)
    b["qs"] = _low2_pack(q)


def _codec_iq4_xs(b):
    qs = b["qs"].reshape(-1, 8, 16)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, 256)
    ib = np.arange(8)
    lo = (b["scales_l"][:, ib // 2] >> (4 * (ib % 2))) & 0xF
    hi = (b["scales_h"][:, None] >> (2 * ib)).astype(np.uint8) & 3
    return q, {"d": b["d"], "ls": (lo | (hi << 4)).astype(np.uint8)}


def _encode_iq4_xs(b, q, p):
    b["d"] = p["d"]
    ls = p["ls"].astype(np.uint16)
    b["scales_h"] = ((ls >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=1, dtype=np.uint16)
    lo = (ls & 0xF).astype(np.uint8)
    b["scales_l"] = lo[:, 0::2] | (lo[:, 1::2] << 4)
    q8 = q.reshape(-1, 8, 32)
    b["qs"] = ((q8[:, :, :16] & 0xF) | ((q8[:, :, 16:] & 0xF) << 4)).reshape(-1, 128)


def _int_codec(t: IntType):
    """(decode, encode) for an integer grid; 4-bit codes pack two per byte, element 2i in the low nibble."""
    def decode(b):
        qs = b["qs"]
        q = np.stack([qs & 0xF, qs >> 4], axis=2).reshape(qs.shape[0], -1) if t.bits == 4 else qs
        return q, {"d": b["d"], "z": b["z"]}

    def encode(b, q, p):
        b["d"], b["z"] = p["d"], p["z"]
        b["qs"] = (q[:, 0::2] & 0xF) | ((q[:, 1::2] & 0xF) << 4) if t.bits == 4 else q
    return decode, encode


_CODECS = {
    T.Q8_0: (_codec_q8_0, _encode_q8_0),
    T.Q4_0: (_codec_q4, _encode_q4), T.Q4_1: (_codec_q4, _encode_q4), T.IQ4_NL: (_codec_q4, _encode_q4),
    T.Q5_0: (_codec_q5, _encode_q5), T.Q5_1: (_codec_q5, _encode_q5),
    T.Q4_K: (_codec_q4_k, _encode_q4_k), T.Q5_K: (_codec_q5_k, _encode_q5_k),
    T.Q6_K: (_codec_q6_k, _encode_q6_k), T.IQ4_XS: (_codec_iq4_xs, _encode_iq4_xs),
    T.Q3_K: (_codec_q3_k, _encode_q3_k), T.Q2_K: (_codec_q2_k, _encode_q2_k),
}


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


def _so_plain(p):
    d = _f32(p["d"])
    return d, (-_f32(p["m"]) if "m" in p else np.zeros_like(d))


def _per_sub(d: np.ndarray, sub: np.ndarray) -> np.ndarray:
    """Broadcast a per-super-block f16 value [rows, nb] to its sub-blocks [rows, nb * k] as float32."""
    return np.repeat(_f32(d), sub.shape[1] // d.shape[1], axis=1)


def _so_k(p):
    return _per_sub(p["d"], p["sc"]) * _f32(p["sc"]), _per_sub(p["dmin"], p["mn"]) * _f32(p["mn"])


def _so_q6_k(p):
    s = _per_sub(p["d"], p["sc"]) * _f32(p["sc"])
    return s, np.zeros_like(s)


def _so_q3_k(p):
    s = _per_sub(p["d"], p["sc"]) * (_f32(p["sc"]) - np.float32(32))
    return s, np.zeros_like(s)


def _so_iq4_xs(p):
    s = _per_sub(p["d"], p["ls"]) * (_f32(p["ls"]) - np.float32(32))
    return s, np.zeros_like(s)


def _so_int(p):
    d = _f32(p["d"])
    return d, d * _f32(p["z"])


_SCALE_OFFSET = {T.Q8_0: _so_plain, T.Q4_0: _so_plain, T.Q4_1: _so_plain, T.Q5_0: _so_plain, T.Q5_1: _so_plain,
                 T.IQ4_NL: _so_plain, T.Q4_K: _so_k, T.Q5_K: _so_k, T.Q6_K: _so_q6_k, T.IQ4_XS: _so_iq4_xs,
                 T.Q3_K: _so_q3_k, T.Q2_K: _so_k}


# ---- public API ----------------------------------------------------------------------------------

def _codec(g: Grid):
    return _int_codec(g.type) if isinstance(g.type, IntType) else _CODECS[g.type]


def unpack(g: Grid, data: np.ndarray, ncols: int) -> BlockFields:
    """Raw GGUF block bytes ([rows, row_bytes] or flat) of a [rows, ncols] matrix -> :class:`BlockFields`."""
    if ncols % g.block:
        raise ValueError(f"{g.name}: row length {ncols} is not a multiple of {g.block}")
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    nb = ncols // g.block
    blocks = raw.view(g.layout)
    rows = blocks.size // nb
    codes, params = _codec(g)[0](blocks)
    codes = codes.astype(np.uint8).reshape(rows, ncols)
    params = {k: np.ascontiguousarray(v).reshape(rows, -1) if v.ndim > 1 else v.reshape(rows, nb)
              for k, v in params.items()}
    return BlockFields(g, codes, params)


def pack(f: BlockFields) -> np.ndarray:
    """:class:`BlockFields` -> raw block bytes, [rows, row_bytes] uint8."""
    g = f.grid
    rows, ncols = f.codes.shape
    nb = ncols // g.block
    blocks = np.zeros(rows * nb, dtype=g.layout)
    params = {k: v.reshape(rows * nb, -1) if v.shape[1] != nb else v.reshape(-1) for k, v in f.params.items()}
    _codec(g)[1](blocks, f.codes.reshape(rows * nb, g.block).astype(np.uint8), params)
    return blocks.view(np.uint8).reshape(rows, nb * g.bytes_per_block)


def dequantize_fields(f: BlockFields) -> np.ndarray:
    """Float32 weights, computed exactly as ggml's dequantize_row_* does."""
    scale, offset = f.scale_offset()
    g = f.grid
    rows, ncols = f.codes.shape
    if isinstance(g.type, IntType):
        # MatMulNBits / OpenVINO decompression: (q - zero_point) * scale
        q = f.codes.astype(np.float32).reshape(rows, -1, g.sub)
        return ((q - _f32(f.params["z"])[..., None]) * _f32(f.params["d"])[..., None]).reshape(rows, ncols)
    lv = g.levels[f.codes].reshape(rows, -1, g.sub)
    if g.type in (T.Q4_1, T.Q5_1):
        # ggml: x*d + m  (same value as scale*level - (-m), kept literal for clarity)
        return (lv * scale[..., None] + (-offset)[..., None]).reshape(rows, ncols)
    return (scale[..., None] * lv - offset[..., None]).reshape(rows, ncols)
