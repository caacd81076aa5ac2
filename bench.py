"""
Benchmarks for DiS.py, four tables: the scan, the model (training and sampling), DiS vs DiT, model sizes;
and a profiling mode for one model's training step.
    python bench.py                          # small shapes on CPU, a few minutes
    python bench.py --preset target          # the DiS-S/2 CIFAR-10 shapes on CPU (README's CPU figures)
    python bench.py --preset quickstart      # the CPU quickstart's model (DiS-Q/8, batch 64) and its DiT peer
    python bench.py --preset gpu --device cuda --markdown bench_gpu.md
    python bench.py --preset gpu-quick --device cuda      # only the headline rows, meant for under 5 minutes on an H100
    python bench.py --profile --device cuda --model DiS-S/2 --batch 128 --profile-scan fused   # [--compile]
    python bench.py --profile --device cpu --model DiS-T/4 --batch 8      # writes profile_DiS-T_4_lean.txt
Times are medians over --repeats runs after a warm-up (CUDA synchronised). The race table (quickstart) times
several models in alternating rounds in one process and gives each one's speed relative to the last, the
median over rounds: on a shared machine the fairest comparison. Peak memory: on CUDA the
allocator's peak; on CPU the growth of the process's peak resident set, each case in a fresh process.
Every row names the scan it runs (lean, ref, triton, fused, mamba-ssm, stand-in): nothing picks a kernel behind
its back. Rows that cannot run here (Triton off CUDA, mamba-ssm not installed) are skipped and listed.
--profile writes torch.profiler's operator table (no traces) of 3 training steps after a warm-up.
--check compares every Triton path with the lean scan at DiS-S/2's real size: python bench.py --check --device cuda
--compile-kernels builds every Triton kernel a fused training step launches for real GPUs, on any machine (no GPU:
Triton's compiler and the ptxas in its wheel), and fails on a compile error or a register spill:
    python bench.py --compile-kernels --arch 80 90
"""
import argparse
import functools
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import DiS
from dis_cli import adamw, mixed_precision

# A variant is "<scan or mode>[+compile][+ckpt]": scans lean, ref, triton, fused (the fused Triton blocks),
# mamba-ssm, stand-in, chunked (DiS models); modes eager, compile (DiT models). Model runs: (name, image size, channels, classes, batch, variants);
# samples: (name, image size, channels, classes, batch, variant); peer: (image size, channels, classes, batch,
# [(name, variant), ...]). scans: shapes (b, d_inner, l, n); scan_names: a subset of the scan rows (default all).
PRESETS = {
    "small": dict(scans=[(4, 256, 66, 16), (4, 256, 258, 16)], scan_dtypes=["float32"],
                  models=[("DiS-T/4", 32, 1, 0, 64, ["lean", "ref", "lean+ckpt", "stand-in", "stand-in+compile"])],
                  peer=(32, 3, 0, 4, [("DiS-S/2", "lean"), ("DiT-S/2", "eager"), ("DiT-S/2", "compile")]),
                  samples=[("DiS-T/4", 32, 1, 0, 16, "lean"), ("DiT-T/4", 32, 1, 0, 16, "eager")],
                  case_timeout=300),
    # the CPU quickstart's model and its scan (b 64, d_inner 192, l 18, n 4); race: against its DiT peer
    # (DiT-T/8, adaLN-Zero, width 128, depth 6, 2 heads, patch 8), in alternating rounds
    "quickstart": dict(scans=[(64, 192, 18, 4)], scan_dtypes=["float32"],
                       scan_names=["lean", "small", "lean keep_states=False", "lean keep_states=True", "ref"],
                       models=[("DiS-Q/8", 32, 1, 10, 64, ["auto", "lean", "chunked", "ref"])],
                       samples=[("DiS-Q/8", 32, 1, 10, 64, "auto")],
                       race=(32, 1, 10, 64, [("DiS-Q/8", "auto"), ("DiS-Q/8", "lean"), ("DiS-Q/8", "chunked"),
                                            ("DiT-T/8", "eager")]),
                       race_rounds=15, tables="scan,model,sample,race"),
    "target": dict(scans=[(8, 736, 258, 16), (8, 736, 1026, 16)], scan_dtypes=["float32"],
                   models=[("DiS-T/4", 32, 1, 0, 64, ["lean", "ref", "lean+ckpt", "lean+compile", "stand-in",
                                                      "stand-in+compile"])],
                   peer=(32, 3, 0, 8, [("DiS-S/2", "lean"), ("DiT-S/2", "eager"), ("DiT-S/2", "compile")]),
                   samples=[("DiS-T/4", 32, 1, 0, 16, "lean"), ("DiT-T/4", 32, 1, 0, 16, "eager")]),
    "gpu": dict(scans=[(128, 736, 258, 16), (128, 736, 1026, 16)], scan_dtypes=["float32", "bfloat16"],
                models=[("DiS-S/2", 32, 3, 0, 128, ["lean", "lean+compile", "lean+ckpt", "mamba-ssm", "triton",
                                                    "triton+compile", "fused", "fused+compile", "fused+ckpt",
                                                    "stand-in", "stand-in+compile"]),
                        ("DiS-S/2", 32, 4, 1000, 128, ["lean", "triton", "fused", "fused+compile"]),   # 256px latents
                        ("DiT-S/2", 32, 4, 1000, 128, ["eager", "compile"]),
                        ("DiS-H/2", 32, 4, 1000, 32, ["lean+ckpt", "triton+ckpt", "fused+ckpt"]),
                        ("DiT-XL/2", 32, 4, 1000, 32, ["eager", "compile"])],
                peer=(32, 3, 0, 128, [("DiS-S/2", "lean"), ("DiS-S/2", "triton"), ("DiS-S/2", "fused"),
                                      ("DiS-S/2", "fused+compile"), ("DiT-S/2", "eager"), ("DiT-S/2", "compile")]),
                samples=[("DiS-S/2", 32, 3, 0, 128, "lean"), ("DiS-S/2", 32, 3, 0, 128, "fused"),
                         ("DiT-S/2", 32, 3, 0, 128, "eager")]),
    # the headline rows only: DiS-S/2 on 256px latents (l = 258 tokens, the scan row's shape) next to DiT-S/2
    "gpu-quick": dict(scans=[(128, 736, 258, 16)], scan_dtypes=["bfloat16"], scan_names=["lean", "triton"],
                      models=[("DiS-S/2", 32, 4, 1000, 128, ["lean", "triton", "fused", "fused+compile", "stand-in",
                                                             "stand-in+compile"]),
                              ("DiT-S/2", 32, 4, 1000, 128, ["eager", "compile"])],
                      samples=[("DiS-S/2", 32, 4, 1000, 128, "fused"), ("DiT-S/2", 32, 4, 1000, 128, "eager")],
                      tables="scan,model,sample", repeats=3, case_timeout=300),
}


def timeit(fn, repeats, device, warmup=True):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    if warmup:
        fn()  # warm-up (and compilation)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_mb(fn, device):
    """Peak memory of one call of fn in MB: the CUDA allocator's peak, or the growth of the CPU max-RSS."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 20   # all of it: weights, optimizer state too
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


#################################################################################
#                                 1. Scan                                       #
#################################################################################

def mambapy_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True):
    """The selective scan as mambapy's MambaBlock.selective_scan computes it, with its parallel pscan."""
    from mambapy.pscan import pscan
    dt = F.softplus(delta + delta_bias[:, None]).transpose(1, 2)                   # (b, l, d)
    dA = torch.exp(dt.unsqueeze(-1) * A)                                           # (b, l, d, n)
    BX = dt.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2) * u.transpose(1, 2).unsqueeze(-1)  # (b, l, d, n)
    hs = pscan(dA, BX)                                                             # (b, l, d, n)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3)                          # (b, l, d)
    y = y + D * u.transpose(1, 2)
    return (y * F.silu(z.transpose(1, 2))).transpose(1, 2)


def stand_in_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Not a scan: a cheap elementwise function of the scan's inputs, with its output shape and dtype and
    gradients into every input. Compiled, it reads each input and writes the output once, which is the
    least any scan kernel must do: the model's speed with it is the ceiling of scan optimisation."""
    dt = delta.float() + (delta_bias.float()[:, None] if delta_bias is not None else 0)   # (b, d_inner, l)
    dt = F.softplus(dt) if delta_softplus else dt
    bc = (B.float() * C.float()).mean(1, keepdim=True)                                     # (b, 1, l)
    y = u.float() * dt * (bc + A.float().mean(-1)[:, None])                                # (b, d_inner, l)
    if D is not None:
        y = y + u.float() * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)


def triton_usable(device):
    """True where the Triton scan runs at benchmark speed: compiled kernels on CUDA (on CPU only Triton's
    interpreter could run it, far too slowly to time)."""
    if device.type != "cuda":
        return False
    try:
        import scan_triton
    except Exception:   # no Triton, or a broken install
        return False
    return not scan_triton.INTERPRETED and torch.cuda.is_available()   # no tensor: the parent stays off the GPU


def scan_variants(device):
    """The scan table's rows: name -> a function with selective_scan's arguments. Each calls one
    implementation directly (never the dispatcher), so a row runs exactly the kernel it names."""
    v = {"lean": DiS.selective_scan_lean, "small": DiS.selective_scan_small, "ref": DiS.selective_scan_ref}
    for chunk in (4, 8, 16, 64):
        v[f"lean chunk={chunk}"] = lambda *a, chunk=chunk, **k: DiS.selective_scan_lean(*a, chunk=chunk, **k)
    for keep in (False, True):   # the default keeps states below DiS.KEEP_STATES_MB; either given: never "small"
        v[f"lean keep_states={keep}"] = lambda *a, keep=keep, **k: DiS.selective_scan_lean(*a, keep_states=keep, **k)
    if importlib.util.find_spec("mambapy") is not None:
        v["mambapy"] = mambapy_scan
    if DiS.mamba_selective_scan_fn is not None and device.type == "cuda":
        v["mamba-ssm"] = DiS.mamba_selective_scan_fn
    if triton_usable(device):
        from scan_triton import selective_scan_triton
        v["triton"] = selective_scan_triton
    v["stand-in"] = stand_in_scan
    return v


def scan_inputs(shape, dtype, device, generator):
    """The scan's inputs at shape (b, d_inner, l, n): u, delta, z, B, C in dtype (as the model makes them under
    autocast), requiring gradients; and A (-1, ..., -n per channel), D, delta_bias in float32."""
    b, d, l, n = shape
    mk = lambda *s: torch.randn(*s, generator=generator).to(device)
    activations = {k: x.to(dtype).requires_grad_() for k, x in zip(
        ("u", "delta", "z", "B", "C"), (mk(b, d, l), mk(b, d, l) * 0.5 - 2, mk(b, d, l), mk(b, n, l), mk(b, n, l)))}
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1).to(device)
    return activations, {"A": A, "D": torch.ones(d, device=device), "delta_bias": mk(d) * 0.1}


def run_scan(fn, x, p):
    """fn (selective_scan's arguments) on scan_inputs' two dicts, with softplus as in the model."""
    return fn(x["u"], x["delta"], p["A"], x["B"], x["C"], p["D"], z=x["z"], delta_bias=p["delta_bias"],
              delta_softplus=True)


def scan_case(name, shape, dtype, device, repeats):
    """One row of the scan table (run in a fresh process on CPU, so that peak RSS is this case's alone)."""
    x, p = scan_inputs(shape, getattr(torch, dtype), device, torch.Generator().manual_seed(0))
    fn = scan_variants(device)[name]
    run = lambda: run_scan(fn, x, p)

    def fwd_bwd():
        out = run()
        torch.autograd.grad(out.float().sum(), list(x.values()))
    mem = peak_memory_mb(fwd_bwd, device)
    with torch.no_grad():
        t_fwd = timeit(run, repeats, device)
    t_fb = timeit(fwd_bwd, repeats, device)
    return {"fwd_ms": t_fwd * 1e3, "fwd_bwd_ms": t_fb * 1e3, "peak_mb": mem}


def in_subprocess(kind, args, case):
    """Run one case in a fresh interpreter; returns its JSON result (or an error string)."""
    cmd = [sys.executable, __file__, "--_case", json.dumps({"kind": kind, "case": case}), "--device", args.device,
           "--repeats", str(args.repeats)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {args.case_timeout} s"}
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:80]}


#################################################################################
#                         2. Model, 3. DiT peer                                 #
#################################################################################

class DiTBlock(nn.Module):
    """A DiT block (Peebles & Xie): adaLN-Zero modulated attention and MLP. Only for the comparison."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6), nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):                                                       # x: (b, l, d), c: (b, d)
        s1, g1, a1, s2, g2, a2 = self.ada(c)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + g1) + s1
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # (b, heads, l, dh)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)      # (b, l, d)
        x = x + a1 * self.proj(h)
        return x + a2 * self.mlp(self.norm2(x) * (1 + g2) + s2)


class MiniDiT(nn.Module):
    """DiT-S/2 by default (width 384, depth 12, 6 heads): the Transformer that DiS replaces."""

    def __init__(self, image_size=32, in_channels=3, patch=2, d=384, depth=12, heads=6, num_classes=0):
        super().__init__()
        self.patch, self.c_out, self.num_classes = patch, 2 * in_channels, num_classes
        self.embed = nn.Conv2d(in_channels, d, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, d))
        self.t_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embed = nn.Embedding(num_classes + 1, d) if num_classes else None
        self.blocks = nn.ModuleList([DiTBlock(d, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.out = nn.Linear(d, patch * patch * self.c_out)

    def forward(self, x, t, y=None):
        b, _, hgt, _ = x.shape
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos                     # (b, l, d)
        c = self.t_mlp(DiS.timestep_embedding(t, 256))                             # (b, d)
        if self.y_embed is not None:
            c = c + self.y_embed(y)
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.ada(c)[:, None].chunk(2, dim=-1)
        h = self.out(self.norm(h) * (1 + scale) + shift)                           # (b, l, p*p*c_out)
        s = hgt // self.patch
        return h.view(b, s, s, self.patch, self.patch, self.c_out).permute(0, 5, 1, 3, 2, 4).reshape(b, self.c_out, hgt, hgt)


# DiT's sizes (width, depth, heads, patch); DiT-T/4 and DiT-T/8 are ours, CPU-sized peers of DiS-T/4 for the small
# presets and of DiS-Q/8 for the quickstart
DIT_CONFIGS = {"DiT-T/4": dict(d=128, depth=6, heads=2, patch=4),
               "DiT-T/8": dict(d=128, depth=6, heads=2, patch=8),
               "DiT-S/2": dict(d=384, depth=12, heads=6, patch=2),
               "DiT-XL/2": dict(d=1152, depth=28, heads=16, patch=2)}

SCAN_BACKEND_OF = {"auto": "auto", "lean": "lean", "chunked": "lean", "ref": "ref", "triton": "triton", "fused": "fused",
                   "mamba-ssm": "mamba_ssm"}
SMALL_SCAN_MB = DiS.SMALL_SCAN_MB


def make_model(name, size, chans, classes):
    if name in DIT_CONFIGS:
        return MiniDiT(size, chans, num_classes=classes, **DIT_CONFIGS[name])
    return DiS.create_model(name, image_size=size, in_channels=chans, num_classes=classes)


def use_scan(variant):
    """Make DiS's mixer run the scan that the variant names: DiS.SCAN_BACKEND, forced (each case is its own
    process); "chunked" is "lean" without its whole-sequence path for small scans (DiS.SMALL_SCAN_MB = 0);
    the stand-in, which is not a scan, replaces DiS.selective_scan, which SSM.forward looks up at call time."""
    scan = variant.split("+")[0]
    DiS.SCAN_BACKEND = SCAN_BACKEND_OF.get(scan, "lean")
    DiS.SMALL_SCAN_MB = 0 if scan == "chunked" else SMALL_SCAN_MB
    if scan == "stand-in":
        DiS.selective_scan = lambda *a, backend=None, **k: stand_in_scan(*a, **k)
    elif scan not in SCAN_BACKEND_OF:
        raise ValueError(f"unknown scan in variant {variant!r}")


def variant_usable(name, variant, device):
    scan = variant.split("+")[0]
    if name in DIT_CONFIGS:
        return True
    if scan in ("triton", "fused"):
        return triton_usable(device)
    if scan == "mamba-ssm":
        return device.type == "cuda" and DiS.mamba_selective_scan_fn is not None
    return True


def prepare(name, size, chans, classes, variant, device):
    """The model on device with its variant applied; returns (model, the callable to run: compiled or not)."""
    torch.manual_seed(0)
    model = make_model(name, size, chans, classes).to(device)
    if name not in DIT_CONFIGS:
        model.grad_checkpoint = "ckpt" in variant.split("+")
        use_scan(variant)
    return model, torch.compile(model) if "compile" in variant.split("+") else model


def training_step(name, size, chans, classes, batch, variant, device):
    """(model, step): one AdamW training step on a fixed random batch, under dis_cli.mixed_precision."""
    model, fwd = prepare(name, size, chans, classes, variant, device)
    opt = adamw(model.parameters(), 1e-4, device)
    diffusion = DiS.Diffusion()
    x = torch.randn(batch, chans, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device) if classes else None

    def step():
        with mixed_precision(device):
            loss = diffusion.training_loss(fwd, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model, step


def model_case(spec, device, repeats):
    """Training-step throughput and peak memory of one model configuration."""
    batch = spec[4]
    model, step = training_step(*spec, device)
    t_start = time.perf_counter()
    mem = peak_memory_mb(step, device)  # the first step: it allocates the optimizer state (and compiles)
    first = time.perf_counter() - t_start
    t = timeit(step, repeats, device)
    return {"img_s": batch / t, "step_ms": t * 1e3, "peak_mb": mem, "first_step_s": first,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def race_case(specs, device, rounds):
    """Training steps of several models (model_case's specs) in alternating rounds in one process, each
    round one step of each, so that a shared or throttled machine slows them alike. Returns, per model, the
    median step and the median over rounds of its speed relative to the last model's."""
    runs = []
    for spec in specs:
        model, step = training_step(*spec, device)
        name, variant = spec[0], spec[-1]
        scan = (lambda v=variant: use_scan(v)) if name not in DIT_CONFIGS else (lambda: None)
        scan()
        step(), step()   # warm-up: the optimizer state, the allocator
        runs.append((model, step, scan))
    times = [[] for _ in runs]
    for _ in range(rounds):
        for (_, step, scan), t in zip(runs, times):
            scan()   # a DiS variant's scan is a module-wide switch: set it before each of its steps
            t.append(timeit(step, 1, device, warmup=False))
    return [{"step_ms": statistics.median(t) * 1e3, "img_s": spec[4] / statistics.median(t),
             "rel_speed": statistics.median(last / mine for last, mine in zip(times[-1], t)),
             "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
            for spec, (model, _, _), t in zip(specs, runs, times)]


def sample_case(spec, device, repeats):
    """DDIM-50 sampling throughput (labels drawn at random for class-conditional models, no guidance)."""
    name, size, chans, classes, batch, variant = spec
    model, fwd = prepare(name, size, chans, classes, variant, device)
    model.eval()
    diffusion = DiS.Diffusion()
    y = torch.randint(0, classes, (batch,), device=device) if classes else None

    def run():
        with torch.no_grad(), mixed_precision(device):
            diffusion.sample(fwd, (batch, chans, size, size), y=y, steps=50, sampler="ddim", device=device)
    t = timeit(run, max(1, repeats // 3), device)
    return {"img_s": batch / t, "batch_s": t}


def scan_flops(b, d_inner, l, n):
    """Elementwise FLOPs of one selective scan (1 multiply-add = 2 FLOPs; exp, softplus, sigmoid = 1 each):
    per (b, d_inner, l, n): dt*A, exp, (dt u)*B, h = decay*h + drive (2), y += h*C (2)   -> 7
    per (b, d_inner, l):    bias add, softplus, dt*u, D*u + y (2), silu(z) (2), gate      -> 8"""
    return b * d_inner * l * (7 * n + 8)


def count_flops(model, batch=1):
    """Forward FLOPs of a DiS model for `batch` inputs of its own size, 1 multiply-add = 2 FLOPs.
    Returns {"matmul": every Linear, conv and the patch embedding, "scan": the selective scans' elementwise
    work, "total"}. Norms, activations and additions outside the scan are left out (a few percent).
    The official numbers came from a hook counter that misses the mixer's projections and the scan.
    The README's model-size table comes from here."""
    d, l = model.hidden_size, model.extras + model.num_patches
    ssm = model.mid_block.mixer.forward_ssm
    d_inner, n, dt_rank, d_conv = ssm.D.shape[0], ssm.d_state, ssm.dt_rank, ssm.conv1d.kernel_size[0]
    p, c = model.patch_size, model.in_channels
    layers = model.depth + 1
    mm = 2 * c * p * p * d * model.num_patches                          # patch embedding
    mm += 2 * (d * 4 * d + 4 * d * d)                                   # time MLP
    per_layer = 2 * l * d * 2 * d_inner + 2 * l * d_inner * d           # in_proj, out_proj
    # per direction: the causal conv (on l + d_conv - 1 padded outputs), x_proj, dt_proj
    per_layer += 2 * (2 * d_inner * d_conv * (l + d_conv - 1) + 2 * l * d_inner * (dt_rank + 2 * n)
                      + 2 * l * dt_rank * d_inner)
    mm += layers * per_layer
    mm += (model.depth // 2) * 2 * l * 2 * d * d                        # skip linears
    if model.num_classes > 0:
        mm += 2 * d * 2 * d                                             # adaLN
    mm += 2 * l * d * p * p * model.out_channels                        # final linear (on every token)
    scan = layers * 2 * scan_flops(1, d_inner, l, n)
    return {"matmul": batch * mm, "scan": batch * scan, "total": batch * (mm + scan)}


def dit_flops(name, size, chans, classes):
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        m = make_model(name, size, chans, classes)
        x, t = torch.zeros(1, chans, size, size), torch.zeros(1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long) if classes else None
    with FlopCounterMode(display=False) as fc:
        m(x, t, y)
    return fc.get_total_flops()


def model_flops(name, size, chans, classes):
    """Forward FLOPs per image: count_flops for DiS, torch's FLOP counter for DiT."""
    if name in DIT_CONFIGS:
        return dit_flops(name, size, chans, classes)
    with torch.device("meta"):
        return count_flops(make_model(name, size, chans, classes))["total"]


#################################################################################
#                               4. Profiling                                    #
#################################################################################

def profile(args, device):
    """--profile: warm-up training steps, then torch.profiler over 3 steps; writes the operator table."""
    from torch.profiler import ProfilerActivity
    scan = args.profile_scan or ("fused" if device.type == "cuda" else "lean")
    if args.model in DIT_CONFIGS:
        variant = label = "compile" if args.compile else "eager"
    else:
        variant = scan + ("+compile" if args.compile else "")
        label = scan + ("_compile" if args.compile else "")
    spec = (args.model, args.image_size, args.in_channels, args.num_classes, args.batch, variant)
    _, step = training_step(*spec, device)
    cuda = device.type == "cuda"
    for _ in range(args.warmup):
        step()
    step_ms = timeit(step, 3, device) * 1e3   # unprofiled, for reference
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            with torch.profiler.record_function("training step"):
                step()
        if cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    machine = torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores"
    header = (f"# python {' '.join(sys.argv)}\n# {machine}; torch {torch.__version__}; {args.model}, "
              f"{args.image_size}x{args.image_size}x{args.in_channels}, {args.num_classes} classes, batch "
              f"{args.batch}, variant {variant}; unprofiled step {step_ms:.1f} ms; 3 profiled steps, sorted by {sort}\n")
    text = header + prof.key_averages().table(sort_by=sort, row_limit=40)
    out = args.profile_out or f"profile_{args.model.replace('/', '_')}_{label}.txt"
    with open(out, "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"wrote {out}")


#################################################################################
#                     5. The Triton paths against the lean scan                 #
#################################################################################

def max_rel_error(a, b):
    """max |a - b| / max |b|: the error relative to the tensor's scale (0 for two zero tensors)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def error_row(case, path, results, reference, names, outputs):
    """A row of the --check table: the worst error of the first `outputs` tensors (outputs), of the rest
    (gradients), and the name of the worst tensor of all."""
    errors = [max_rel_error(a, r) for a, r in zip(results, reference)]
    worst = names[max(range(len(errors)), key=errors.__getitem__)]
    return [case, path, f"{max(errors[:outputs]):.1e}", f"{max(errors[outputs:]):.1e}", worst]


def check_paths(args, device):
    """--check: every Triton path against the lean PyTorch one at the size given (default DiS-S/2's
    CIFAR-10 step at batch 128): one scan (triton), and one whole block (triton, fused) under the precision
    policy, output and every gradient; the worst error relative to each tensor's scale."""
    rows = []
    with torch.device("meta"):
        model = DiS.create_model(args.model)
    b, l, d = args.batch, (args.image_size // 2) ** 2 + 1, model.hidden_size
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):   # the scan alone, as the readable mixer calls it
        x, p = scan_inputs((b, 2 * d, l, 16), dtype, device, g)
        g_out = torch.randn(b, 2 * d, l, generator=g).to(device, dtype)
        results = {}
        for backend in ("lean", "triton"):
            out = run_scan(functools.partial(DiS.selective_scan, backend=backend), x, p)
            results[backend] = [out] + list(torch.autograd.grad(out, list(x.values()), g_out))
        rows.append(error_row(f"scan ({b}, {2 * d}, {l}, 16), {str(dtype)[6:]} inputs", "triton", results["triton"],
                              results["lean"], ["out"] + [f"grad {k}" for k in x], outputs=1))
    torch.manual_seed(0)
    block = DiS.Block(d, n_layer=model.depth, drop_prob=0.1).to(device)   # one of the model's blocks
    half = torch.bfloat16 if device.type == "cuda" else torch.float32   # the mixer output, as under autocast
    hidden, residual = torch.randn(b, l, d, generator=g).to(device, half), torch.randn(b, l, d, generator=g).to(device)
    g_hidden, g_residual = (torch.randn(b, l, d, generator=g).to(device) for _ in range(2))
    results = {}
    for backend in ("lean", "triton", "fused"):
        DiS.SCAN_BACKEND = backend
        torch.manual_seed(1)   # the same drop-path draws
        leaves = [hidden.clone().requires_grad_(), residual.clone().requires_grad_()]
        with mixed_precision(device):
            out_h, out_r = block(*leaves)
        grads = torch.autograd.grad([out_h.float(), out_r], leaves + list(block.parameters()), [g_hidden, g_residual])
        results[backend] = [out_h, out_r] + list(grads)
    names = ["mixer output", "stream"] + ["grad hidden", "grad residual"] + [f"grad {n}" for n, _ in block.named_parameters()]
    precision = "bf16 autocast" if device.type == "cuda" else "float32"
    for backend in ("triton", "fused"):
        rows.append(error_row(f"{args.model} block, batch {b}, {l} tokens ({precision})", backend, results[backend],
                              results["lean"], names, outputs=2))
    return table("Fast paths against the lean PyTorch scan (max |error| / max |lean value|, worst tensor)",
                 ["case", "path", "output", "gradients", "worst"], rows)


# The settings whose fused training step --compile-kernels builds: (model, image size, channels, classes, batch,
# autocast dtype or None for float32). DiS-H/2 on 256px latents is the largest model of the paper.
COMPILE_SETTINGS = [("DiS-S/2", 32, 3, 10, 128, torch.bfloat16), ("DiS-S/2", 32, 3, 10, 128, None),
                    ("DiS-H/2", 32, 4, 1000, 32, torch.bfloat16)]


def record_launches(model_name, image_size, channels, classes, batch, dtype):
    """[(kernel, args, kwargs)] of every Triton launch in a fused training step's first and middle block
    (forward + backward), recorded without running a kernel: the custom ops run on uninitialised CPU tensors of
    the real shapes and strides, with Triton's launcher replaced by a recorder. Run with Triton's interpreter off."""
    from triton.runtime.jit import JITFunction
    st = DiS.triton_module("fused")
    launches = []
    saved = (JITFunction.run, st.triton_scan_usable, st._interpreter_ready, DiS.SCAN_BACKEND)
    JITFunction.run = lambda kernel, *a, grid, warmup, **kw: launches.append((kernel, a, kw))
    st.triton_scan_usable, st._interpreter_ready, DiS.SCAN_BACKEND = (lambda u: True), (lambda: True), "fused"
    try:
        with torch.device("meta"):
            model = DiS.create_model(model_name, image_size=image_size, in_channels=channels, num_classes=classes)
        b, l, d = batch, model.extras + model.num_patches, model.hidden_size
        blocks = [m for m in model.modules() if isinstance(m, DiS.Block)]
        autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)
        with SkipMatmuls(), autocast:
            for block, first in ((blocks[0], True), (model.mid_block, False)):   # no residual yet; one with it
                block = block.to_empty(device="cpu").train()
                hidden = torch.empty(b, l, d, dtype=torch.float32 if first else dtype or torch.float32,
                                     requires_grad=True)
                residual = None if first else torch.empty(b, l, d, requires_grad=True)
                out = [t for t in block(hidden, residual) if t.requires_grad]
                torch.autograd.backward(out, [torch.empty_like(t) for t in out])
    finally:
        JITFunction.run, st.triton_scan_usable, st._interpreter_ready, DiS.SCAN_BACKEND = saved
    return launches


class SkipMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    """Matmuls return uninitialised tensors of their result's shape: recording launches needs no arithmetic."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._overloadpacket.__name__ in ("mm", "addmm", "bmm", "baddbmm"):
            to_meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t   # noqa: E731
            out = func(*[to_meta(a) for a in args], **{k: to_meta(v) for k, v in kwargs.items()})
            return torch.empty_strided(out.shape, out.stride(), dtype=out.dtype)
        return func(*args, **kwargs)


COMPILE_JOBS = []   # (name, row, kernel, compile arguments) of each specialisation; filled before the workers fork


def compile_kernels(archs):
    """--compile-kernels: every specialisation of COMPILE_SETTINGS' launches, compiled for each sm_<arch> as Triton
    would on that GPU (one worker process per core), with the log of its ptxas (registers, spills).
    Returns (rows, problems)."""
    import multiprocessing
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    done = set()
    for setting in COMPILE_SETTINGS:
        what = f"{setting[0]} {'bf16 autocast' if setting[-1] else 'float32'}"
        launches = record_launches(*setting)
        for arch in archs:
            target = GPUTarget("cuda", arch, 32)
            backend = make_backend(target)
            for kernel, args, kwargs in launches:   # the specialisation, as Triton's launcher computes it
                kwargs = dict(kwargs, debug=False, instrumentation_mode="")
                bound, spec, options = create_function_from_signature(kernel.signature, kernel.params, backend)(
                    *args, **kwargs)
                options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
                key = (arch, kernel.fn.__name__, repr(signature), repr(sorted(map(str, constexprs.items()))),
                       repr(sorted(map(str, attrs.items()))), options.num_warps)
                if key not in done:
                    done.add(key)
                    consts = ", ".join(f"{kernel.arg_names[k[0]]}={v}" for k, v in constexprs.items()
                                       if kernel.params[k[0]].is_constexpr)
                    COMPILE_JOBS.append((f"{kernel.fn.__name__} sm_{arch} ({what}; {consts})",
                                         [kernel.fn.__name__, f"sm_{arch}", what, consts, options.num_warps],
                                         ASTSource(kernel, signature, constexprs, attrs), target, options.__dict__))
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        results = pool.map(compile_job, range(len(COMPILE_JOBS)), chunksize=1)
    return [row for row, _ in results], [problem for _, problem in results if problem]


def compile_job(index):
    """([row..., registers, spill bytes], problem or None) of COMPILE_JOBS[index]."""
    import contextlib
    import io
    import re
    import triton
    name, row, source, target, options = COMPILE_JOBS[index]
    triton.knobs.nvidia.dump_ptxas_log = True        # printed to stdout, caught here
    triton.knobs.compilation.always_compile = True   # a cached kernel would come back without its log
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            triton.compile(source, target=target, options=options)
    except Exception as e:
        return row + ["-", "-"], f"{name}: does not compile: {' '.join(str(e).split())[-300:]}"
    number = lambda pattern: sum(int(x) for x in re.findall(pattern, log.getvalue()))  # noqa: E731
    regs, spills = number(r"Used (\d+) registers"), number(r"(\d+) bytes spill (?:stores|loads)")
    problem = (f"{name}: no ptxas log to read registers and spills from" if not regs else
               f"{name}: {spills} bytes of register spills ({regs} registers)" if spills else None)
    return row + [regs, spills], problem


#################################################################################
#                                 Tables                                        #
#################################################################################

def table(title, header, rows, note=None):
    lines = [f"### {title}", ""] + ([note, ""] if note else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def fmt(r, key, f="{:.1f}"):
    return r["error"] if "error" in r else f.format(r[key])


def ratio_rows(res):
    """DiS / DiT throughput and memory: the first DiS row against the first DiT row, eager and compiled
    separately (stand-in rows are not models, so they are left out)."""
    def first(dit, compiled):
        for (name, v), r in res.items():
            if ((name in DIT_CONFIGS) == dit and ("compile" in v.split("+")) == compiled
                    and "stand-in" not in v and "error" not in r):
                return name, v
    rows = []
    for compiled in (False, True):
        a, b = first(False, compiled), first(True, compiled)
        if a and b:
            rows.append([f"{a[0]} / {b[0]}", f"{a[1]} / {b[1]}", "", "", f"{res[a]['img_s'] / res[b]['img_s']:.2f}x",
                         f"{res[a]['peak_mb'] / max(res[b]['peak_mb'], 1e-9):.2f}x"])
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=list(PRESETS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (default: the preset's, else 5)")
    p.add_argument("--tables", default=None, help="comma-separated subset of scan,model,sample,peer,race,size "
                                                  "(default: the preset's, else all)")
    p.add_argument("--case-timeout", type=int, default=None,
                   help="seconds allowed to one measurement (default: the preset's, else 900)")
    p.add_argument("--markdown", default=None, help="also write the tables to this markdown file")
    g = p.add_argument_group("profiling (--profile)")
    g.add_argument("--profile", action="store_true", help="profile training steps of --model instead of the tables")
    g.add_argument("--profile-scan", choices=["fused", "triton", "lean", "stand-in"], default=None,
                   help="the scan in DiS models (default: fused on CUDA, lean elsewhere)")
    g.add_argument("--profile-out", default=None, help="output file (default: profile_<model>_<scan>.txt)")
    g.add_argument("--model", default="DiS-S/2", help="a DiS model or one of " + ", ".join(DIT_CONFIGS))
    g.add_argument("--batch", type=int, default=128)
    g.add_argument("--image-size", type=int, default=32)
    g.add_argument("--in-channels", type=int, default=4)
    g.add_argument("--num-classes", type=int, default=1000)
    g.add_argument("--compile", action="store_true", help="profile the torch.compile'd model")
    g.add_argument("--warmup", type=int, default=5, help="training steps before profiling")
    p.add_argument("--check", action="store_true", help="instead of timing: every Triton path against the lean scan at "
                   "--model's size (--batch, --image-size; patch 2), output and gradients")
    p.add_argument("--compile-kernels", action="store_true", help="instead of timing: compile every Triton kernel of "
                   "a fused training step (DiS-S/2 bf16 and float32, DiS-H/2 on 256px latents) for --arch, no GPU "
                   "needed; exits 1 on a compile error or a register spill")
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities for --compile-kernels")
    p.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    preset = PRESETS[args.preset]
    args.repeats = args.repeats or preset.get("repeats", 5)
    args.case_timeout = args.case_timeout or preset.get("case_timeout", 900)
    if args._case:   # a child process: one measurement, printed as JSON
        c = json.loads(args._case)
        fn = {"scan": scan_case, "model": model_case, "sample": sample_case, "race": race_case}[c["kind"]]
        res = fn(*c["case"], device, args.repeats) if c["kind"] == "scan" else fn(c["case"], device, args.repeats)
        print(json.dumps(res))
        return
    if args.compile_kernels:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            sys.exit("error: --compile-kernels compiles real kernels: unset TRITON_INTERPRET")
        rows, problems = compile_kernels(args.arch)
        print(table("Triton kernels compiled ahead of time", ["kernel", "target", "step", "constexprs", "warps",
                                                            "registers", "spill bytes"], rows))
        print("\n".join(problems) or f"{len(rows)} specialisations: all compile, no spills")
        sys.exit(1 if problems else 0)
    if args.check:
        text = check_paths(args, device)
        print(text)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text)
        return
    if args.profile:
        profile(args, device)
        return
    wanted = (args.tables or preset.get("tables", "scan,model,sample,peer,size")).split(",")
    cpu = os.popen("lscpu | grep 'Model name' | cut -d: -f2").read().strip() or "unknown CPU"
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu}, {os.cpu_count()} cores"
    out = [f"Machine: {machine}; torch {torch.__version__}; `python bench.py --preset {args.preset} --device "
           f"{args.device} --repeats {args.repeats}`\n"]
    print(out[0])
    skipped = []
    mixed = "bf16 autocast" if args.device == "cuda" else "float32"

    if "scan" in wanted:
        rows, here = [], list(scan_variants(device))
        names = [s for s in preset.get("scan_names", here) if s in here]
        skipped += [f"scan {s}" for s in preset.get("scan_names", here) if s not in here]
        for shape in preset["scans"]:
            for dtype in preset["scan_dtypes"]:
                for name in names:
                    r = in_subprocess("scan", args, [name, shape, dtype])
                    rows.append([name, "x".join(map(str, shape)), dtype, fmt(r, "fwd_ms"), fmt(r, "fwd_bwd_ms"),
                                 fmt(r, "peak_mb", "{:.0f}")])
                    print(rows[-1], flush=True)
        out.append(table("Selective scan (b x d_inner x l x n)", ["scan", "shape", "dtype", "forward ms", "fwd+bwd ms",
                                                                  "peak MB"], rows,
                         note="dtype: of u, delta, z, B, C (A, D, delta_bias float32). lean: DiS.selective_scan_lean "
                              "with its defaults (on a CPU, scans below DiS.SMALL_SCAN_MB run small); small: "
                              "DiS.selective_scan_small, the whole-sequence scan; ref: the plain-autograd loop; triton: scan_triton.py; stand-in: not a scan, reads the "
                              "inputs and writes the output once (a floor for any kernel)."))
    if "model" in wanted:
        rows = []
        for name, size, chans, classes, batch, variants in preset["models"]:
            for v in variants:
                if not variant_usable(name, v, device):
                    skipped.append(f"model {name} {v}")
                    continue
                r = in_subprocess("model", args, [name, size, chans, classes, batch, v])
                rows.append([name, f"{size}x{size}x{chans}", classes, batch, v, fmt(r, "params_m", "{:.1f}"),
                             fmt(r, "img_s"), fmt(r, "step_ms", "{:.0f}"), fmt(r, "peak_mb", "{:.0f}"),
                             fmt(r, "first_step_s")])
                print(rows[-1], flush=True)
        out.append(table(f"Training step ({mixed})", ["model", "input", "classes", "batch", "variant", "params M",
                                                      "img/s", "step ms", "peak MB", "first step s"], rows,
                         note="variant: the scan (auto, lean, chunked, ref, triton, mamba-ssm, stand-in) or, for DiT, eager; "
                              "auto: the default (on a CPU, DiS.cpu_block); chunked: lean without its whole-sequence "
                              "path for small scans (DiS.SMALL_SCAN_MB = 0); "
                              "+compile: torch.compile; +ckpt: gradient checkpointing of every block."))
    if "sample" in wanted:
        rows = []
        for spec in preset["samples"]:
            name, size, chans, classes, batch, v = spec
            if not variant_usable(name, v, device):
                skipped.append(f"sample {name} {v}")
                continue
            r = in_subprocess("sample", args, list(spec))
            rows.append([name, f"{size}x{size}x{chans}", classes, batch, v, fmt(r, "img_s", "{:.2f}"), fmt(r, "batch_s")])
            print(rows[-1], flush=True)
        out.append(table(f"Sampling, DDIM-50 ({mixed})", ["model", "input", "classes", "batch", "variant", "img/s",
                                                          "s per batch"], rows))
    if "peer" in wanted and "peer" in preset:
        size, chans, classes, batch, peers = preset["peer"]
        rows, res = [], {}
        for name, v in peers:
            if not variant_usable(name, v, device):
                skipped.append(f"peer {name} {v}")
                continue
            res[name, v] = r = in_subprocess("model", args, [name, size, chans, classes, batch, v])
            rows.append([name, v, fmt(r, "params_m", "{:.2f}"), f"{model_flops(name, size, chans, classes) / 1e9:.2f}",
                         fmt(r, "img_s"), fmt(r, "peak_mb", "{:.0f}")])
            print(rows[-1], flush=True)
        rows += ratio_rows(res)
        out.append(table(f"DiS vs DiT, training step ({mixed}), {size}x{size}x{chans}, {classes} classes, batch {batch}",
                         ["model", "variant", "params M", "forward GFLOPs / image", "img/s", "peak MB"], rows))
    if "race" in wanted and "race" in preset:
        size, chans, classes, batch, racers = preset["race"]
        racers = [(name, v) for name, v in racers if variant_usable(name, v, device)]
        rounds = preset.get("race_rounds", args.repeats)
        res = in_subprocess("race", argparse.Namespace(**{**vars(args), "repeats": rounds}),
                            [[name, size, chans, classes, batch, v] for name, v in racers])
        last = racers[-1][0]
        rows = [[name, v, "error", "", "", res["error"]] for name, v in racers] if "error" in res else [
            [name, v, f"{r['params_m']:.2f}", f"{r['step_ms']:.0f}", f"{r['img_s']:.0f}", f"{r['rel_speed']:.2f}x"]
            for (name, v), r in zip(racers, res)]
        for row in rows:
            print(row, flush=True)
        out.append(table(f"DiS vs DiT, training step ({mixed}), {size}x{size}x{chans}, {classes} classes, batch "
                         f"{batch}: {rounds} alternating rounds in one process",
                         ["model", "variant", "params M", "step ms", "img/s", f"speed / {last}'s"], rows,
                         note=f"step ms: the median over rounds; speed / {last}'s: the median over rounds of "
                              f"{last}'s step time over the row's. auto: the default, which on a CPU runs "
                              f"each block as DiS.cpu_block (token-major, no flips); lean: the readable blocks "
                              f"with the lean scan; chunked: lean without its whole-sequence path for small "
                              f"scans (DiS.SMALL_SCAN_MB = 0)."))
    if "size" in wanted:
        rows = []
        for name in DiS.DiS_models:
            cells = [name]
            for size, chans, classes in ((32, 3, 0), (32, 4, 1000)):
                with torch.device("meta"):
                    m = DiS.create_model(name, image_size=size, in_channels=chans, num_classes=classes)
                f = count_flops(m)
                cells += [f"{sum(q.numel() for q in m.parameters()) / 1e6:.2f}", f"{f['total'] / 1e9:.2f}",
                          f"{100 * f['scan'] / f['total']:.0f}%"]
            rows.append(cells)
        out.append(table("Model sizes (forward GFLOPs per image, 1 multiply-add = 2 FLOPs, scan included)",
                         ["model", "params M, 32x32x3", "GFLOPs, 32x32x3", "scan share", "params M, 256px latents, 1000 classes",
                          "GFLOPs, latents", "scan share"], rows))
    if skipped:
        out.append(f"Skipped on {args.device} (Triton needs CUDA; mamba-ssm needs its CUDA build): {', '.join(skipped)}\n")
    text = "\n".join(out)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
