"""CLIP checkpoints in OpenAI / open_clip layout converted to transformers CLIP keys.

Reward models built on CLIP ship their weights in the layout of the code that trained them: HPS v1 (`hpc.pt`) is
`{'state_dict': ...}` in OpenAI-CLIP keys (ViT-L/14), HPS v2/v2.1 (`HPS_v2*_compressed.pt`) is an open_clip ViT-H-14
checkpoint, whose standard CLIP keeps OpenAI's key names. `to_transformers` turns either (or a transformers CLIP
state dict) into the keys of transformers' `CLIPTextModelWithProjection` (text tower only, the default) or
`CLIPModel` (`vision=True`); `load_strict` loads the result and names the key of any mismatch.

Layout differences handled here, beyond renames:
  * OpenAI attention keeps q/k/v stacked in one `in_proj_weight` (3W, W) / `in_proj_bias` (3W,), in that order;
    transformers has separate `q_proj`/`k_proj`/`v_proj`.
  * OpenAI projections are parameters applied as `x @ proj`, shape (width, embed); transformers' are `nn.Linear`,
    whose weight is (embed, width): they are transposed. A square projection would load untransposed without error
    and give wrong embeddings, so the tests compare embeddings numerically.
Not handled (rejected, with the keys named): ResNet image towers, layer scale, custom attention blocks, open_clip's
CustomTextCLIP (`text.*` keys) and HF-text-tower models.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

# Containers that training scripts wrap a state dict in (open_clip: 'state_dict' next to 'optimizer', 'epoch', ...).
WRAPPER_KEYS = ("state_dict", "model", "module")
# Prefixes every key carries when saved from a wrapped module: DDP ('module.'), torch.compile ('_orig_mod.').
PREFIXES = ("module.", "_orig_mod.")
# Entries that are not weights: OpenAI's JIT metadata, open_clip's causal mask buffer in older versions.
NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size", "attn_mask")

# Residual block sub-keys, OpenAI -> transformers (attention in_proj is split separately).
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TEXT = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_VISION = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
# (width, embed) parameters applied as `x @ p` -> nn.Linear weights (embed, width).
_PROJECTIONS = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def read_checkpoint(path: str | Path) -> Any:
    """The object stored at `path`: a .safetensors file or a torch pickle (loaded with weights_only, on CPU)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"CLIP checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def unwrap(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The flat tensor state dict inside `checkpoint`: wrappers and key prefixes removed, non-weights dropped."""
    state = checkpoint
    while isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not state:
        raise ValueError(f"CLIP checkpoint: expected a state dict of tensors, got {type(state).__name__}")
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    non_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor) and k not in NON_WEIGHTS)
    if non_tensors:
        raise ValueError(f"CLIP checkpoint: entries that are not tensors: {non_tensors[:5]}")
    return {k: v for k, v in state.items() if k not in NON_WEIGHTS}


def detect_format(state_dict: dict[str, torch.Tensor]) -> str:
    """'transformers' (text_model.* keys) or 'openai' (OpenAI CLIP and open_clip's standard CLIP)."""
    if any(k.startswith(("text_model.", "vision_model.")) for k in state_dict):
        return "transformers"
    if {"token_embedding.weight", "text_projection", "ln_final.weight"} <= state_dict.keys() and any(
        k.startswith("transformer.resblocks.") for k in state_dict
    ):
        return "openai"
    raise ValueError(
        "unrecognised CLIP checkpoint format: expected transformers keys (text_model.*) or OpenAI/open_clip keys "
        "(token_embedding.weight, transformer.resblocks.*, text_projection); "
        f"its keys include {sorted(state_dict)[:6]}"
    )


def _convert_openai(state: dict[str, torch.Tensor], vision: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    # The text tower needs neither the image tower nor the logit scale/bias.
    left = {k: v for k, v in state.items() if not k.startswith(() if vision else ("visual.", "logit_"))}
    for src, dst in {**_TEXT, **(_VISION if vision else {})}.items():
        if src in left:
            out[dst] = left.pop(src)
    for src, dst in _PROJECTIONS.items():
        if src in left and left[src].ndim == 2:
            out[dst] = left.pop(src).T.contiguous()  # (width, embed) -> (embed, width)
    for key in [k for k in left if _RESBLOCK.match(k)]:
        visual, layer, sub = _RESBLOCK.match(key).groups()
        prefix = f"{'vision_model' if visual else 'text_model'}.encoder.layers.{layer}"
        module, _, kind = sub.rpartition(".")
        if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = kind.removeprefix("in_proj_")
            # (3W, W) or (3W,): q, k, v stacked in that order -> three (W, W) or (W,)
            for name, part in zip("qkv", left.pop(key).chunk(3, dim=0), strict=True):
                out[f"{prefix}.self_attn.{name}_proj.{kind}"] = part.contiguous()
        elif module in _BLOCK:
            out[f"{prefix}.{_BLOCK[module]}.{kind}"] = left.pop(key)
        # else it stays in `left`, e.g. layer scale (ls_1.gamma), which transformers CLIP lacks
    if left:
        raise ValueError(f"CLIP checkpoint: cannot convert {sorted(left)[:6]} (no transformers CLIP equivalent)")
    return out


def to_transformers(checkpoint: Any, vision: bool = False) -> dict[str, torch.Tensor]:
    """`checkpoint` (any supported format, wrapped or prefixed) in transformers CLIP keys.

    vision=False: the keys of `CLIPTextModelWithProjection` (the image tower and logit scale are dropped).
    vision=True: the keys of `CLIPModel`.
    """
    state = unwrap(checkpoint)
    if detect_format(state) == "openai":
        return _convert_openai(state, vision)
    # Older transformers versions saved position_ids buffers, which are no longer part of the state dict.
    state = {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}
    if not vision:
        state = {k: v for k, v in state.items() if k.startswith("text_model.") or k == "text_projection.weight"}
    return state


def load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Loads every key of `model` from `state_dict`; a missing, extra or differently shaped key is a ValueError
    naming it (and both shapes), where torch's own message would bury it among the model's structure."""
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"CLIP checkpoint does not fit the model: missing keys {missing[:6]}, unexpected keys {unexpected[:6]}"
        )
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if v.shape != expected[k].shape
    ]
    if mismatched:
        raise ValueError(f"CLIP checkpoint shapes do not match the model: {'; '.join(sorted(mismatched)[:6])}")
    model.load_state_dict(state_dict, strict=True)
