"""The layer-by-layer calibration engine.

Calibration tokens are embedded once. Then, for each decoder layer: load only that layer's weights,
run it in full precision over the calibration activations while hooks accumulate each linear's input
Hessian ``X^T X`` (shared by q/k/v and by gate/up; only for methods that need it, else its diagonal),
let the method's layer hook change the layer (AWQ searches channel scales and folds them into the
norms/linears), quantize its linears with the chosen method, load the quantized values back and run the layer again to produce the next layer's
inputs (so later layers see, and compensate, earlier layers' errors). Finished layers are checkpointed
so an interrupted run resumes where it stopped. Each quantized tensor's reconstruction error (against the
weights it was quantized from: AWQ-folded when AWQ runs) is kept in :attr:`LayerwiseEngine.errors` and
checkpointed with its layer.

Peak memory is one layer's worth, and no large matrix is held twice (a one-layer 7B checkpoint through
GPTQ on 8192 tokens: 3.3 GiB peak RSS for the whole run, 19 GiB before; ``benchmarks/layer_memory.py``):
the activations are one [n, T, H] float32 tensor that each layer's second pass overwrites batch by batch;
the Hessians are normalised in place (large ones also accumulated in place, :mod:`quantizers.linalg`);
the module's bf16 linears are let go while the quantizer runs; the float32 weights are read one group at
a time (AWQ, which folds scales into all of them, reads them up front), the group with the widest Hessian
first; and each Hessian is dropped, or handed to the quantizer to factor in place, at its last use.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from gguf import GGMLQuantizationType as T

from qcompile.model import Architecture, CheckpointSource, ModelConfig, StreamedDecoder
from qcompile.spill import release
from quantizers import CalibStats, Method, linalg
from quantizers.error import ErrorTally
from quantizers.grids import Target, parse_type
from quantizers.tensor import QuantizedTensor

if TYPE_CHECKING:
    import torch

BATCH_TOKENS = 2048  # tokens per forward batch of the layer engine
SAMPLE_TOKENS = 2048  # calibration tokens kept per input for a method that asks for samples (AWQ's search)
SPILL_RESIDUAL_BYTES = 256 << 20  # on the CPU, a larger residual stream waits in a file mapping
# An MoE expert routed fewer tokens than this many per input (a Hessian of lower rank) is thin (EXPERT_THIN
# below). The layer's other tokens, weighted so an expert's statistics count that many tokens, stand in for an
# expert the calibration never reached (and blend into every thin one under the "blend" rule)
EXPERT_MIN_TOKENS_PER_INPUT = 1.0
EXPERT_POOL_TOKENS = 2048  # the layer's tokens (seeded sample) that thinly routed experts are blended with
# what a thinly routed expert (fewer tokens than its input width) is calibrated with: "imatrix" (imatrix-weighted
# RTN on its own tokens' statistics; on the layer's sample above when it got none), "blend" (the run's method on
# its tokens plus the layer's sample), "own" (the run's method on its tokens alone: the damping fills the rank
# they leave). Measured (benchmarks/expert_blend.py, the upcycled real-weight MoE, GPTQ on 2 x 128 tokens so
# that every expert is thin): KLD on the four unseen sets 0.2223 / 0.2477 / 0.2540, in-domain 0.1915 / 0.2309 /
# 0.2365 for imatrix / blend / own, imatrix lowest on every set. A Hessian from too few tokens fits them; the
# imatrix only reweights the rounding.
EXPERT_THIN = "imatrix"


@dataclass
class Stats:
    """Accumulated input statistics of one linear group."""
    sq: np.ndarray                  # float64 [in], sum of x^2 (llama.cpp's imatrix, unnormalised)
    abs: np.ndarray                 # float64 [in], sum of |x| (AWQ's activation scale)
    hessian: object = None          # float32 [in, in] sum of x x^T (numpy on CPU, torch elsewhere) or None
    sample_every: int = 0           # keep every n-th token for AWQ (0: none)
    samples: list = field(default_factory=list)
    tokens: int = 0
    # set once a batch went into the upper triangle only (a large NumPy Hessian from float32 inputs, by
    # syrk in place): calib() mirrors it then; the other routes write the whole matrix
    upper_only: bool = False

    def add(self, x) -> None:
        """Accumulate a batch of inputs x [tokens, in]."""
        xf = x.float()
        if xf.data_ptr() == x.data_ptr():  # already float32: copy it, the sums below overwrite it
            xf = xf.clone()
        if self.hessian is not None:
            # f32 products: bf16 partial sums break positive-definiteness of the near-singular Hessians
            # (o_proj's input under GQA has eigenvalues far below bf16's resolution)
            if not isinstance(self.hessian, np.ndarray):
                self.hessian.addmm_(xf.T, xf)
            elif linalg.can_add_gram_bf16(x):
                linalg.add_gram_bf16(self.hessian, x)  # bf16 inputs, f32 sums, in place: the fastest safe way
            elif linalg.is_large(len(self.hessian)):
                # in place (syrk): a product before the sum would be another n x n temporary, 1.4 GB for
                # 7B's down_proj
                linalg.add_gram_upper(self.hessian, xf.cpu().numpy())
                self.upper_only = True
            else:
                xn = xf.cpu().numpy()  # NumPy recognises a.T @ a and calls BLAS syrk: half the FLOPs
                self.hessian += xn.T @ xn
        if self.sample_every:
            self.samples.append(x[::self.sample_every].to("cpu", copy=True))
        # last, in place on xf (|x|, then |x|^2 = x^2 exactly): no more [tokens, in] float32 temporaries
        # (155 MB each for 7B's down_proj input, 2048 tokens a batch)
        self.abs += xf.abs_().sum(0).double().cpu().numpy()
        self.sq += xf.square_().sum(0).double().cpu().numpy()
        self.tokens += x.shape[0]

    def merge(self, other: Stats, weight: float) -> None:
        """Add ``other``'s sums, each of its tokens counting ``weight`` (an expert's blend with its layer)."""
        self.sq += weight * other.sq
        self.abs += weight * other.abs
        if self.hessian is not None:
            if self.upper_only or other.upper_only:
                raise RuntimeError("merge of upper-triangle Hessians")
            self.hessian += np.float32(weight) * other.hessian
        self.tokens += weight * other.tokens

    def calib(self) -> CalibStats:
        """The mean statistics. The Hessian is handed over, not copied: normalised in place (a large one
        made symmetric first) and no longer held here, so call this once."""
        n = max(1, self.tokens)
        h = self.hessian
        if h is not None:
            if not isinstance(h, np.ndarray):
                h = h.cpu().numpy()
            elif self.upper_only:
                linalg.mirror_upper(h)
            h /= n   # the same float32 arithmetic as h / n, without the copy
            self.hessian = None
        return CalibStats(h, (self.sq / n).astype(np.float32))


@dataclass
class LayerView:
    """One layer as a method's hook sees it (:attr:`quantizers.Method.transform_layer`), after the statistics
    pass and before quantization. A hook may replace the linears' float weights (``weights``: every linear,
    relative name -> [out, in]; the engine then quantizes these) and the norms/biases the export takes
    (``params``: full name -> vector), and rescale ``calib`` to match, leaving the layer's function unchanged."""
    arch: Architecture
    prefix: str                          # the layer's HF name prefix
    tensors: list[str]                   # the layer's HF tensor names (what this variant has)
    stats: dict[str, Stats]              # accumulated input statistics, by the module whose input they are
    calib: dict[str, CalibStats]         # their means, what the quantizer will get
    types: dict[str, Target]             # target type by HF weight name
    read: Callable[[str], np.ndarray]    # a tensor's float32 values by HF name, from the checkpoint
    weights: dict[str, np.ndarray] | None = None
    params: dict[str, np.ndarray] = field(default_factory=dict)
    linears: dict[str, str] = field(default_factory=dict)   # the layer's linears (Architecture.linears)


class LayerwiseEngine:
    """Produces the quantized linears of each layer in order (call :meth:`layer` with 0, 1, 2, ...)."""

    def __init__(self, cfg: ModelConfig, source: CheckpointSource, tokens: np.ndarray,
                 types: dict[str, Target], method: Method, *, device: str = "cpu", batch: int | None = None,
                 work_dir: Path | None = None, fingerprint: str = "", resume: bool = False,
                 dtype: str | None = None, progress: Callable[[int], None] = lambda i: None, keep: bool = False):
        import torch
        self.torch, self.cfg, self.source, self.types, self.method = torch, cfg, source, types, method
        # Layers run in bf16 where it is fast (3x the matmul throughput of f32 on CPUs with AVX512-BF16/AMX,
        # and the usual choice of GPTQ tools on GPUs), else in f32 (linalg.compute_dtype: bf16 is an emulation
        # on AVX2-only CPUs); the residual stream between layers and the Hessian sums stay f32.
        self.dtype = getattr(torch, dtype or linalg.compute_dtype(device))
        # sequences per forward batch: BATCH_TOKENS tokens (8 x 256), so the batch's activations stay the
        # same size whatever the sequence length (a 7B layer's MLP on 8 x 512 tokens holds 1.5 GB)
        self.batch = batch or max(1, BATCH_TOKENS // max(1, tokens.shape[1]))
        self.device, self.progress = device, progress
        self.dec = StreamedDecoder(cfg)
        self.work = work_dir
        self.keep = keep        # leave the work folder for other compiles (--calib-cache) instead of removing it
        self.fingerprint = fingerprint
        self.done = -1          # last layer whose outputs are in self.hidden
        self._head: CalibStats | None = None  # the output matrix's input statistics (head_stats)
        self.hidden = None
        self._mapped: np.ndarray | None = None  # the file mapping behind self.hidden, when spilled
        self.tokens = tokens
        self.errors = ErrorTally()  # per HF tensor name, for report.json
        self.experts: dict[int, list[dict]] = {}  # MoE: per layer, each expert's routed tokens and blend
        if self.work is not None:
            if resume and self._load_state():
                return
            shutil.rmtree(self.work, ignore_errors=True)
            self.work.mkdir(parents=True)
            (self.work / "fingerprint").write_text(fingerprint)

    # ---- resume ---------------------------------------------------------------------------------
    def _load_state(self) -> bool:
        state = self.work / "state.json"
        if not state.is_file() or (self.work / "fingerprint").read_text() != self.fingerprint:
            return False
        self.done = json.loads(state.read_text())["layer"]
        saved = self.torch.load(self.work / "hidden.pt", mmap=True)
        self.hidden = self._new_residual(lambda rows: saved[rows])
        return True

    def _save(self, i: int, tensors: dict[str, QuantizedTensor]) -> None:
        if self.work is None:
            return
        arrays = {f"{k}|{q.type.name}|{q.shape[0]}|{q.shape[1]}": q.data for k, q in tensors.items()}
        tmp = self.work / f".layer-{i:03d}.npz"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, self.work / f"layer-{i:03d}.npz")
        errors = {k: self.errors.sums(k) for k in tensors if self.errors.sums(k) is not None}
        if i in self.experts:
            errors["__experts__"] = self.experts[i]
        (self.work / f".errors-{i:03d}.json").write_text(json.dumps(errors))
        os.replace(self.work / f".errors-{i:03d}.json", self.work / f"errors-{i:03d}.json")
        self.torch.save(self.hidden.cpu(), self.work / ".hidden.pt")
        self._release()
        os.replace(self.work / ".hidden.pt", self.work / "hidden.pt")
        (self.work / ".state.json").write_text(json.dumps({"layer": i}))
        os.replace(self.work / ".state.json", self.work / "state.json")

    def _load_layer(self, i: int) -> dict[str, QuantizedTensor]:
        out = {}
        with np.load(self.work / f"layer-{i:03d}.npz") as z:
            for key in z.files:
                name, typ, r, c = key.split("|")
                out[name] = QuantizedTensor(name, parse_type(typ), (int(r), int(c)), z[key])
        errors = self.work / f"errors-{i:03d}.json"
        if errors.is_file():  # absent in checkpoints written before errors were measured: no error then
            for name, sums in json.loads(errors.read_text()).items():
                if name == "__experts__":
                    self.experts[i] = sums
                else:
                    self.errors.put(name, sums)
        return out

    def head_stats(self) -> CalibStats:
        """Input statistics of the output matrix (the Hessian only for a method that needs it): the
        final-normed residual stream after the last *quantized* layer, what the head reads at inference. Runs
        the layers not run yet; their tensors wait in the resume folder until the writer asks for them
        (so the GGUF keeps llama.cpp's tensor order, the output matrix before the blocks).

        Why calibrate the head: the output matrix writes the logits directly, and at the sizes of the 4-bit
        mixes it carries most of the predicted KLD (real 0.5B at Q4_K_M's bytes: 0.0082 of 0.0140 with the
        head at Q5_1, RTN); its input is one [hidden] vector per token, so its Hessian is as small as
        q_proj's. Its output error at Q5_1 there: imatrix RTN 0.42x plain RTN's, GPTQ 0.20x."""
        if self.work is None:
            raise RuntimeError("head_stats needs the engine's work folder (the layers' tensors wait there)")
        for i in range(self.done + 1, self.cfg.num_layers):
            self.layer(i)
        if self._head is None:
            n = self.cfg.hidden_size
            st = self._new_stats(n)
            norm = self.dec.build_norm(self.source, self.device).to(self.dtype)
            with self.torch.no_grad():
                for b in range(0, self.hidden.shape[0], self.batch):
                    x = norm(self.hidden[b:b + self.batch].to(self.dtype))
                    st.add(x.reshape(-1, n))
                    self._release()
            self._head = st.calib()
        return self._head

    def finish(self) -> None:
        self.hidden = self._mapped = None  # unmaps a spilled stream (its file is already unlinked)
        if self.work is not None and not self.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    # ---- the engine -------------------------------------------------------------------------------
    def layer(self, i: int) -> dict[str, QuantizedTensor]:
        """Quantized linears of layer ``i``, keyed by HF tensor name."""
        if i <= self.done:
            return self._load_layer(i)
        if i != self.done + 1:
            raise RuntimeError(f"layers must be requested in order (asked {i}, next is {self.done + 1})")
        if self.hidden is None:
            # the same rows as one call, batch by batch
            self.hidden = self._new_residual(lambda rows: self.dec.embed(self.source, self.tokens[rows]))
        module = self.dec.build_layer(i, self.source, self.device).to(self.dtype)
        routed: dict[str, list] = {"x": [], "idx": [], "w": []}
        stats = self._collect(module, self.cfg.arch.linears(i), routed if self.cfg.arch.moe else None)
        for lin in self.cfg.arch.linears(i):  # until the quantized values take their place, their memory is GPTQ's
            module.get_submodule(lin).weight.data = self.torch.empty(0, dtype=self.dtype, device=self.device)
        prefix = self.cfg.arch.layer_prefix(i)
        calib = {k: st.calib() for k, st in stats.items()}
        view = LayerView(self.cfg.arch, prefix, self.cfg.layer_tensor_names(i), stats, calib, self.types,
                         self.source.full, linears=self.cfg.arch.linears(i))
        self.method.transform_layer(view)  # e.g. AWQ: scales folded into the linears and their producers
        # full precision, not the bf16 copies inside the module: read group by group as they are quantized,
        # unless the hook replaced them (then each is let go once its group is quantized)
        weight: Callable[[str], np.ndarray] = view.weights.pop if view.weights is not None else \
            (lambda lin: self.source.full(f"{prefix}{lin}.weight"))
        fp = view.params                   # folded norms/biases, exported instead of the checkpoint's
        del stats, view
        out = self._quantize(i, module, weight, calib)
        if self.cfg.arch.moe:
            out |= self._quantize_experts(i, module, routed)
        del routed
        for name, v in fp.items():
            out[name] = QuantizedTensor(name, T.F32, (1, v.size), v.reshape(1, -1).astype(np.float32))
            self._install(module, prefix, out[name], v)
        self._run(module, write_back=True)
        self.done = i
        self._save(i, out)
        self.progress(i)
        return out

    def _quantize(self, i: int, module, weight: Callable[[str], np.ndarray], calib: dict[str, CalibStats]
                  ) -> dict[str, QuantizedTensor]:
        """Quantize the layer's linears and load them into ``module``. Those that share input statistics and
        target type (q/k/v, gate/up) are stacked into one matrix: every method here treats rows independently
        given the statistics, so this changes nothing but the cost (GPTQ factors each Hessian once and sweeps
        its columns once). ``weight``: a linear's float32 weights (relative name), called once per linear.

        Memory: groups run widest input first, and each group's statistics are dropped after their last
        use (which may overwrite the Hessian), so 7B's 1.4 GB down_proj Hessian is gone before the
        gate/up stack (0.5 GB, and as much again inside GPTQ) is read."""
        groups: dict[tuple, list[str]] = {}
        prefix, linears = self.cfg.arch.layer_prefix(i), self.cfg.arch.linears(i)
        for lin, stat_of in linears.items():
            groups.setdefault((stat_of, self.types[f"{prefix}{lin}.weight"]), []).append(lin)
        uses = Counter(stat_of for stat_of, _ in groups)
        parts: dict[str, QuantizedTensor] = {}
        for stat_of, target in sorted(groups, key=lambda g: -len(calib[g[0]].sq_mean)):
            uses[stat_of] -= 1
            stat = calib.pop(stat_of) if uses[stat_of] == 0 else calib[stat_of]
            stat.last_use = stat_of not in calib
            parts |= self._quantize_group(prefix, module, groups[stat_of, target], target, stat, weight)
            del stat
        return {f"{prefix}{lin}.weight": parts[lin] for lin in linears}

    def _quantize_experts(self, i: int, module, routed: dict[str, list]) -> dict[str, QuantizedTensor]:
        """Quantize layer ``i``'s routed experts one by one, each on the tokens the full-precision router sent
        it, and load them into ``module``; returns the stacked tensors (``ffn_*_exps``), keyed by HF name.

        Statistics per expert: gate/up see the expert's tokens, down sees its intermediate activations on them
        (float weights, as the dense layers' statistics pass), each token weighted by its routing weight. An
        expert with fewer tokens than its input width is rounded by :data:`EXPERT_THIN`'s rule (by default
        imatrix-weighted RTN on its own statistics, on a seeded sample of the layer's tokens when it has
        none): never left in float, never rounded on a Hessian its few tokens cannot span. Memory: one
        expert's statistics and weights at a time, beside the layer's recorded inputs (tokens x hidden)."""
        torch, cfg, arch = self.torch, self.cfg, self.cfg.arch
        x_all, idx, gates = torch.cat(routed.pop("x")), torch.cat(routed.pop("idx")), torch.cat(routed.pop("w"))
        routed.clear()
        names = arch.expert_names(i)                   # gate, up, down: stacked [E, rows, cols]
        n_exp, width, hidden = cfg.num_experts, cfg.expert_intermediate_size, cfg.hidden_size
        spans = ((width, width, hidden))               # rows of one expert in each
        pool_rows = np.random.default_rng(i).permutation(x_all.shape[0])[:EXPERT_POOL_TOKENS]
        pool = x_all[torch.from_numpy(np.sort(pool_rows))]
        pool_in = self._stats_of(pool)                 # gate/up inputs of the pool (the same for every expert)
        experts = module.get_submodule(arch.EXPERTS_MODULE)
        act = experts.act_fn
        parts: list[list[QuantizedTensor]] = [[], [], []]
        coverage = []
        for e in range(n_exp):
            hit = idx == e
            rows = torch.nonzero(hit.any(dim=1)).flatten()
            x = x_all[rows]
            # each token weighted by its routing weight: the expert's output reaches the layer's output times
            # that weight, so its rounding error there counts w^2 (H = sum w^2 x x^T). Scaled to mean w^2 = 1,
            # so the blend below still counts tokens.
            g = (gates[rows] * hit[rows]).sum(dim=1)
            g = (g / g.pow(2).mean().sqrt().clamp_min(1e-12))[:, None] if len(rows) else g[:, None]
            w = [self.source.rows(n, e * r, (e + 1) * r) for n, r in zip(names, spans)]
            blend = max(0.0, EXPERT_MIN_TOKENS_PER_INPUT * hidden - len(rows)) / max(1, len(pool))
            method = self.method
            if blend and EXPERT_THIN != "blend":
                if EXPERT_THIN == "imatrix":
                    import quantizers
                    method = quantizers.get("imatrix")
                if len(rows) or EXPERT_THIN == "own":
                    blend = 0.0   # its own statistics; an expert with none keeps the layer's sample
            st = self._stats_of(x * g)
            if blend:
                st.merge(pool_in, blend)
            wg, wu = torch.from_numpy(w[0]), torch.from_numpy(w[1])
            inter = lambda a: act(a @ wg.T) * (a @ wu.T)   # the expert's down input, float weights
            st_down = self._stats_of(inter(x) * g)
            if blend:
                st_down.merge(self._stats_of(inter(pool)), max(0.0, EXPERT_MIN_TOKENS_PER_INPUT * width
                                                               - len(rows)) / max(1, len(pool)))
            # gate and up share their input: one stacked solve when they share a type
            groups = [[0, 1]] if self.types[names[0]] == self.types[names[1]] else [[0], [1]]
            calib_in = st.calib()
            for k, group in enumerate(groups):
                calib_in.last_use = k == len(groups) - 1
                q = method.quantize(f"{names[group[0]]}[{e}]", _stack((w[j] for j in group),
                                                                      [spans[j] for j in group]),
                                    self.types[names[group[0]]], calib_in)
                r0 = 0
                for j in group:
                    parts[j].append(QuantizedTensor(names[j], q.type, w[j].shape, q.data[r0:r0 + spans[j]]))
                    r0 += spans[j]
            calib_down = st_down.calib()
            calib_down.last_use = True
            parts[2].append(method.quantize(f"{names[2]}[{e}]", w[2], self.types[names[2]], calib_down))
            deq = [qs[-1].dequantize() for qs in parts]
            for name, ref, qs, dq in zip(names, w, parts, deq):
                self.errors.add(name, ref, qs[-1], dq)
            arch.set_expert(experts, e, *(torch.from_numpy(dq).to(self.device) for dq in deq))
            coverage.append({"tokens": int(len(rows)), "blend": round(blend, 6), "method": method.name})
        self.experts[i] = coverage
        return {name: QuantizedTensor(name, qs[0].type, (sum(q.shape[0] for q in qs), qs[0].shape[1]),
                                      np.concatenate([q.data for q in qs])) for name, qs in zip(names, parts)}

    def _stats_of(self, x) -> Stats:
        """The statistics (what the method needs) of inputs ``x`` [tokens, width], in batches."""
        st = self._new_stats(x.shape[-1])
        for b in range(0, x.shape[0], BATCH_TOKENS):
            st.add(x[b:b + BATCH_TOKENS])
        return st

    def _quantize_group(self, prefix: str, module, lins: list[str], target: Target, stat: CalibStats,
                        weight: Callable[[str], np.ndarray]) -> dict[str, QuantizedTensor]:
        """Quantize linears ``lins`` (sharing ``stat`` and ``target``) as one row-stacked matrix, load them
        into ``module`` and return them by linear."""
        names = [f"{prefix}{lin}.weight" for lin in lins]
        rows = [self.source.shape(n)[0] for n in names]
        w = _stack(map(weight, lins), rows)
        cols = self._file_columns(names)
        if cols is not None:
            # llama.cpp stores this linear with its columns reordered (Qwen3.5's out_proj under tiled value
            # heads), which moves columns across quantization blocks: quantize in the file's column order, on
            # statistics reordered alike, so the blocks are the file's (GgufLayout.cols; the GGUF exporter
            # takes such a tensor as it is)
            w = np.ascontiguousarray(w[:, cols])
            stat = CalibStats(None if stat.hessian is None else np.ascontiguousarray(stat.hessian[np.ix_(cols, cols)]),
                              stat.sq_mean[cols], last_use=True)
        q = self.method.quantize("+".join(names), w, target, stat)
        out, r0 = {}, 0
        for lin, name, n in zip(lins, names, rows):
            out[lin] = QuantizedTensor(name, q.type, (n, q.shape[1]), q.data[r0:r0 + n])
            self._install(module, prefix, out[lin], w[r0:r0 + n], None if cols is None else np.argsort(cols))
            r0 += n
        return out

    def _file_columns(self, names: list[str]) -> np.ndarray | None:
        """The column order llama.cpp stores a lone linear in, when it is not the checkpoint's."""
        lay = self.cfg.arch.gguf_layout(names[0], self.cfg) if len(names) == 1 else None
        return None if lay is None else lay.cols

    def _install(self, module, prefix: str, qt: QuantizedTensor, reference: np.ndarray,
                 to_module: np.ndarray | None = None) -> None:
        """Record ``qt``'s reconstruction error against ``reference`` (what it was quantized from, same shape)
        and put its values into ``module``, in the engine dtype, for the layer's second pass (``to_module``:
        the column order of the module when ``qt`` is in the file's)."""
        deq = qt.dequantize()
        self.errors.add(qt.name, reference, qt, deq)
        if to_module is not None:
            deq = deq.reshape(reference.shape)[:, to_module]
        param = module.get_parameter(qt.name[len(prefix):])
        param.data = self.torch.from_numpy(np.ascontiguousarray(deq)).reshape(reference.shape).to(self.device,
                                                                                                   self.dtype)

    def _new_residual(self, part: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        """A float32 [n, T, hidden] residual stream for the calibration windows, filled batch by batch with
        ``part(rows)`` (the windows' slice). On the CPU, one of more than :data:`SPILL_RESIDUAL_BYTES` lives
        in an unlinked temporary file, memory-mapped (in the run's work folder when it has one): 128 x 512
        tokens of a 7B are 0.94 GB, which would put GPTQ's 7B layer over 4 GB. Each batch's pages leave the
        resident set once used (:meth:`_release`): the engine reads and writes the stream in order, so the
        page cache holds it, not the process."""
        n, t = self.tokens.shape
        shape = (n, t, self.cfg.hidden_size)
        if self.device != "cpu" or n * t * self.cfg.hidden_size * 4 <= SPILL_RESIDUAL_BYTES:
            hidden = self.torch.empty(shape, dtype=self.torch.float32, device=self.device)
        else:
            with tempfile.TemporaryFile(dir=self.work) as f:  # the mapping keeps the file alive until dropped
                self._mapped = np.memmap(f, dtype=np.float32, mode="w+", shape=shape)
            hidden = self.torch.from_numpy(self._mapped)
        for b in range(0, n, self.batch):
            hidden[b:b + self.batch] = part(slice(b, b + self.batch)).to(self.device)
            self._release()
        return hidden

    def _release(self) -> None:
        if self._mapped is not None:
            release(self._mapped)

    def _run(self, module, write_back: bool = False) -> None:
        """The layer over all calibration activations, batch by batch, in the engine dtype. ``write_back``:
        each batch's outputs (f32) replace its inputs in ``self.hidden``: sequences are independent, so the
        batches still to run are untouched, and no second [n, T, H] tensor is ever made (0.9 GB at 7B
        with 128 x 512 tokens)."""
        for b in range(0, self.hidden.shape[0], self.batch):
            y = self.dec.run_layer(module, self.hidden[b:b + self.batch].to(self.dtype))
            if write_back:
                self.hidden[b:b + self.batch] = y
            self._release()

    def _new_stats(self, n: int, sample_every: int = 0) -> Stats:
        """Empty statistics of an input of width ``n``: with a Hessian (NumPy on the CPU, torch on the
        device) when the method needs one."""
        hessian = None
        if self.method.hessian:  # the statistics the method declares it needs
            hessian = np.zeros((n, n), np.float32) if self.device == "cpu" else \
                self.torch.zeros(n, n, device=self.device)
        return Stats(np.zeros(n), np.zeros(n), hessian, sample_every)

    def _collect(self, module, linears: dict[str, str], routed: dict[str, list] | None = None) -> dict[str, Stats]:
        """The layer's statistics pass: input statistics of each linear group; with ``routed`` (an MoE layer)
        also the experts module's inputs and each token's chosen experts, for :meth:`_quantize_experts`."""
        stats: dict[str, Stats] = {}
        hooks = []
        if routed is not None:
            def record(_mod, inputs):
                x, idx, w = inputs[0], inputs[1], inputs[2]
                routed["x"].append(x.reshape(-1, x.shape[-1]).to("cpu", self.torch.float32, copy=True))
                routed["idx"].append(idx.reshape(x.shape[0], -1).to("cpu", copy=True))
                routed["w"].append(w.reshape(x.shape[0], -1).to("cpu", self.torch.float32, copy=True))
            hooks.append(module.get_submodule(self.cfg.arch.EXPERTS_MODULE).register_forward_pre_hook(record))
        n_tokens = int(np.prod(self.hidden.shape[:2]))
        for name in sorted(set(linears.values())):
            lin = module.get_submodule(name)
            stats[name] = self._new_stats(lin.in_features,
                                          max(1, n_tokens // SAMPLE_TOKENS) if self.method.samples else 0)

            def hook(_mod, inputs, name=name):
                stats[name].add(inputs[0].reshape(-1, inputs[0].shape[-1]))
            hooks.append(lin.register_forward_pre_hook(hook))
        try:
            self._run(module)
        finally:
            for h in hooks:
                h.remove()
        return stats


def _stack(arrays: Iterable[np.ndarray], rows: list[int]) -> np.ndarray:
    """Stack matrices by rows, filling one preallocated array as they come (only one of them is held at a time:
    7B's gate and up are 0.27 GB each); a single matrix is returned as it is."""
    arrays = iter(arrays)
    first = next(arrays)
    if len(rows) == 1:
        return first
    out = np.empty((sum(rows), first.shape[1]), first.dtype)
    out[:rows[0]] = first
    del first
    r0 = rows[0]
    for a, n in zip(arrays, rows[1:]):
        out[r0:r0 + n] = a
        r0 += n
    return out


def fingerprint(*parts: object) -> str:
    """A short hash of everything a resumed run must share with the interrupted one."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
    return h.hexdigest()[:16]
