"""
Sample from a DiS checkpoint made by train.py: a PNG grid and an .npz for FID.
    python sample.py --ckpt results/000-DiS-S-2 --num-samples 50000
The model's config comes from the checkpoint (EMA weights when present); no training flag is repeated.
The .npz holds arr_0 = uint8 images (N, H, W, C), the layout of the ADM evaluation suite, and labels
(-1 for unconditional models).
"""
import signal

signal.signal(signal.SIGINT, signal.SIG_DFL)   # Ctrl-C during the imports below: stop quietly

import argparse
import math
import os

import numpy as np
import torch

import DiS
from dis_cli import (HelpFormatter, UserError, add_device_flag, add_scan_backend_flag, load_checkpoint, load_vae,
                     mixed_precision, model_from_checkpoint, pick_device, resolve_checkpoint, run, run_of,
                     set_scan_backend, to_images)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample from a DiS checkpoint (see README.md).", formatter_class=HelpFormatter)
    add = p.add_argument
    add("--ckpt", required=True, help="a checkpoint written by train.py, or a run folder (its newest checkpoint)")
    add("--num-samples", type=int, default=64, help="images to draw")
    add("--batch-size", type=int, default=64, help="images per sampling batch (per model call: twice that with guidance)")
    add("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="ancestral DDPM or deterministic DDIM")
    add("--num-sampling-steps", type=int, default=None, help="default: 250 for ddpm, 50 for ddim")
    add("--cfg-scale", type=float, default=None,
        help="classifier-free guidance scale for class-conditional checkpoints (default 1.5, the official value; "
             "1 = no guidance); not allowed for unconditional ones")
    add("--class-labels", type=int, nargs="+", default=None,
        help="labels to draw, cycled over the samples (default: all classes evenly)")
    add("--seed", type=int, default=0, help="random seed of the sampling noise")
    add("--out", default=None, help="output path without extension (default: samples/ in the checkpoint's run folder)")
    add("--grid", action=argparse.BooleanOptionalAction, default=True, help="write a PNG grid (at most 100 images)")
    add("--npz", action=argparse.BooleanOptionalAction, default=True, help="write the .npz")
    add("--use-ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights when present")
    add("--vae", default=None, help="latent checkpoints: the VAE to decode with (default: the one they were "
                                    "encoded with, a hub name or a local diffusers folder)")
    add_device_flag(p)
    add_scan_backend_flag(p)
    return p.parse_args(argv)


def settings(args, config):
    """Checked sampling settings: (labels or None, guidance scale, sampling steps)."""
    conditional = config["num_classes"] > 0
    if not conditional and (args.cfg_scale is not None or args.class_labels is not None):
        raise UserError("this checkpoint is unconditional: --cfg-scale and --class-labels do not apply; drop them")
    if args.num_samples < 1 or args.batch_size < 1:
        raise UserError("--num-samples and --batch-size must be positive")
    labels = None
    if conditional:
        pool = args.class_labels if args.class_labels is not None else list(range(config["num_classes"]))
        labels = torch.tensor([pool[i % len(pool)] for i in range(args.num_samples)])
        try:
            DiS.check_labels(labels, config["num_classes"])
        except ValueError as e:
            raise UserError(f"--class-labels: {e}")
    try:
        steps = DiS.Diffusion().sampling_steps(args.sampler, args.num_sampling_steps)
    except ValueError as e:
        raise UserError(f"--num-sampling-steps: {e}")
    cfg_scale = (1.5 if args.cfg_scale is None else args.cfg_scale) if conditional else 1.0
    return labels, cfg_scale, steps


def main(args):
    path = resolve_checkpoint(args.ckpt)
    if path != args.ckpt:
        print(f"sampling from {path}, the newest checkpoint in {args.ckpt}")
    ckpt = load_checkpoint(path)
    config = ckpt["config"]
    labels, cfg_scale, steps = settings(args, config)
    weights = "ema" if args.use_ema and ckpt.get("ema") is not None else "model"
    name = (f"{os.path.splitext(os.path.basename(path))[0]}-{weights}-{args.sampler}{steps}"
            f"{f'-cfg{cfg_scale:g}' if labels is not None else ''}-n{args.num_samples}-seed{args.seed}")
    out = args.out or os.path.join(run_of(path), "samples", name)
    targets = [out + ext for ext, on in ((".npz", args.npz), (".png", args.grid)) if on]
    for t in targets:
        if os.path.exists(t):
            raise UserError(f"{t} exists already; pass another --out or --seed, or remove it")
    device = pick_device(args.device)
    print(set_scan_backend(args.scan_backend, device))
    model = model_from_checkpoint(ckpt, path, weights).to(device).eval()
    vae = load_vae(args.vae or config["vae"], device) if config["latents"] else None
    out_dir = os.path.dirname(os.path.abspath(out))
    made_dir = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    try:
        arr = draw(args, model, config, labels, cfg_scale, steps, device, vae)
    except KeyboardInterrupt:
        if made_dir and not os.listdir(out_dir):
            os.rmdir(out_dir)   # leave nothing behind: no partial files, no empty folder
        raise
    if args.npz:
        np.savez(out + ".npz.tmp.npz", arr_0=arr, labels=labels.numpy() if labels is not None else np.full(len(arr), -1))
        os.replace(out + ".npz.tmp.npz", out + ".npz")
    if args.grid:
        import torchvision.utils as vutils
        grid = torch.from_numpy(arr[:100]).permute(0, 3, 1, 2).float() / 255
        vutils.save_image(grid, out + ".png", nrow=int(math.ceil(math.sqrt(len(grid)))))
    print("wrote " + " and ".join(targets))


def draw(args, model, config, labels, cfg_scale, steps, device, vae):
    """All samples as uint8 (N, H, W, C), batch by batch; the progress bar counts sampling steps."""
    from tqdm import tqdm
    diffusion = DiS.Diffusion()
    gen = torch.Generator(device).manual_seed(args.seed)
    size = (config["in_channels"], config["input_size"], config["input_size"])
    images = []
    with tqdm(total=math.ceil(args.num_samples / args.batch_size) * steps, unit="step",
              desc=f"{args.num_samples} samples, {args.sampler}{steps}") as bar:
        for start in range(0, args.num_samples, args.batch_size):
            n = min(args.batch_size, args.num_samples - start)
            y = labels[start:start + n].to(device) if labels is not None else None
            with mixed_precision(device):
                x = diffusion.sample(model, (n,) + size, y=y, steps=steps, sampler=args.sampler, cfg_scale=cfg_scale,
                                     generator=gen, device=device, clip_denoised=not config["latents"], progress=bar)
            with torch.no_grad():
                img = to_images(x, vae)                                                # (n, c, H, W) in [0, 1]
            images.append((img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())  # (n, H, W, c)
    return torch.cat(images).numpy()


if __name__ == "__main__":
    run(main, parse_args())
