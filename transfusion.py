"""
Transfusion in one file: a single transformer that predicts the next text token and
denoises images with diffusion, switching between the two inside one sequence.

    Zhou et al., "Transfusion: Predict the Next Token and Diffuse Images with One
    Multi-Modal Model", 2024. https://arxiv.org/abs/2408.11039  (section numbers: v1)

Sections 1-9 are the paper's method on a plain padded batch, in the order the data
flows; read them top to bottom. Section 10 only makes it fast and may be skipped: the
file up to its header trains a model and decodes with it.
    1. config                              6. sequences -> a padded batch
    2. the transformer: Llama blocks       7. the model (Fig. 3)
    3. patches, timesteps, autoencoder     8. the training objective (Eq. 1-4)
    4. the attention mask (Fig. 4)         9. decoding (§3 "Inference")
    5. diffusion: schedule, noising       10. Speed: packing, the KV cache, batched decoding, bf16

Shapes in the comments: B batch, S sequence, L cached length, V vocabulary, D model
width, H heads, Dh head width, M images in a batch, C image channels, I image side
(images are square: (C, I, I)), P patch side, N = (I/P)^2 patches per image, U the
U-Net's width, T diffusion steps.

A sequence is a Python list of segments: a 1-D LongTensor of text token ids, or an
image tensor (C, I, I): pixels in [-1, 1], or a latent of them (§2.3, ImageAutoencoder;
Transfusion.encode_images and decode_images go between the two). BOI and EOI are not written in the text:
every image is wrapped in BOI ... EOI when the sequence is read (§3 "Data
Representation"). Example: [tensor([BOS, 7]), image, tensor([EOS])] is the token stream
BOS 7 BOI <N patches> EOI EOS.

Deviations from the paper, all so that it trains on a laptop CPU:
- A small conv autoencoder's latent, trained first on the training images (train_mnist.py
  --autoencoder 16: a digit -> 4 x 8 x 8), not a pretrained VAE's (§2.3), and without its
  KL term; the config's default, autoencoder = 0, patchifies pixels directly.
- Tiny: the pixel defaults below have 1.27M parameters and 2 layers of width 128 (paper:
  0.16B-7B, 16-32 layers, Table 2), a vocabulary of 16 ids (Llama 2's 32k) and
  sequences of at most 43 positions (4096).
- The U-Net patch layers have one resolution level. Their norm is footnote 7's regular
  layer norm in place of AdaLayerNorm: a GroupNorm with one group normalises each image
  over (C, I, I), with a per-channel scale and shift. The timestep embedding enters
  inside each conv block, as in DDPM's U-Net, and is added once more to the patch tokens
  that the down path makes, as for linear patches (below).
- Linear patches get the timestep embedding after the linear layer, at width D; footnote
  6 adds it to each patch vector before. W(p + e) = Wp + We, so a learned D-vector added
  after can express everything the paper's version can.
- Each patch token also gets a learned embedding of its index in the image, so that even
  the linear encoder knows where a patch sits; the paper does not say how patches are
  told apart beyond the sequence's RoPE.
- Condition dropout for classifier-free guidance: the paper gives no rate; we use DiT's
  0.1. "Unconditional" is BOS and the image alone (drop_condition, section 8).
- A clean image given to the model (in a prompt, or one just drawn) is shown with the
  timestep embedding of t = clean_t = 200 (alpha_bar 0.90); the paper does not say. t is
  drawn uniformly in training (1..500 for the images that teach captions), so the embedding
  of t = 1 is among the least trained; mid-range ones caption best (docs/defaults.md;
  train_mnist.py --eval-only --clean-t T measures any other).
- The samplers clip their estimate of x_0 to the data range (predict_x0): [-1, 1] for
  pixels, as the reference DDPM code does; for latents, each number's range over the
  training images. The paper does not say.
- A DDIM sampler (Song et al. 2021) is offered beside the paper's DDPM one.

Left out on purpose: a pretrained VAE, text tokenization (ids are given), distributed
training and the image-editing fine-tune (§4.5).
"""
import math
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Segment = torch.Tensor  # a 1-D LongTensor of token ids, or an image (C, I, I)


# ---- 1. Config ----

@dataclass
class TransfusionConfig:
    # the defaults are a model of 28x28 digits' pixels (train_mnist.py's is on latents: autoencoder 16)
    # text (§2.1): a closed vocabulary; the special tokens are ordinary ids in it
    vocab_size: int = 16          # 10 digits and 6 special ids; paper: Llama 2's 32k
    pad_id: int = 10
    bos_id: int = 11
    boi_id: int = 12              # begin of image (§3 "Data Representation")
    eoi_id: int = 13              # end of image
    eos_id: int = 14
    max_seq_len: int = 43         # a 4-digit number and its images, room for a 5th; paper: 4096
    # transformer (§3 "Model Architecture", §4.1: Llama's settings)
    d_model: int = 128            # paper: 768-4096 (Table 2)
    n_layers: int = 2             # paper: 16-32
    n_heads: int = 4              # paper: 12-32
    ffn_hidden: int = 344         # SwiGLU width, ~8/3 d_model as in Llama
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    image_attention: str = "bidirectional"  # within an image (§3); "causal" is the ablation of §4.3.1
    # images (§3) as the transformer sees them: pixels, or the latent of an autoencoder (§2.3)
    image_size: int = 28          # I; a latent's side when autoencoder > 0
    channels: int = 1             # C; a latent's channels when autoencoder > 0 (paper: 8)
    autoencoder: int = 0          # 0: the model sees pixels; W > 0: an ImageAutoencoder of conv width W
    pixel_size: int = 28          # ... whose images are (pixel_channels, pixel_size, pixel_size)
    pixel_channels: int = 1
    patch_size: int = 14          # 4 patches per 28x28 image. Paper: 2x2 latent pixels (= 16x16
                                  # image pixels); with U-Net layers larger patches lose little (Table 6)
    patch_encoder: str = "unet"   # "linear" or "unet" (§3, §4.3.3)
    unet_channels: int = 16       # U, the width of the U-Net down/up blocks
    unet_downsample: int = 1      # 2: blocks at I/2 (pixel-unshuffle): faster, worse digits (docs/speed.md)
    # diffusion (§2.2)
    T: int = 1000                 # training timesteps, as the paper
    cosine_s: float = 0.008       # Nichol & Dhariwal's offset
    max_beta: float = 0.999       # ... and their clip on beta_t
    # training objective (§3 "Training Objective", §4.1)
    lam: float = 5.0              # lambda of Eq. 4, as the paper
    cond_drop_prob: float = 0.1   # paper: not given; DiT's value
    image_first_max_t: int = 500  # noise cap for images before their caption (§4.3.4)
    clean_t: int = 200            # the t a clean image is shown at (paper: not given; see docstring)
    min_snr_gamma: float = 0.0    # 0: the paper's plain MSE (Eq. 3); > 0: min-SNR weights (section 8)

    @property
    def n_patches(self) -> int:  # N, patches per image
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:  # C * P * P, numbers in one patch
        return self.channels * self.patch_size ** 2

    def __post_init__(self):
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError("d_model / n_heads must be an even integer (RoPE rotates pairs)")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide image_size {self.image_size}")
        if self.image_attention not in ("bidirectional", "causal"):
            raise ValueError(f"image_attention must be 'bidirectional' or 'causal', not {self.image_attention!r}")
        if self.patch_encoder not in ("linear", "unet"):
            raise ValueError(f"patch_encoder must be 'linear' or 'unet', not {self.patch_encoder!r}")
        if self.patch_encoder == "unet" and self.unet_channels < 1:
            raise ValueError(f"unet_channels must be at least 1, not {self.unet_channels}")
        if self.unet_downsample < 1 or self.patch_size % self.unet_downsample:
            raise ValueError(f"unet_downsample {self.unet_downsample} must divide patch_size {self.patch_size}")
        if self.autoencoder < 0:
            raise ValueError(f"autoencoder must be 0 (pixels) or a conv width >= 1, not {self.autoencoder}")
        if self.autoencoder and (self.pixel_size > 4 * self.image_size or self.pixel_size % 2):
            raise ValueError(f"an autoencoder's latent is 1/4 of its padded images: image_size {self.image_size} "
                             f"does not fit pixel_size {self.pixel_size} (even, at most 4 x image_size)")
        if not 1 <= self.image_first_max_t <= self.T:
            raise ValueError("image_first_max_t must be in [1, T]")
        if not 1 <= self.clean_t <= self.T:
            raise ValueError("clean_t must be in [1, T]")


# ---- 2. The transformer: Llama-style pre-norm blocks (§3 "Model Architecture", §4.1) ----

class RMSNorm(nn.Module):
    """Llama's norm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * g.
    F.rms_norm computes exactly that in one kernel."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_table(head_dim: int, max_len: int, theta: float) -> torch.Tensor:
    """RoPE's rotations (Su et al. 2021) as unit complex numbers e^(i pos theta^(-2j/Dh)),
    (max_len, Dh/2) complex64: position pos turns pair j by the angle pos * theta^(-2j/Dh)."""
    freqs = theta ** (-torch.arange(0, head_dim, 2).float() / head_dim)   # (Dh/2,)
    angles = torch.arange(max_len).float()[:, None] * freqs[None, :]     # (max_len, Dh/2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x, rot):
    """Rotate the pairs (x[2j], x[2j+1]) of q or k (..., S, Dh) by their position's angles, rot
    (..., S, Dh/2): a pair read as the complex number x[2j] + i x[2j+1], times e^(i angle), as in
    Llama's reference code. In fp32 (there is no bf16 complex); one kernel, where the same
    rotation written with cos and sin takes six and a concatenation (docs/speed.md)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))     # (..., S, Dh/2) complex
    return torch.view_as_real(pairs * rot).flatten(-2)                  # (..., S, Dh)


class Attention(nn.Module):
    def __init__(self, cfg: TransfusionConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.wqkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, rot, mask):
        q, k, v = self.qkv(x, rot)
        return self.attend(q, k, v, mask)

    def qkv(self, x, rot):
        """Queries, keys and values of x (B, S, D), each (B, H, S, Dh); q and k rotated by RoPE."""
        B, S, D = x.shape
        qkv = self.wqkv(x).view(B, S, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, S, Dh)
        q, k = apply_rope(qkv[:2], rot).unbind(0)                       # (B, H, S, Dh) each: both rotated at once
        return q, k, qkv[2]

    def attend(self, q, k, v, mask):
        """Each query's mix of the values whose keys the mask lets it see (section 4):
        softmax(q k^T / sqrt(Dh)) v over the keys where mask is True."""
        # in fp32 under bf16 autocast, as Llama's reference computes its softmax in fp32. Written
        # out, not F.scaled_dot_product_attention: at these sizes (rows of ~35 positions) the
        # three steps are faster on a CPU (docs/speed.md), and the mask is seen at work
        with torch.autocast(q.device.type, enabled=False):
            scores = (q.float() @ k.float().transpose(-2, -1)) * self.head_dim ** -0.5  # (B, H, S, L)
            y = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v.float()   # (B, H, S, Dh)
        B, H, S, Dh = y.shape
        return self.wo(y.transpose(1, 2).reshape(B, S, H * Dh))          # (B, S, D)


class SwiGLU(nn.Module):
    """Llama's MLP: W2 (silu(W1 x) * W3 x) (Shazeer 2020); W1 and W3 in one matmul."""

    def __init__(self, cfg: TransfusionConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.d_model, 2 * cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)                          # (B, S, ffn_hidden) each
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: TransfusionConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, rot, mask):
        x = x + self.attn(self.attn_norm(x), rot, mask)
        return x + self.mlp(self.mlp_norm(x))


# ---- 3. Modality parts (§3 "Model Architecture"): patches, timesteps, patch layers; latents (§2.3) ----
# Text has an embedding table in and a linear LM head out (in Transfusion, section 7).
# Images are cut into P x P patches in raster order (left to right, top to bottom;
# §3 "Data Representation") and mapped to and from the transformer's width by a linear
# layer or by U-Net down/up blocks, with the diffusion timestep added. With an autoencoder
# (§2.3) the images are its latents: ImageAutoencoder, at the end of this section, turns
# pixels into latents before sequences are made, and latents back into pixels after sampling.

def patchify(x, P: int):
    """(M, C, I, I) images -> (M, N, C*P*P) patches in raster order."""
    M, C, I, _ = x.shape
    x = x.view(M, C, I // P, P, I // P, P)                              # (M, C, I/P, P, I/P, P)
    x = x.permute(0, 2, 4, 1, 3, 5)                                     # (M, I/P, I/P, C, P, P)
    return x.reshape(M, (I // P) ** 2, C * P * P)                       # (M, N, C*P*P)


def unpatchify(x, P: int, C: int):
    """(M, N, C*P*P) patches -> (M, C, I, I) images; the exact inverse of patchify."""
    M, N, _ = x.shape
    side = math.isqrt(N)                                                # I/P
    x = x.view(M, side, side, C, P, P)                                  # (M, I/P, I/P, C, P, P)
    x = x.permute(0, 3, 1, 4, 2, 5)                                     # (M, C, I/P, P, I/P, P)
    return x.reshape(M, C, side * P, side * P)                          # (M, C, I, I)


def timestep_features(t, dim: int = 256, max_period: float = 10000.0):
    """Sinusoidal features of the diffusion step t (M,) -> (M, dim), as in DDPM / DiT."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))  # (dim/2,)
    angles = t.float()[:, None] * freqs[None, :]                        # (M, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)             # (M, dim)


class TimestepEmbedder(nn.Module):
    """t -> sinusoidal features -> MLP -> a D-vector added to the image's patches."""

    def __init__(self, d_model: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, t):
        return self.mlp(timestep_features(t, self.freq_dim))            # (M, D)


class LinearPatches(nn.Module):
    """The paper's simple option (§3): one linear layer in, one linear layer out."""

    def __init__(self, cfg: TransfusionConfig):
        super().__init__()
        self.P, self.C = cfg.patch_size, cfg.channels
        self.proj_in = nn.Linear(cfg.patch_dim, cfg.d_model)
        self.proj_out = nn.Linear(cfg.d_model, cfg.patch_dim)

    def encode(self, x, temb):
        """Images x_t (M, C, I, I) and their timestep embedding (M, D) -> tokens (M, N, D)."""
        # footnote 6 adds the timestep to each patch before proj_in; we add it after, at width D (docstring)
        return self.proj_in(patchify(x, self.P)) + temb[:, None, :], None

    def decode(self, h, temb, skip):
        """Transformer outputs at the patches (M, N, D) -> predicted noise (M, C, I, I)."""
        return unpatchify(self.proj_out(h), self.P, self.C)


class ResBlock(nn.Module):
    """The DDPM U-Net's residual conv block, the timestep added between its two convs.
    Its norm is footnote 7's regular layer norm in place of AdaLayerNorm: a GroupNorm with
    one group normalises each image over all its channels and pixels, with a per-channel
    scale and shift."""

    def __init__(self, c_in: int, c_out: int, d_t: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(1, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(d_t, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(1, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x))) + self.t_proj(temb)[:, :, None, None]  # (M, c_out, I, I)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class UNetPatches(nn.Module):
    """The paper's stronger option (§3, §4.3.3): U-Net down blocks before the transformer
    and up blocks after it, joined by the U-Net's skip connection around the transformer.
    One level here: a conv block at full resolution, then patchify and a linear layer make
    one token per patch (a P x P convolution of stride P, written as the matmul it is);
    the up path mirrors it."""

    def __init__(self, cfg: TransfusionConfig):
        super().__init__()
        U, D, s = cfg.unet_channels, cfg.d_model, cfg.unet_downsample
        self.s, self.U, self.P = s, U, cfg.patch_size // s              # P: the patch side at the blocks' resolution
        self.conv_in = nn.Conv2d(cfg.channels * s * s, U, 3, padding=1)
        self.down = ResBlock(U, U, D)
        self.to_tokens = nn.Linear(U * self.P ** 2, D)                  # a patch's U x P x P features -> D
        self.from_tokens = nn.Linear(D, U * self.P ** 2)
        self.up = ResBlock(2 * U, U, D)
        self.norm_out, self.conv_out = nn.GroupNorm(1, U), nn.Conv2d(U, cfg.channels * s * s, 3, padding=1)
        # speed only, the same numbers: weights and images stored channels-last, (I, I, U)
        # in memory, the layout CPU convolutions run fastest in (docs/speed.md)
        self.to(memory_format=torch.channels_last)
        # speed only, the same numbers: on a CPU, more images than this (sampling draws
        # hundreds at once) go through in slices whose activations stay in the CPU's caches
        self.slice = 128

    def encode(self, x, temb):
        if len(x) > self.slice and x.device.type == "cpu":  # speed only (`self.slice` above)
            parts = [self.encode(x[i:i + self.slice], temb[i:i + self.slice]) for i in range(0, len(x), self.slice)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        x = F.pixel_unshuffle(x, self.s)                                # (M, C s s, I/s, I/s)
        x = x.contiguous(memory_format=torch.channels_last)              # a no-op if C s s = 1
        skip = self.down(self.conv_in(x), temb)                         # (M, U, I/s, I/s)
        h = patchify(skip, self.P)                                      # (M, N, U*P*P), raster order
        return self.to_tokens(h) + temb[:, None, :], skip               # (M, N, D); t again (docstring)

    def decode(self, h, temb, skip):
        if len(h) > self.slice and h.device.type == "cpu":
            return torch.cat([self.decode(h[i:i + self.slice], temb[i:i + self.slice], skip[i:i + self.slice])
                              for i in range(0, len(h), self.slice)])
        h = unpatchify(self.from_tokens(h), self.P, self.U)              # (M, U, I/s, I/s)
        h = h.contiguous(memory_format=torch.channels_last)              # as skip, for the convs (speed)
        h = self.up(torch.cat([h, skip], dim=1), temb)                  # (M, U, I/s, I/s)
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), self.s)  # (M, C, I, I)


class ImageAutoencoder(nn.Module):
    """§2.3 "Latent Image Representation", small: the paper's diffusion runs on the latent of a
    pretrained VAE ("represent every 8 x 8 pixel patch as an 8-dimensional vector"); the
    transformer never sees a pixel. Ours represents every 4 x 4 pixel patch as 4 numbers: a
    plain conv autoencoder, trained first on the training images alone (`fit`) and frozen:
    (c, S, S) pixels in [-1, 1], padded with -1 to 4I x 4I, -> two stride-2 convs -> a latent
    (C, I, I). Each latent channel is shifted and scaled to mean 0 and variance 1 over the
    training images, the scale the noise schedule assumes (Rombach et al.'s scale factor, per
    channel). No KL term: the latent is kept small by a light L2 penalty instead. `lo`, `hi`
    bound every latent number over the training images: the samplers clip x_0 to them, as they
    clip pixels to [-1, 1] (predict_x0)."""

    def __init__(self, cfg: TransfusionConfig):
        super().__init__()
        W, c, C = cfg.autoencoder, cfg.pixel_channels, cfg.channels
        self.pad = (4 * cfg.image_size - cfg.pixel_size) // 2          # 28 -> 32 for a latent 8 x 8
        self.enc = nn.Sequential(nn.Conv2d(c, W, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(W, W, 4, stride=2, padding=1), nn.SiLU(),           # 4I -> 2I
                                 nn.Conv2d(W, W, 4, stride=2, padding=1), nn.SiLU(),           # 2I -> I
                                 nn.Conv2d(W, C, 3, padding=1))
        self.dec = nn.Sequential(nn.Conv2d(C, W, 3, padding=1), nn.SiLU(),
                                 nn.ConvTranspose2d(W, W, 4, stride=2, padding=1), nn.SiLU(),  # I -> 2I
                                 nn.ConvTranspose2d(W, W, 4, stride=2, padding=1), nn.SiLU(),  # 2I -> 4I
                                 nn.Conv2d(W, c, 3, padding=1))
        shape = (C, cfg.image_size, cfg.image_size)
        self.register_buffer("mean", torch.zeros(C, 1, 1))
        self.register_buffer("std", torch.ones(C, 1, 1))
        self.register_buffer("lo", torch.full(shape, -1.0))
        self.register_buffer("hi", torch.full(shape, 1.0))
        # speed only, the same numbers: channels-last convs, as in UNetPatches (fit: 0.7x the time)
        self.to(memory_format=torch.channels_last)

    def raw_encode(self, x):  # (M, c, S, S) -> the unnormalised latent (M, C, I, I)
        x = F.pad(x, (self.pad,) * 4, value=-1.0).contiguous(memory_format=torch.channels_last)
        return self.enc(x).contiguous()

    def raw_decode(self, z):  # (M, C, I, I) -> (M, c, S, S), unclipped
        x, p = self.dec(z.contiguous(memory_format=torch.channels_last)), self.pad  # (M, c, 4I, 4I)
        return x[..., p:x.shape[-1] - p, p:x.shape[-1] - p].contiguous()

    @torch.no_grad()
    def encode(self, x, chunk: int = 1000):
        """Pixels (M, c, S, S) in [-1, 1] -> latents (M, C, I, I), in fp32 whatever the autocast."""
        with torch.autocast(x.device.type, enabled=False):
            return torch.cat([(self.raw_encode(x[i:i + chunk].float()) - self.mean) / self.std
                              for i in range(0, len(x), chunk)]) if len(x) else x.new_zeros(0, *self.lo.shape)

    @torch.no_grad()
    def decode(self, z, chunk: int = 1000):
        """Latents (M, C, I, I) -> pixels (M, c, S, S) in [-1, 1], in fp32."""
        with torch.autocast(z.device.type, enabled=False):
            if not len(z):  # no latents: no pixels, in their shape
                return self.raw_decode(z.new_zeros(1, *self.lo.shape).float())[:0]
            return torch.cat([self.raw_decode(z[i:i + chunk].float() * self.std + self.mean).clamp(-1, 1)
                              for i in range(0, len(z), chunk)])

    def fit(self, images, steps: int = 4000, batch_size: int = 16, lr: float = 2e-3,
            generator: Optional[torch.Generator] = None, log=None):
        """Train on pixels (n, c, S, S) in [-1, 1]: reconstruction MSE, AdamW with a cosine
        decay, fp32; then set the latent's per-channel mean and std, and its bounds lo, hi.
        Many small batches: 4,000 steps of 16 digits reconstruct better than 1,000 of 128 in
        half the time (docs/speed.md). Returns the images' latents (n, C, I, I), those `encode`
        gives, computed here anyway for the statistics."""
        self.requires_grad_(True)
        opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.0)
        with torch.enable_grad(), torch.autocast(images.device.type, enabled=False):
            for i in range(steps):
                for g in opt.param_groups:
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / steps))
                x = images[torch.randint(len(images), (batch_size,), generator=generator)].float()  # (B, c, S, S)
                z = self.raw_encode(x)                                  # (B, C, I, I)
                loss = F.mse_loss(self.raw_decode(z), x) + 1e-4 * z.pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if log is not None and (i + 1) % 1000 == 0:
                    log(f"autoencoder step {i + 1}/{steps}: loss {loss.item():.4f}")
        opt.zero_grad(set_to_none=True)                                 # no stale gradient for a later clip
        self.requires_grad_(False)                                      # frozen from here on
        self.mean.zero_()
        self.std.fill_(1.0)
        z = self.encode(images)                                         # unnormalised, as mean 0, std 1
        self.mean.copy_(z.mean((0, 2, 3))[:, None, None])
        self.std.copy_(z.std((0, 2, 3))[:, None, None])
        z = (z - self.mean) / self.std                                  # (n, C, I, I), as encode gives them
        self.lo.copy_(z.amin(0))
        self.hi.copy_(z.amax(0))
        return z


# ---- 4. The Transfusion attention mask (§3 "Transfusion Attention", Fig. 4) ----

def transfusion_mask(img_id, valid, bidirectional: bool = True):
    """Who may attend to whom, for a padded batch with one sequence per row.

    img_id (B, S): for each position the index of the image its patch belongs to, or
        -1 for text (BOI and EOI are text) and padding.
    valid (B, S): False at padding.
    Returns (B, S, S) bool, True where query i may attend to key j: causal over the
    whole sequence, plus, if `bidirectional`, every pair of patches of the same image;
    never a padding key. A padding query sees itself, so that no softmax row is empty.
    """
    S = img_id.shape[1]
    mask = torch.ones(S, S, dtype=torch.bool, device=img_id.device).tril()     # (S, S) causal
    if bidirectional:  # the paper's choice; causal images lose FID, most with linear patches (Table 5)
        same_image = (img_id[:, :, None] == img_id[:, None, :]) & (img_id[:, :, None] >= 0)  # (B, S, S)
        mask = mask | same_image
    mask = mask & valid[:, None, :]                                             # (B, S, S)
    return mask | torch.eye(S, dtype=torch.bool, device=img_id.device)


# ---- 5. Diffusion (§2.2): the cosine schedule and the forward process ----

def cosine_alpha_bar(T: int, s: float = 0.008, max_beta: float = 0.999):
    """alpha_bar_t for t = 0..T (T+1 values) from Nichol & Dhariwal's cosine schedule.

    f(t) = cos^2((t/T + s) / (1 + s) * pi/2), beta_t = min(1 - f(t)/f(t-1), max_beta),
    alpha_bar_t = prod_{s<=t} (1 - beta_s), so alpha_bar_0 = 1 (a clean image).
    """
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)                  # (T,) beta_1..beta_T
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    return torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar]).float()  # (T+1,)


def add_noise(x0, t, eps, alpha_bar):
    """Eq. 2: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, for images (M, C, I, I), t (M,)."""
    ab = alpha_bar[t].view(-1, 1, 1, 1)                                 # (M, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


# ---- 6. Sequences -> a padded batch (§3 "Data Representation") ----
# The user's segments become the model's "items": token tensors with BOI and EOI written
# in, and (image, t) pairs, each image filling N patch positions. `collate` pads rows of
# items into one Batch; the loss (section 8) and decoding (section 9) both use it.

@dataclass
class Batch:
    """A padded batch of sequences, one per row: what the transformer sees (`collate`)."""
    tokens: torch.Tensor   # (B, S) text token ids; PAD at patches and padding
    img_id: torch.Tensor   # (B, S) index m of the image a patch belongs to, -1 elsewhere
    valid: torch.Tensor    # (B, S) False at padding
    pos: torch.Tensor      # (B, S) RoPE positions
    mask: torch.Tensor     # (B, S, S) who may attend to whom (section 4)
    targets: torch.Tensor  # (B, S) the next token each position is trained to predict, -1: none (Eq. 1)
    images: torch.Tensor   # (M, C, I, I) the images as the model sees them (x_t)
    t: torch.Tensor        # (M,) their diffusion timesteps
    img_row: torch.Tensor  # (M,) the row of image m ...
    img_col: torch.Tensor  # (M,) ... and the column of its first patch

    def patch_index(self, N: int):
        """(row, column) of every patch in the batch, image by image: two (M*N,) tensors."""
        M = self.img_row.shape[0]
        rows = self.img_row[:, None].expand(M, N).reshape(-1)
        cols = (self.img_col[:, None] + torch.arange(N, device=self.img_col.device)).reshape(-1)
        return rows, cols


def check_batch(cfg: TransfusionConfig, seqs: Sequence[Sequence[Segment]]):
    """Raise ValueError naming what is wrong with a batch of sequences; nothing is
    truncated. The token ids and the pixels of the whole batch are checked at once (fast)."""
    if len(seqs) == 0:
        raise ValueError("empty batch: give at least one sequence")
    texts, images, where = [], [], []
    for s, seq in enumerate(seqs):
        if not isinstance(seq, (list, tuple)) or len(seq) == 0:
            raise ValueError("a sequence must be a non-empty list of segments")
        length = 0
        for i, seg in enumerate(seq):
            if not isinstance(seg, torch.Tensor):
                raise ValueError(f"segment {i} is a {type(seg).__name__}, not a tensor")
            if seg.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):  # text
                if seg.dim() != 1 or seg.numel() == 0:
                    raise ValueError(f"text segment {i} must be a non-empty 1-D tensor, got shape {tuple(seg.shape)}")
                texts.append(seg)
                length += seg.numel()
            elif seg.is_floating_point():  # image
                want = (cfg.channels, cfg.image_size, cfg.image_size)
                if tuple(seg.shape) != want:
                    raise ValueError(f"image segment {i} has shape {tuple(seg.shape)}, expected (C, I, I) = {want}")
                images.append(seg)
                where.append((s, i))
                length += cfg.n_patches + 2  # BOI, patches, EOI
            else:
                raise ValueError(f"segment {i} has dtype {seg.dtype}: use int64 for text, float for images")
        if length > cfg.max_seq_len:
            raise ValueError(f"sequence of {length} positions is longer than max_seq_len = {cfg.max_seq_len}")
    if images:  # a NaN would only surface later, as a NaN loss or a blank image
        finite = torch.stack(images).isfinite().flatten(1).all(1)       # (M,)
        if not finite.all():
            s, i = where[int((~finite).nonzero()[0])]
            raise ValueError(f"image segment {i} of sequence {s} contains NaN or inf")
    reserved = torch.tensor([cfg.pad_id, cfg.boi_id, cfg.eoi_id])
    ids = torch.cat([t.long().cpu() for t in texts])
    if ids.min() >= 0 and ids.max() < cfg.vocab_size and not torch.isin(ids, reserved).any():
        return
    for seg in texts:  # something is wrong: find it, to say what
        bad = seg[(seg < 0) | (seg >= cfg.vocab_size)]
        if bad.numel():
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {cfg.vocab_size})")
        if torch.isin(seg.long().cpu(), reserved).any():
            raise ValueError("a text segment contains PAD, BOI or EOI: BOI/EOI are added around each "
                             "image automatically and PAD is for batching")


def with_markers(cfg: TransfusionConfig, seq: Sequence[Segment], t_clean: Optional[int] = None) -> list:
    """User segments -> model items: BOI/EOI tokens put around each image, and each
    image paired with its diffusion timestep (clean images: cfg.clean_t, see docstring)."""
    t_clean = cfg.clean_t if t_clean is None else t_clean
    boi, eoi = torch.tensor([cfg.boi_id]), torch.tensor([cfg.eoi_id])
    items = []
    for seg in seq:
        if seg.is_floating_point():
            items += [boi, (seg, t_clean), eoi]
        else:
            items.append(seg)
    return items


def n_positions(cfg: TransfusionConfig, items: list) -> int:
    """The sequence positions a list of items fills: N per image, one per token."""
    return sum(cfg.n_patches if isinstance(item, tuple) else item.numel() for item in items)


def lm_targets(cfg: TransfusionConfig, tokens, is_text):
    """Eq. 1's targets (B, S), -1 where none: position i predicts token i+1 where both are text
    (is_text (B, S)), but not where the input is BOI (footnote 8: a patch comes next, and
    patches are not predicted as tokens)."""
    has_target = is_text[:, :-1] & is_text[:, 1:] & (tokens[:, :-1] != cfg.boi_id)  # (B, S-1)
    targets = torch.full_like(tokens, -1)
    targets[:, :-1][has_target] = tokens[:, 1:][has_target]
    return targets


def collate(cfg: TransfusionConfig, seqs: Sequence[list], device,
            start_pos: Optional[Sequence[int]] = None, packed: bool = False) -> Batch:
    """Lists of items (token tensors and (image, t) pairs) -> one right-padded Batch, a
    sequence per row. Sequence b's positions start at start_pos[b] (0 unless it continues
    earlier positions, as decoding with a KV cache does, section 10).
    packed=True: short sequences share rows, for speed (`pack_batch`, section 10)."""
    N = cfg.n_patches
    tokens, img_id, images, ts, img_row, img_col = [], [], [], [], [], []
    for b, items in enumerate(seqs):
        tok, ids = [], []
        for item in items:
            if isinstance(item, tuple):  # an image: N patch positions
                img_row.append(b)
                img_col.append(len(tok))
                ids += [len(images)] * N
                tok += [cfg.pad_id] * N
                images.append(item[0])
                ts.append(item[1])
            else:
                ids += [-1] * item.numel()
                tok += item.tolist()
        tokens.append(tok)
        img_id.append(ids)
    lengths = [len(tok) for tok in tokens]
    S = max(1, max(lengths))

    def pad(rows, value):
        return torch.tensor([r + [value] * (S - len(r)) for r in rows], device=device)  # (B, S)

    tokens, img_id = pad(tokens, cfg.pad_id), pad(img_id, -1)
    column = torch.arange(S, device=device)
    valid = column < torch.tensor(lengths, device=device)[:, None]     # (B, S)
    p0 = torch.tensor(start_pos if start_pos is not None else [0] * len(seqs), device=device)
    pos = torch.where(valid, p0[:, None] + column, 0)                   # (B, S) RoPE positions, 0 at padding
    targets = lm_targets(cfg, tokens, valid & (img_id < 0))
    img = (torch.stack(images).to(device) if images else
           torch.zeros(0, cfg.channels, cfg.image_size, cfg.image_size, device=device))
    batch = Batch(tokens=tokens, img_id=img_id, valid=valid, pos=pos,
                  mask=None if packed else transfusion_mask(img_id, valid, cfg.image_attention == "bidirectional"),
                  targets=targets, images=img, t=torch.tensor(ts, dtype=torch.long, device=device),
                  img_row=torch.tensor(img_row, dtype=torch.long, device=device),
                  img_col=torch.tensor(img_col, dtype=torch.long, device=device))
    return pack_batch(cfg, batch) if packed else batch


# ---- 7. The model: one transformer over text and patches (§3 "Model Architecture", Fig. 3) ----

class Transfusion(nn.Module):
    """The parts of sections 2-4 put together: `forward` maps a Batch to text logits and
    noise predictions. The loss and decoding are sections 8 and 9 (also offered as methods)."""

    def __init__(self, cfg: TransfusionConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        # text in and out (§3: "embedding matrices")
        self.tok_emb = nn.Embedding(cfg.vocab_size, D)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        # images in and out (§3: linear layer or U-Net down/up blocks)
        self.time_emb = TimestepEmbedder(D)
        self.patches = LinearPatches(cfg) if cfg.patch_encoder == "linear" else UNetPatches(cfg)
        self.patch_pos = nn.Parameter(torch.zeros(cfg.n_patches, D))   # where in the image (see docstring)
        # the shared transformer
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.register_buffer("rope", rope_table(D // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta), persistent=False)
        self.register_buffer("alpha_bar", cosine_alpha_bar(cfg.T, cfg.cosine_s, cfg.max_beta), persistent=False)
        self.init_weights()
        # §2.3: with an autoencoder the model reads and writes latents; it is trained before the
        # transformer (ImageAutoencoder.fit) and frozen: no gradient, no optimizer, no EMA
        self.autoencoder = ImageAutoencoder(cfg).requires_grad_(False) if cfg.autoencoder else None

    def init_weights(self):
        # GPT-2/Llama init for the transformer's linear layers and embeddings; the U-Net's
        # convs keep PyTorch's fan-in-scaled default, as in the DDPM U-Net
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, std=0.02)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
        for block in self.blocks:  # GPT-2: scale the residual projections by depth
            nn.init.normal_(block.attn.wo.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
            nn.init.normal_(block.mlp.w2.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
        # DiT: zero the layers that write the noise prediction and the U-Net's residual
        # branches, so training starts from eps_hat = 0 (loss 1) and identity blocks
        out = self.patches.proj_out if isinstance(self.patches, LinearPatches) else self.patches.conv_out
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        if isinstance(self.patches, UNetPatches):
            for rb in (self.patches.down, self.patches.up):
                nn.init.zeros_(rb.conv2.weight)
            # the patch projections are the U-Net's P x P convs: they keep a conv's fan-in
            # init, uniform in +-1/sqrt(U P P), like the convs around them
            bound = 1 / math.sqrt(self.patches.to_tokens.in_features)
            for lin in (self.patches.to_tokens, self.patches.from_tokens):
                nn.init.uniform_(lin.weight, -bound, bound)
                nn.init.uniform_(lin.bias, -bound, bound)
        nn.init.normal_(self.patch_pos, std=0.02)

    def num_params(self) -> int:  # what training learns: the frozen autoencoder's weights are not counted
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith("autoencoder."))

    # §2.3: the images of a sequence are what the transformer sees, pixels or latents
    def encode_images(self, x):
        """Pixels (M, c, S, S) in [-1, 1] -> the model's images (M, C, I, I): the latent, or x itself."""
        return x if self.autoencoder is None else self.autoencoder.encode(x)

    def decode_images(self, x):
        """The model's images (M, C, I, I) -> pixels (M, c, S, S) in [-1, 1]."""
        return x.clamp(-1, 1) if self.autoencoder is None else self.autoencoder.decode(x)

    @property
    def x0_range(self):  # the bounds the samplers clip x_0 to: [-1, 1] for pixels, the latents' box
        return (-1.0, 1.0) if self.autoencoder is None else (self.autoencoder.lo, self.autoencoder.hi)

    @property
    def device(self) -> torch.device:  # where inputs go; the training script chooses it
        return self.tok_emb.weight.device

    def forward(self, batch: Batch):
        """One pass over a batch of mixed sequences (Fig. 3): each modality's own layers in,
        the shared transformer, each modality's own layers out. Returns text logits
        (B, S, V) and the predicted noise eps_hat of each image (M, C, I, I)."""
        h, image_state = self.embed(batch)                              # (B, S, D)
        rot = self.rope[batch.pos][:, None]                             # (B, 1, S, Dh/2), shared by heads
        mask = batch.mask[:, None]                                      # (B, 1, S, S), shared by heads
        for block in self.blocks:
            h = block(h, rot, mask)
        return self.predict(h, batch, image_state)

    def embed(self, batch: Batch):
        """Text tokens -> their embeddings; each noisy image x_t -> N patch tokens with its
        timestep, written into the sequence where its patches go. Returns h (B, S, D) and
        what `predict` needs again for the images: their timestep embedding and U-Net skip."""
        h = self.tok_emb(batch.tokens)                                  # (B, S, D)
        M, N = batch.images.shape[0], self.cfg.n_patches
        if not M:
            return h, None
        temb = self.time_emb(batch.t)                                   # (M, D)
        patch_tokens, skip = self.patches.encode(batch.images, temb)    # (M, N, D)
        patch_tokens = patch_tokens + self.patch_pos                    # (M, N, D)
        h = h.index_put(batch.patch_index(N), patch_tokens.reshape(M * N, -1).to(h.dtype))  # (B, S, D)
        return h, (temb, skip)

    def predict(self, h, batch: Batch, image_state):
        """The transformer's outputs (B, S, D) -> text logits (B, S, V) at every position, and
        the predicted noise (M, C, I, I) of each image from the outputs at its patches."""
        h = self.norm(h)
        logits = self.lm_head(h)                                        # (B, S, V)
        if image_state is None:
            return logits, None
        temb, skip = image_state
        M, N = batch.images.shape[0], self.cfg.n_patches
        eps = self.patches.decode(h[batch.patch_index(N)].view(M, N, -1), temb, skip)  # (M, C, I, I)
        return logits, eps

    # sections 6, 8, 9 and 10 as methods: what the MNIST scripts call
    def with_markers(self, seq, t_clean=None) -> list:
        return with_markers(self.cfg, seq, t_clean)

    def collate(self, seqs, start_pos=None) -> Batch:
        return collate(self.cfg, seqs, self.device, start_pos)

    def loss(self, seqs: Sequence[Sequence[Segment]], generator: Optional[torch.Generator] = None,
             packed: bool = False):
        """(total, lm, ddpm) of Eq. 4 on a batch of sequences: `transfusion_loss`, section 8."""
        return transfusion_loss(self, seqs, generator, packed)

    def generate_reference(self, prompt: Sequence[Segment], **kw):
        """Continue one prompt with text and images: `generate_reference`, section 9."""
        return generate_reference(self, prompt, **kw)

    def generate(self, prompts: Sequence[Sequence[Segment]], **kw):
        """The same for a batch of prompts, KV-cached: `generate`, section 10 (keywords there)."""
        return generate(self, prompts, **kw)


# ---- 8. The training objective (§3 "Training Objective", Eq. 1-4, §4.3.4) ----

def drop_condition(cfg: TransfusionConfig, seqs, generator=None):
    """Classifier-free guidance training: with probability cond_drop_prob, a sequence that
    opens with a caption and then an image becomes BOS <image>, so that the model also
    learns the unconditional p(image). Everything after the first image goes too: the later
    text and images belong to a context that no longer exists, and training "BOS <image>
    EOI -> EOS" would teach a captioner that an uncaptioned image ends a sequence. So
    BOS <image> is the one unconditional context the model learns, the one the decoding
    loop contrasts every image with (`unconditional_eps`, section 9)."""
    out = []
    for seq, r in zip(seqs, torch.rand(len(seqs), generator=generator).tolist()):  # one draw a sequence
        opens_with_caption = (len(seq) > 1 and not seq[0].is_floating_point() and seq[1].is_floating_point()
                              and seq[0].numel() > 1 and int(seq[0][0]) == cfg.bos_id)
        if opens_with_caption and r < cfg.cond_drop_prob:
            seq = [seq[0][:1], seq[1]]
        out.append(seq)
    return out


def max_timesteps(cfg: TransfusionConfig, seqs) -> List[int]:
    """The noise cap t_max of every image, in order. §4.3.4 (Table 8) caps t at 500 "in the
    20% of cases where images appear before their captions": here every image of a sequence
    that opens with an image (nothing but BOS before it) gets image_first_max_t, the later
    images too (text between images does not make a sequence caption-first). Every image of
    a sequence that opens with text is trained at any t up to T."""
    caps = []
    for seq in seqs:
        # the first segment that is not BOS alone: an image, or the text of a caption
        lead = next((seg for seg in seq if seg.is_floating_point() or bool((seg != cfg.bos_id).any())), None)
        image_first = lead is not None and lead.is_floating_point()
        caps += [cfg.image_first_max_t if image_first else cfg.T for seg in seq if seg.is_floating_point()]
    return caps


def transfusion_loss(model: Transfusion, seqs: Sequence[Sequence[Segment]],
                     generator: Optional[torch.Generator] = None, packed: bool = False):
    """L = L_LM + lambda * L_DDPM (Eq. 4) on a batch of interleaved sequences of clean
    images in [-1, 1]. Returns (total, lm, ddpm). packed=True: the same loss, computed on
    rows that several short sequences share (section 10; float rounding apart)."""
    cfg, device = model.cfg, model.device
    check_batch(cfg, seqs)
    # the noise caps are read from the data as given: an image whose caption is dropped
    # below is still a caption-first image, trained at every noise level
    caps = [max_timesteps(cfg, [seq]) for seq in seqs]
    if model.training and cfg.cond_drop_prob > 0:
        seqs = drop_condition(cfg, seqs, generator)
    # a dropped condition keeps a prefix of the images (the first): keep their caps
    t_max = torch.tensor([c for seq, cap in zip(seqs, caps)
                          for c in cap[:sum(seg.is_floating_point() for seg in seq)]], dtype=torch.float)
    # Diffusion forward process, per image and before patchify (§3 "Training Objective"):
    # each image draws its own t uniformly in 1..t_max and its own noise eps.
    x0 = [seg for seq in seqs for seg in seq if seg.is_floating_point()]
    x0 = (torch.stack(x0).to(device) if x0 else
          torch.zeros(0, cfg.channels, cfg.image_size, cfg.image_size, device=device))  # (M, C, I, I)
    t = 1 + (torch.rand(len(t_max), generator=generator) * t_max).long()  # (M,) uniform in 1..t_max
    eps = torch.randn(x0.shape, generator=generator).to(device)
    xt = add_noise(x0, t.to(device), eps, model.alpha_bar)           # (M, C, I, I), Eq. 2
    # the same sequences with each clean image replaced by its x_t, in order
    noisy = iter(zip(xt, t.tolist()))
    items = [[next(noisy) if isinstance(item, tuple) else item for item in with_markers(cfg, seq)] for seq in seqs]
    batch = collate(cfg, items, device, packed=packed)
    return batch_loss(model, batch, eps, t)


def batch_loss(model: Transfusion, batch: Batch, eps, t):
    """Eq. 4 on a collated batch whose images are x_t, noised with eps (M, C, I, I) at t (M,):
    the forward pass, then the objective. Returns (total, lm, ddpm)."""
    cfg = model.cfg
    logits, eps_hat = model(batch)
    weight = min_snr_weight(model.alpha_bar[t.to(model.device)], cfg.min_snr_gamma) if cfg.min_snr_gamma > 0 else None
    return objective(cfg, batch, logits, eps_hat, eps, weight)


def objective(cfg: TransfusionConfig, batch: Batch, logits, eps_hat, eps, weight=None):
    """Eq. 4 from the model's outputs: (total, lm, ddpm). LM loss: the cross-entropy of each
    text position's next token (Eq. 1), where `collate` set a target (none where the input
    is BOI, footnote 8, at patches or at padding). Diffusion loss per image (Eq. 3): the MSE
    over one image's pixels, averaged over images, so each image weighs the same (unless
    `weight`, one number per image, says otherwise: min_snr_weight below)."""
    has_target = batch.targets >= 0                                  # (B, S)
    lm = (F.cross_entropy(logits[has_target].float(), batch.targets[has_target])  # Eq. 1
          if has_target.any() else torch.zeros((), device=logits.device))
    if eps_hat is not None and eps_hat.shape[0]:
        per_image = (eps_hat.float() - eps).pow(2).mean(dim=(1, 2, 3))  # (M,) Eq. 3
        ddpm = (per_image if weight is None else weight * per_image).mean()
    else:
        ddpm = torch.zeros((), device=logits.device)
    return lm + cfg.lam * ddpm, lm, ddpm                            # Eq. 4


def min_snr_weight(alpha_bar_t, gamma: float):
    """Not the paper's (it weighs every image alike: config.min_snr_gamma = 0). Min-SNR-gamma
    weights for epsilon-prediction (Hang et al. 2023): min(SNR, gamma) / SNR per image, with
    SNR = alpha_bar_t / (1 - alpha_bar_t). Nearly clean images (SNR above gamma), whose noise is
    hard to see and whose MSE is the largest, count less. Measured as a speed lever, not adopted:
    docs/speed.md."""
    snr = alpha_bar_t / (1 - alpha_bar_t)
    return snr.clamp(max=gamma) / snr


# ---- 9. Decoding (§3 "Inference"): samplers, guidance, the decoding loop ----
# LM mode samples tokens; BOI switches to diffusion mode, which appends N patches of pure
# noise and denoises them step by step; EOI switches back. `generate_reference` is that
# loop for one prompt, written to be read beside the paper's paragraph.

def sampling_timesteps(T: int, steps: int) -> List[Tuple[int, int]]:
    """(t, t_prev) pairs from T down to 0 in `steps` evenly spaced jumps, the
    "respacing" of Nichol & Dhariwal (§4.1: 250 steps of the 1000 trained)."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    ts = torch.linspace(T, 1, steps).round().long().tolist()
    return list(zip(ts, ts[1:] + [0]))


def predict_x0(xt, eps, ab_t, x0_range=(-1.0, 1.0)):
    """Invert Eq. 2 for x_0 given the predicted noise; clipped to the data range (docstring):
    [-1, 1] for pixels, each latent number's bounds over the training images for latents
    (ImageAutoencoder.lo, .hi). Unclipped, the first step from t = T, where alpha_bar_T ~ 0,
    divides by ~0 and throws a latent's x_0 far out."""
    return torch.clamp((xt - (1 - ab_t).sqrt() * eps) / ab_t.sqrt(), *x0_range)


def ddpm_step(xt, eps, t: int, t_prev: int, alpha_bar, noise, x0_range=(-1.0, 1.0)):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2), on a respaced schedule:
    x_{t_prev} ~ q(x_{t_prev} | x_t, x0_hat), the Gaussian posterior around the predicted
    x_0 (Ho et al.'s Eq. 6-7, with beta the jump's: 1 - alpha_bar_t / alpha_bar_{t_prev})."""
    ab_t, ab_prev = alpha_bar[t], alpha_bar[t_prev]
    beta = 1 - ab_t / ab_prev                                           # beta of the jump t_prev -> t
    x0 = predict_x0(xt, eps, ab_t, x0_range)
    mean = (ab_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - ab_prev) * xt) / (1 - ab_t)
    if t_prev == 0:
        return mean
    var = beta * (1 - ab_prev) / (1 - ab_t)
    return mean + var.sqrt() * noise


def ddim_step(xt, eps, t: int, t_prev: int, alpha_bar, noise=None, x0_range=(-1.0, 1.0)):
    """Deterministic DDIM (Song et al. 2021, eta = 0): jump to t_prev along the predicted noise."""
    ab_t, ab_prev = alpha_bar[t], alpha_bar[t_prev]
    x0 = predict_x0(xt, eps, ab_t, x0_range)
    eps = (xt - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()                  # the noise consistent with the clipped x0
    return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps


SAMPLERS = {"ddpm": ddpm_step, "ddim": ddim_step}


def classifier_free_guidance(eps_cond, eps_uncond, scale: float):
    """Ho & Salimans 2022: push the prediction away from the unconditional one (§2.2, §4.1)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def sample_token(logits, temperature: float, top_k: Optional[int], generator):
    """LM mode: greedy (the paper's choice for text, §4.1) or temperature / top-k sampling.
    logits (B, V) -> token ids (B,)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def append_text(out: list, tok: int):
    """Add a generated token to the returned segments, extending the last one if it is text."""
    tok = torch.tensor([tok])
    if out[-1].is_floating_point():
        out.append(tok)
    else:
        out[-1] = torch.cat([out[-1], tok])


def unconditional_eps(model: Transfusion, x, t: int):
    """eps_hat of the images x_t (M, C, I, I) in the unconditional context of classifier-free
    guidance, BOS BOI <x_t>: no text and no earlier image, for the first image of a sequence
    and a later one alike. It is the context condition dropout trains (drop_condition,
    section 8), so guidance pushes each image toward all of its real context: the text
    before it and the earlier images."""
    cfg = model.cfg
    context = torch.tensor([cfg.bos_id, cfg.boi_id])
    return model(collate(cfg, [[context, (xi, t)] for xi in x], model.device))[1]  # (M, C, I, I)


def check_decoding(model: Transfusion, prompts, sampler: str, steps: int) -> List[Tuple[int, int]]:
    """Raise ValueError on bad prompts or sampler arguments; return the (t, t_prev) schedule."""
    check_batch(model.cfg, prompts)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, not {sampler!r}")
    return sampling_timesteps(model.cfg.T, steps)


@torch.no_grad()
def generate_reference(model: Transfusion, prompt: Sequence[Segment], *, max_new_tokens: int = 32,
                       steps: int = 250, sampler: str = "ddpm", guidance_scale: float = 3.0,
                       temperature: float = 0.0, top_k: Optional[int] = None,
                       generator: Optional[torch.Generator] = None, on_step=None, use_cache: bool = True):
    """§3 "Inference" for ONE prompt, plainly: the whole sequence is recomputed at every
    step. Returns the prompt followed by what was generated, as segments (token tensors
    without BOI/EOI, images (C, I, I) in [-1, 1]). It stops at EOS, after max_new_tokens
    tokens, or when the sequence is full. `on_step(t_prev, x)`, if given, sees the image
    after each denoising step. use_cache is ignored (`generate`, section 10, takes the same
    arguments). A test holds the two equal."""
    cfg, N, device = model.cfg, model.cfg.n_patches, model.device
    schedule = check_decoding(model, [prompt], sampler, steps)
    items, out = with_markers(cfg, prompt), list(prompt)  # what the model reads; what we return

    def read(items):  # the model on the whole sequence: logits (1, S, V), eps_hat (M, C, I, I)
        return model(collate(cfg, [items], device))

    for _ in range(max_new_tokens):
        length = n_positions(cfg, items)
        if length >= cfg.max_seq_len:
            break
        tok = int(sample_token(read(items)[0][:, -1], temperature, top_k, generator))  # LM mode
        if tok in (cfg.pad_id, cfg.eoi_id) or (tok == cfg.boi_id and length + N + 2 > cfg.max_seq_len):
            break  # never trained on; or no room for BOI, N patches and EOI: no half image
        items.append(torch.tensor([tok]))
        if tok == cfg.boi_id:  # diffusion mode: append N patches of pure noise x_T, denoise for `steps`
            x = torch.randn(1, cfg.channels, cfg.image_size, cfg.image_size, generator=generator).to(device)
            for t, t_prev in schedule:
                eps = read(items + [(x[0], t)])[1][-1:]                     # (1, C, I, I) the last image's
                if guidance_scale != 1:  # classifier-free guidance against BOS BOI <x_t>
                    eps = classifier_free_guidance(eps, unconditional_eps(model, x, t), guidance_scale)
                noise = torch.randn(x.shape, generator=generator).to(device) if t_prev > 0 else None
                x = SAMPLERS[sampler](x, eps, t, t_prev, model.alpha_bar, noise, model.x0_range)  # overwrites x_t
                if on_step is not None:
                    on_step(t_prev, x)
            x = torch.clamp(x, *model.x0_range)
            items += [(x[0], cfg.clean_t), torch.tensor([cfg.eoi_id])]  # the clean image, EOI: back to LM mode
            out.append(x[0].cpu())
        else:
            append_text(out, tok)
            if tok == cfg.eos_id:
                break
    return out


# ---- 10. Speed: packing, the KV cache, batched decoding, bf16 ----
# Nothing here changes what the method computes, up to float rounding; tests hold each
# piece equal to sections 6-9: a packed batch's loss and gradients to the padded batch's,
# KV-cached logits to a full forward pass, `generate` to `generate_reference`. Last, where
# bf16 autocast pays (its rounding is coarser: the training script measured its effect).

def pack(lengths: Sequence[int], capacity: int) -> List[Tuple[int, int]]:
    """First-fit decreasing: put sequences of these lengths into as few rows of
    `capacity` positions as it finds. Returns (row, offset) for each sequence."""
    assert max(lengths) <= capacity, "a sequence longer than a row"
    ends, where = [], [None] * len(lengths)           # ends[r]: the positions row r has filled
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, end in enumerate(ends) if end + lengths[i] <= capacity), len(ends))
        if r == len(ends):
            ends.append(0)
        where[i] = (r, ends[r])
        ends[r] += lengths[i]
    return where


def packed_mask(cfg: TransfusionConfig, img_id, valid, owner):
    """Section 4's mask (R, S, S) of rows holding several sequences (owner (R, S): the sequence
    at each position, -1 at padding): each query sees only keys of its own sequence."""
    return (transfusion_mask(img_id, valid, cfg.image_attention == "bidirectional")
            & (owner[:, :, None] == owner[:, None, :]))


def pack_batch(cfg: TransfusionConfig, batch: Batch) -> Batch:
    """The padded batch's sequences with short ones sharing rows, none longer than the
    longest sequence, so that a training step computes less padding. Each sequence keeps
    its positions (RoPE restarts at 0) and its LM targets, and its mask is section 4's
    restricted to its own positions, so it sees only itself: the loss and its gradients are
    the padded batch's. Images keep their order m; only their place in the batch moves.
    (The padded batch's own mask is not needed: `collate` leaves it out when packing.)"""
    B, S = batch.tokens.shape
    lengths = batch.valid.sum(1).tolist()
    where = pack(lengths, capacity=S)
    R = 1 + max(r for r, _ in where)
    rows = torch.tensor([r for r, _ in where], device=batch.tokens.device)    # (B,) new row of each sequence
    offsets = torch.tensor([o for _, o in where], device=batch.tokens.device)  # (B,) and its first column
    v = batch.valid
    to = (rows[:, None].expand(B, S)[v], (offsets[:, None] + torch.arange(S, device=v.device))[v])  # new (row, col)

    def move(x, fill):  # (B, S) -> (R, S): each sequence's positions to their new place
        out = torch.full((R, S), fill, dtype=x.dtype, device=x.device)
        out[to] = x[v]
        return out

    valid, img_id = move(v, False), move(batch.img_id, -1)
    owner = move(torch.arange(B, device=v.device)[:, None].expand(B, S), -1)   # (R, S) the sequence at each position
    return Batch(tokens=move(batch.tokens, cfg.pad_id), img_id=img_id, valid=valid, pos=move(batch.pos, 0),
                 mask=packed_mask(cfg, img_id, valid, owner), targets=move(batch.targets, -1), images=batch.images,
                 t=batch.t, img_row=rows[batch.img_row], img_col=offsets[batch.img_row] + batch.img_col)


def packed_batch(cfg: TransfusionConfig, seqs: List[List[int]], images, t, device) -> Batch:
    """The Batch that `collate(cfg, items, device, packed=True)` makes, built from plain lists in
    one pass instead of a tensor per segment (train_mnist.py's training batches, `number_batch`).
    Each sequence is its token ids with BOI and EOI written in, and image m's N patch positions
    written as N entries -1 - m; images (M, C, I, I) are the x_t of images 0..M-1, t (M,) their
    timesteps. A test holds it equal to collate's packed batch."""
    lengths = [len(s) for s in seqs]
    S = max(lengths)
    where = pack(lengths, capacity=S)
    R = 1 + max(r for r, _ in where)
    tok, img, owner, pos = [cfg.pad_id] * (R * S), [-1] * (R * S), [-1] * (R * S), [0] * (R * S)
    for b, (seq, (r, o)) in enumerate(zip(seqs, where)):  # sequence b at row r, from column o
        i, n = r * S + o, len(seq)
        tok[i:i + n] = [c if c >= 0 else cfg.pad_id for c in seq]
        img[i:i + n] = [-1 - c if c < 0 else -1 for c in seq]
        owner[i:i + n] = [b] * n
        pos[i:i + n] = range(n)
    tokens, img_id, owner, pos = (torch.tensor(x, device=device).view(R, S)             # (R, S) each
                                  for x in (tok, img, owner, pos))
    valid = owner >= 0
    targets = lm_targets(cfg, tokens, valid & (img_id < 0))             # (R, S) ...
    targets[:, :-1][owner[:, :-1] != owner[:, 1:]] = -1                 # ... none into the next sequence
    first = (img_id >= 0) & (F.pad(img_id, (1, 0), value=-1)[:, :-1] != img_id)   # (R, S) each image's first patch
    img_row, img_col = first.nonzero(as_tuple=True)                     # (M,) each, in raster order ...
    order = img_id[img_row, img_col].argsort()                          # ... put in the order m
    return Batch(tokens=tokens, img_id=img_id, valid=valid, pos=pos, mask=packed_mask(cfg, img_id, valid, owner),
                 targets=targets, images=images.to(device), t=t.to(device), img_row=img_row[order], img_col=img_col[order])


class KVCache:
    """Keys and values of the tokens decoded so far, one pair per layer.

    `valid` (B, L) marks real columns. Every call adds a column for every row, so a
    row that sat a call out (its sequence ended, or waits while others decode) leaves
    invalid columns behind that no later query may attend to.
    Speed only: each layer's keys and values live in a buffer with room after its L
    columns, so that new columns are written in place instead of copying the cache each
    call (a denoising step adds N columns at each of its 100 steps and keeps none).
    """

    def __init__(self):
        self.k: List[torch.Tensor] = []   # per layer (B, H, room, Dh); the first L columns are the cache
        self.v: List[torch.Tensor] = []
        self.valid: Optional[torch.Tensor] = None

    def __len__(self):
        return 0 if self.valid is None else self.valid.shape[1]

    def extend(self, layer: int, k, v):
        """The cache's keys and values followed by the new ones k, v (B, H, S, Dh): (B, H, L+S, Dh)
        each. The new ones are written just after the cache, where they stay once `valid` grows
        to cover them (forward_cached's commit); otherwise the next call writes over them."""
        L, S = len(self), k.shape[2]
        if layer == len(self.k):
            self.k.append(k.new_empty(k.shape[0], k.shape[1], 0, k.shape[3]))
            self.v.append(v.new_empty(v.shape[0], v.shape[1], 0, v.shape[3]))
        if self.k[layer].shape[2] < L + S:  # no room: a buffer twice as long, the cache copied once
            for buf in (self.k, self.v):
                old, buf[layer] = buf[layer], k.new_empty(k.shape[0], k.shape[1], 2 * (L + S), k.shape[3])
                buf[layer][:, :, :L] = old[:, :, :L]
        self.k[layer][:, :, L:L + S] = k
        self.v[layer][:, :, L:L + S] = v
        return self.k[layer][:, :, :L + S], self.v[layer][:, :, :L + S]


def forward_cached(model: Transfusion, batch: Batch, cache: KVCache, commit: bool = True):
    """Transfusion.forward for a batch that continues the cached rows: the new positions
    attend to the cache and to each other, and only they are computed. `commit` stores
    their keys and values (a denoising step does not: its x_t is replaced next step)."""
    B, S = batch.tokens.shape
    h, image_state = model.embed(batch)                                 # (B, S, D)
    rot = model.rope[batch.pos][:, None]                                # (B, 1, S, Dh/2)
    mask = batch.mask
    if len(cache):  # the cached prefix lies wholly before the new tokens: visible wherever it is valid
        mask = torch.cat([cache.valid[:, None, :].expand(B, S, -1), mask], dim=2)  # (B, S, L+S)
    mask = mask[:, None]                                                # (B, 1, S, L+S)
    for i, block in enumerate(model.blocks):  # Block.forward, with the cache's keys and values
        q, k, v = block.attn.qkv(block.attn_norm(h), rot)
        k, v = cache.extend(i, k, v)                                    # (B, H, L+S, Dh)
        h = h + block.attn.attend(q, k, v, mask)
        h = h + block.mlp(block.mlp_norm(h))
    if commit:
        cache.valid = batch.valid if cache.valid is None else torch.cat([cache.valid, batch.valid], dim=1)
    return model.predict(h, batch, image_state)


class DownPathOnce:
    """Speed only, the same numbers: guidance runs the model twice on the same x_t at the same
    t, in the conditional context and then in the unconditional one. The patch encoder (the
    U-Net's down path) sees only x_t and t, so inside this block its second call on equal
    inputs returns the first call's result instead of computing it again."""

    def __init__(self, patches: nn.Module):
        self.patches, self.last = patches, None

    def encode_once(self, x, temb):
        last = self.last
        if last is not None and torch.equal(x, last[0]) and torch.equal(temb, last[1]):
            return last[2]
        self.last = (x, temb, type(self.patches).encode(self.patches, x, temb))
        return self.last[2]

    def __enter__(self):
        self.patches.encode = self.encode_once       # shadows the class's method on this object

    def __exit__(self, *exc):
        del self.patches.encode                      # back to the class's method
        self.last = None


class Denoiser:
    """The guided eps_hat of the images that rows `drawing` are drawing, step after step (the
    diffusion mode of `generate`): each row's x_t in its own context, and, unless the guidance
    scale is 1, in the unconditional context BOS BOI (`unconditional_eps`, section 9).
    Speed only, the same numbers up to float rounding: with a KV cache, the batch of N patch
    positions a row adds is the same at every step but for x_t and t, so it is collated once;
    and the keys and values of BOS BOI, which do not depend on x_t, are computed once into a
    cache of their own. Without a cache every row is recomputed from its start, every step."""

    def __init__(self, model: Transfusion, rows: List["Row"], drawing: List[int], cache: Optional[KVCache],
                 guidance_scale: float):
        cfg, device = model.cfg, model.device
        self.model, self.rows, self.drawing, self.cache, self.scale = model, rows, drawing, cache, guidance_scale
        if cache is None:
            return
        blank = (torch.zeros(cfg.channels, cfg.image_size, cfg.image_size), 0)  # x_t and t: set at each step
        new = [[blank] if b in drawing else [] for b in range(len(rows))]
        self.cond = collate(cfg, new, device, start_pos=[n_positions(cfg, r.items) for r in rows])
        M = len(drawing)
        self.uncond_cache = KVCache()
        forward_cached(model, collate(cfg, [[torch.tensor([cfg.bos_id, cfg.boi_id])]] * M, device), self.uncond_cache)
        self.uncond = collate(cfg, [[blank]] * M, device, start_pos=[2] * M)

    def eps(self, x, t: int):
        """eps_hat of the images x_t (M, C, I, I) at t, with classifier-free guidance."""
        with DownPathOnce(self.model.patches):
            eps = self.conditional(x, t)
            if self.scale != 1:  # classifier-free guidance against BOS BOI <x_t>
                eps = classifier_free_guidance(eps, self.unconditional(x, t), self.scale)
        return eps

    def conditional(self, x, t: int):
        if self.cache is None:
            at_t = [[] for _ in self.rows]
            for i, b in enumerate(self.drawing):
                at_t[b] = [(x[i], t)]
            return run_rows(self.model, [r.items for r in self.rows], at_t, None, commit=False)[1]
        return self.run(self.cond, self.cache, x, t)

    def unconditional(self, x, t: int):
        if self.cache is None:
            return unconditional_eps(self.model, x, t)
        return self.run(self.uncond, self.uncond_cache, x, t)

    def run(self, batch: Batch, cache: KVCache, x, t: int):  # the collated batch, with x_t at t written in
        batch = replace(batch, images=x, t=torch.full((len(x),), t, dtype=torch.long, device=x.device))
        return forward_cached(self.model, batch, cache, commit=False)[1]


@dataclass
class Row:
    """One sequence being decoded by `generate`."""
    items: list          # what the model has read: token tensors and (image, t) pairs
    out: list            # what we return: the prompt's segments, then the generated ones
    mode: str = "text"   # "text" (LM mode), "image" (opened one, waits to draw it), "done"
    n_new: int = 0       # tokens generated (BOI counts one; an image's patches none)


def take_token(cfg: TransfusionConfig, row: Row, tok: int, max_new_tokens: int) -> list:
    """LM mode for one row: act on its sampled token; returns the items it appends."""
    length = n_positions(cfg, row.items)
    if row.n_new >= max_new_tokens or length >= cfg.max_seq_len:
        row.mode = "done"
    elif tok == cfg.boi_id:  # diffusion mode next, if BOI, N patches and EOI fit: no half image
        row.mode = "image" if length + cfg.n_patches + 2 <= cfg.max_seq_len else "done"
    elif tok in (cfg.pad_id, cfg.eoi_id):  # never trained on: treat as the end
        row.mode = "done"
    else:
        append_text(row.out, tok)
        row.mode = "done" if tok == cfg.eos_id else "text"
    if row.mode == "done":
        return []
    row.n_new += 1
    return [torch.tensor([tok])]


def run_rows(model: Transfusion, history: List[list], new: List[list], cache: Optional[KVCache], commit: bool):
    """Model outputs for the items new[b] appended to each row's history[b]: text logits at
    each row's last new position (B, V) and eps_hat of the images in `new` (M, C, I, I), row
    by row. With a KV cache that holds the history, only `new` is computed; without one,
    every row is recomputed from its start."""
    cfg, device = model.cfg, model.device
    start = [n_positions(cfg, h) for h in history]
    if cache is not None:
        logits, eps = forward_cached(model, collate(cfg, new, device, start_pos=start), cache, commit)
        last = [max(n_positions(cfg, n) - 1, 0) for n in new]
    else:
        batch = collate(cfg, [h + n for h, n in zip(history, new)], device)
        logits, eps = model(batch)
        last = [max(s + n_positions(cfg, n) - 1, 0) for s, n in zip(start, new)]
        if eps is not None:  # keep the images of `new`: those that start after their row's history
            eps = eps[batch.img_col >= torch.tensor(start, device=device)[batch.img_row]]
    return logits[torch.arange(len(new), device=device), torch.tensor(last, device=device)], eps


@torch.no_grad()
def generate(model: Transfusion, prompts: Sequence[Sequence[Segment]], *, max_new_tokens: int = 32,
             steps: int = 250, sampler: str = "ddpm", guidance_scale: float = 3.0,
             temperature: float = 0.0, top_k: Optional[int] = None,
             generator: Optional[torch.Generator] = None, on_step=None, use_cache: bool = True):
    """`generate_reference` for a batch of prompts, with a KV cache (use_cache=False:
    recompute every row from its start). Each row takes its own path; rows that opened an
    image wait until no row is writing, then draw together. Same arguments, result and use
    of the random generator as `generate_reference`."""
    cfg, device = model.cfg, model.device
    schedule = check_decoding(model, prompts, sampler, steps)
    rows = [Row(items=[], out=list(p)) for p in prompts]
    cache = KVCache() if use_cache else None
    new = [with_markers(cfg, p) for p in prompts]                    # first the model reads the prompts
    while any(r.mode != "done" for r in rows):
        if any(new):  # each row's new items: its prompt, a token, or an image and EOI
            logits, _ = run_rows(model, [r.items for r in rows], new, cache, commit=True)  # (B, V)
            for r, items in zip(rows, new):
                r.items += items
        if any(r.mode == "text" for r in rows):
            # LM mode: every row in text mode samples one token; rows that opened an image wait
            tokens = sample_token(logits, temperature, top_k, generator).tolist()
            new = [take_token(cfg, r, tok, max_new_tokens) if r.mode == "text" else []
                   for r, tok in zip(rows, tokens)]
        else:
            # Diffusion mode, once no row is writing: x_T is pure noise, and each step's
            # x_{t_prev} overwrites x_t (the model only ever sees the current noisy image)
            drawing = [b for b, r in enumerate(rows) if r.mode == "image"]
            x = torch.randn(len(drawing), cfg.channels, cfg.image_size, cfg.image_size,
                            generator=generator).to(device)             # (M, C, I, I)
            denoiser = Denoiser(model, rows, drawing, cache, guidance_scale)
            for t, t_prev in schedule:
                eps = denoiser.eps(x, t)                                 # (M, C, I, I), guided
                noise = torch.randn(x.shape, generator=generator).to(device) if t_prev > 0 else None
                x = SAMPLERS[sampler](x, eps, t, t_prev, model.alpha_bar, noise, model.x0_range)
                if on_step is not None:
                    on_step(t_prev, x)
            # the clean image and EOI join the sequence; back to LM mode
            x = torch.clamp(x, *model.x0_range)
            new = [[] for _ in rows]
            for i, b in enumerate(drawing):
                new[b] = [(x[i], cfg.clean_t), torch.tensor([cfg.eoi_id])]
                rows[b].out.append(x[i].cpu())
                rows[b].mode = "text"
    return [r.out for r in rows]


def bf16_is_fast(device: torch.device, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether bf16 autocast pays on `device`: a CUDA GPU with bf16, or a CPU with bf16 dot
    products, AVX-512 BF16 (AMD Zen 4 and 5, Intel Xeons since Cooper Lake) or AMX (Xeons since
    Sapphire Rapids), on which oneDNN runs bf16 convolutions and matmuls: a training step took
    0.78x fp32's time on a Zen 4, 0.86-0.90x on a Xeon with AMX (docs/speed.md). Elsewhere fp32: without
    these instructions bf16 is emulated. The flags are read from Linux's /proc/cpuinfo; elsewhere False."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open(cpuinfo) as f:
            return bool({"avx512_bf16", "amx_bf16"} & set(f.read().split()))
    except OSError:
        return False
