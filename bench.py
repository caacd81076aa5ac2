"""
Benchmarks for DiS.py, four tables: the scan, the model (training and sampling), DiS vs DiT, model sizes.
    python bench.py                          # small shapes on CPU, a few minutes
    python bench.py --preset target          # the DiS-S/2 CIFAR-10 shapes on CPU (README's CPU figures)
    python bench.py --preset gpu --device cuda --markdown bench_gpu.md
Times are medians over --repeats runs after a warm-up (CUDA synchronised). Peak memory: on CUDA the
allocator's peak; on CPU the growth of the process's peak resident set, each case in a fresh process.
"""
import argparse
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
from train import mixed_precision

PRESETS = {
    # scan shapes (b, d_inner, l, n); model runs: (name, image size, channels, classes, batch, variants)
    "small": dict(scans=[(4, 256, 66, 16), (4, 256, 258, 16)],
                  models=[("DiS-T/4", 32, 1, 0, 64, ["lean", "ref", "lean+ckpt"])],
                  peer=(32, 3, 4), sample=("DiS-T/4", 32, 1, 16)),
    "target": dict(scans=[(8, 736, 258, 16), (8, 736, 1026, 16)],
                   models=[("DiS-T/4", 32, 1, 0, 64, ["lean", "ref", "lean+ckpt", "lean+compile"])],
                   peer=(32, 3, 8), sample=("DiS-T/4", 32, 1, 16)),
    "gpu": dict(scans=[(128, 736, 258, 16), (128, 736, 1026, 16)],
                models=[("DiS-S/2", 32, 3, 0, 128, ["lean", "lean+compile", "lean+ckpt"]),
                        ("DiS-S/2", 32, 4, 1000, 128, ["lean"]),   # 256px latents
                        ("DiS-H/2", 32, 4, 1000, 8, ["lean+ckpt", "lean"])],
                peer=(32, 3, 128), sample=("DiS-S/2", 32, 3, 128)),
}


def timeit(fn, repeats, device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
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


def scan_variants():
    v = {"lean (default)": DiS.selective_scan_lean, "ref (plain autograd)": DiS.selective_scan_ref}
    for chunk in (4, 8, 16, 64):
        v[f"lean chunk={chunk}"] = lambda *a, chunk=chunk, **k: DiS.selective_scan_lean(*a, chunk=chunk, **k)
    try:
        import mambapy.pscan  # noqa: F401
        v["mambapy pscan path"] = mambapy_scan
    except ImportError:
        pass
    if DiS.mamba_selective_scan_fn is not None:
        v["mamba-ssm kernel"] = DiS.mamba_selective_scan_fn
    return v


def scan_case(name, shape, device, repeats):
    """One row of the scan table (run in a fresh process on CPU, so that peak RSS is this case's alone)."""
    b, d, l, n = shape
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device)
    u, delta, z, B, C = mk(b, d, l), mk(b, d, l) * 0.5 - 2, mk(b, d, l), mk(b, n, l), mk(b, n, l)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1).to(device)
    D, bias = torch.ones(d, device=device), mk(d) * 0.1
    params = [t.requires_grad_() for t in (u, delta, B, C, z)]
    fn = scan_variants()[name]
    run = lambda: fn(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)

    def fwd_bwd():
        out = run()
        torch.autograd.grad(out.sum(), params)
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


def model_case(spec, device, repeats):
    """Training-step throughput and peak memory of one model configuration."""
    name, size, chans, classes, batch, variant = spec
    torch.manual_seed(0)
    if name.startswith("DiT"):
        model = MiniDiT(size, chans, num_classes=classes).to(device)
    else:
        model = DiS.create_model(name, image_size=size, in_channels=chans, num_classes=classes).to(device)
        model.grad_checkpoint = "ckpt" in variant
    if "ref" in variant:
        DiS.TORCH_SCAN = DiS.selective_scan_ref
    fwd = torch.compile(model) if "compile" in variant else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diffusion = DiS.Diffusion()
    x = torch.randn(batch, chans, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device) if classes else None

    def step():
        with mixed_precision(device):
            loss = diffusion.training_loss(fwd, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    t_start = time.perf_counter()
    mem = peak_memory_mb(step, device)  # the first step: it allocates the optimizer state (and compiles)
    first = time.perf_counter() - t_start
    t = timeit(step, repeats, device)
    return {"img_s": batch / t, "step_ms": t * 1e3, "peak_mb": mem, "first_step_s": first,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def sample_case(spec, device, repeats):
    name, size, chans, batch = spec
    model = DiS.create_model(name, image_size=size, in_channels=chans).to(device).eval()
    diffusion = DiS.Diffusion()

    def run():
        with mixed_precision(device):
            diffusion.sample(model, (batch, chans, size, size), steps=50, sampler="ddim", device=device)
    t = timeit(run, max(1, repeats // 3), device)
    return {"img_s": batch / t, "batch_s": t}


def dit_flops(size, chans, classes):
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        m = MiniDiT(size, chans, num_classes=classes)
        x, t = torch.zeros(1, chans, size, size), torch.zeros(1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long) if classes else None
    with FlopCounterMode(display=False) as fc:
        m(x, t, y)
    return fc.get_total_flops()


#################################################################################
#                                 Tables                                        #
#################################################################################

def table(title, header, rows):
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def fmt(r, key, f="{:.1f}"):
    return r["error"] if "error" in r else f.format(r[key])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=list(PRESETS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tables", default="scan,model,sample,peer,size", help="comma-separated subset to run")
    p.add_argument("--case-timeout", type=int, default=900, help="seconds allowed to one measurement")
    p.add_argument("--markdown", default=None, help="also write the tables to this markdown file")
    p.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args._case:   # a child process: one measurement, printed as JSON
        c = json.loads(args._case)
        fn = {"scan": scan_case, "model": model_case, "sample": sample_case}[c["kind"]]
        res = fn(*c["case"], device, args.repeats) if c["kind"] == "scan" else fn(c["case"], device, args.repeats)
        print(json.dumps(res))
        return
    preset, wanted = PRESETS[args.preset], args.tables.split(",")
    cpu = os.popen("lscpu | grep 'Model name' | cut -d: -f2").read().strip() or "unknown CPU"
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu}, {os.cpu_count()} cores"
    out = [f"Machine: {machine}; torch {torch.__version__}; `python bench.py --preset {args.preset} --device {args.device}`\n"]
    print(out[0])

    if "scan" in wanted:
        rows = []
        for shape in preset["scans"]:
            for name in scan_variants():
                r = in_subprocess("scan", args, [name, shape])
                rows.append([name, "x".join(map(str, shape)), fmt(r, "fwd_ms"), fmt(r, "fwd_bwd_ms"), fmt(r, "peak_mb", "{:.0f}")])
                print(rows[-1], flush=True)
        out.append(table("Selective scan (b x d_inner x l x n), float32", ["scan", "shape", "forward ms", "fwd+bwd ms", "peak MB"], rows))
    if "model" in wanted:
        rows = []
        for name, size, chans, classes, batch, variants in preset["models"]:
            for v in variants:
                r = in_subprocess("model", args, [name, size, chans, classes, batch, v])
                rows.append([name, f"{size}x{size}x{chans}", batch, v, fmt(r, "img_s"), fmt(r, "step_ms", "{:.0f}"),
                             fmt(r, "peak_mb", "{:.0f}"), fmt(r, "first_step_s")])
                print(rows[-1], flush=True)
        out.append(table("Training step (" + ("bf16 autocast" if args.device == "cuda" else "float32") + ")",
                         ["model", "input", "batch", "variant", "img/s", "step ms", "peak MB", "first step s"], rows))
    if "sample" in wanted:
        name, size, chans, batch = preset["sample"]
        r = in_subprocess("sample", args, [name, size, chans, batch])
        out.append(table("Sampling, DDIM-50", ["model", "input", "batch", "img/s", "s per batch"],
                         [[name, f"{size}x{size}x{chans}", batch, fmt(r, "img_s", "{:.2f}"), fmt(r, "batch_s")]]))
        print(out[-1], flush=True)
    if "peer" in wanted:
        size, chans, batch = preset["peer"]
        rows, res = [], {}
        for name in ("DiS-S/2", "DiT-S/2"):
            res[name] = r = in_subprocess("model", args, [name, size, chans, 0, batch, "lean"])
            with torch.device("meta"):
                flops = DiS.count_flops(DiS.create_model("DiS-S/2", image_size=size, in_channels=chans))["total"] \
                    if name.startswith("DiS") else dit_flops(size, chans, 0)
            rows.append([name, fmt(r, "params_m", "{:.2f}"), f"{flops / 1e9:.2f}", fmt(r, "img_s"), fmt(r, "peak_mb", "{:.0f}")])
            print(rows[-1], flush=True)
        if all("error" not in r for r in res.values()):
            rows.append(["DiS / DiT", "", "", f"{res['DiS-S/2']['img_s'] / res['DiT-S/2']['img_s']:.2f}x",
                         f"{res['DiS-S/2']['peak_mb'] / max(res['DiT-S/2']['peak_mb'], 1e-9):.2f}x"])
        out.append(table(f"DiS vs DiT, training step, {size}x{size}x{chans}, batch {batch}",
                         ["model", "params M", "forward GFLOPs / image", "img/s", "peak MB"], rows))
    if "size" in wanted:
        rows = []
        for name in DiS.DiS_models:
            cells = [name]
            for size, chans, classes in ((32, 3, 0), (32, 4, 1000)):
                with torch.device("meta"):
                    m = DiS.create_model(name, image_size=size, in_channels=chans, num_classes=classes)
                f = DiS.count_flops(m)
                cells += [f"{sum(q.numel() for q in m.parameters()) / 1e6:.2f}", f"{f['total'] / 1e9:.2f}",
                          f"{100 * f['scan'] / f['total']:.0f}%"]
            rows.append(cells)
        out.append(table("Model sizes (forward GFLOPs per image, 1 multiply-add = 2 FLOPs, scan included)",
                         ["model", "params M, 32x32x3", "GFLOPs, 32x32x3", "scan share", "params M, 256px latents, 1000 classes",
                          "GFLOPs, latents", "scan share"], rows))
    text = "\n".join(out)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
