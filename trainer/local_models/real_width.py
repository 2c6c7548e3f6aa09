"""Real-width models: the cluster profile's models at their released widths and file layouts, with seeded random
weights and depth cut to 1-2 layers, for the real-architecture test tier (tests/services/test_real_architectures.py,
tests/trainer/test_real_architectures.py) and the GPU check (benchmarks/gpu_check.py, `full_depth`).

They load through the same code as the real checkpoints, so a reward that breaks on a real layout (a tower of a full
CLIPModel checkpoint, a tokenizer.model without tokenizer.json, fp16 weights) breaks in CI. Each builds in seconds;
the tokenizers are trained tiny (`tokenizers.py`) because the real ones cannot be downloaded, while the embeddings
keep the real vocabulary sizes.
"""

from __future__ import annotations

from pathlib import Path

from trainer.local_models.tiny import TINY_SAM, save_pretrained, stable_diffusion_pipeline
from trainer.local_models.tokenizers import clip_tokenizer, llama_tokenizer, opt_tokenizer

# segment_anything's vit_b (sam_vit_b_01ec64.pth: 768 wide, 12 heads, 1024 px input, 256-wide prompt encoder and mask
# decoder) with its image encoder cut from 12 blocks to 2, one windowed and one global-attention block (vit_b has
# global attention at 2, 5, 8, 11), as the semantic reward's `sam` config fields: TINY_SAM's layout at vit_b's widths.
REAL_WIDTH_SAM = {
    **TINY_SAM,
    "encoder_embed_dim": 768,
    "encoder_num_heads": 12,
    "image_size": 1024,
    "prompt_embed_dim": 256,
}
REAL_WIDTH_SAM_FILE = "sam_vit_b_depth2.pth"
# Shard size of the real-width BLIP-2 and Llama checkpoints: their releases are sharded, so loading goes through
# model.safetensors.index.json as with the real ones.
RELEASE_SHARD_SIZE = "500MB"
# lmsys/vicuna-7b-v1.5's special token ids in its config: <s> begins, </s> ends, <unk> (0) pads.
LLAMA_TOKEN_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def random_init(cls, config, seed: int, dtype=None):
    """`cls(config)` initialised by the model's own seeded `init_weights`, with parameters in `dtype`.

    torch's default init of every layer, which `init_weights` overwrites anyway, is skipped: it is most of the build
    time of a model with hundreds of millions of parameters on a CPU.
    """
    import torch
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        with no_init_weights():
            model = cls(config)
        torch.manual_seed(seed)
        model.init_weights()
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def real_width_blip2(path: str | Path, seed: int = 0, full_depth: bool = False) -> Path:
    """BLIP-2 OPT-2.7b at the widths of Salesforce/blip2-opt-2.7b, 1-2 layers per tower, random weights, written with
    `save_pretrained` (config, model.safetensors, processor) into `path`.

    Widths from the hub's config.json (transformers' Blip2VisionConfig / Blip2QFormerConfig defaults are the same):
    - vision (EVA ViT-g): 1408 wide, 16 heads, MLP 6144, patch 14 at 224 px; 39 layers -> 1;
    - Q-Former: 768 wide, 12 heads, MLP 3072, cross-attention to the 1408-wide image features every 2nd layer, 32
      query tokens; 12 layers -> 2 (one with cross-attention, one without);
    - OPT-2.7b: 2560 wide, 32 heads, FFN 10240, 2048 positions, vocab 50304 (facebook/opt-2.7b's 50272 grown for
      the <image> token at 50265, padded); "\\n" ends a caption (eos 50118 there); 32 layers -> 1.
    The processor: 224 px with OpenAI CLIP normalisation, 32 query tokens, OPT's tokenizer trained tiny.
    `full_depth`: the release's 39 / 12 / 32 layers, in fp16 (7.7 GB; for the GPU check, benchmarks/gpu_check.py).
    """
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

    path = Path(path)
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(
            size={"height": 224, "width": 224},
            resample=PILImageResampling.BICUBIC,
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
        ),
        tokenizer=opt_tokenizer(path),
        num_query_tokens=32,
    )  # adds the <image> token
    tokenizer = processor.tokenizer
    config = Blip2Config(
        vision_config=_tower(
            39 if full_depth else 1, 1408, 6144, 16, patch_size=14, image_size=224, qkv_bias=True, layer_norm_eps=1e-6
        ),
        qformer_config=_tower(
            12 if full_depth else 2, 768, 3072, 12, cross_attention_frequency=2, encoder_hidden_size=1408
        ),
        text_config=dict(
            model_type="opt",
            vocab_size=50304,
            hidden_size=2560,
            word_embed_proj_dim=2560,
            ffn_dim=10240,
            num_attention_heads=32,
            num_hidden_layers=32 if full_depth else 1,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("Ċ"),  # "\n" in byte-level BPE
            pad_token_id=tokenizer.pad_token_id,
            prefix="</s>",
        ),
        num_query_tokens=32,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = random_init(Blip2ForConditionalGeneration, config, seed, dtype=torch.float16 if full_depth else None)
    # The tokenizer has about 1000 of the 50304 ids; the others decode to nothing. Zero (tied input and output)
    # embedding rows give them logit 0, below the best of 1000 random logits, so greedy captions are words.
    with torch.no_grad():
        model.get_input_embeddings().weight[len(tokenizer) :] = 0
    # Sharded, as the release is (2 shards, with model.safetensors.index.json).
    model.save_pretrained(path, max_shard_size=RELEASE_SHARD_SIZE)
    processor.save_pretrained(path)
    return path


def _tower(layers: int, width: int, mlp: int, heads: int, **fields) -> dict:
    """A transformer tower's config fields: `layers` blocks `width` wide, MLP `mlp` wide, `heads` heads; `fields`."""
    return dict(
        num_hidden_layers=layers, hidden_size=width, intermediate_size=mlp, num_attention_heads=heads, **fields
    )


def _clip_l14_tower(layers: int, width: int, mlp: int, heads: int) -> dict:
    """The config fields both towers of openai/clip-vit-large-patch14 share: quick_gelu, layer norm eps 1e-5, and
    projection 768 (repeated in each tower's config, as in the release, so a tower loads alone)."""
    return _tower(layers, width, mlp, heads, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)


def clip_l14_text_config(full_depth: bool) -> dict:
    """openai/clip-vit-large-patch14's text tower (also SD 1.5's text encoder): 768 wide, 12 heads, MLP 3072, vocab
    49408, 77 positions, quick_gelu, projection 768, legacy eos_token_id 2; 12 layers, or 1."""
    return dict(
        **_clip_l14_tower(12 if full_depth else 1, 768, 3072, 12),
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def real_width_clip_l14(path: str | Path, seed: int = 0, full_depth: bool = False) -> Path:
    """CLIP ViT-L/14 at the widths of openai/clip-vit-large-patch14, one layer per tower, random weights: CLIPModel and
    CLIPProcessor written with `save_pretrained` into `path`.

    Widths from the hub's config.json: text 768 wide, 12 heads, MLP 3072, vocab 49408, 77 positions (12 layers -> 1);
    vision 1024 wide, 16 heads, MLP 4096, patch 14 at 224 px (24 layers -> 1); projection 768; quick_gelu. As in the
    release, each tower's config repeats projection_dim (so a tower loads alone) and the text config keeps the legacy
    eos_token_id 2, with which CLIP pools at the highest token id: <|endoftext|>. CLIP's tokenizer, trained tiny.
    `full_depth`: the release's 12 text and 24 vision layers.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    config = CLIPConfig(
        text_config=clip_l14_text_config(full_depth),
        vision_config={**_clip_l14_tower(24 if full_depth else 1, 1024, 4096, 16), "patch_size": 14},
        projection_dim=768,
        logit_scale_init_value=2.6592,
    )
    model = random_init(CLIPModel, config, seed)
    # CLIPImageProcessor's defaults are the release's: shortest edge 224, centre crop 224, bicubic, OpenAI mean/std.
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=clip_tokenizer())
    path = Path(path)
    save_pretrained(path, model, processor)
    return path


def real_width_llama7b(path: str | Path, seed: int = 0, full_depth: bool = False) -> Path:
    """Vicuna-7B v1.5 (Llama-2-7B) at its widths with one layer, random weights, in fp16 safetensors written with
    `save_pretrained` into `path`, next to the tokenizer files of the lmsys/vicuna-7b-v1.5 repo: `tokenizer.model`,
    tokenizer_config.json and special_tokens_map.json, no tokenizer.json, so loading the tokenizer needs sentencepiece.

    Widths from the hub's config.json: hidden 4096, intermediate 11008, 32 heads (no grouped KV), vocab 32000, 4096
    positions, RMSNorm eps 1e-5; 32 layers -> 1. The sentencepiece BPE model (Llama's trainer settings: byte
    fallback, split digits) is trained tiny, 1000 pieces; the LM keeps 32000 rows. `full_depth`: the release's 32
    layers (13.5 GB).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        **_tower(32 if full_depth else 1, 4096, 11008, 32, num_key_value_heads=32),  # no grouped KV
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        **LLAMA_TOKEN_IDS,
        tie_word_embeddings=False,
    )
    # Built in fp16 directly: half the memory of building in fp32 and casting. Sharded, as the release is.
    model = random_init(LlamaForCausalLM, config, seed, dtype=torch.float16)
    model.save_pretrained(path, max_shard_size=RELEASE_SHARD_SIZE)
    del model
    llama_tokenizer(path)
    return path


def real_width_sam_vit_b(path: str | Path, seed: int = 0) -> Path:
    """SAM at vit_b's widths (`REAL_WIDTH_SAM`: 2 of its 12 encoder blocks), random weights, written into `path` as
    the release's checkpoint is: a plain state dict `.pth`. Returns the checkpoint file."""
    import torch

    from services.rewards.semantic import SamConfig, build_sam

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    checkpoint = path / REAL_WIDTH_SAM_FILE
    torch.save(build_sam(SamConfig(**REAL_WIDTH_SAM)).state_dict(), checkpoint)
    return checkpoint


def real_width_alignment_reward(path: str | Path, clip: str | Path, seed: int = 0) -> Path:
    """A learned alignment reward directory on the CLIP at `clip`, as `rewardfleet train-reward` writes it (the CLIP
    copied in as `clip/`, `save_alignment_model`), with an untrained head of the trainer's default shape: residual,
    hidden (128, 32), on 768-wide embeddings (`rewardfleet train-reward`'s defaults, trainer/reward_training.py). Its
    zero-initialised last MLP layer is drawn at random instead, so scores depend on the MLP as well as on the CLIP
    cosine."""
    import shutil

    import torch

    from services.rewards.alignment import HeadConfig, build_head, save_alignment_model

    head_config = HeadConfig(embed_dim=768, hidden_sizes=(128, 32), residual=True)
    torch.manual_seed(seed)
    head = build_head(head_config)
    torch.nn.init.normal_(head["mlp"][-1].weight, std=0.1)
    path = Path(path)
    shutil.copytree(clip, path / "clip", dirs_exist_ok=True)
    return save_alignment_model(path, "clip", head, head_config)


def save_real_width_models(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Writes every real-width model under `root`: {"blip2", "clip", "llama", "alignment": directories, "sam":
    checkpoint file}."""
    root = Path(root)
    paths = {
        "blip2": real_width_blip2(root / "blip2", seed),
        "clip": real_width_clip_l14(root / "clip", seed),
        "llama": real_width_llama7b(root / "llama", seed),
        "sam": real_width_sam_vit_b(root / "sam", seed),
    }
    paths["alignment"] = real_width_alignment_reward(root / "alignment", paths["clip"], seed)
    return paths


def real_width_stable_diffusion(path: str | Path, seed: int = 0, full_depth: bool = False) -> Path:
    """Stable Diffusion 1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5) at its released widths with one layer per
    block, random weights, written with `StableDiffusionPipeline.save_pretrained` into `path` in the release's layout:
    model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ (no safety_checker/ or feature_extractor/;
    requires_safety_checker false). What `model.pretrained=<path>` of the fine-tuning job loads.

    Widths from the release's config.json files (the diffusers defaults of the fields not listed are the release's):
    - unet: block_out_channels (320, 640, 1280, 1280), CrossAttnDownBlock2D x3 + DownBlock2D, UpBlock2D +
      CrossAttnUpBlock2D x3, cross_attention_dim 768, attention_head_dim 8 (diffusers reads it as 8 heads), norm
      groups 32, 4 in/out channels, sample_size 64; layers_per_block 2 -> 1 (580M of the release's 860M weights);
    - vae: block_out_channels (128, 256, 512, 512), 4 latent channels, scaling_factor 0.18215, norm groups 32,
      sample_size 512; layers_per_block 2 -> 1;
    - text_encoder: CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14): 768 wide, 12 heads, MLP 3072,
      vocab 49408, 77 positions, quick_gelu, legacy eos_token_id 2; 12 layers -> 1;
    - scheduler: PNDMScheduler with the release's scheduler_config.json, whose DDIM-only key clip_sample (false) is
      kept as diffusers keeps it, so DDIMScheduler.from_config of it does not clip;
    - tokenizer: CLIP's, trained tiny (`tokenizers.clip_tokenizer`), 77 tokens.
    The UNet and VAE keep torch's default init (seeded; about 4 s for the UNet). The build takes about 15 s on 2 cores,
    most of it writing the 2.7 GB of fp32 safetensors. `full_depth`: the release's 2 layers per block and 12 text
    layers (SD 1.5's 860M-weight UNet; for the GPU check).
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = random_init(CLIPTextModel, CLIPTextConfig(**clip_l14_text_config(full_depth)), seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2 if full_depth else 1,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()
    vae = AutoencoderKL(
        sample_size=512,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2 if full_depth else 1,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32,
        scaling_factor=0.18215,
    ).eval()
    scheduler = PNDMScheduler.from_config(
        {
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000,
            "steps_offset": 1,
            "skip_prk_steps": True,
            "set_alpha_to_one": False,
            "clip_sample": False,
            "trained_betas": None,
        }
    )
    pipe = stable_diffusion_pipeline(vae, text_encoder, clip_tokenizer(), unet, scheduler)
    path = Path(path)
    pipe.save_pretrained(path)
    return path
