"""
Sample from a DiS checkpoint made by train.py: a PNG grid and an .npz for FID.
    python sample.py --ckpt results/000-DiS-S-2/checkpoints/0400000.pt --num-samples 50000
The model's config comes from the checkpoint (EMA weights when present); no training flag is repeated.
The .npz holds arr_0 = uint8 images (N, H, W, C), the layout of the ADM evaluation suite, and labels
(-1 for unconditional models).
"""
import argparse
import math
import os
import sys

import numpy as np
import torch

import DiS
from train import UserError, load_checkpoint, load_vae, load_weights, mixed_precision, model_from_config, to_images


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample from a DiS checkpoint (see README.md).")
    add = p.add_argument
    add("--ckpt", required=True, help="a checkpoint written by train.py")
    add("--num-samples", type=int, default=64)
    add("--batch-size", type=int, default=64)
    add("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    add("--num-sampling-steps", type=int, default=None, help="default: 250 for ddpm, 50 for ddim")
    add("--cfg-scale", type=float, default=None,
        help="classifier-free guidance scale for class-conditional checkpoints (default 1.5, the official value; "
             "1 = no guidance); not allowed for unconditional ones")
    add("--class-labels", type=int, nargs="+", default=None,
        help="labels to draw, cycled over the samples (default: all classes evenly)")
    add("--seed", type=int, default=0)
    add("--out", default=None, help="output path without extension (default: samples/ next to the checkpoint's run)")
    add("--grid", action=argparse.BooleanOptionalAction, default=True, help="write a PNG grid (at most 100 images)")
    add("--npz", action=argparse.BooleanOptionalAction, default=True, help="write the .npz")
    add("--use-ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights when present")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--vae", default=None, help="latent checkpoints: the VAE to decode with (default: the one they were "
                                    "encoded with, a hub name or a local diffusers folder)")
    return p.parse_args(argv)


def main(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no GPU")
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    ckpt = load_checkpoint(args.ckpt)
    config = ckpt["config"]
    model = model_from_config(config).to(device).eval()
    weights = "ema" if args.use_ema and ckpt.get("ema") is not None else "model"
    load_weights(model, ckpt[weights], args.ckpt)

    conditional = config["num_classes"] > 0
    if not conditional and (args.cfg_scale is not None or args.class_labels is not None):
        raise UserError("this checkpoint is unconditional: --cfg-scale and --class-labels do not apply; drop them")
    cfg_scale = (1.5 if args.cfg_scale is None else args.cfg_scale) if conditional else 1.0
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

    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt)))
    steps = args.num_sampling_steps or (250 if args.sampler == "ddpm" else 50)
    if not 2 <= steps <= 1000:
        raise UserError(f"--num-sampling-steps must be in [2, 1000], got {steps}")
    name = (f"{os.path.splitext(os.path.basename(args.ckpt))[0]}-{weights}-{args.sampler}{steps}"
            f"{f'-cfg{cfg_scale:g}' if conditional else ''}-n{args.num_samples}-seed{args.seed}")
    out = args.out or os.path.join(run_dir, "samples", name)
    targets = [out + ext for ext, on in ((".npz", args.npz), (".png", args.grid)) if on]
    for t in targets:
        if os.path.exists(t):
            raise UserError(f"{t} exists already; pass another --out or --seed, or remove it")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    vae = load_vae(args.vae or config["vae"], device) if config["latents"] else None
    diffusion = DiS.Diffusion()
    gen = torch.Generator(device).manual_seed(args.seed)
    size = (config["in_channels"], config["input_size"], config["input_size"])
    images = []
    from tqdm import tqdm
    for start in tqdm(range(0, args.num_samples, args.batch_size), desc="batches"):
        n = min(args.batch_size, args.num_samples - start)
        y = labels[start:start + n].to(device) if conditional else None
        with mixed_precision(device):
            x = diffusion.sample(model, (n,) + size, y=y, steps=steps, sampler=args.sampler, cfg_scale=cfg_scale,
                                 generator=gen, device=device, clip_denoised=not config["latents"])
        with torch.no_grad():
            img = to_images(x, vae)                                                # (n, c, H, W) in [0, 1]
        images.append((img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())  # (n, H, W, c)
    arr = torch.cat(images).numpy()
    if args.npz:
        lab = labels.numpy() if conditional else np.full(len(arr), -1)
        np.savez(out + ".npz.tmp.npz", arr_0=arr, labels=lab)
        os.replace(out + ".npz.tmp.npz", out + ".npz")
    if args.grid:
        import torchvision.utils as vutils
        grid = torch.from_numpy(arr[:100]).permute(0, 3, 1, 2).float() / 255
        vutils.save_image(grid, out + ".png", nrow=int(math.ceil(math.sqrt(len(grid)))))
    print("wrote " + " and ".join(targets))


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
