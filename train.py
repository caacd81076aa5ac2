"""
Train a DiS model. One process on CPU or one GPU:
    python train.py --dataset cifar10
Several GPUs or nodes (DistributedDataParallel; the same script):
    torchrun --nproc_per_node=8 train.py --dataset latents --data-path latents/ --model DiS-H/2
ImageNet latents: first encode the images once with the Stable Diffusion VAE (needs `pip install diffusers`):
    python train.py --encode-latents --data-path imagenet/train --latents-path latents/ --image-size 256
Everything model- and diffusion-related comes from DiS.py.
"""
import argparse
import bisect
import copy
import glob
import gzip
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import DiS

VAE_SCALE = 0.18215                          # the Stable Diffusion VAE's latent scale factor
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"   # apt-get install dataset-fashion-mnist
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class UserError(Exception):
    """A problem with the user's input: reported as one line, no traceback."""


def build_parser():
    p = argparse.ArgumentParser(description="Train DiS (see README.md).")
    add = p.add_argument
    # data
    add("--dataset", default="cifar10", choices=["cifar10", "fashion-mnist", "mnist", "folder", "latents"],
        help="cifar10: 32x32x3, 10 classes. fashion-mnist / mnist: 28x28 padded to 32x32, 1 channel. "
             "folder: a directory of images (ImageFolder layout for classes, or flat). latents: shards "
             "made by --encode-latents")
    add("--data-path", default="data", help="dataset root (downloads go here), image folder, or latents folder")
    add("--image-size", type=int, default=None,
        help="pixel size (default: 32 for cifar10/mnists/folder, 256 for latents, whose model input is 1/8 of it)")
    add("--class-cond", action=argparse.BooleanOptionalAction, default=False,
        help="class-conditional model with label dropout for classifier-free guidance (CIFAR-10 in the paper: off)")
    add("--encode-latents", action="store_true", help="encode --data-path images into --latents-path, then exit")
    add("--latents-path", default=None, help="output folder of --encode-latents")
    add("--vae", default="stabilityai/sd-vae-ft-ema", help="diffusers AutoencoderKL: hub name or local folder")
    # model and optimisation
    add("--model", default="DiS-S/2", choices=list(DiS.DiS_models), help="DiS-S/2 is the official CIFAR-10 model")
    add("--learn-sigma", action=argparse.BooleanOptionalAction, default=True, help="learn the variance (hybrid loss)")
    add("--global-batch-size", type=int, default=128, help="summed over all processes")
    add("--lr", type=float, default=1e-4)
    add("--weight-decay", type=float, default=0.0,
        help="AdamW weight decay (official: 0); never applied to A_log, D, biases, norms, embeddings")
    add("--lr-schedule", default="constant", choices=["constant", "cosine"],
        help="constant (DiT, the default) or cosine decay to 0 at --max-steps (the official DiS code)")
    add("--warmup-steps", type=int, default=0, help="linear warm-up steps before the schedule")
    add("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    add("--ema-decay", type=float, default=0.9999, help="EMA decay, warmed up as min(decay, (1+step)/(10+step))")
    add("--grad-checkpoint", action="store_true", help="recompute each block in backward (less memory)")
    add("--compile", action="store_true", help="torch.compile the model (long first step)")
    # length, logging, checkpoints
    add("--max-steps", type=int, default=None, help="stop after this many optimizer steps in all")
    add("--epochs", type=int, default=None, help="stop after this many epochs (default: 1400 if no --max-steps)")
    add("--log-every", type=int, default=100)
    add("--ckpt-every", type=int, default=10000)
    add("--sample-every", type=int, default=5000, help="save a grid of EMA samples (0: never)")
    add("--sample-steps", type=int, default=25, help="DDIM steps of the preview grids")
    add("--results-dir", default="results", help="each run gets a numbered folder in here")
    add("--resume", default=None, help="a checkpoint path, or 'auto' for the newest one in --results-dir")
    add("--seed", type=int, default=0)
    add("--num-workers", type=int, default=4)
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--fail-at-step", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a NaN loss
    return p


def parse_args(argv=None):
    """-> (args, the names of the flags given on the command line: a resumed run keeps the rest)."""
    args = build_parser().parse_args(argv)
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return args, set(vars(quiet.parse_args(argv)))


# What a resumed run may change; every other flag comes from the checkpoint (the data must still give
# the same model input, which main checks).
RESUME_MAY_CHANGE = {"max_steps", "epochs", "log_every", "ckpt_every", "sample_every", "sample_steps", "num_workers",
                     "device", "resume", "results_dir", "data_path", "fail_at_step"}


def check_args(args):
    """Ranges argparse cannot express; one line each."""
    lowest = {"global_batch_size": 1, "log_every": 1, "ckpt_every": 1, "sample_every": 0, "sample_steps": 2,
              "max_steps": 1, "epochs": 1, "image_size": 1, "num_workers": 0}
    for name, low in lowest.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if args.sample_steps > 1000:
        raise UserError(f"--sample-steps must be at most 1000 (the training steps), got {args.sample_steps}")


#################################################################################
#                                    Data                                       #
#################################################################################

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


class LatentShards(Dataset):
    """Latents written by --encode-latents: shards of {"latents": (N, 4, s, s) float16, "labels": (N,)}."""

    def __init__(self, root):
        shards = sorted(glob.glob(os.path.join(root, "shard_*.pt")))
        if not shards:
            raise UserError(f"no latent shards (shard_*.pt) in {root}; make them with "
                            f"python train.py --encode-latents --data-path IMAGES --latents-path {root}")
        # memory-mapped and never concatenated: every DDP process shares the page cache instead of a copy
        self.parts = [torch.load(s, weights_only=True, mmap=True) for s in shards]
        self.ends = list(itertools.accumulate(len(p["labels"]) for p in self.parts))

    def __len__(self):
        return self.ends[-1]

    def __getitem__(self, i):
        k = bisect.bisect_right(self.ends, i)                 # the shard holding item i
        part, j = self.parts[k], i - (self.ends[k - 1] if k else 0)
        return part["latents"][j].float(), int(part["labels"][j])


def image_folder_dataset(path, image_size, class_cond):
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


def make_dataset(args):
    """-> (dataset of (x in [0, 1] or latents, label), flip augmentation?, number of classes)."""
    import torchvision.datasets as tvd
    import torchvision.transforms as T
    if args.dataset == "latents":
        num_classes = latents_meta(args.data_path)["num_classes"]
        if args.class_cond and num_classes == 0:
            raise UserError(f"--class-cond: the latents in {args.data_path} have no classes (encoded from a flat "
                            f"folder); use --no-class-cond, or encode a folder with one subfolder per class")
        return LatentShards(args.data_path), False, num_classes
    if args.dataset == "folder":
        ds, num_classes = image_folder_dataset(args.data_path, args.image_size, args.class_cond)
        return ds, True, num_classes
    if args.image_size != 32:
        raise UserError(f"{args.dataset} images are 32x32 (28x28 digits padded to 32); --image-size applies to "
                        f"--dataset folder and latents only")
    if args.dataset == "fashion-mnist":
        place_debian_fashion_mnist(args.data_path)
    cls, flip, tf = {"cifar10": (tvd.CIFAR10, True, T.ToTensor()),
                     "fashion-mnist": (tvd.FashionMNIST, False, T.Compose([T.Pad(2), T.ToTensor()])),
                     "mnist": (tvd.MNIST, False, T.Compose([T.Pad(2), T.ToTensor()]))}[args.dataset]
    try:
        ds = cls(args.data_path, train=True, download=True, transform=tf)
    except Exception as e:  # no network: say where the files go
        where = {"cifar10": "cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/) in",
                 "fashion-mnist": "the four *-ubyte files in <data-path>/FashionMNIST/raw/ of",
                 "mnist": "the four *-ubyte files in <data-path>/MNIST/raw/ of"}[args.dataset]
        raise UserError(f"could not load or download {args.dataset} into {os.path.abspath(args.data_path)} "
                        f"({type(e).__name__}: {e}); place {where} {args.data_path}" +
                        (" or apt-get install dataset-fashion-mnist" if args.dataset == "fashion-mnist" else ""))
    return ds, flip, 10


def latents_meta(path):
    try:
        with open(os.path.join(path, "meta.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}/meta.json not found: {path} is not a latents folder made by --encode-latents")


def load_vae(name, device):
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise UserError("ImageNet latents need the VAE from diffusers: pip install diffusers")
    try:
        return AutoencoderKL.from_pretrained(name).to(device).eval()
    except Exception as e:
        raise UserError(f"could not load the VAE {name!r} ({type(e).__name__}); pass --vae with a local "
                        f"diffusers AutoencoderKL folder or make the hub reachable")


@torch.no_grad()
def encode_latents(args, device):
    """Encode an image folder into latent shards once, so training needs no VAE."""
    if not args.latents_path:
        raise UserError("--encode-latents needs --latents-path OUT for the shards")
    if os.path.exists(os.path.join(args.latents_path, "meta.json")):
        raise UserError(f"{args.latents_path} already holds latents; choose another --latents-path")
    vae = load_vae(args.vae, device)
    ds, num_classes = image_folder_dataset(args.data_path, args.image_size, class_cond=False)
    os.makedirs(args.latents_path, exist_ok=True)
    loader = DataLoader(ds, batch_size=64, num_workers=args.num_workers)
    shard, count = {"latents": [], "labels": []}, 0

    def flush(i):
        torch.save({k: torch.cat(v) for k, v in shard.items()}, os.path.join(args.latents_path, f"shard_{i:05d}.pt"))
        shard["latents"], shard["labels"] = [], []

    from tqdm import tqdm
    for x, y in tqdm(loader, desc="encoding"):
        z = vae.encode(x.to(device) * 2 - 1).latent_dist.sample() * VAE_SCALE
        shard["latents"].append(z.half().cpu())
        shard["labels"].append(torch.as_tensor(y))
        count += len(y)
        if sum(len(s) for s in shard["labels"]) >= 10000:
            flush(len(glob.glob(os.path.join(args.latents_path, "shard_*.pt"))))
    if shard["labels"]:
        flush(len(glob.glob(os.path.join(args.latents_path, "shard_*.pt"))))
    with open(os.path.join(args.latents_path, "meta.json"), "w") as f:
        json.dump({"vae": args.vae, "image_size": args.image_size, "num_classes": num_classes, "count": count}, f)
    print(f"encoded {count} images into {args.latents_path}")


#################################################################################
#                               Checkpoints                                     #
#################################################################################

def load_checkpoint(path):
    """torch.load(weights_only=True) with one-line errors for a missing, truncated or foreign file."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint (truncated or another format: {type(e).__name__})")
    if not isinstance(ckpt, dict) or not {"model", "args", "config"} <= ckpt.keys():
        raise UserError(f"{path} is not a DiS checkpoint made by train.py (it lacks model/args/config)")
    return ckpt


def model_from_config(config):
    """The model a checkpoint's "config" describes."""
    try:
        return DiS.create_model(config["model"], image_size=config["input_size"], in_channels=config["in_channels"],
                                num_classes=config["num_classes"], learn_sigma=config["learn_sigma"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"the checkpoint describes a model this DiS.py cannot build ({e})")


def load_weights(model, state, path):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"the weights in {path} do not fit this model ({first})")


def rng_state(gen):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "flip": gen.get_state()}


def set_rng_state(state, gen):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    gen.set_state(state["flip"])


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: an interrupted save never leaves a broken checkpoint,
    and an existing checkpoint is never overwritten."""
    if os.path.exists(path):
        return False
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return True


def newest_in_run(ckpt_path):
    """The checkpoint of the highest step in the run folder that holds ckpt_path (names are zero-padded steps)."""
    return sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "*.pt")))[-1]


def new_run_dir(results_dir, model):
    """results/NNN-DiS-S-2 with the next free number; never an existing folder."""
    os.makedirs(results_dir, exist_ok=True)
    index = len(glob.glob(os.path.join(results_dir, "*")))
    while True:   # another run may have taken this number meanwhile
        run_dir = os.path.join(results_dir, f"{index:03d}-{model.replace('/', '-')}")
        try:
            os.makedirs(os.path.join(run_dir, "checkpoints"))
            os.makedirs(os.path.join(run_dir, "samples"))
            return run_dir
        except FileExistsError:
            index += 1


def newest_checkpoint(results_dir):
    ckpts = sorted(glob.glob(os.path.join(results_dir, "*", "checkpoints", "*.pt")), key=os.path.getmtime)
    return ckpts[-1] if ckpts else None


#################################################################################
#                                  Training                                     #
#################################################################################

def lr_lambda(args, total_steps):
    def f(step):
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        if args.lr_schedule == "constant":
            return 1.0
        progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def param_groups(model, weight_decay):
    """Weight decay only on matrices of Linear/conv layers: never on A_log, D, biases, norms, embeddings."""
    if weight_decay == 0:
        return [{"params": list(model.parameters()), "weight_decay": 0.0}]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.ndim >= 2 and not name.endswith(("A_log", "pos_embed")) and "embedding_table" not in name
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().float(), 1 - decay)


def to_images(x, vae=None):
    """Model-space samples -> images in [0, 1]."""
    if vae is not None:
        x = vae.decode(x / VAE_SCALE).sample
    return ((x.float() + 1) / 2).clamp(0, 1)


def mixed_precision(device):
    """bf16 autocast on CUDA (the scan and the residual stream stay float32 inside DiS), float32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def main(args, given=()):
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no GPU")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True   # TF32 matmuls: much faster on Ampere and newer (as DiT)
        torch.backends.cudnn.allow_tf32 = True
    check_args(args)
    if args.encode_latents:
        args.image_size = args.image_size or 256
        if rank == 0:
            encode_latents(args, device)
        return

    # --- resume: the checkpoint's settings win, except what says how long to train and how often to log
    ckpt, ckpt_path = None, args.resume
    if args.resume == "auto":
        ckpt_path = newest_checkpoint(args.results_dir)
    if ckpt_path:
        ckpt = load_checkpoint(ckpt_path)
        if "model" in given and ckpt["args"]["model"] != args.model:
            raise UserError(f"--resume: {ckpt_path} is a {ckpt['args']['model']} run, not {args.model}; "
                            f"drop --model or start a new run")
        changed = sorted(k for k in given - RESUME_MAY_CHANGE if getattr(args, k) != ckpt["args"].get(k))
        if changed:
            raise UserError(f"--resume keeps the run's settings; drop --{changed[0].replace('_', '-')} "
                            f"(a resumed run may change only {', '.join(sorted(RESUME_MAY_CHANGE))})")
        args = argparse.Namespace(**{**ckpt["args"], **{k: getattr(args, k) for k in given | {"resume"}}})
    if args.image_size is None:
        args.image_size = 256 if args.dataset == "latents" else 32
    if args.global_batch_size % world:
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by {world} processes")
    if args.max_steps is None and args.epochs is None:
        args.epochs = 1400

    dataset, flip, num_classes = make_dataset(args)
    if args.dataset == "latents" and latents_meta(args.data_path)["image_size"] != args.image_size:
        raise UserError(f"the latents in {args.data_path} were encoded at "
                        f"{latents_meta(args.data_path)['image_size']}px; pass that as --image-size")
    x0, _ = dataset[0]
    config = {"model": args.model, "input_size": x0.shape[-1], "in_channels": x0.shape[0],
              "num_classes": num_classes if args.class_cond else 0, "learn_sigma": args.learn_sigma,
              "dataset": args.dataset, "latents": args.dataset == "latents",
              "vae": latents_meta(args.data_path)["vae"] if args.dataset == "latents" else None}
    patch = int(args.model.split("/")[1])
    if config["input_size"] % patch:
        raise UserError(f"--image-size {args.image_size} gives a {config['input_size']}px model input, which "
                        f"the patch size {patch} of {args.model} does not divide; use a multiple of {patch * (8 if config['latents'] else 1)}")
    if ckpt is not None and ckpt["config"] != config:
        raise UserError(f"--resume: {ckpt_path} was trained with {ckpt['config']}, but the data now give {config}")

    torch.manual_seed(args.seed * world + rank)           # a different stream per process: dropout, noise, t
    model = model_from_config(config).to(device)
    model.grad_checkpoint = args.grad_checkpoint
    ema = copy.deepcopy(model).requires_grad_(False).eval()   # EMA weights are what we sample from
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, weight_decay=0.0)
    local_batch = args.global_batch_size // world
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch == 0:
        raise UserError(f"the dataset has {len(dataset)} items, fewer than one batch of {args.global_batch_size}")
    total = args.max_steps or args.epochs * steps_per_epoch
    if args.epochs is not None:
        total = min(total, args.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args, total))
    flip_gen = torch.Generator().manual_seed(args.seed * world + rank + 1)  # the augmentation's own RNG
    step = 0
    if ckpt is not None:
        load_weights(model, ckpt["model"], ckpt_path)
        load_weights(ema, ckpt["ema"], ckpt_path)
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        step = ckpt["step"]
        if ckpt.get("rng") and len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank], flip_gen)
        elif rank == 0:
            print("note: the checkpoint holds no RNG state for this many processes; random streams restart")
    train_model = DDP(model, device_ids=[device.index] if use_cuda else None) if distributed else model
    if args.compile:
        train_model = torch.compile(train_model)
    diffusion = DiS.Diffusion()

    # --- the run folder: the resumed run's own if its newest checkpoint is the one resumed, else a new
    # numbered one (so that continuing from an older checkpoint never mixes with what came after it)
    run_dir = None
    if rank == 0:
        if ckpt_path and newest_in_run(ckpt_path) == os.path.abspath(ckpt_path):
            run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path)))
            os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        else:
            run_dir = new_run_dir(args.results_dir, args.model)
    if distributed:
        box = [run_dir]
        dist.broadcast_object_list(box, src=0)
        run_dir = box[0]
    log_file = open(os.path.join(run_dir, "log.txt"), "a") if rank == 0 else None

    def log(msg):
        if rank == 0:
            log_file.write(msg + "\n")
            log_file.flush()

    vae = load_vae(config["vae"], device) if config["latents"] and args.sample_every and rank == 0 else None

    def checkpoint_state():
        rngs = [rng_state(flip_gen)]
        if distributed:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state(flip_gen))
        return {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "args": vars(args), "config": config, "step": step, "rng": rngs}

    def save(state):
        if rank == 0:
            path = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
            msg = f"saved checkpoint {path}" if save_checkpoint(path, state) else f"kept the existing {path}"
            log(msg)
            print("\n" + msg)

    @torch.no_grad()
    def preview():
        if rank != 0:
            return
        g = torch.Generator(device).manual_seed(args.seed)  # the same noise every time: comparable grids
        n = 16
        y = torch.arange(n, device=device) % num_classes if config["num_classes"] else None
        x = diffusion.sample(ema, (n, config["in_channels"], config["input_size"], config["input_size"]), y=y,
                             steps=args.sample_steps, sampler="ddim", generator=g, device=device,
                             clip_denoised=not config["latents"])
        import torchvision.utils as vutils
        vutils.save_image(to_images(x, vae), os.path.join(run_dir, "samples", f"{step:07d}.png"), nrow=4)

    if distributed:  # each process must see its own part of the data
        firsts = [None] * world
        dist.all_gather_object(firsts, list(sampler)[:10000])
        log(f"shards disjoint: {len(set().union(*map(set, firsts))) == sum(map(len, firsts))}")
    log(f"args: {json.dumps(vars(args))}")
    log(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, {len(dataset)} training items, "
        f"{world} process(es), device {device}")
    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, disable=rank != 0, dynamic_ncols=True)
    interrupted = False

    def on_sigint(signum, frame):   # first Ctrl-C: finish the step, save, stop; a second one: stop at once
        nonlocal interrupted
        if interrupted:
            signal.default_int_handler(signum, frame)
        interrupted = True
    signal.signal(signal.SIGINT, on_sigint)
    def abort(what, value):   # a non-finite loss or gradient: stop before it reaches the weights
        msg = (f"the {what} became {value} at step {step + 1}; stopped without saving. The last good "
               f"checkpoint is in {run_dir}/checkpoints; try a lower --lr")
        log("error: " + msg)
        bar.close()
        raise UserError(msg)

    model.train()
    t_last, step_last = time.time(), step
    stop = False   # agreed by all processes, so that they leave the loop at the same step
    while step < total and not stop:
        epoch, position = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)       # the data order is a function of (seed, epoch): resumable mid-epoch
        order = list(sampler)[position * local_batch: steps_per_epoch * local_batch]
        loader = DataLoader(dataset, batch_size=local_batch, sampler=order, num_workers=args.num_workers,
                            pin_memory=use_cuda, generator=torch.Generator(), persistent_workers=False)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if not config["latents"]:
                x = x * 2 - 1                                                   # [0, 1] -> [-1, 1]
            if flip:
                mask = torch.rand(x.shape[0], generator=flip_gen) < 0.5
                x = torch.where(mask.to(device)[:, None, None, None], x.flip(-1), x)
            with mixed_precision(device):
                loss = diffusion.training_loss(train_model, x, y if config["num_classes"] else None)
            if args.fail_at_step is not None and step + 1 >= args.fail_at_step:
                loss = loss * float("nan")
            shared = torch.stack([loss.detach().float(), torch.tensor(float(interrupted), device=device)])
            if distributed:   # the mean loss, and whether any process was interrupted
                dist.all_reduce(shared)
            loss_value, stop = shared[0].item() / world, shared[1].item() > 0
            if not math.isfinite(loss_value):
                abort("loss", loss_value)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip))
            if not math.isfinite(grad_norm):
                abort("gradient norm", grad_norm)
            opt.step()
            sched.step()
            step += 1
            update_ema(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))
            bar.update(1)
            if step % args.log_every == 0 or step == total:
                dt = time.time() - t_last
                rate = (step - step_last) / max(dt, 1e-9)
                bar.set_postfix(loss=f"{loss_value:.4f}", steps_s=f"{rate:.2f}", img_s=f"{rate * args.global_batch_size:.1f}")
                log(f"step {step:07d} loss {loss_value:.6f} lr {sched.get_last_lr()[0]:.3g} "
                    f"steps/s {rate:.3f} img/s {rate * args.global_batch_size:.1f}")
                t_last, step_last = time.time(), step
            if args.sample_every and step % args.sample_every == 0:
                preview()
            if step % args.ckpt_every == 0 or step == total:
                save(checkpoint_state())
            if stop or step >= total:
                break
    bar.close()
    if stop:
        save(checkpoint_state())
        print(f"interrupted at step {step}; resume with --resume auto (or the checkpoint path)")
    log(f"done at step {step}")
    if distributed:  # DDP keeps replicas equal by averaging gradients; check that it did
        same = torch.ones((), device=device)
        for p in model.parameters():
            p0 = p.detach().clone()
            dist.broadcast(p0, src=0)
            same *= float(torch.equal(p0, p.detach()))
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        log(f"replicas identical: {bool(same.item())}")
        dist.destroy_process_group()
    if stop:
        sys.exit(130)


if __name__ == "__main__":
    try:
        main(*parse_args())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
