"""Shared fixtures: tiny randomly initialised diffusers models built from configs (no downloads)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_unet(in_channels: int = 1, num_class_embeds: int | None = None):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=num_class_embeds,
    ).eval()  # fmt: skip


def tiny_cond_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    ).eval()  # fmt: skip


def tiny_dit(num_layers: int = 1, in_channels: int = 4):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=in_channels, out_channels=2 * in_channels, num_layers=num_layers, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
    ).eval()  # fmt: skip


def tiny_sd3(num_layers: int = 1):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
    ).eval()  # fmt: skip


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 4, 8),
    ).eval()  # fmt: skip


def _tiny_tokenizer(folder):
    """A CLIP tokenizer from files written here (unknown text maps to the end token); no downloads."""
    import json

    from transformers import CLIPTokenizer

    folder.mkdir(exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "p": 3, "h": 4, "o": 5, "t": 6, "o</w>": 7}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _tiny_vae(**config):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=8, **config)  # fmt: skip


def tiny_sd_pipeline(folder):
    """A StableDiffusionPipeline of tiny random components (8x8 images, latents 4x8x8), built locally."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextModel(CLIPTextConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))  # fmt: skip
    pipe = StableDiffusionPipeline(vae=_tiny_vae(), text_encoder=text, tokenizer=_tiny_tokenizer(folder / "tok"), unet=tiny_cond_unet(),
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(folder, num_layers: int = 1):
    """A StableDiffusion3Pipeline of tiny random components (T5 left out, as SD3 allows), with FlowMatchEuler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, projection_dim=4, bos_token_id=0, eos_token_id=1,
                                                          pad_token_id=1))  # fmt: skip

    pipe = StableDiffusion3Pipeline(transformer=tiny_sd3(num_layers), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_tiny_vae(shift_factor=0.0, scaling_factor=1.0),
                                    text_encoder=clip(), tokenizer=_tiny_tokenizer(folder / "tok"), text_encoder_2=clip(),
                                    tokenizer_2=_tiny_tokenizer(folder / "tok"), text_encoder_3=None, tokenizer_3=None)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(folder):
    """A FluxPipeline of tiny random components (one double-stream and one single-stream block); the T5 tokenizer is a
    word-level one built here."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

    words = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "photo": 4}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    t5_tokenizer = T5TokenizerFast(tokenizer_object=words, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))  # fmt: skip
    t5 = T5EncoderModel(T5Config(vocab_size=5, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)).eval()  # no dropout
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 4, 8))  # fmt: skip
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=_tiny_vae(shift_factor=0.0, scaling_factor=1.0), text_encoder=clip,
                        tokenizer=_tiny_tokenizer(folder / "tok"), text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
