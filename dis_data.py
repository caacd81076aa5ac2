"""
The training data of train.py (and the image folders of encode_latents.py): every dataset yields
(x, label) with x in [0, 1] (images) or as stored (latents).

Run as a script, it writes PNG folders for FID tools that read folders (pytorch-fid): a dataset's training
images, as train.py sees them (the reference), or the images of a sample.py .npz:
    python dis_data.py --dataset cifar10 --out cifar10_train_png
    python dis_data.py --npz results/000-DiS-S-2/samples/<name>.npz --out samples_png
"""
import bisect
import glob
import gzip
import itertools
import json
import os
import shutil
import sys

import torch
from torch.utils.data import Dataset

from dis_cli import UserError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"   # apt-get install dataset-fashion-mnist
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
WHERE_TO_GET = {   # for the offline error: where the files go, and where they come from
    "cifar10": "cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, or its "
               "extracted cifar-10-batches-py/) in",
    "fashion-mnist": "the four *-ubyte files (https://github.com/zalandoresearch/fashion-mnist, or "
                     "apt-get install dataset-fashion-mnist) in <data-path>/FashionMNIST/raw/ of",
    "mnist": "the four *-ubyte files (https://ossci-datasets.s3.amazonaws.com/mnist/) in <data-path>/MNIST/raw/ of",
}


def make_dataset(kind, path, image_size, class_cond):
    """-> (dataset, flip augmentation?, number of classes) for train.py's --dataset."""
    if kind == "latents":
        meta = latents_meta(path)
        if class_cond and meta["num_classes"] == 0:
            raise UserError(f"--class-cond: the latents in {path} have no classes (encoded from a flat folder); "
                            f"use --no-class-cond, or encode a folder with one subfolder per class")
        if meta["image_size"] != image_size:
            raise UserError(f"the latents in {path} were encoded at {meta['image_size']}px; pass that as --image-size")
        return LatentShards(path), False, meta["num_classes"]
    if kind == "folder":
        ds, num_classes = image_folder_dataset(path, image_size, class_cond)
        return ds, True, num_classes
    if image_size != 32:
        raise UserError(f"{kind} images are 32x32 (28x28 digits padded to 32); --image-size applies to "
                        f"--dataset folder and latents only")
    import torchvision.datasets as tvd
    import torchvision.transforms as T
    if kind == "fashion-mnist":
        place_debian_fashion_mnist(path)
    cls, flip, tf = {"cifar10": (tvd.CIFAR10, True, T.ToTensor()),
                     "fashion-mnist": (tvd.FashionMNIST, False, T.Compose([T.Pad(2), T.ToTensor()])),
                     "mnist": (tvd.MNIST, False, T.Compose([T.Pad(2), T.ToTensor()]))}[kind]
    try:
        ds = cls(path, train=True, download=True, transform=tf)
    except Exception as e:  # no network: say where the files go and where they come from
        raise UserError(f"could not load or download {kind} into {os.path.abspath(path)} "
                        f"({type(e).__name__}: {e}); place {WHERE_TO_GET[kind]} {path}")
    return ds, flip, 10


class FlatImageFolder(Dataset):
    """Every image below a folder, no classes (label 0)."""

    def __init__(self, root, transform):
        self.files = sorted(f for f in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                            if f.lower().endswith(IMAGE_EXTENSIONS))
        self.transform = transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB")), 0


def image_folder_dataset(path, image_size, class_cond):
    """An ImageFolder (one subfolder per class) or a flat folder, resized and centre-cropped.
    -> (dataset, number of classes: 0 for a flat folder)"""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    if not os.path.isdir(path):
        raise UserError(f"image folder {path} does not exist; pass --data-path with your images")
    tf = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor()])
    has_classes = any(os.path.isdir(os.path.join(path, d)) for d in os.listdir(path))
    ds = ImageFolder(path, transform=tf, allow_empty=True) if has_classes else FlatImageFolder(path, tf)
    if len(ds) == 0:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {path}")
    if class_cond and not has_classes:
        raise UserError(f"--class-cond needs one subfolder per class in {path}; use --no-class-cond for a flat folder")
    return ds, (len(ds.classes) if has_classes else 0)


def place_debian_fashion_mnist(root):
    """torchvision reads the raw idx files from <root>/FashionMNIST/raw; Debian ships them gzipped."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    for gz in glob.glob(os.path.join(DEBIAN_FASHION_MNIST, "*-ubyte.gz")):
        dst = os.path.join(raw, os.path.basename(gz)[:-3])
        if not os.path.exists(dst):
            os.makedirs(raw, exist_ok=True)
            with gzip.open(gz, "rb") as f, open(dst + ".tmp", "wb") as g:
                shutil.copyfileobj(f, g)
            os.replace(dst + ".tmp", dst)


class LatentShards(Dataset):
    """Latents written by encode_latents.py: shards of {"latents": (N, 4, s, s) float16, "labels": (N,)}."""

    def __init__(self, root):
        shards = sorted(glob.glob(os.path.join(root, "shard_*.pt")))
        if not shards:
            raise UserError(f"no latent shards (shard_*.pt) in {root}; make them with "
                            f"python encode_latents.py --data-path IMAGES --latents-path {root}")
        # memory-mapped and never concatenated: every DDP process shares the page cache instead of a copy
        self.parts = [torch.load(s, weights_only=True, mmap=True) for s in shards]
        self.ends = list(itertools.accumulate(len(p["labels"]) for p in self.parts))

    def __len__(self):
        return self.ends[-1]

    def __getitem__(self, i):
        k = bisect.bisect_right(self.ends, i)                 # the shard holding item i
        part, j = self.parts[k], i - (self.ends[k - 1] if k else 0)
        return part["latents"][j].float(), int(part["labels"][j])


def latents_meta(path):
    try:
        with open(os.path.join(path, "meta.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}/meta.json not found: {path} is not a latents folder made by encode_latents.py")


def write_pngs(images, out):
    """Each uint8 image (h, w, c), c = 1 or 3, of an iterable as out/000000.png, 000001.png, ...; returns the count."""
    from PIL import Image
    os.makedirs(out, exist_ok=True)
    count = 0
    for count, a in enumerate(images, 1):
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(os.path.join(out, f"{count - 1:06d}.png"))
    return count


def dataset_images(kind, path, image_size, num, seed=0):
    """uint8 (h, w, c) arrays of `num` training images of train.py's --dataset (all when num is 0), drawn at random
    with a fixed seed (not the first classes only), without flips."""
    if kind == "latents":
        raise UserError("latents are not images: make the reference from the image folder they were encoded from "
                        "(--dataset folder --data-path IMAGES --image-size N)")
    ds, _, _ = make_dataset(kind, path, image_size, class_cond=False)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    for i in order[:num or len(ds)].tolist():
        yield (ds[i][0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()   # ToTensor's x / 255, undone


def main(argv=None):
    import argparse
    import numpy as np
    from dis_cli import HelpFormatter
    p = argparse.ArgumentParser(description="Write PNG folders for FID (see README.md): a dataset's training images, "
                                "or the samples of an .npz from sample.py.", formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="a new folder (an existing non-empty one is refused)")
    p.add_argument("--npz", default=None, help="sample.py's .npz (arr_0: uint8 (N, H, W, C)); else --dataset")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "fashion-mnist", "mnist", "folder"],
                   help="the training images, as train.py reads them")
    p.add_argument("--data-path", default="data", help="as train.py's --data-path")
    p.add_argument("--image-size", type=int, default=32, help="as train.py's --image-size (folders: resized, cropped)")
    p.add_argument("--num", type=int, default=50000, help="images drawn at random from the dataset; 0 for all")
    args = p.parse_args(argv)
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise UserError(f"{args.out} exists and is not empty; pass a new --out")
    if args.npz:
        if not os.path.isfile(args.npz):
            raise UserError(f"{args.npz} does not exist; pass the .npz that sample.py wrote")
        images = np.load(args.npz)["arr_0"]
    else:
        images = dataset_images(args.dataset, args.data_path, args.image_size, args.num)
    print(f"wrote {write_pngs(images, args.out)} images to {args.out}")


if __name__ == "__main__":
    from dis_cli import run
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    run(main)
