"""Semantic segment reward (FineRewards' "SAM reward", Fang et al. 2023).

1. Segments: SAM's automatic mask generator splits the image into regions.
2. Labels: each region's crop (pixels outside the mask greyed, padded to a square) is classified by CLIP against a
   vocabulary: the 80 COCO and 150 ADE20K category names (services/data/categories.txt) plus the prompt's nouns.
   Regions with the same label are merged (area = union).
3. Likelihood: an LLM (cluster profile: Vicuna-7B) says how likely each label is to appear in the scene the prompt
   describes, a number in [0, 1] (`services.llm_scorer`: token log-probabilities by default, or the paper's
   generated 3/2/1 ratings).
4. Reward = mean of the segments' likelihoods (the paper's R = (1/n) sum s_i), or their area-weighted mean.

Score range [0, 1]; higher = the image contains only things that belong in the prompted scene (no stray objects).
An image with no segment left after filtering scores `empty_reward` (default 0.0: nothing recognisable was drawn),
never NaN. The response lists the segments: label, area fraction, label confidence, likelihood.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from services.clip import clip_embeddings, load_clip
from services.config import Config
from services.llm_scorer import LikelihoodScorer, LLMConfig
from services.registry import register
from services.reward import ModelSource, Reward, RewardInfo, RewardOutput, SampleFailure, SegmentScore

CATEGORIES_FILE = Path(__file__).resolve().parents[1] / "data" / "categories.txt"

# Words of a prompt that are not objects: articles, prepositions, counts, colours, common adjectives.
_NOT_NOUNS = set(
    """a an the of in on at to with and or under over near next by from into onto behind beside above below inside
    outside front back top bottom left right is are be its their his her this that these those some many few several
    one two three four five six seven eight nine ten eleven twelve single pair couple dozen photo picture image
    painting drawing render style red green blue yellow orange purple pink brown black white gray grey golden silver
    big small large tiny huge little tall short old young new cute beautiful happy sad dark bright colorful wooden
    metal plastic glass very""".split()
)


def prompt_nouns(prompt: str) -> list[str]:
    """Candidate object words of a prompt, singularised: "two green dogs in the city" -> ["dog", "city"].

    A heuristic (no POS tagger): words that are not articles, prepositions, counts, colours or common adjectives.
    Extra candidates only widen CLIP's choice; they are never scored unless a region gets that label.
    """
    nouns = []
    for word in re.findall(r"[a-z]+", prompt.lower()):
        if word in _NOT_NOUNS or len(word) < 3:
            continue
        if word.endswith("ies") and len(word) > 4:
            word = word[:-3] + "y"
        elif word.endswith(("ches", "shes", "sses", "xes")):
            word = word[:-2]
        elif word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        if word not in nouns:
            nouns.append(word)
    return nouns


def load_vocabulary(path: str | Path = CATEGORIES_FILE) -> list[str]:
    lines = Path(path).expanduser().read_text().splitlines()
    return list(dict.fromkeys(line.strip() for line in lines if line.strip() and not line.startswith("#")))


class SamConfig(Config):
    model_type: Literal["vit_h", "vit_l", "vit_b", "custom"] = Field(
        "vit_h",
        description=(
            "segment_anything's registry ('vit_h', 'vit_l', 'vit_b'), or 'custom': the architecture of the "
            "encoder_*, image_size and prompt_embed_dim fields (the local profile's tiny SAM)."
        ),
    )
    checkpoint: str = Field(
        "sam_vit_h_4b8939.pth",
        description="SAM checkpoint (.pth state dict). Cluster profile: the ViT-H release, sam_vit_h_4b8939.pth.",
    )
    # The custom architecture; the defaults are ViT-H's.
    encoder_embed_dim: int = Field(1280, ge=1, description="custom only: image encoder width.")
    encoder_depth: int = Field(32, ge=1, description="custom only: image encoder blocks.")
    encoder_num_heads: int = Field(16, ge=1, description="custom only: image encoder attention heads.")
    encoder_global_attn_indexes: tuple[Annotated[int, Field(ge=0)], ...] = Field(
        (7, 15, 23, 31), description="custom only: indexes of the encoder's global-attention blocks."
    )
    image_size: int = Field(1024, ge=16, description="custom only: input side in pixels.")
    prompt_embed_dim: int = Field(
        256, ge=1, description="custom only: prompt/mask-decoder width (256 in every release)."
    )
    points_per_side: int = Field(
        32, ge=1, description="Automatic mask generation: a points_per_side^2 grid of point prompts."
    )
    points_per_batch: int = Field(64, ge=1, description="Point prompts per mask-decoder pass.")
    pred_iou_thresh: float = Field(0.88, ge=0.0, le=1.0, description="Masks below this predicted IoU are dropped.")
    stability_score_thresh: float = Field(
        0.95, ge=0.0, le=1.0, description="Masks below this stability score are dropped."
    )
    box_nms_thresh: float = Field(
        0.7, ge=0.0, le=1.0, description="Box IoU above which overlapping masks are suppressed (NMS)."
    )
    min_area_fraction: float = Field(
        0.005,
        ge=0.0,
        description="Regions smaller than this fraction of the image are dropped (too small to label reliably).",
    )
    max_segments: int = Field(
        24, ge=1, description="At most this many regions per image, largest first (bounds the labelling and LLM cost)."
    )

    @field_validator("encoder_global_attn_indexes")
    @classmethod
    def _within_depth(cls, value: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        depth = info.data.get("encoder_depth")
        if depth is not None and any(i >= depth for i in value):
            raise ValueError(f"must be < encoder_depth ({depth}), got {list(value)}")
        return value


class LabelerConfig(Config):
    clip: str = Field(
        "openai/clip-vit-large-patch14", description="CLIP model (hub id or local directory) that labels each crop."
    )
    revision: str | None = Field(None, description="Hub revision of `clip`; None for the default.")
    vocabulary: str | None = Field(
        None, description="Label vocabulary file, one name per line; None = the built-in COCO + ADE20K list."
    )
    include_prompt_nouns: bool = Field(
        True,
        description="Add the prompt's nouns to the vocabulary (so 'a corgi on a surfboard' can be labelled 'corgi').",
    )
    template: str = Field("a photo of a {}.", description="Text prompt for each label; '{}' stands for the label.")
    crop_margin: float = Field(
        0.1,
        ge=0.0,
        description="Margin added around a region's bounding box before cropping, as a fraction of its size.",
    )
    batch_size: int = Field(64, ge=1, description="Most crops per CLIP forward pass.")

    @field_validator("template")
    @classmethod
    def _has_slot(cls, value: str) -> str:
        if "{}" not in value:
            raise ValueError(f"must contain '{{}}' where the label goes, got {value!r}")
        return value


class SemanticConfig(Config):
    sam: SamConfig = Field(default_factory=SamConfig, description="The segmenter.")
    labeler: LabelerConfig = Field(default_factory=LabelerConfig, description="The CLIP labeller of the segments.")
    llm: LLMConfig = Field(default_factory=LLMConfig, description="The likelihood scorer (LLM, backend, mode).")
    aggregate: Literal["mean", "area_weighted"] = Field(
        "mean", description="'mean' over segments (the paper) or 'area_weighted' (large regions count more)."
    )
    empty_reward: float = Field(
        0.0, ge=0.0, le=1.0, description="Reward of an image with no segment left after filtering."
    )


def build_sam(s: SamConfig, checkpoint: str | None = None):
    """A SAM of the custom architecture in `s`, from segment_anything's own modules (same layout as its
    `_build_sam`, which fixes the input at 1024 px and the decoder at 256 wide)."""
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    patch = 16
    dim = s.prompt_embed_dim
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=s.encoder_depth,
            embed_dim=s.encoder_embed_dim,
            img_size=s.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=s.encoder_num_heads,
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=list(s.encoder_global_attn_indexes),
            window_size=14,
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(s.image_size // patch, s.image_size // patch),
            input_image_size=(s.image_size, s.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=8 * dim, num_heads=8),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    if checkpoint is not None:
        sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return sam.eval()


@register("semantic")
class Semantic(Reward):
    Config = SemanticConfig

    def __init__(self, config: SemanticConfig | None = None, *, sam=None, clip=None, clip_processor=None, scorer=None):
        """`sam` (segment_anything Sam), `clip` + `clip_processor` and `scorer` inject already-built parts."""
        super().__init__(config)
        self.sam, self.clip, self.clip_processor = sam, clip, clip_processor
        self.scorer = scorer if scorer is not None else LikelihoodScorer(self.config.llm)
        self.device = "cpu"

    # --- loading ------------------------------------------------------------------------------------------------

    def load(self, device: str = "cpu") -> None:
        from segment_anything import SamAutomaticMaskGenerator

        cfg = self.config
        self.device = device
        if self.sam is None:
            self.sam = self._load_sam()
        self.sam = self.sam.to(device).eval()
        s = cfg.sam
        self.mask_generator = SamAutomaticMaskGenerator(
            self.sam,
            points_per_side=s.points_per_side,
            points_per_batch=s.points_per_batch,
            pred_iou_thresh=s.pred_iou_thresh,
            stability_score_thresh=s.stability_score_thresh,
            box_nms_thresh=s.box_nms_thresh,
            output_mode="binary_mask",
        )
        if self.clip is None:
            self.clip, self.clip_processor = load_clip(
                cfg.labeler.clip, "semantic reward", "CLIP labeler (labeler.clip)", cfg.labeler.revision
            )
        self.clip = self.clip.to(device).eval()
        self.scorer.load(device)
        # The built-in vocabulary is embedded once; prompt nouns are embedded per batch.
        self.vocabulary = load_vocabulary(cfg.labeler.vocabulary or CATEGORIES_FILE)
        self._vocab_emb = self._embed_labels(self.vocabulary)  # (V, D)

    def _load_sam(self):
        from segment_anything import sam_model_registry

        s = self.config.sam
        checkpoint = str(Path(s.checkpoint).expanduser())
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"semantic reward: SAM checkpoint {s.checkpoint!r} does not exist")
        if s.model_type == "custom":
            return build_sam(s, checkpoint)
        return sam_model_registry[s.model_type](checkpoint=checkpoint)

    # --- the three stages ---------------------------------------------------------------------------------------

    def segments(self, image: np.ndarray) -> list[np.ndarray]:
        """SAM regions of one (H, W, 3) image: boolean (H, W) masks, largest first, small ones dropped.

        segment_anything's generator takes one image at a time; within it, point prompts run points_per_batch at a
        time through the mask decoder.
        """
        import torch

        s = self.config.sam
        with torch.inference_mode():
            records = self.mask_generator.generate(np.ascontiguousarray(image))
        h, w = image.shape[:2]
        records = [r for r in records if r["area"] >= s.min_area_fraction * h * w]
        records.sort(key=lambda r: -r["area"])
        return [r["segmentation"] for r in records[: s.max_segments]]

    def _crop(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The region's crop: outside-mask pixels greyed, bounding box plus margin, padded to a square."""
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        my = int((y1 - y0) * self.config.labeler.crop_margin)
        mx = int((x1 - x0) * self.config.labeler.crop_margin)
        y0, y1 = max(0, y0 - my), min(image.shape[0], y1 + my)
        x0, x1 = max(0, x0 - mx), min(image.shape[1], x1 + mx)
        crop = np.where(mask[y0:y1, x0:x1, None], image[y0:y1, x0:x1], 127).astype(np.uint8)  # (h, w, 3)
        side = max(crop.shape[:2])
        square = np.full((side, side, 3), 127, np.uint8)
        oy, ox = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
        square[oy : oy + crop.shape[0], ox : ox + crop.shape[1]] = crop
        return square

    def _embed_labels(self, labels: Sequence[str]):
        """Unit-norm CLIP text embeddings of the labels' prompts, (N, D) on the device; all in one pass."""
        texts = [self.config.labeler.template.format(label) for label in labels]
        _, emb = clip_embeddings(self.clip, self.clip_processor, None, texts, self.device)
        return emb.to(self.device)  # (N, D)

    def _embed_crops(self, crops: Sequence[np.ndarray]):
        """Unit-norm CLIP image embeddings of the crops, (N, D) on the device, labeler.batch_size per pass."""
        import torch

        size = self.config.labeler.batch_size
        chunks = [crops[start : start + size] for start in range(0, len(crops), size)]
        out = [clip_embeddings(self.clip, self.clip_processor, chunk, None, self.device)[0] for chunk in chunks]
        return torch.cat(out).to(self.device)  # (N, D)

    def vocabulary_for(self, prompt: str) -> list[str]:
        """The labels a region of this prompt's image can get: the built-in vocabulary, then the prompt's nouns."""
        if not self.config.labeler.include_prompt_nouns:
            return self.vocabulary
        known = set(self.vocabulary)
        return self.vocabulary + [n for n in prompt_nouns(prompt) if n not in known]

    def label(self, images: Sequence[np.ndarray], masks: Sequence[list[np.ndarray]], prompts: Sequence[str]):
        """For each image: [(label, confidence, mask)] with same-label regions merged (mask = union)."""
        import torch

        crops = [self._crop(img, m) for img, ms in zip(images, masks, strict=True) for m in ms]
        vocabs = [self.vocabulary_for(p) for p in prompts]
        # Prompt nouns missing from the built-in vocabulary, embedded once for the whole batch.
        extra = list(dict.fromkeys(n for v in vocabs for n in v[len(self.vocabulary) :]))
        extra_row = {n: i for i, n in enumerate(extra)}
        crop_emb = self._embed_crops(crops) if crops else None  # (total masks, D)
        extra_emb = self._embed_labels(extra) if extra else self._vocab_emb[:0]  # (E, D)
        scale = self.clip.logit_scale.exp().item()
        labelled, k = [], 0
        for ms, names in zip(masks, vocabs, strict=True):
            own = [extra_row[n] for n in names[len(self.vocabulary) :]]
            text_emb = torch.cat([self._vocab_emb, extra_emb[own]])  # (V', D)
            merged: dict[str, tuple[float, np.ndarray]] = {}
            for m in ms:
                probs = (scale * crop_emb[k] @ text_emb.T).softmax(-1)  # (V',)
                k += 1
                conf, idx = probs.max(-1)
                name = names[int(idx)]
                if name in merged:
                    old_conf, old_mask = merged[name]
                    merged[name] = (max(old_conf, float(conf)), old_mask | m)
                else:
                    merged[name] = (float(conf), m)
            labelled.append([(name, conf, mask) for name, (conf, mask) in merged.items()])
        return labelled

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[RewardOutput | SampleFailure]:
        # 1. Segments, 2. labels (all regions of the batch in batched CLIP passes).
        masks = [self.segments(img) for img in images]
        labelled = self.label(images, masks, prompts)
        # 3. One likelihood per (prompt, label); identical pairs across the batch are computed once by the scorer.
        requests = [(p, [name for name, _, _ in segs]) for p, segs in zip(prompts, labelled, strict=True)]
        likelihoods = self.scorer.score(requests)
        # 4. Aggregate.
        outputs: list[RewardOutput | SampleFailure] = []
        for image, segs, lik in zip(images, labelled, likelihoods, strict=True):
            if isinstance(lik, SampleFailure):
                outputs.append(lik)
                continue
            pixels = image.shape[0] * image.shape[1]
            segments = [SegmentScore(name, float(mask.sum()) / pixels, conf, lik[name]) for name, conf, mask in segs]
            outputs.append(self._aggregate(segments))
        return outputs

    def _aggregate(self, segments: list[SegmentScore]) -> RewardOutput:
        n = len(segments)
        if n == 0:
            reward = mean = weighted = self.config.empty_reward
        else:
            mean = float(np.mean([s.likelihood for s in segments]))
            areas = np.array([s.area_fraction for s in segments])
            weighted = float(np.dot(areas, [s.likelihood for s in segments]) / areas.sum())
            reward = mean if self.config.aggregate == "mean" else weighted
        return RewardOutput(
            reward=reward,
            components={"num_segments": float(n), "mean_likelihood": mean, "area_weighted_likelihood": weighted},
            segments=segments,
        )

    def info(self) -> RewardInfo:
        cfg = self.config
        return RewardInfo(
            description=(
                f"{cfg.aggregate} over SAM segments (labelled by CLIP) of the LLM likelihood that the label appears "
                f"in the prompted scene ({cfg.llm.mode} mode); {cfg.empty_reward} when no segment is found."
            ),
            min_reward=0.0,
            max_reward=1.0,
            models=(
                ModelSource("segmenter", cfg.sam.checkpoint, cfg.sam.model_type),
                ModelSource("labeler", cfg.labeler.clip, cfg.labeler.revision or ""),
                ModelSource("llm", cfg.llm.model, cfg.llm.revision or ""),
            ),
        )
