"""The vision tower of a multimodal Qwen3.5 checkpoint, as llama.cpp's multimodal tools (``libmtmd``) load it:
an ``mmproj`` GGUF of architecture ``clip`` with projector type ``qwen3vl_merger``.

Names come from gguf-py's ``TensorNameMap`` for ``MODEL_ARCH.MMPROJ`` (the table llama.cpp's converter uses);
what that table does not cover is the converter's own convention, spelled here: the patch merger's two linears
are ``mm.0`` / ``mm.2`` and its norm ``v.post_ln``, and the Conv3d patch embedding (temporal patch 2) is stored as
two Conv2d kernels, ``v.patch_embd.weight`` and ``v.patch_embd.weight.1``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from qcompile.errors import QCompileError

PREFIX = "model.visual."
PROJECTOR = "qwen3vl_merger"


@dataclass(frozen=True)
class VisionPiece:
    """One mmproj tensor: its GGUF name, the checkpoint tensor it comes from, and (for the split patch
    embedding) which temporal slice of it."""
    name: str
    source: str
    temporal: int | None = None


@dataclass(frozen=True)
class VisionTower:
    """The tower's hyper-parameters (``vision_config`` and the image processor's normalisation) and tensors."""
    config: dict
    text_hidden: int
    text_eps: float
    image_mean: list[float]
    image_std: list[float]

    @property
    def depth(self) -> int:
        return int(self.config["depth"])

    @property
    def image_size(self) -> int:
        """What the converter derives: the position-embedding grid (num_position_embeddings = side^2) x patch."""
        return int(int(self.config.get("num_position_embeddings", 2304)) ** 0.5 * int(self.config.get("patch_size", 16)))

    def pieces(self, stored: list[str]) -> list[VisionPiece]:
        """The mmproj tensors made from the checkpoint's ``stored`` tensor names, in the checkpoint's order."""
        tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, self.depth)
        out = []
        for name in stored:
            if not name.startswith(PREFIX):
                continue
            rel = name[len(PREFIX):]
            if rel == "patch_embed.proj.weight":
                out += [VisionPiece("v.patch_embd.weight", name, 0), VisionPiece("v.patch_embd.weight.1", name, 1)]
                continue
            if rel == "patch_embed.proj.bias":
                out.append(VisionPiece("v.patch_embd.bias", name))
                continue
            if rel.startswith("merger."):
                part, _, suffix = rel[len("merger."):].partition(".")
                gname = {"linear_fc1": "mm.0", "linear_fc2": "mm.2", "norm": "v.post_ln"}.get(part)
                if gname is None:
                    raise QCompileError(f"unexpected vision tensor {name!r} (a tower this version does not know)")
                out.append(VisionPiece(f"{gname}.{suffix}", name))
                continue
            if rel.startswith("deepstack_merger_list."):
                raise QCompileError(f"{name!r}: deepstack vision towers (Qwen3-VL) are not written yet")
            mapped = tmap.get_name("visual." + rel, try_suffixes=(".weight", ".bias"))
            if mapped is None:
                raise QCompileError(f"unexpected vision tensor {name!r} (a tower this version does not know)")
            out.append(VisionPiece(mapped, name))
        return out

    def add_gguf_hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        w.add_clip_has_vision_encoder(True)
        w.add_vision_projection_dim(self.text_hidden)
        w.add_vision_image_size(self.image_size)
        w.add_vision_patch_size(int(c.get("patch_size", 16)))
        w.add_vision_embedding_length(int(c["hidden_size"]))
        w.add_vision_feed_forward_length(int(c["intermediate_size"]))
        w.add_vision_block_count(self.depth)
        w.add_vision_head_count(int(c.get("num_heads", c.get("num_attention_heads"))))
        w.add_vision_image_mean(self.image_mean)
        w.add_vision_image_std(self.image_std)
        w.add_clip_projector_type(PROJECTOR)
        w.add_vision_use_gelu(True)
        w.add_vision_spatial_merge_size(int(c.get("spatial_merge_size", 2)))
        w.add_vision_attention_layernorm_eps(self.text_eps)   # the converter takes the text model's epsilon
        deep = set(c.get("deepstack_visual_indexes") or [])
        w.add_vision_is_deepstack_layers([i in deep for i in range(self.depth)])


def vision_tower(model_dir: Path, raw: dict) -> VisionTower | None:
    """The tower of a multimodal checkpoint (``raw``: its whole config.json), or None for a text-only one.
    The image normalisation comes from ``preprocessor_config.json``, as llama.cpp's converter reads it."""
    vc = raw.get("vision_config")
    if not isinstance(vc, dict):
        return None
    if int(vc.get("temporal_patch_size", 2)) != 2:
        raise QCompileError(f"{model_dir}: temporal_patch_size {vc['temporal_patch_size']}: llama.cpp's qwen3vl "
                            "projector takes 2")
    pre = model_dir / "preprocessor_config.json"
    try:
        pp = json.loads(pre.read_text(encoding="utf-8"))
        mean, std = [float(x) for x in pp["image_mean"]], [float(x) for x in pp["image_std"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QCompileError(f"{pre}: the image processor's image_mean / image_std are needed for the mmproj "
                            f"({e.__class__.__name__}); pass --mmproj none to write the text model only") from None
    text = raw.get("text_config") or {}
    return VisionTower(vc, int(text["hidden_size"]), float(text.get("rms_norm_eps", 1e-6)), mean, std)
