"""
Encode an image folder once into Stable Diffusion VAE latents, so that training needs no VAE
(as fast-DiT's extract_features.py). Needs `pip install diffusers`.
    python encode_latents.py --data-path imagenet/train --latents-path latents/ --image-size 256
    python train.py --dataset latents --data-path latents/ --model DiS-H/2 --class-cond
Writes shard_00000.pt, ... ({"latents": (N, 4, s/8, s/8) float16, "labels": (N,)}) and meta.json.
"""
import signal

signal.signal(signal.SIGINT, signal.SIG_DFL)   # Ctrl-C during the imports below: stop quietly

import argparse
import json
import os

import torch
from torch.utils.data import DataLoader

from dis_cli import VAE_SCALE, HelpFormatter, UserError, add_device_flag, load_vae, pick_device, run
from dis_data import image_folder_dataset

SHARD_SIZE = 10000   # latents per shard file


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Encode images into VAE latents for train.py --dataset latents.",
                                formatter_class=HelpFormatter)
    p.add_argument("--data-path", required=True, help="an image folder: one subfolder per class, or flat")
    p.add_argument("--latents-path", required=True, help="the output folder (must not hold latents yet)")
    p.add_argument("--image-size", type=int, default=256, help="pixel size; the latents are 1/8 of it")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="diffusers AutoencoderKL: hub name or local folder")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE call")
    p.add_argument("--num-workers", type=int, default=4, help="data loading processes")
    add_device_flag(p)
    return p.parse_args(argv)


@torch.no_grad()
def main(args):
    if os.path.exists(os.path.join(args.latents_path, "meta.json")):
        raise UserError(f"{args.latents_path} already holds latents; choose another --latents-path")
    device = pick_device(args.device)
    ds, num_classes = image_folder_dataset(args.data_path, args.image_size, class_cond=False)
    vae = load_vae(args.vae, device)
    os.makedirs(args.latents_path, exist_ok=True)
    loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.num_workers)
    latents, labels, shards, count = [], [], 0, 0

    def flush():
        nonlocal latents, labels, shards
        torch.save({"latents": torch.cat(latents), "labels": torch.cat(labels)},
                   os.path.join(args.latents_path, f"shard_{shards:05d}.pt"))
        latents, labels, shards = [], [], shards + 1

    from tqdm import tqdm
    for x, y in tqdm(loader, desc="encoding"):
        z = vae.encode(x.to(device) * 2 - 1).latent_dist.sample() * VAE_SCALE   # (b, 4, s/8, s/8)
        latents.append(z.half().cpu())
        labels.append(torch.as_tensor(y))
        count += len(y)
        if sum(map(len, labels)) >= SHARD_SIZE:
            flush()
    if labels:
        flush()
    with open(os.path.join(args.latents_path, "meta.json"), "w") as f:   # written last: marks a complete folder
        json.dump({"vae": args.vae, "image_size": args.image_size, "num_classes": num_classes, "count": count}, f)
    print(f"encoded {count} images into {args.latents_path}")


if __name__ == "__main__":
    run(main, parse_args())
