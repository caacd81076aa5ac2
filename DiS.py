"""
DiS: diffusion models with a bidirectional Mamba (state space model) backbone, in one file.

Paper: "Scalable Diffusion Models with State Space Backbone", Fei, Fan, Yu, Huang (arXiv 2402.05608).
Official code: github.com/feizc/DiS (models_dis.py, built on Vim's patched mamba-ssm and on DiT's diffusion).

Read it top to bottom. The first four sections are the whole model, and with SCAN_BACKEND = "ref" the model
runs on nothing else; the fifth only makes it fast:
  1. Selective scan   - the SSM recurrence as a plain loop (mamba-ssm: selective_scan_ref), and
                        selective_scan, the one entry point the model calls, with its switch SCAN_BACKEND
  2. Mixer            - a bidirectional Mamba layer (Vim's "bimamba v2" in mamba_simple.Mamba)
  3. Model            - the DiS network and its sizes (models_dis.DisModel)
  4. Diffusion        - noise schedule, training loss and samplers (DiT's / improved-DDPM's gaussian_diffusion)
  5. Making it fast   - the memory-lean PyTorch scan with its hand-written backward, mamba-ssm's kernel, and
                        the hook to the fused Triton block of scan_triton.py

Glossary of shape letters and index names, one meaning each throughout the file:
  b        batch size
  l        sequence length: the extra tokens ([label,] time) + the patches
  d        model width, d_model
  d_inner  width inside the mixer, expand * d: the scan's channels
  n        SSM state size per channel, d_state
  dt_rank  rank of the low-rank projection that makes delta (ceil(d / 16))
  c, h, w  image channels, height, width;  p  patch size (DiT's conditioning vector c is called cond here)
  i        a token's position in the scan: u_i, h_i, decay_i, ...
  t        a diffusion timestep, an integer in [0, 1000) (in the sampler, a step of the respaced schedule,
           and t_model the training timestep it stands for)
In the scan, h (h_i) is the SSM state of Mamba's notation, n numbers per channel, not a height.
Other sizes have names: d_conv (the causal conv's width), chunk (tokens per chunk of the lean scan).
"""
import importlib
import importlib.util
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

try:  # optional CUDA kernel; importing it fails unless its compiled extension is really present
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_selective_scan_fn
except Exception:  # ImportError, or an OSError/RuntimeError from a broken CUDA build
    mamba_selective_scan_fn = None


#################################################################################
#                          1. Selective scan                                    #
#################################################################################
# The state space recurrence at the heart of Mamba, for each batch element and channel, token i = 0, 1, ...:
#     dt_i = softplus(delta_i + delta_bias)                (a per-token step size)
#     h_i  = exp(dt_i * A) * h_{i-1} + dt_i * B_i * u_i    (h_i: a state of n numbers)
#     y_i  = <h_i, C_i> + D * u_i,   out_i = y_i * silu(z_i)
# Layouts follow mamba-ssm's selective_scan_fn, so that its CUDA kernel drops in unchanged:
#     u, delta, z: (b, d_inner, l)   A: (d_inner, n)   B, C: (b, n, l)   D, delta_bias: (d_inner,)

def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The readable reference (mirrors mamba_ssm.ops.selective_scan_interface.selective_scan_ref); it needs
    only torch, torch.nn.functional as F and einops' rearrange. Computes in float32 (float64 for float64
    inputs), under autocast too: it uses only elementwise ops, which autocast leaves alone. Returns u's dtype.
    The loop walks the tokens with unbind: indexing x[:, :, i] instead would make each step's backward write
    a full-size zero gradient, and the backward would grow quadratically in l."""
    out_dtype = u.dtype
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32   # fp16/bf16 can't carry a long recurrence
    u, delta, A, B, C = (x.to(dtype) for x in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]                             # (b, d_inner, l)
    dt = F.softplus(delta) if delta_softplus else delta                           # (b, d_inner, l)
    decay = torch.exp(dt[..., None] * A[:, None, :])                              # (b, d_inner, l, n)
    drive = (dt * u)[..., None] * rearrange(B, "b n l -> b 1 l n")                # (b, d_inner, l, n)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])                           # (b, d_inner, n)
    ys = []
    for decay_i, drive_i, C_i in zip(decay.unbind(2), drive.unbind(2), C.unbind(2)):
        h = decay_i * h + drive_i                                                 # (b, d_inner, n)
        ys.append((h * C_i[:, None, :]).sum(-1))                                  # (b, d_inner)
    y = torch.stack(ys, dim=-1)                                                   # (b, d_inner, l)
    if D is not None:
        y = y + u * D.to(dtype)[:, None]                                          # (b, d_inner, l)
    if z is not None:
        y = y * F.silu(z.to(dtype))                                               # (b, d_inner, l)
    return y.to(out_dtype)


# The one switch of every fast path: which implementation runs the model's scans (and, for "fused", its blocks).
#   "auto"       the default. On CUDA: "fused" once a first-use check on that device has passed (one small
#                block, fused against lean; section 5), else mamba-ssm's kernel where it can run, else "lean".
#                Elsewhere: "lean", but on a CPU the blocks of small scans run token-major in PyTorch (section 5)
#   "ref"        selective_scan_ref above, exactly as written (slow; keeps every (b, d_inner, l, n) tensor)
#   "lean"       the lean PyTorch scan of section 5: the same math, a fraction of the memory
#   "mamba_ssm"  mamba-ssm's kernel; an error where it cannot run
#   "triton"     the Triton scan of scan_triton.py (CUDA, or Triton's CPU interpreter)
#   "fused"      each block's add + RMSNorm and its whole mixer as fused Triton kernels of scan_triton.py,
#                token-major and without flips (Block.forward hands over to it); scans called alone use "triton".
#                Needs float32 parameters (autocast is fine)
SCAN_BACKEND = "auto"
SCAN_BACKENDS = ("auto", "ref", "lean", "mamba_ssm", "triton", "fused")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, backend=None):
    """The scan the model calls: selective_scan_ref's arguments and result, run by the implementation that
    backend (default: SCAN_BACKEND) names. The fast ones live in section 5."""
    backend = backend or SCAN_BACKEND
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"scan backend must be one of {', '.join(map(repr, SCAN_BACKENDS))}, got {backend!r}")
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if backend == "ref":
        return selective_scan_ref(*args)
    if backend in ("triton", "fused") or fused_path_runs(u, backend):
        return triton_module(backend).selective_scan_triton(*args)
    if backend in ("auto", "mamba_ssm") and mamba_kernel_usable(*args[:8]):
        return mamba_selective_scan_fn(*args[:6], z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    if backend == "mamba_ssm":
        raise RuntimeError("scan backend 'mamba_ssm' was forced, but mamba-ssm is not installed or these "
                           "tensors do not suit its kernel (CUDA, float32 A/D/delta_bias, n <= 256, "
                           "contiguous last dim); set DiS.SCAN_BACKEND = 'auto' to fall back to PyTorch")
    return selective_scan_lean(*args)


def check_scan_shapes(u, delta, A, B, C, D, z, delta_bias):
    if u.ndim != 3 or A.ndim != 2:
        raise ValueError(f"selective_scan: u must be (b, d_inner, l) and A (d_inner, n), "
                         f"got {tuple(u.shape)} and {tuple(A.shape)}")
    b, d_inner, l = u.shape
    n = A.shape[-1]
    expected = {"delta": (delta, (b, d_inner, l)), "A": (A, (d_inner, n)), "B": (B, (b, n, l)),
                "C": (C, (b, n, l)), "D": (D, (d_inner,)), "z": (z, (b, d_inner, l)), "delta_bias": (delta_bias, (d_inner,))}
    for name, (x, shape) in expected.items():
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"selective_scan: {name} has shape {tuple(x.shape)}, expected {shape} for u of "
                             f"shape (b, d_inner, l) = {(b, d_inner, l)} and A of shape (d_inner, n) = {(d_inner, n)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported (DiS uses real A)")


#################################################################################
#                      2. Bidirectional Mamba mixer                             #
#################################################################################
# One Mamba layer that reads the tokens in both directions (Vim's "bimamba v2", used by the official
# DiS through its vendored mamba_simple.Mamba with bimamba_type="v2"). A shared in_proj makes x and z;
# each direction has its own causal conv, projections and SSM parameters; the backward direction runs
# on the flipped sequence and is flipped back; the two are summed before the shared out_proj.

class SSM(nn.Module):
    """One direction: causal depthwise conv -> input-dependent (delta, B, C) -> selective scan.
    Initialisation as upstream Mamba (mamba_simple.Mamba.__init__)."""

    def __init__(self, d_inner, d_state=16, d_conv=4, dt_rank=8, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4):
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        # padded by d_conv - 1 on both sides; forward keeps the first l outputs, so token i sees tokens
        # i - d_conv + 1 .. i only (causal)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        # dt_proj's weight: uniform in +-dt_rank^-0.5 (Mamba's dt_init "random" at dt_scale 1), small enough
        # that the bias sets dt at the start; its bias: chosen so that softplus(bias) = dt with dt log-uniform
        # in [dt_min, dt_max], each channel its own time scale (DiS.initialize_weights leaves it alone).
        nn.init.uniform_(self.dt_proj.weight, -dt_rank ** -0.5, dt_rank ** -0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # inverse of softplus
        # A = -exp(A_log) = -(1, 2, ..., n) per channel (S4D-real): decay rates spread over time scales.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))   # the direct term D * u of y (Mamba's "D skip")

    def forward(self, x, z):                                                            # x, z: (b, d_inner, l)
        x = F.silu(self.conv1d(x)[..., :x.shape[-1]])                                   # (b, d_inner, l)
        x_dbl = self.x_proj(x.transpose(1, 2))                                          # (b, l, dt_rank + 2n)
        delta_low, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)  # delta_low: (b, l, dt_rank)
        delta = (delta_low @ self.dt_proj.weight.t()).transpose(1, 2)                   # (b, d_inner, l); bias in scan
        B = B.transpose(1, 2).contiguous()                                              # (b, n, l)
        C = C.transpose(1, 2).contiguous()                                              # (b, n, l)
        A = -torch.exp(self.A_log.float())                                              # (d_inner, n)
        return selective_scan(x, delta.contiguous(), A, B, C, self.D.float(), z=z.contiguous(),
                              delta_bias=self.dt_proj.bias.float(), delta_softplus=True)  # (b, d_inner, l)


class BiMamba(nn.Module):
    """The DiS mixer (mamba_simple.Mamba with bimamba_type="v2"). Both directions always run.
    The attribute names forward_ssm / backward_ssm are state_dict keys: renaming them would break checkpoints."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank=None, n_layer=1, **ssm_kwargs):
        super().__init__()
        d_inner = expand * d_model
        dt_rank = dt_rank or math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.forward_ssm = SSM(d_inner, d_state, d_conv, dt_rank, **ssm_kwargs)
        self.backward_ssm = SSM(d_inner, d_state, d_conv, dt_rank, **ssm_kwargs)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        # GPT-2 style: shrink the residual-branch output by 1/sqrt(depth) so the sum over layers stays O(1)
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        with torch.no_grad():
            self.out_proj.weight /= math.sqrt(n_layer)

    def forward(self, hidden):                                                          # (b, l, d)
        xz = self.in_proj(hidden).transpose(1, 2)                                       # (b, 2 d_inner, l)
        x, z = xz.chunk(2, dim=1)                                                       # (b, d_inner, l) each
        y_fwd = self.forward_ssm(x, z)                                                  # (b, d_inner, l)
        y_bwd = self.backward_ssm(x.flip(-1), z.flip(-1)).flip(-1)                      # (b, d_inner, l)
        return self.out_proj((y_fwd + y_bwd).transpose(1, 2))                           # (b, l, d)


#################################################################################
#                               3. The DiS model                                #
#################################################################################
# models_dis.DisModel: patches become tokens, a time token (and a label token) is prepended, a stack of
# bidirectional Mamba blocks with U-ViT style long skips mixes them, and a DiT-style final layer turns
# each patch token back into pixels: the noise (and, with learn_sigma, the variance interpolation).

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (integer) timesteps t (b,) -> (b, dim); cos first, as DiT and DiS."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]                                             # (b, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)                        # (b, 2 half)
    return F.pad(emb, (0, dim % 2))                                                    # (b, dim)


def drop_path(x, prob, training):
    """Stochastic depth: zero a whole sample's residual branch with probability prob (and rescale)."""
    if prob == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - prob)
    return x * keep / (1 - prob)


class Block(nn.Module):
    """Add -> RMSNorm -> mixer (models_dis.Block, as in mamba-ssm). It takes and returns the pair
    (mixer output, residual stream) instead of nanoGPT's x = x + mixer(norm(x)), for two reasons: mamba-ssm
    does so to fuse the add with the next norm (our fused path does too), and DiS's long skips need each
    in-block's mixer output on its own, before it joins the stream. The add happens at the start of the next
    block. Out-blocks (takes_skip) first merge a long skip: Linear(2d, d) on [incoming mixer output, skip]."""

    def __init__(self, dim, n_layer, drop_prob=0.0, takes_skip=False, **mixer_kwargs):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if takes_skip else None
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.mixer = BiMamba(dim, n_layer=n_layer, **mixer_kwargs)
        self.drop_prob = drop_prob   # drop-path of the incoming mixer output (the previous block's)

    def forward(self, hidden, residual, skip=None):          # (b, l, d) each; skip: an in-block's mixer output
        if self.skip_linear is not None:
            hidden = self.skip_linear(torch.cat([hidden, skip], dim=-1))                 # (b, l, d)
        if fused_path_runs(hidden):   # the rest of this block as fused Triton kernels (section 5)
            return fused_block(self, hidden, residual)
        if residual is None:   # first block: the embedded tokens start the stream
            residual = hidden.float()                                                   # (b, l, d)
        else:                  # the stream stays float32 even under bf16 autocast
            residual = residual + drop_path(hidden, self.drop_prob, self.training).float()
        hidden = self.mixer(self.norm(residual.to(self.norm.weight.dtype)))             # (b, l, d)
        return hidden, residual


class LabelEmbedder(nn.Module):
    """Class label -> vector; label num_classes is the null label that classifier-free guidance uses.
    In training, each label is replaced by the null label with probability dropout_prob."""

    def __init__(self, num_classes, dim, dropout_prob=0.1):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, y):                                                               # (b,)
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)                                                  # (b, d)


class FinalLayer(nn.Module):
    """LayerNorm, then (class-conditional only) adaLN shift/scale from cond = time token + label embedding,
    then a Linear to p*p*out_channels values per token (models_dis.FinalLayer, from DiT)."""

    def __init__(self, dim, patch_size, out_channels, conditional):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim)) if conditional else None
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x, cond=None):                                                    # x: (b, l, d), cond: (b, d)
        x = self.norm(x)                                                                # (b, l, d)
        if self.adaLN is not None:
            shift, scale = self.adaLN(cond).chunk(2, dim=-1)                            # (b, d) each
            x = x * (1 + scale[:, None]) + shift[:, None]                               # (b, l, d)
        return self.linear(x)                                                           # (b, l, p*p*out_c)


class DiS(nn.Module):
    """The DiS network. forward(x, t, y=None) -> (b, out_channels, h, w) with out_channels = 2 * in_channels
    when learn_sigma (noise, then the variance interpolation value v), else in_channels."""

    def __init__(self, image_size=32, patch_size=2, in_channels=3, hidden_size=368, depth=24, num_classes=0,
                 learn_sigma=True, class_dropout_prob=0.1, drop_path_rate=0.1, **mixer_kwargs):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by the patch size {patch_size}; "
                             f"use a multiple of {patch_size} or another model")
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        self.hidden_size, self.depth, self.num_classes, self.learn_sigma = hidden_size, depth, num_classes, learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_patches = (image_size // patch_size) ** 2
        self.extras = 2 if num_classes > 0 else 1            # [label, time] or [time] tokens before the patches
        self.grad_checkpoint = False                          # recompute each block in backward to save memory

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.time_embed = nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.SiLU(),
                                        nn.Linear(4 * hidden_size, hidden_size))
        self.label_embed = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + self.num_patches, hidden_size))

        # depth // 2 in-blocks, a mid-block, depth // 2 out-blocks. The drop-path rate grows linearly with depth
        # (the official schedule). A block applies its rate to the mixer output it receives, the previous
        # block's, so the list starts with a 0.0 for the first block (which receives the embedded tokens), and
        # the last mixer output, added after the loop in mix(), gets the full rate.
        drop_rates = [0.0] + [drop_path_rate * k / max(depth - 1, 1) for k in range(depth)]
        def block(index, takes_skip=False):
            return Block(hidden_size, depth, drop_prob=drop_rates[index], takes_skip=takes_skip, **mixer_kwargs)
        self.in_blocks = nn.ModuleList([block(k) for k in range(depth // 2)])
        self.mid_block = block(depth // 2)
        self.out_blocks = nn.ModuleList([block(depth // 2 + 1 + k, takes_skip=True) for k in range(depth // 2)])
        self.final_drop_prob = drop_path_rate
        # Mamba's final RMSNorm, then DiT's final layer, which has a LayerNorm of its own: two norms in a row,
        # as in the official code (kept, so that the architecture and its parameters match it)
        self.norm_f = nn.RMSNorm(hidden_size, eps=1e-5)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, conditional=num_classes > 0)
        self.initialize_weights()

    def initialize_weights(self):
        # As the official code (models_dis._init_weights): zero Linear biases except dt_proj's (which hold the
        # time scales SSM.__init__ drew), embeddings N(0, 0.02); in_proj, x_proj, convs keep PyTorch's defaults;
        # out_proj and dt_proj were set in BiMamba / SSM.
        dt_projs = [m.dt_proj for m in self.modules() if isinstance(m, SSM)]
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None and not any(m is p for p in dt_projs):
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        # Borrowed from DiT: a zero output layer (and a zero adaLN) makes the model output exactly 0 at
        # init, so training starts from "predict no noise" instead of from random outputs.
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.final_layer.adaLN is not None:
            nn.init.zeros_(self.final_layer.adaLN[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN[-1].bias)

    def forward(self, x, t, y=None):
        """x: (b, c, h, w) noisy images or latents; t: (b,) integer timesteps in [0, 1000); y: (b,) labels
        (class-conditional models only; num_classes is the null label)."""
        self.check_inputs(x, y)
        tokens, cond = self.embed(x, t, y)                                              # (b, l, d), (b, d)
        stream = self.mix(tokens)                                                       # (b, l, d), float32
        out = self.final_layer(self.norm_f(stream.to(self.norm_f.weight.dtype)), cond)  # (b, l, p*p*out_c)
        return self.unpatchify(out[:, self.extras:])                                   # (b, out_c, h, w)

    def check_inputs(self, x, y):
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"DiS expects input of shape (b, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}), got {tuple(x.shape)}")
        if (y is None) != (self.num_classes == 0):
            raise ValueError("a class-conditional DiS needs labels y; an unconditional one (num_classes=0) takes none")

    def embed(self, x, t, y):
        """The token sequence [label,] time, patches (with positions), and the final layer's condition
        cond = time + label (None for unconditional models, whose final layer has no adaLN)."""
        patches = rearrange(self.patch_embed(x), "b d rows cols -> b (rows cols) d")   # (b, num_patches, d)
        time = self.time_embed(timestep_embedding(t, self.hidden_size))                # (b, d)
        if self.label_embed is None:
            front, cond = [time], None
        else:
            label = self.label_embed(y)                                                 # (b, d)
            front, cond = [label, time], time + label
        tokens = torch.cat([token[:, None] for token in front] + [patches], dim=1)      # (b, l, d)
        return tokens + self.pos_embed, cond

    def mix(self, hidden):
        """The U-ViT-shaped stack: in-blocks save their mixer outputs, out-blocks take them back in reverse
        order. Returns the float32 residual stream with the last mixer output added."""
        residual, skips = None, []
        for block in self.in_blocks:
            hidden, residual = self.run_block(block, hidden, residual)                  # (b, l, d)
            skips.append(hidden)                           # the mixer output, not the residual stream
        hidden, residual = self.run_block(self.mid_block, hidden, residual)             # (b, l, d)
        for block in self.out_blocks:
            hidden, residual = self.run_block(block, hidden, residual, skips.pop())     # (b, l, d)
        return residual + drop_path(hidden, self.final_drop_prob, self.training).float()  # (b, l, d)

    def run_block(self, block, hidden, residual, skip=None):
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, hidden, residual, skip, use_reentrant=False)
        return block(hidden, residual, skip)

    def unpatchify(self, x):
        """(b, num_patches, p*p*c) -> (b, c, h, w); the patches form a rows x cols grid."""
        grid, p = self.image_size // self.patch_size, self.patch_size
        return rearrange(x, "b (rows cols) (p1 p2 c) -> b c (rows p1) (cols p2)", rows=grid, cols=grid, p1=p, p2=p)


# The official sizes (models_dis.py): width / depth, patch size 2 or 4. "T" (tiny) is ours, for tests and
# CPU demos. depth counts in- plus out-blocks; with the mid-block there are depth + 1 mixer layers.
# Defaults of every constructor: image_size=32, in_channels=3, num_classes=0, learn_sigma=True.
def DiS_T_2(**kwargs): return DiS(hidden_size=128, depth=6, patch_size=2, **kwargs)
def DiS_T_4(**kwargs): return DiS(hidden_size=128, depth=6, patch_size=4, **kwargs)
def DiS_S_2(**kwargs): return DiS(hidden_size=368, depth=24, patch_size=2, **kwargs)
def DiS_S_4(**kwargs): return DiS(hidden_size=368, depth=24, patch_size=4, **kwargs)
def DiS_B_2(**kwargs): return DiS(hidden_size=768, depth=24, patch_size=2, **kwargs)
def DiS_B_4(**kwargs): return DiS(hidden_size=768, depth=24, patch_size=4, **kwargs)
def DiS_M_2(**kwargs): return DiS(hidden_size=768, depth=48, patch_size=2, **kwargs)
def DiS_M_4(**kwargs): return DiS(hidden_size=768, depth=48, patch_size=4, **kwargs)
def DiS_L_2(**kwargs): return DiS(hidden_size=1024, depth=48, patch_size=2, **kwargs)
def DiS_L_4(**kwargs): return DiS(hidden_size=1024, depth=48, patch_size=4, **kwargs)
def DiS_H_2(**kwargs): return DiS(hidden_size=1536, depth=48, patch_size=2, **kwargs)
def DiS_H_4(**kwargs): return DiS(hidden_size=1536, depth=48, patch_size=4, **kwargs)
# Not in the paper: the CPU quickstart's model (README): T's depth, 16 tokens of 8x8 pixels, a 4-number state
# and no expansion, so that a step is cheap on a CPU; no drop-path, since a run of minutes does not overfit.
def DiS_Q_8(**kwargs): return DiS(hidden_size=192, depth=6, patch_size=8, d_state=4, expand=1, drop_path_rate=0.0,
                                   **kwargs)


DiS_models = {
    "DiS-T/2": DiS_T_2, "DiS-T/4": DiS_T_4, "DiS-S/2": DiS_S_2, "DiS-S/4": DiS_S_4,
    "DiS-B/2": DiS_B_2, "DiS-B/4": DiS_B_4, "DiS-M/2": DiS_M_2, "DiS-M/4": DiS_M_4,
    "DiS-L/2": DiS_L_2, "DiS-L/4": DiS_L_4, "DiS-H/2": DiS_H_2, "DiS-H/4": DiS_H_4, "DiS-Q/8": DiS_Q_8,
}


def create_model(name, **kwargs):
    """DiS_models[name](**kwargs), with an error that lists the names."""
    if name not in DiS_models:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(DiS_models)}")
    return DiS_models[name](**kwargs)


#################################################################################
#                                4. Diffusion                                   #
#################################################################################
# Gaussian diffusion as DiT and DiS train it (DiT's diffusion/gaussian_diffusion.py, after improved-DDPM):
# a linear beta schedule over 1000 steps (scaled as DiT does for other lengths), the network predicts the
# noise eps and, with learn_sigma, a value v in [-1, 1] that interpolates the log-variance between beta_t and
# the posterior variance.
# The loss is MSE(eps) + the variational bound (VLB) term, which trains only the variance.

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of data x in [-1, 1], discretised to 256 levels, under N(means, exp(log_scales)^2)."""
    def cdf(v):  # the tanh approximation of the standard normal CDF, as improved-DDPM
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))             # the lowest bin takes everything below
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))  # the highest bin everything above
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x):
    return x.mean(dim=list(range(1, x.ndim)))


def check_labels(y, num_classes):
    """Labels given to sample() or the scripts must be real classes; the null label is internal."""
    if num_classes == 0:
        raise ValueError("this model is unconditional (num_classes=0): give no class labels")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"class labels must be in [0, {num_classes - 1}], "
                         f"got values from {int(y.min())} to {int(y.max())}")


class Diffusion:
    """The noise schedule and everything computed from it. Tables are float64 tensors indexed by step.
    A respaced copy (respace) keeps a subset of the steps with recomputed betas; timestep_map says which
    training timestep (0..999) each of its steps stands for, and the model always sees those."""

    DEFAULT_STEPS = {"ddpm": 250, "ddim": 50}   # sampling steps when none are given (DiT's sample.py, DDIM paper)

    def __init__(self, num_timesteps=1000, betas=None, timestep_map=None):
        if betas is None:  # linear schedule (DDPM, DiT), stretched so that any T ends as close to noise as T = 1000
            scale = 1000 / num_timesteps
            betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
        self.betas = betas.to(torch.float64)
        self.num_timesteps = len(self.betas)
        self.timestep_map = torch.arange(self.num_timesteps) if timestep_map is None else timestep_map
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.alphas_cumprod_prev = F.pad(self.alphas_cumprod[:-1], (1, 0), value=1.0)
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance)
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # the variance is 0 at t = 0: clip its log to the t = 1 value
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * (1 - self.betas).sqrt() / (1 - self.alphas_cumprod)
        # the rest of what the formulas read, all in float64 here: 1 - acp is tiny for small t
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / self.alphas_cumprod - 1).sqrt()
        self.log_betas = torch.log(self.betas)
        # the fixed "large" variance: beta_t, with the posterior variance at t = 0 (DiT's default without learn_sigma)
        self.log_large_variance = torch.log(torch.cat([self.posterior_variance[1:2], self.betas[1:]]))
        self._on_device = {}   # (table, device, dtype) -> the table there, made once

    def sampling_steps(self, sampler, steps=None):
        """`steps`, or the sampler's default, checked against this schedule (scripts check flags with it)."""
        if sampler not in self.DEFAULT_STEPS:
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        return self.check_steps(steps or self.DEFAULT_STEPS[sampler])

    def check_steps(self, steps):
        if not 2 <= steps <= self.num_timesteps:   # one step would start at t = 0, not from noise
            raise ValueError(f"the number of sampling steps must be in [2, {self.num_timesteps}], got {steps}")
        return steps

    def respace(self, steps):
        """A schedule with `steps` evenly spaced steps of this one (improved-DDPM's space_timesteps)."""
        self.check_steps(steps)
        stride = (self.num_timesteps - 1) / (steps - 1)
        keep = sorted({round(i * stride) for i in range(steps)})
        acp = self.alphas_cumprod[keep]
        betas = 1 - acp / F.pad(acp[:-1], (1, 0), value=1.0)   # so that the kept alphas_cumprod are unchanged
        return Diffusion(betas=betas, timestep_map=self.timestep_map[keep])

    def _table(self, name, device, dtype):
        """The table self.<name> on device in dtype, cast once per device and dtype (on the CPU first: some
        devices have no float64)."""
        key = (name, torch.device(device), dtype)
        if key not in self._on_device:
            self._on_device[key] = getattr(self, name).to(dtype).to(device)
        return self._on_device[key]

    def _per_sample(self, name, t, x):
        """self.<name>[t] shaped to broadcast against x (b, ...), in x's dtype."""
        return self._table(name, x.device, x.dtype)[t].reshape(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(acp_t) x_0 + sqrt(1 - acp_t) eps"""
        signal, sigma = self._per_sample("sqrt_alphas_cumprod", t, x0), self._per_sample("sqrt_one_minus_alphas_cumprod", t, x0)
        return signal * x0 + sigma * noise

    def p_mean_variance(self, model_out, x_t, t, clip_denoised=False):
        """From the network output at step index t: predicted x_0, and the mean and log-variance of
        p(x_{t-1} | x_t). Without learned sigma, the fixed "large" variance beta_t (DiT's default)."""
        c = x_t.shape[1]
        if model_out.shape[1] == 2 * c:
            eps, v = model_out.split(c, dim=1)
            min_log = self._per_sample("posterior_log_variance_clipped", t, x_t)
            max_log = self._per_sample("log_betas", t, x_t)
            frac = (v + 1) / 2                                   # v in [-1, 1] -> [0, 1]
            log_var = frac * max_log + (1 - frac) * min_log
        elif model_out.shape[1] == c:
            eps = model_out
            log_var = self._per_sample("log_large_variance", t, x_t).expand_as(x_t)
        else:
            raise ValueError(f"the model returned {model_out.shape[1]} channels for {c}-channel inputs; "
                             f"expected {c} or {2 * c} (with learned sigma)")
        recip, recip_m1 = (self._per_sample(name, t, x_t)
                           for name in ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"))
        x0 = recip * x_t - recip_m1 * eps                                     # invert q_sample
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean = self._per_sample("posterior_mean_coef1", t, x_t) * x0 + self._per_sample("posterior_mean_coef2", t, x_t) * x_t
        return mean, log_var, x0, eps

    def vb_terms_bpd(self, model_out, x0, x_t, t):
        """The VLB term in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and
        the decoder's negative log-likelihood of x_0 at t = 0, each averaged over non-batch dims. (b,)"""
        true_mean = self._per_sample("posterior_mean_coef1", t, x0) * x0 + self._per_sample("posterior_mean_coef2", t, x0) * x_t
        true_log_var = self._per_sample("posterior_log_variance_clipped", t, x0)
        mean, log_var, _, _ = self.p_mean_variance(model_out, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_loss(self, model, x0, y=None, t=None, noise=None):
        """The hybrid loss of improved-DDPM / DiT: mean over the batch of MSE(eps) + (with learned sigma)
        the VLB term computed with eps detached, so that the VLB trains only the variance."""
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)                                              # (b, c, h, w)
        out = model(x_t, self._table("timestep_map", t.device, t.dtype)[t], y)          # (b, c or 2c, h, w)
        out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
        c = x0.shape[1]
        loss = mean_flat((noise - out[:, :c]) ** 2)                                    # (b,)
        if out.shape[1] == 2 * c:
            frozen = torch.cat([out[:, :c].detach(), out[:, c:]], dim=1)
            loss = loss + self.vb_terms_bpd(frozen, x0, x_t, t)
        return loss.mean()

    @staticmethod
    def _check_sample_args(model_fn, y, cfg_scale, null_label, generator, device):
        """sample()'s checks; returns the null label (for guidance) and the device to sample on: the given
        one, else the generator's, else the labels', else the model's."""
        num_classes = getattr(model_fn, "num_classes", None)
        if y is not None and num_classes is not None:
            check_labels(y, num_classes)
        if cfg_scale != 1.0:
            if y is None:
                raise ValueError("classifier-free guidance (cfg_scale != 1) needs class labels y; "
                                 "use cfg_scale=1.0 for an unconditional model")
            null_label = num_classes if null_label is None else null_label
            if null_label is None:
                raise ValueError("cfg_scale != 1 needs null_label, or a model_fn with a num_classes attribute")
        if device is None:
            params = next(model_fn.parameters(), None) if isinstance(model_fn, nn.Module) else None
            device = (generator.device if generator is not None else y.device if y is not None
                      else params.device if params is not None else torch.device("cpu"))
        return null_label, device

    @torch.no_grad()
    def sample(self, model_fn, shape, y=None, steps=None, sampler="ddpm", cfg_scale=1.0, null_label=None,
               generator=None, progress=False, clip_denoised=False, eta=0.0, device=None):
        """Draw samples. model_fn(x, t, y) returns what DiS.forward returns and is called with the training
        timesteps (0..999). sampler "ddpm": ancestral sampling over `steps` respaced steps (default 250);
        "ddim": deterministic for eta = 0 (default 50 steps). With labels y and cfg_scale != 1, classifier-
        free guidance: the conditional and null-label halves run in one batch, and every noise channel
        is guided; the variance comes from the conditional half. clip_denoised: clamp the predicted x_0
        to [-1, 1] (right for pixels, wrong for latents). progress: True for a progress bar of its own, or a tqdm bar
        (of several calls) that advances by one per step. A model in training mode samples in eval mode (no
        label dropout, no drop-path) and gets its modes back."""
        modes = [(m, m.training) for m in model_fn.modules()] if isinstance(model_fn, nn.Module) else []
        try:
            for m, _ in modes:
                m.training = False
            return self._sample(model_fn, shape, y, steps, sampler, cfg_scale, null_label, generator, progress,
                                clip_denoised, eta, device)
        finally:
            for m, mode in modes:
                m.training = mode

    def _sample(self, model_fn, shape, y, steps, sampler, cfg_scale, null_label, generator, progress, clip_denoised,
                eta, device):
        steps = self.sampling_steps(sampler, steps)
        null_label, device = self._check_sample_args(model_fn, y, cfg_scale, null_label, generator, device)
        guided = cfg_scale != 1.0
        schedule = self.respace(steps)
        x = torch.randn(shape, generator=generator, device=device)
        c = shape[1]
        bar = progress
        if progress is True:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, desc=f"{sampler} sampling")
        for step in range(schedule.num_timesteps - 1, -1, -1):
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)   # index into the respaced tables
            t_model = schedule._table("timestep_map", device, t.dtype)[t]       # the training timestep it stands for
            if guided:
                out = model_fn(torch.cat([x, x]), torch.cat([t_model, t_model]),
                               torch.cat([y, torch.full_like(y, null_label)]))
                out_cond, out_uncond = out.float().chunk(2)
                guided_eps = out_uncond[:, :c] + cfg_scale * (out_cond[:, :c] - out_uncond[:, :c])
                out = torch.cat([guided_eps, out_cond[:, c:]], dim=1)
            else:
                out = model_fn(x, t_model, y).float()
            out = out.to(x.dtype)
            mean, log_var, x0, _ = schedule.p_mean_variance(out, x, t, clip_denoised)
            noiseless = step == 0 or (sampler == "ddim" and eta == 0)   # the last step adds none; nor DDIM at eta 0
            noise = 0.0 if noiseless else torch.randn(shape, generator=generator, device=device, dtype=x.dtype)
            if sampler == "ddpm":
                x = mean + torch.exp(0.5 * log_var) * noise
            else:  # DDIM (Song et al.), eps recomputed from the (possibly clipped) x_0
                # every sample is at the same step: the coefficients are Python floats (float64), which keeps
                # 1 - acp exact enough near t = 0
                acp, acp_prev = schedule.alphas_cumprod[step].item(), schedule.alphas_cumprod_prev[step].item()
                eps = (x / math.sqrt(acp) - x0) / math.sqrt(1 / acp - 1)
                sigma = eta * math.sqrt((1 - acp_prev) / (1 - acp) * (1 - acp / acp_prev))
                x = x0 * math.sqrt(acp_prev) + math.sqrt(1 - acp_prev - sigma ** 2) * eps + sigma * noise
            if bar:
                bar.update(1)
        if progress is True:
            bar.close()
        return x


#################################################################################
#                          5. Making it fast                                    #
#################################################################################
# Section 1's loop keeps every (b, d_inner, l, n) intermediate for autograd: at DiS-S/2 sizes that is
# gigabytes per layer. What selective_scan (section 1) can run instead, and the fused block:
#   selective_scan_lean   PyTorch. Forward: the same recurrence, chunk by chunk, keeping one state per chunk.
#                         Backward: written by hand; recomputes each chunk's states from its saved start
#                         (the trick of mamba-ssm's CUDA kernel), so only (b, d_inner, l)-sized tensors and
#                         the chunk states are kept. Small scans (below KEEP_STATES_MB) keep every state
#                         instead, and their backward recomputes nothing.
#   selective_scan_small  PyTorch, for small scans on CPUs (below SMALL_SCAN_MB; selective_scan_lean hands
#                         them over): every state kept, each step over the whole sequence at once, in a
#                         layout where every op runs along contiguous rows of d_inner numbers.
#   cpu_block             PyTorch, "auto" on a CPU: Block.forward after the skip merge with a token-major mixer
#                         (cpu_mixer): shifted-add convs and selective_scan_small in both directions, the
#                         backward one walking the tokens last to first, with no flips and no transposing copies.
#   mamba-ssm's kernel    selective_scan_fn, a fused CUDA kernel; "auto" takes it on CUDA when it is installed.
#   scan_triton.py        Triton kernels (nothing to compile ahead of time): the scan alone ("triton"), and
#                         fused_block ("fused"), the whole of Block.forward after the skip merge in a few
#                         kernels: add + RMSNorm, and a mixer that stays token-major, with no flips
#                         (mamba-ssm's mamba_inner_fn is the model).

# Keeping the states saves the backward's recomputation but streams three more (l, b, d_inner, n) tensors
# through memory: it pays only while they stay near the cache (README, Performance).
KEEP_STATES_MB = 16
# On a CPU, below this the whole-sequence scan is the faster (at every size measured), and its kept states
# are small enough; above it, selective_scan_lean's bounded memory is worth more than the speed.
SMALL_SCAN_MB = 16


def _discretize(u, delta, A, B, delta_bias, delta_softplus):
    """The lean scan's first step: inputs in the compute dtype, and the step size dt = softplus(delta + bias)."""
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B = u.to(dtype), delta.to(dtype), A.to(dtype), B.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    dt = F.softplus(delta) if delta_softplus else delta                       # (b, d_inner, l)
    return u, dt, A, B


def _finish(y, u, D, z, out_dtype):
    """The lean scan's last step: the skip term D * u and the silu(z) gate, then back to the input dtype."""
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]                                    # (b, d_inner, l)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))                                         # (b, d_inner, l)
    return y.to(out_dtype)


def _no_autocast(u):
    # The lean scan contracts with matmul on CUDA, which autocast would run in bf16: keep it float32.
    return torch.autocast(u.device.type if u.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu", enabled=False)


def _token_major(x):
    """(b, ., l) -> a contiguous (l, b, .): each token's slice is then one contiguous block of memory,
    which is what makes the per-token loop fast."""
    return x.permute(2, 0, 1).contiguous()


def _batch_major(x):
    """(l, b, .) -> (b, ., l), the inverse of _token_major (a view)."""
    return x.permute(1, 2, 0)


class _LeanScan(torch.autograd.Function):
    """The memory-lean scan; tensors inside are token-major: (l, b, d_inner) and (l, b, n), and the
    per-chunk tensors (chunk, b, d_inner, n). The two contractions (over n, and over d_inner) run as a
    batched matrix-vector product where matmul=True (faster on GPUs) or as a multiply-and-sum (faster
    on CPUs)."""

    @staticmethod
    def _chunk_terms(dt, dtu, A, B, start, end, kept=None):
        """Decay exp(dt_i A) and drive (dt_i u_i) B_i of tokens start..end-1, each (chunk, b, d_inner, n);
        written into kept's (decay, drive, states) buffers (l, b, d_inner, n) when they are given."""
        decay, drive = (kept[0][start:end], kept[1][start:end]) if kept else (None, None)
        decay = torch.exp(torch.mul(dt[start:end, ..., None], A, out=decay), out=decay)   # (chunk, b, d_inner, n)
        drive = torch.mul(dtu[start:end, ..., None], B[start:end, :, None, :], out=drive)  # (chunk, b, d_inner, n)
        return decay, drive

    @staticmethod
    def _states(h, decay, drive, hs=None):
        """h_i = decay_i * h_{i-1} + drive_i for the tokens of one chunk, starting from h (b, d_inner, n)."""
        hs = torch.empty_like(drive) if hs is None else hs                              # (chunk, b, d_inner, n)
        for i in range(drive.shape[0]):
            h = torch.addcmul(drive[i], decay[i], h, out=hs[i])                         # (b, d_inner, n)
        return hs

    @staticmethod
    def _sum_over_n(x, v, out, matmul):
        """out = sum_n x * v: x (chunk, b, d_inner, n), v (chunk, b, n) -> out (chunk, b, d_inner)."""
        if matmul:
            return torch.matmul(x, v[..., None], out=out[..., None])
        return torch.sum(x * v[:, :, None, :], -1, out=out)

    @staticmethod
    def _sum_over_d_inner(x, v, out, matmul):
        """out = sum_d_inner x * v: x (chunk, b, d_inner, n), v (chunk, b, d_inner) -> out (chunk, b, n)."""
        if matmul:
            return torch.matmul(x.transpose(-1, -2), v[..., None], out=out[..., None])
        return torch.sum(x * v[..., None], 2, out=out)

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, matmul, keep_states):
        with _no_autocast(u):
            u32, dt, A32, B32 = _discretize(u, delta, A, B, delta_bias, delta_softplus)
            dt_l, dtu_l = _token_major(dt), _token_major(dt * u32)                      # (l, b, d_inner)
            B_l, C_l = _token_major(B32), _token_major(C.to(u32.dtype))                 # (l, b, n)
            l = u.shape[-1]
            h = u32.new_zeros(u.shape[0], u.shape[1], A.shape[1])                       # (b, d_inner, n)
            starts, y_l = [], torch.empty_like(dt_l)                                    # y_l: (l, b, d_inner)
            # keep_states: decay, drive and every state stay for the backward, which then recomputes nothing
            kept = [dt_l.new_empty(l, *h.shape) for _ in range(3)] if keep_states else []  # 3 x (l, b, d_inner, n)
            for start in range(0, l, chunk):
                end = min(start + chunk, l)
                starts.append(h)
                decay, drive = _LeanScan._chunk_terms(dt_l, dtu_l, A32, B_l, start, end, kept)
                hs = _LeanScan._states(h, decay, drive, kept[2][start:end] if kept else None)
                h = hs[-1] if kept else hs[-1].clone()   # a copy, so that the chunk's states can be freed
                _LeanScan._sum_over_n(hs, C_l[start:end], y_l[start:end], matmul)       # <h_i, C_i>
            out = _finish(_batch_major(y_l), u32, D, z, u.dtype)                        # (b, d_inner, l)
        kept = kept + [y_l] if kept else []
        # starts: (chunks, b, d_inner, n); kept: decay, drive, states (l, b, d_inner, n) and y_l, or nothing
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, torch.stack(starts), *kept)
        ctx.delta_softplus, ctx.chunk, ctx.matmul = delta_softplus, chunk, matmul
        return out

    # Backward, derived. Write a_i = exp(dt_i A) (the decay), h_i = a_i h_{i-1} + (dt_i u_i) B_i,
    # y_i = <h_i, C_i> + D u_i, out_i = y_i silu(z_i), and g_X for dLoss/dX. Each gradient, and the variable
    # that holds it:
    #   g_y_i       = g_out_i silu(z_i)                                  g_y   (g_y_l token-major)
    #   g_z_i       = g_out_i y_i silu'(z_i)                             g_z   (needs y_i: recomputed)
    #   g_h_i       = g_y_i C_i + a_{i+1} g_h_{i+1}   (adjoint recurrence, last token first)
    #                                                                    g_h   per chunk; carry between chunks
    #   g_C_i       = sum_d_inner g_y_i h_i                              g_C_l
    #   g_B_i       = sum_d_inner g_h_i (dt_i u_i)                       g_B_l
    #   g_(dt u)_i  = <g_h_i, B_i>                                       g_dtu_l
    #   g_(dt A)_i  = g_h_i a_i h_{i-1} = g_h_i (h_i - dt_i u_i B_i)     g_dtA (no shifted copy of the states)
    #   g_A         = sum_{b,i} g_(dt A)_i dt_i                          g_A
    #   g_dt_i      = <g_(dt A)_i, A> + g_(dt u)_i u_i                   g_dt_l, then g_dt
    #   g_u_i       = g_(dt u)_i dt_i + g_y_i D                          g_u
    #   g_D         = sum_{b,i} g_y_i u_i                                g_D
    #   g_delta_i   = g_dt_i sigmoid(delta_i + delta_bias)  (softplus' = sigmoid; g_dt itself without softplus)
    #   g_delta_bias = sum_{b,i} g_delta_i                               g_bias
    # test_lean_scan_gradcheck checks every one against finite differences in float64, and
    # test_scan_equals_naive_float64_recurrence against autograd through an element-by-element loop.
    @staticmethod
    def backward(ctx, g_out):
        u, delta, A, B, C, D, z, delta_bias, starts, *kept = ctx.saved_tensors
        matmul = ctx.matmul
        with _no_autocast(u):
            u32, dt, A32, B32 = _discretize(u, delta, A, B, delta_bias, ctx.delta_softplus)
            C32, g_out = C.to(u32.dtype), g_out.to(u32.dtype)
            D32 = D.to(u32.dtype)[:, None] if D is not None else None                  # (d_inner, 1)
            if z is not None:
                z32 = z.to(u32.dtype)
                sig = torch.sigmoid(z32)                                                # (b, d_inner, l)
                g_y = g_out * z32 * sig                                                 # g_out * silu(z)
                g_silu = g_out * sig * (1 + z32 * (1 - sig))                            # g_out * silu'(z)
            else:
                g_y = g_out
            g_u = g_y * D32 if D is not None else torch.zeros_like(u32)                 # (b, d_inner, l)
            g_D = (g_y * u32).sum((0, 2)).to(D.dtype) if D is not None else None
            dt_l, dtu_l, B_l, C_l = _token_major(dt), _token_major(dt * u32), _token_major(B32), _token_major(C32)
            g_y_l = _token_major(g_y)                                                   # (l, b, d_inner)
            y_l = kept[3] if kept else torch.empty_like(dt_l) if z is not None else None  # <h_i, C_i>, (l, b, d_inner)
            g_dt_l, g_dtu_l = torch.empty_like(dt_l), torch.empty_like(dt_l)            # (l, b, d_inner)
            g_B_l, g_C_l = torch.empty_like(B_l), torch.empty_like(C_l)                 # (l, b, n)
            g_A = torch.zeros_like(A32)                                                 # (d_inner, n)
            l, chunk = u.shape[-1], ctx.chunk
            carry = torch.zeros_like(starts[0])                  # a_{i+1} g_h_{i+1} from the next chunk
            for index, start in reversed(list(enumerate(range(0, l, chunk)))):
                end = min(start + chunk, l)
                if kept:   # the forward's own                                          (chunk, b, d_inner, n) each
                    decay, drive, hs = (x[start:end] for x in kept[:3])
                else:      # recomputed from the chunk's start state
                    decay, drive = _LeanScan._chunk_terms(dt_l, dtu_l, A32, B_l, start, end)
                    hs = _LeanScan._states(starts[index], decay, drive)
                    if z is not None:
                        _LeanScan._sum_over_n(hs, C_l[start:end], y_l[start:end], matmul)
                g_h = g_y_l[start:end, ..., None] * C_l[start:end, :, None, :]          # (chunk, b, d_inner, n)
                g_h[-1] += carry
                for i in reversed(range(end - start - 1)):
                    g_h[i].addcmul_(decay[i + 1], g_h[i + 1])                           # (b, d_inner, n)
                carry = decay[0] * g_h[0]                                               # (b, d_inner, n)
                # g_(dt A) = g_h (h_i - drive_i), written into drive's memory (drive is not needed after this;
                # a kept drive is a saved tensor, which stays untouched so that a second backward still works)
                g_dtA = torch.sub(hs, drive, out=None if kept else drive).mul_(g_h)     # (chunk, b, d_inner, n)
                g_A += (g_dtA * dt_l[start:end, ..., None]).sum((0, 1))                 # (d_inner, n)
                _LeanScan._sum_over_n(g_h, B_l[start:end], g_dtu_l[start:end], matmul)  # (chunk, b, d_inner)
                torch.sum(g_dtA.mul_(A32), -1, out=g_dt_l[start:end])                   # (chunk, b, d_inner)
                _LeanScan._sum_over_d_inner(g_h, dtu_l[start:end], g_B_l[start:end], matmul)  # (chunk, b, n)
                _LeanScan._sum_over_d_inner(hs, g_y_l[start:end], g_C_l[start:end], matmul)   # (chunk, b, n)
            g_dtu = _batch_major(g_dtu_l)                                               # (b, d_inner, l)
            g_dt = _batch_major(g_dt_l) + g_dtu * u32                                   # (b, d_inner, l)
            g_u = g_u + g_dtu * dt
            g_z = None
            if z is not None:
                y = _batch_major(y_l) + u32 * D32 if D is not None else _batch_major(y_l)  # (b, d_inner, l)
                g_z = (g_silu * y).to(z.dtype)
            if ctx.delta_softplus:  # back through dt = softplus(delta + delta_bias)
                pre = delta.to(dt.dtype) + (delta_bias.to(dt.dtype)[:, None] if delta_bias is not None else 0)
                g_dt = g_dt * torch.sigmoid(pre)
            g_bias = g_dt.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None
        return (g_u.to(u.dtype), g_dt.to(delta.dtype), g_A.to(A.dtype), _batch_major(g_B_l).to(B.dtype),
                _batch_major(g_C_l).to(C.dtype), g_D, g_z, g_bias, None, None, None, None)


class _SmallScan(torch.autograd.Function):
    """The scan of small sizes on CPUs: every state kept, so the backward recomputes nothing, and each step
    runs over the whole sequence at once (only the two recurrences walk the tokens). Everything inside is
    token-major, (l, b, d_inner), (l, b, n), and for the states (l, b, n, d_inner), the state before the
    channel: every broadcast and every contraction over n then runs along contiguous rows of d_inner numbers
    (in a (..., d_inner, n) layout they stride over n, which a CPU vectorizes badly). The output and the
    gradients are (b, ., l) views of token-major memory, which the model's projections read without a
    transposing copy. reverse: the recurrence walks the tokens last to first (h_i = a_i h_{i+1} + drive_i),
    which is the scan of the flipped sequence, flipped back, without the flips."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=False):
        with _no_autocast(u):
            dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
            A_t = A.to(dtype).t().contiguous()                                          # (n, d_inner)
            pre = _token_major(delta.to(dtype))                                         # (l, b, d_inner)
            if delta_bias is not None:   # not in place: pre may be delta itself (contiguous() returns it)
                pre = pre + delta_bias.to(dtype)
            dt = F.softplus(pre) if delta_softplus else pre                             # (l, b, d_inner)
            u_l = _token_major(u.to(dtype))                                             # (l, b, d_inner)
            B_l, C_l = _token_major(B.to(dtype)), _token_major(C.to(dtype))             # (l, b, n)
            dtu = dt * u_l                                                              # (l, b, d_inner)
            decay = torch.mul(dt[:, :, None], A_t).exp_()                               # (l, b, n, d_inner)
            hs = torch.mul(dtu[:, :, None], B_l[..., None])                             # the drives, then the states
            for i in _SmallScan.walk(hs.shape[0], reverse):
                hs[i].addcmul_(decay[i], hs[i + (1 if reverse else -1)])                # h_i = a_i h_prev + drive_i
            y = torch.matmul(C_l[:, :, None], hs)[:, :, 0]                              # <h_i, C_i>, (l, b, d_inner)
            if D is not None:
                y = torch.addcmul(y, u_l, D.to(dtype))                                  # (l, b, d_inner)
            sig = silu = None
            out = y
            if z is not None:
                z_l = _token_major(z.to(dtype))                                         # (l, b, d_inner)
                sig = torch.sigmoid(z_l)
                silu = z_l * sig
                out = y * silu                                                          # (l, b, d_inner)
        gate = (y, sig, silu) if z is not None else ()
        ctx.save_for_backward(D, A_t, pre, dt, u_l, dtu, B_l, C_l, decay, hs, *gate)
        ctx.dtypes = [x.dtype if x is not None else None for x in (u, delta, A, B, C, z, delta_bias)]
        ctx.delta_softplus, ctx.reverse = delta_softplus, reverse
        return _batch_major(out.to(u.dtype))                                            # (b, d_inner, l)

    @staticmethod
    def walk(l, reverse):
        """The tokens that follow another in the scan's order: 1 .. l-1, or l-2 .. 0 when reverse."""
        return range(l - 2, -1, -1) if reverse else range(1, l)

    # The backward of _LeanScan's derivation, for the whole sequence at once; G holds g_h, and
    # g_(dt A)_i = g_h_i a_i h_{i-1} uses the kept states directly (it is 0 for the first token). With reverse,
    # "previous" is i + 1 and "next" i - 1: the adjoint walks the tokens first to last.
    @staticmethod
    def backward(ctx, g_out):
        D, A_t, pre, dt, u_l, dtu, B_l, C_l, decay, hs, *gate = ctx.saved_tensors
        u_dtype, delta_dtype, A_dtype, B_dtype, C_dtype, z_dtype, bias_dtype = ctx.dtypes
        with _no_autocast(dt):
            g_y = _token_major(g_out.to(dt.dtype))                                      # (l, b, d_inner)
            g_z = None
            if gate:   # z was given
                y, sig, silu = gate
                g_z = g_y * y * torch.addcmul(sig, silu, 1 - sig)                       # g_out y silu'(z)
                g_y = g_y * silu                                                        # g_out silu(z)
            g_D = (g_y * u_l).sum((0, 1)).to(D.dtype) if D is not None else None
            G = torch.mul(g_y[:, :, None], C_l[..., None])                              # (l, b, n, d_inner)
            step = -1 if ctx.reverse else 1   # from a token to the next in the scan's order
            for i in _SmallScan.walk(G.shape[0], not ctx.reverse):   # the scan's order, backwards
                G[i].addcmul_(decay[i + step], G[i + step])                             # g_h_i += a_next g_h_next
            g_C = torch.matmul(hs, g_y[..., None])[..., 0]                              # sum_d_inner g_y h, (l, b, n)
            g_B = torch.matmul(G, dtu[..., None])[..., 0]                               # (l, b, n)
            g_dtu = torch.matmul(B_l[:, :, None], G)[:, :, 0]                           # <g_h_i, B_i>, (l, b, d_inner)
            after, before = (slice(None, -1), slice(1, None)) if ctx.reverse else (slice(1, None), slice(None, -1))
            g_dtA = G[after].mul_(decay[after]).mul_(hs[before])                        # (l - 1, b, n, d_inner)
            g_A = (g_dtA * dt[after, :, None]).sum((0, 1)).t()                          # (d_inner, n)
            g_dt = g_dtu * u_l                                                          # (l, b, d_inner)
            g_dt[after] += g_dtA.mul_(A_t).sum(2)                                       # <g_(dt A)_i, A>
            g_u = g_dtu.mul_(dt)                                                        # (l, b, d_inner)
            if D is not None:
                g_u.addcmul_(g_y, D.to(dt.dtype))
            if ctx.delta_softplus:                                                      # softplus' = sigmoid
                g_dt *= torch.sigmoid(pre)
            g_bias = g_dt.sum((0, 1)).to(bias_dtype) if bias_dtype is not None else None
        return (_batch_major(g_u.to(u_dtype)), _batch_major(g_dt.to(delta_dtype)), g_A.to(A_dtype),
                _batch_major(g_B.to(B_dtype)), _batch_major(g_C.to(C_dtype)), g_D,
                _batch_major(g_z.to(z_dtype)) if g_z is not None else None, g_bias, None, None)


@torch.compiler.disable  # torch.compile would unroll the token loop: compile the rest, run this scan eagerly
def selective_scan_lean(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, chunk=None,
                        matmul=None, keep_states=None):
    """Memory-lean PyTorch scan; same arguments and result as selective_scan_ref.
    chunk: tokens per chunk, one saved state each (default 16 on CUDA, 8 elsewhere).
    matmul: contract with batched matmul (default on CUDA) or with multiply-and-sum (default elsewhere).
    keep_states: keep every state (3 float32 tensors of (l, b, d_inner, n)) for a backward that recomputes
    nothing; default: when a gradient is needed and they take at most KEEP_STATES_MB.
    With chunk, matmul and keep_states all left to it, a small scan on a CPU runs selective_scan_small."""
    if chunk is None and matmul is None and keep_states is None and small_scan_suits(u, A):
        return selective_scan_small(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    chunk = chunk or (16 if u.is_cuda else 8)
    matmul = u.is_cuda if matmul is None else matmul
    if keep_states is None:
        inputs = (u, delta, A, B, C, D, z, delta_bias)
        needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
        keep_states = needs_grad and 3 * 4 * u.numel() * A.shape[1] <= KEEP_STATES_MB * 2 ** 20
    return _LeanScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, matmul, keep_states)


@torch.compiler.disable  # as selective_scan_lean: the token loop runs eagerly
def selective_scan_small(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False):
    """The whole-sequence scan (_SmallScan): same arguments and result as selective_scan_ref. Keeps two
    float32 tensors of (l, b, n, d_inner) for the backward: selective_scan_lean takes it on CPUs while they
    fit in SMALL_SCAN_MB (small_scan_suits). reverse: the scan of the flipped sequence, flipped back (the
    backward direction of the CPU block), without flipping anything."""
    return _SmallScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)


def small_scan_suits(u, A):
    """True for a scan on a CPU whose kept states (decay and state, 2 x 4 bytes x b d_inner l n) take at
    most SMALL_SCAN_MB."""
    return u.device.type == "cpu" and 2 * 4 * u.numel() * A.shape[1] <= SMALL_SCAN_MB * 2 ** 20


def mamba_kernel_usable(u, delta, A, B, C, D=None, z=None, delta_bias=None):
    """True when mamba-ssm's kernel is installed and accepts these tensors: all on CUDA, float32/16 or
    bfloat16 inputs, float32 A/D/delta_bias, n <= 256, contiguous last dimension."""
    if mamba_selective_scan_fn is None:
        return False
    tensors = [x for x in (u, delta, A, B, C, D, z, delta_bias) if x is not None]
    return (all(x.device.type == "cuda" for x in tensors)
            and u.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and A.shape[-1] <= 256
            and all(x.dtype == torch.float32 for x in (A, D, delta_bias) if x is not None)
            and all(x.stride(-1) == 1 for x in tensors))


def triton_module(backend):
    """scan_triton.py, imported on first use, so that DiS.py copied alone never needs it: the one beside this
    file when DiS.py is part of a package (pkg.DiS finds pkg.scan_triton), else a top-level scan_triton."""
    try:
        if __package__ and importlib.util.find_spec(f"{__package__}.scan_triton") is not None:
            return importlib.import_module(f"{__package__}.scan_triton")
        import scan_triton
    except ImportError as e:
        raise RuntimeError(f"scan backend {backend!r} needs scan_triton.py beside DiS.py and Triton ({e}); "
                           f"set DiS.SCAN_BACKEND = 'auto' for the PyTorch scan") from e
    return scan_triton


def _autocast_dtype(x):
    """The dtype autocast gives a Linear's output on x's device: the fused kernels must match it."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32


def mixer_weights(mixer):
    """A BiMamba's parameters in the order scan_triton.bimamba_inner_fn takes them: in_proj's and out_proj's
    weights, then for each direction (conv weight, conv bias, x_proj, dt_proj weight and bias, A_log, D)."""
    directions = [(ssm.conv1d.weight, ssm.conv1d.bias, ssm.x_proj.weight, ssm.dt_proj.weight, ssm.dt_proj.bias,
                   ssm.A_log, ssm.D) for ssm in (mixer.forward_ssm, mixer.backward_ssm)]
    return mixer.in_proj.weight, mixer.out_proj.weight, *directions


def fused_block(block, hidden, residual):
    """Block.forward after its skip merge, as the fused kernels of scan_triton.py (SCAN_BACKEND "fused"), or
    on a CPU under "auto" as cpu_block: the same math and parameters, and the same (mixer output, residual
    stream) result."""
    if hidden.device.type == "cpu" and SCAN_BACKEND == "auto":
        return cpu_block(block, hidden, residual)
    st = triton_module("fused")
    if not torch.compiler.is_compiling() and not st.triton_scan_usable(hidden):
        raise RuntimeError(f"scan backend 'fused' cannot run on {hidden.dtype} tensors on {hidden.device.type}: its "
                           f"Triton kernels need CUDA (or TRITON_INTERPRET=1 set before torch is imported, for "
                           f"tests) and float32/16 or bfloat16; set DiS.SCAN_BACKEND = 'auto'")
    scale = None   # drop-path as one factor per sample: drop_path itself, on ones, so the random draws are its own
    if residual is not None and block.drop_prob > 0 and block.training:
        ones = hidden.new_ones((hidden.shape[0],) + (1,) * (hidden.ndim - 1))
        scale = drop_path(ones, block.drop_prob, block.training).flatten().float()      # (b,)
    normed, residual = st.add_rms_norm_triton(hidden, residual, block.norm.weight, block.norm.eps, scale=scale,
                                              out_dtype=_autocast_dtype(hidden))      # (b, l, d) each
    return st.bimamba_inner_fn(normed, *mixer_weights(block.mixer)), residual                  # (b, l, d)


def cpu_block(block, hidden, residual):
    """Block.forward after its skip merge on a CPU ("auto"): the add and RMSNorm as Block.forward writes them
    (drop-path through drop_path itself, so the random draws are the same), then, when the mixer's scans are
    small (small_scan_suits), cpu_mixer, else the readable mixer."""
    if residual is None:
        residual = hidden.float()                                                       # (b, l, d)
    else:
        residual = residual + drop_path(hidden, block.drop_prob, block.training).float()
    normed = block.norm(residual.to(block.norm.weight.dtype))                           # (b, l, d)
    mixer, (b, l, _) = block.mixer, normed.shape
    u = normed.new_empty(()).expand(b, mixer.out_proj.in_features, l)                  # the scans' u: (b, d_inner, l)
    if small_scan_suits(u, mixer.forward_ssm.A_log):
        return cpu_mixer(mixer, normed), residual
    return mixer(normed), residual


def cpu_mixer(mixer, hidden):
    """BiMamba.forward for small CPU scans, token-major throughout: every tensor is (l, b, .), so that each
    token is one contiguous block (what selective_scan_small works in: no transposing copies around it).
    The convs are shifted multiply-adds, the backward direction's anti-causal, and its scan runs the tokens
    last to first: no flips. Plain autograd, but for the convs (_ShiftConv) and the scans."""
    x_l = hidden.transpose(0, 1).contiguous()                                           # (l, b, d)
    xz = F.linear(x_l, mixer.in_proj.weight)                                            # (l, b, 2 d_inner)
    x, z = xz.chunk(2, dim=-1)                                                          # (l, b, d_inner) each
    z = z.contiguous()                      # once for both scans, which would each copy the strided view
    y = cpu_ssm(mixer.forward_ssm, x, z, False) + cpu_ssm(mixer.backward_ssm, x, z, True)  # (l, b, d_inner)
    return F.linear(y, mixer.out_proj.weight).transpose(0, 1)                           # (b, l, d)


class _ShiftConv(torch.autograd.Function):
    """The depthwise conv of cpu_ssm on token-major x (l, b, d_inner), as one shifted multiply-add per tap:
    tap k reads the token s = d_conv-1-k before (causal) or, with reverse, after (anti-causal). Its backward
    is the same shifts the other way, and one multiply-and-sum per tap for the weight."""

    @staticmethod
    def forward(ctx, x, w, bias, reverse):                                              # w: (d_inner, d_conv)
        l, d_conv = x.shape[0], w.shape[1]
        out = torch.addcmul(bias, x, w[:, -1])                                          # (l, b, d_inner)
        for k, s in ((k, d_conv - 1 - k) for k in range(d_conv - 1) if d_conv - 1 - k < l):
            reads, writes = (slice(s, None), slice(None, l - s)) if reverse else (slice(None, l - s), slice(s, None))
            out[writes].addcmul_(x[reads], w[:, k])                                     # out_i += w_k x_(i -+ s)
        ctx.save_for_backward(x, w)
        ctx.reverse = reverse
        return out

    @staticmethod
    def backward(ctx, g_out):
        x, w = ctx.saved_tensors
        l, d_conv = x.shape[0], w.shape[1]
        g_x = g_out * w[:, -1]                                                          # (l, b, d_inner)
        g_w = torch.zeros_like(w)                                                       # (d_inner, d_conv)
        g_w[:, -1] = (g_out * x).sum((0, 1))
        for k, s in ((k, d_conv - 1 - k) for k in range(d_conv - 1) if d_conv - 1 - k < l):
            reads, writes = (slice(s, None), slice(None, l - s)) if ctx.reverse else (slice(None, l - s), slice(s, None))
            g_x[reads].addcmul_(g_out[writes], w[:, k])
            g_w[:, k] = (g_out[writes] * x[reads]).sum((0, 1))
        return g_x, g_w, g_out.sum((0, 1)), None


def cpu_ssm(ssm, x, z, reverse):
    """SSM.forward on token-major x, z (l, b, d_inner) -> (l, b, d_inner). The conv, token i:
    bias + sum_k w[k] x[i - (d_conv-1) + k] (causal), or with reverse bias + sum_k w[k] x[i + d_conv-1 - k],
    which is flip(conv(flip(x)))."""
    w, bias = ssm.conv1d.weight[:, 0].to(x.dtype), ssm.conv1d.bias.to(x.dtype)          # (d_inner, d_conv), (d_inner,)
    u = F.silu(_ShiftConv.apply(x, w, bias, reverse))                                   # (l, b, d_inner)
    x_dbl = F.linear(u, ssm.x_proj.weight)                                              # (l, b, dt_rank + 2n)
    delta_low, B, C = x_dbl.split([ssm.dt_rank, ssm.d_state, ssm.d_state], dim=-1)
    delta = F.linear(delta_low, ssm.dt_proj.weight)                                     # (l, b, d_inner); bias in scan
    A = -torch.exp(ssm.A_log.float())                                                   # (d_inner, n)
    batch_major = lambda t: t.permute(1, 2, 0)                                          # (l, b, .) -> (b, ., l) view
    y = selective_scan_small(batch_major(u), batch_major(delta), A, batch_major(B), batch_major(C), ssm.D.float(),
                             batch_major(z), ssm.dt_proj.bias.float(), True, reverse)  # (b, d_inner, l)
    return y.permute(2, 0, 1)                                                           # (l, b, d_inner)


# What "auto" runs on CUDA. The fused path is the fastest one we have, but its kernels are compiled on the
# user's GPU by the user's Triton: before it runs there, one small block runs fused and lean, forward and
# backward under bf16 autocast, and must agree. Any failure keeps the PyTorch path, with one warning.
# The verdict is kept per device for the process; a torch.compile trace only reads it (the scripts decide
# before they compile: call resolve_auto(device) first in your own code if you compile).
# max |fused - lean| / max |lean| of each output and gradient: bf16 rounding alone leaves a few percent between
# the two paths at this size, a wrong kernel is off by about the whole scale
AUTO_CHECK_TOLERANCE = 0.1
_AUTO_VERDICT = {}            # (device type, index) -> (backend, reason)


def fused_path_runs(x, backend=None):
    """Whether the fused path runs for tensors like x: backend (default SCAN_BACKEND) is "fused" (the Triton
    path), or "auto" on a CUDA device whose first-use check passed (the same). Block.forward asks without a
    backend, and for it "auto" on a CPU answers True too: its fused_block is then cpu_block, plain PyTorch
    (which keeps the readable mixer for scans too big for the small scan). selective_scan asks for one scan,
    naming its backend: on a CPU that scan is never Triton's."""
    asked_by_block = backend is None
    backend = backend or SCAN_BACKEND
    if backend == "auto" and x.device.type == "cpu":
        return asked_by_block
    if backend != "auto" or x.device.type != "cuda":
        return backend == "fused"
    if torch.compiler.is_compiling():
        verdict = _AUTO_VERDICT.get((x.device.type, x.device.index))
        return verdict is not None and verdict[0] == "fused"
    return resolve_auto(x.device)[0] == "fused"


def resolve_auto(device):
    """(backend, reason): what SCAN_BACKEND "auto" runs on device, and why, e.g. ("fused", "checked on NVIDIA
    H100 80GB HBM3") or ("lean", "the fused path failed its check on cuda:0: <what went wrong>"). The first call
    for a CUDA device runs the check (a fraction of a second) and warns in one line if the fused path is not
    taken."""
    device = torch.device(device)
    if device.type != "cuda":
        return "lean", f"PyTorch on {device.type}, small blocks token-major"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device.type, device.index)
    if key not in _AUTO_VERDICT:
        pytorch = "mamba_ssm" if mamba_selective_scan_fn is not None else "lean"
        try:
            _AUTO_VERDICT[key] = ("fused", fused_first_use_check(device))
        except Exception as e:   # Triton missing, a compile error, an unsupported GPU, a mismatch: all alike
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            _AUTO_VERDICT[key] = (pytorch, f"the fused path failed its check on {device}: {reason}")
            warnings.warn(f"DiS: {_AUTO_VERDICT[key][1]}; running {pytorch} instead", stacklevel=2)
    return _AUTO_VERDICT[key]


def fused_first_use_check(device, b=2, l=70, d=64):
    """Runs one small block (with a residual, no drop-path) fused and lean under bf16 autocast, forward and
    backward (also when called under no_grad, e.g. from the first forward of sampling); returns "checked on
    <device name>", or raises with what went wrong. Leaves the random state as it was."""
    global SCAN_BACKEND
    if not triton_module("fused").triton_scan_usable(torch.empty(0, device=device)):
        raise RuntimeError("Triton's kernels cannot run on this device")
    saved, results = SCAN_BACKEND, {}
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                torch.inference_mode(False), torch.enable_grad():
            torch.manual_seed(0)
            block = Block(d, n_layer=1).to(device)
            inputs = [torch.randn(b, l, d, device=device) for _ in range(4)]   # hidden, residual, 2 gradients
            for backend in ("lean", "fused"):
                SCAN_BACKEND = backend
                hidden, residual = inputs[0].bfloat16().requires_grad_(), inputs[1].clone().requires_grad_()
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    out = block(hidden, residual)                                   # (mixer output, stream)
                grads = torch.autograd.grad([out[0].float(), out[1]], [hidden, residual, *block.parameters()],
                                            inputs[2:])
                results[backend] = [t.detach().bfloat16().float() for t in (*out, *grads)]
    finally:
        SCAN_BACKEND = saved
    names = ["mixer output", "stream", "grad hidden", "grad residual"] + [n for n, _ in block.named_parameters()]
    for name, fused, lean in zip(names, results["fused"], results["lean"]):
        error = ((fused - lean).abs().max() / lean.abs().max().clamp(min=1e-30)).item()
        if not error <= AUTO_CHECK_TOLERANCE:   # NaN fails too
            raise RuntimeError(f"the fused {name} differs from lean by {error:.2g} of its scale "
                               f"(tolerance {AUTO_CHECK_TOLERANCE:g})")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"checked on {name}"
