"""CLIP, loaded and embedded one way for every reward and for reward training: unit-norm float32 embeddings on CPU."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.models import load_pretrained


def load_clip(source: str, owner: str, what: str = "CLIP model", revision: str | None = None):
    """(CLIPModel, CLIPProcessor) from a model source (`services.models.resolve_model_source`), on CPU.

    A source that cannot be read raises FileNotFoundError naming `owner`, `what` and `source`.
    """
    from transformers import CLIPModel, CLIPProcessor

    processor = load_pretrained(CLIPProcessor.from_pretrained, source, owner, what, revision=revision)
    model = load_pretrained(CLIPModel.from_pretrained, source, owner, what, revision=revision)
    return model, processor


def clip_embeddings(clip, processor, images: Sequence[np.ndarray] | None, texts: Sequence[str] | None, device: str):
    """Unit-norm CLIP embeddings: (image_emb (N, D) or None, text_emb (M, D) or None), float32 on CPU.

    `images` are (H, W, 3) uint8 arrays, all embedded in one forward pass (callers batch); None or empty gives None.
    """
    import torch

    def norm(x):
        x = x if not hasattr(x, "pooler_output") else x.pooler_output  # newer transformers wrap features
        return torch.nn.functional.normalize(x.float(), dim=-1).cpu()

    image_emb = text_emb = None
    # no_grad, not inference_mode: training uses these embeddings as inputs of the head's autograd graph.
    with torch.no_grad():
        if images is not None and len(images):
            pixels = processor(images=list(images), return_tensors="pt", input_data_format="channels_last")
            image_emb = norm(clip.get_image_features(pixel_values=pixels["pixel_values"].to(device)))
        if texts is not None and len(texts):
            tokens = processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
            text_emb = norm(
                clip.get_text_features(
                    input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
                )
            )
    return image_emb, text_emb


def clip_cosines(clip, processor, images: Sequence[np.ndarray], prompts: Sequence[str], device: str, batch_size: int):
    """The cosine of each image's and its own prompt's CLIP embeddings: a float32 (N,) tensor on CPU.

    Chunks of `batch_size` images, each prompt embedded once per chunk; a sample's cosine does not depend on the
    other samples (up to the last bits of other batch shapes' kernels)."""
    import torch

    cosines = []
    for start in range(0, len(images), batch_size):
        chunk, texts = images[start : start + batch_size], prompts[start : start + batch_size]
        unique = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        image_emb, text_emb = clip_embeddings(clip, processor, chunk, list(unique), device)
        cosines.append((image_emb * text_emb[[unique[t] for t in texts]]).sum(-1))  # (B,)
    return torch.cat(cosines) if cosines else torch.zeros(0)
