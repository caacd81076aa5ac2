"""
Train a DiS model. One process on CPU or one GPU:
    python train.py --dataset cifar10
Several GPUs or nodes (DistributedDataParallel; the same script):
    torchrun --nproc_per_node=8 train.py --dataset latents --data-path latents/ --model DiS-H/2 --class-cond
ImageNet latents are made once beforehand with encode_latents.py. The model and the diffusion come from DiS.py.
"""
import signal

signal.signal(signal.SIGINT, signal.SIG_DFL)   # Ctrl-C during the imports below: stop quietly

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import DiS
from dis_cli import (HelpFormatter, RunLog, UserError, adamw, add_device_flag, add_scan_backend_flag, deferred_ctrl_c,
                     flag, load_vae, load_weights, mixed_precision, model_from_config, new_run_dir, pick_device,
                     resume, rng_state, run, run_checkpoints, run_of, save_checkpoint, set_rng_state,
                     set_scan_backend, to_images)
from dis_data import latents_meta, make_dataset


def build_parser():
    p = argparse.ArgumentParser(description="Train DiS (see README.md).", formatter_class=HelpFormatter,
                                allow_abbrev=False)
    add = p.add_argument
    # data
    add("--dataset", default="cifar10", choices=["cifar10", "fashion-mnist", "mnist", "folder", "latents"],
        help="cifar10: 32x32x3, 10 classes. fashion-mnist / mnist: 28x28 padded to 32x32, 1 channel. "
             "folder: a directory of images (ImageFolder layout for classes, or flat). latents: the output "
             "of encode_latents.py")
    add("--data-path", default="data", help="dataset root (downloads go here), image folder, or latents folder")
    add("--image-size", type=int, default=None,
        help="pixel size (default: 32 for cifar10/mnists/folder, 256 for latents, whose model input is 1/8 of it)")
    add("--class-cond", action=argparse.BooleanOptionalAction, default=False,
        help="class-conditional model with label dropout for classifier-free guidance (CIFAR-10 in the paper: off)")
    # model and optimisation
    add("--model", default="DiS-S/2", choices=list(DiS.DiS_models), help="DiS-S/2 is the official CIFAR-10 model")
    add("--learn-sigma", action=argparse.BooleanOptionalAction, default=True, help="learn the variance (hybrid loss)")
    add("--global-batch-size", type=int, default=128, help="summed over all processes")
    add("--lr", type=float, default=1e-4, help="AdamW learning rate (DiT and DiS: 1e-4)")
    add("--weight-decay", type=float, default=0.0,
        help="AdamW weight decay (official: 0); never applied to A_log, D, biases, norms, embeddings")
    add("--lr-schedule", default="constant", choices=["constant", "cosine"],
        help="constant (DiT) or cosine decay to 0 at the last step (the official DiS code)")
    add("--warmup-steps", type=int, default=0, help="linear warm-up steps before the schedule")
    add("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    add("--ema-decay", type=float, default=0.9999, help="EMA decay, warmed up as min(decay, (1+step)/(10+step))")
    add("--grad-checkpoint", action="store_true", help="recompute each block in backward (less memory)")
    add("--compile", action="store_true", help="torch.compile the model (long first step)")
    # length, logging, checkpoints
    add("--max-steps", type=int, default=None, help="stop after this many optimizer steps in all")
    add("--epochs", type=int, default=None, help="stop after this many epochs (default: 1400 if no --max-steps)")
    add("--log-every", type=int, default=100, help="steps between loss lines in log.txt")
    add("--ckpt-every", type=int, default=10000, help="steps between checkpoints (one is also written at the end)")
    add("--sample-every", type=int, default=5000, help="steps between grids of EMA samples (0: never)")
    add("--sample-steps", type=int, default=25, help="DDIM steps of the preview grids")
    add("--sample-cfg-scale", type=float, default=4.0,
        help="classifier-free guidance of the preview grids of class-conditional models (1: none; DiT's sample.py: 4)")
    add("--results-dir", default="results", help="each run gets a numbered folder in here")
    add("--resume", default=None, help="a checkpoint, a run folder (its newest checkpoint), or 'auto': the newest "
        "run in --results-dir whose settings match the flags given here. A resumed run keeps its settings: "
        f"flags other than {', '.join(flag(k) for k in sorted(RESUME_MAY_CHANGE - {'resume'}))} must match it")
    add("--seed", type=int, default=0, help="random seed (each process adds its rank)")
    add("--num-workers", type=int, default=4, help="data loading processes per training process")
    add_device_flag(p)
    add_scan_backend_flag(p)
    return p


# What a resumed run may change; every other setting comes from the checkpoint.
RESUME_MAY_CHANGE = {"max_steps", "epochs", "log_every", "ckpt_every", "sample_every", "sample_steps",
                     "sample_cfg_scale", "num_workers", "device", "scan_backend", "resume", "results_dir", "data_path"}


def parse_args(argv=None):
    """-> (args, the names of the flags typed on the command line: a resumed run keeps the others)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    typed = {a.split("=")[0] for a in argv if a.startswith("--")}   # exact: the parser allows no abbreviations
    return parser.parse_args(argv), {a.dest for a in parser._actions if typed & set(a.option_strings)}


def check_args(args):
    """Ranges argparse cannot express; one line each."""
    lowest = {"global_batch_size": 1, "log_every": 1, "ckpt_every": 1, "sample_every": 0, "sample_steps": 2,
              "max_steps": 1, "epochs": 1, "image_size": 1, "num_workers": 0}
    for name, low in lowest.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise UserError(f"{flag(name)} must be at least {low}, got {value}")
    try:
        DiS.Diffusion().check_steps(args.sample_steps)
    except ValueError as e:
        raise UserError(f"--sample-steps: {e}")


#################################################################################
#                               Training pieces                                 #
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


def make_config(args, dataset, num_classes):
    """What the checkpoint records about the model and its data, and the model it describes."""
    x0, _ = dataset[0]
    latents = args.dataset == "latents"
    config = {"model": args.model, "input_size": x0.shape[-1], "in_channels": x0.shape[0],
              "num_classes": num_classes if args.class_cond else 0, "learn_sigma": args.learn_sigma,
              "dataset": args.dataset, "latents": latents, "vae": latents_meta(args.data_path)["vae"] if latents else None}
    try:
        return config, model_from_config(config)
    except ValueError as e:
        raise UserError(f"--image-size {args.image_size} gives a {config['input_size']}px model input: {e}")


@torch.no_grad()
def preview(ema, diffusion, config, args, path, device, vae):
    """A 4x4 grid of EMA samples, from the same noise every time so that grids are comparable; class-
    conditional models draw classes 0, 1, 2, ... in reading order, guided by --sample-cfg-scale."""
    g = torch.Generator(device).manual_seed(args.seed)
    y = torch.arange(16, device=device) % config["num_classes"] if config["num_classes"] else None
    with mixed_precision(device):
        x = diffusion.sample(ema, (16, config["in_channels"], config["input_size"], config["input_size"]), y=y,
                             steps=args.sample_steps, sampler="ddim", generator=g, device=device,
                             cfg_scale=args.sample_cfg_scale if y is not None else 1.0,
                             clip_denoised=not config["latents"])
    import torchvision.utils as vutils
    vutils.save_image(to_images(x, vae), path, nrow=4)


#################################################################################
#                                  Training                                     #
#################################################################################

def setup(args, given):
    """Everything the loop needs: processes, device, data, model, EMA, optimizer, a run folder; restored
    from a checkpoint when resuming."""
    r = argparse.Namespace(distributed="RANK" in os.environ, step=0)
    if r.distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    r.rank, r.world = (dist.get_rank(), dist.get_world_size()) if r.distributed else (0, 1)
    r.device = pick_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    ckpt = path = None
    if args.resume:   # the run's own settings, except what a resumed run may change
        path, ckpt, args = resume(args, given, RESUME_MAY_CHANGE)
    r.args = args
    r.scan_line = set_scan_backend(args.scan_backend, r.device)   # each rank checks its own device
    args.image_size = args.image_size or (256 if args.dataset == "latents" else 32)
    if args.global_batch_size % r.world:
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by {r.world} processes")
    if args.max_steps is None and args.epochs is None:
        args.epochs = 1400
    torch.manual_seed(args.seed * r.world + r.rank)      # a different stream per process: dropout, noise, t
    r.dataset, r.flip, num_classes = make_dataset(args.dataset, args.data_path, args.image_size, args.class_cond)
    r.config, r.model = make_config(args, r.dataset, num_classes)
    if ckpt is not None and ckpt["config"] != r.config:
        raise UserError(f"--resume: {path} was trained with {ckpt['config']}, but the data now give {r.config}")
    r.model.to(r.device)
    r.model.grad_checkpoint = args.grad_checkpoint
    r.ema = copy.deepcopy(r.model).requires_grad_(False).eval()   # EMA weights are what we sample from
    r.opt = adamw(param_groups(r.model, args.weight_decay), args.lr, r.device)
    r.local_batch = args.global_batch_size // r.world
    r.sampler = DistributedSampler(r.dataset, num_replicas=r.world, rank=r.rank, shuffle=True, seed=args.seed,
                                   drop_last=True)
    r.steps_per_epoch = len(r.sampler) // r.local_batch
    if r.steps_per_epoch == 0:
        raise UserError(f"the dataset has {len(r.dataset)} items, fewer than one batch of {args.global_batch_size}")
    r.total = min(args.max_steps or math.inf, (args.epochs or math.inf) * r.steps_per_epoch)
    r.sched = torch.optim.lr_scheduler.LambdaLR(r.opt, lr_lambda(args, r.total))
    r.flip_gen = torch.Generator().manual_seed(args.seed * r.world + r.rank + 1)  # the augmentation's own RNG
    if ckpt is not None:
        load_weights(r.model, ckpt["model"], path)
        load_weights(r.ema, ckpt["ema"], path)
        r.opt.load_state_dict(ckpt["opt"])
        r.sched.load_state_dict(ckpt["sched"])
        r.step = ckpt["step"]
        if ckpt.get("rng") and len(ckpt["rng"]) == r.world:
            set_rng_state(ckpt["rng"][r.rank], r.flip_gen)
        elif r.rank == 0:
            print("note: the checkpoint holds no RNG state for this many processes; random streams restart")
    # the run folder: the resumed run's own if its newest checkpoint is the one resumed, else a new numbered
    # one (so that continuing from an older checkpoint never mixes with what came after it)
    r.run_dir = None
    if r.rank == 0:
        same = path and run_checkpoints(run_of(path))[-1] == os.path.abspath(path)
        r.run_dir = run_of(path) if same else new_run_dir(args.results_dir, args.model)
        os.makedirs(os.path.join(r.run_dir, "samples"), exist_ok=True)
        if path:
            print(f"resuming {r.run_dir} from {path} at step {r.step}")
    if r.distributed:
        box = [r.run_dir]
        dist.broadcast_object_list(box, src=0)
        r.run_dir = box[0]
    r.log = RunLog(r.run_dir, r.rank)
    r.train_model = DDP(r.model, device_ids=[r.device.index] if r.device.type == "cuda" else None) \
        if r.distributed else r.model
    if args.compile:
        r.train_model = torch.compile(r.train_model)
    return r


def batches(r):
    """The rest of the current epoch's batches, in [-1, 1] (images) or as stored (latents), on the device.
    The data order is a function of (seed, epoch), so a resumed run continues mid-epoch exactly."""
    epoch, position = divmod(r.step, r.steps_per_epoch)
    r.sampler.set_epoch(epoch)
    order = list(r.sampler)[position * r.local_batch: r.steps_per_epoch * r.local_batch]
    loader = DataLoader(r.dataset, batch_size=r.local_batch, sampler=order, num_workers=r.args.num_workers,
                        pin_memory=r.device.type == "cuda", generator=torch.Generator())
    for x, y in loader:
        x, y = x.to(r.device, non_blocking=True), y.to(r.device, non_blocking=True)
        if not r.config["latents"]:
            x = x * 2 - 1                                                   # [0, 1] -> [-1, 1]
        if r.flip:
            mask = torch.rand(x.shape[0], generator=r.flip_gen) < 0.5
            x = torch.where(mask.to(r.device)[:, None, None, None], x.flip(-1), x)
        yield x, y if r.config["num_classes"] else None


def train(r):
    """The loop. Returns True when stopped by Ctrl-C (all processes agree on the step where they stop)."""
    args, log = r.args, r.log
    diffusion = DiS.Diffusion()
    vae = load_vae(r.config["vae"], r.device) if r.config["latents"] and args.sample_every and r.rank == 0 else None
    bar = tqdm(total=r.total, initial=r.step, disable=r.rank != 0, dynamic_ncols=True)
    start, t_last, step_last, stop = r.step, time.time(), r.step, False
    with deferred_ctrl_c() as ctrl_c:
        while r.step < r.total and not stop:
            for x, y in batches(r):
                with mixed_precision(r.device):
                    loss = diffusion.training_loss(r.train_model, x, y)
                shared = torch.stack([loss.detach().float(), torch.tensor(float(ctrl_c["hit"]), device=r.device)])
                if r.distributed:   # the mean loss, and whether any process was interrupted
                    dist.all_reduce(shared)
                loss_value, stop = shared[0].item() / r.world, shared[1].item() > 0
                check_finite(r, bar, "loss", loss_value)   # before a non-finite value reaches the weights
                r.opt.zero_grad(set_to_none=True)
                loss.backward()
                check_finite(r, bar, "gradient norm", float(torch.nn.utils.clip_grad_norm_(r.model.parameters(),
                                                                                           args.grad_clip)))
                r.opt.step()
                r.sched.step()
                r.step += 1
                update_ema(r.ema, r.model, min(args.ema_decay, (1 + r.step) / (10 + r.step)))
                bar.update(1)
                if r.step - start == 1:
                    t_first = time.time()
                elif r.step - start == 6 and r.device.type == "cpu":
                    warn_if_long(r, (time.time() - t_first) / 5)
                if r.step % args.log_every == 0 or r.step == r.total:
                    rate = (r.step - step_last) / max(time.time() - t_last, 1e-9)
                    bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{rate * args.global_batch_size:.1f}")
                    log(f"step {r.step:07d} loss {loss_value:.6f} lr {r.sched.get_last_lr()[0]:.3g} "
                        f"steps/s {rate:.3f} img/s {rate * args.global_batch_size:.1f}")
                    t_last, step_last = time.time(), r.step
                if args.sample_every and r.step % args.sample_every == 0 and r.rank == 0:
                    preview(r.ema, diffusion, r.config, args, os.path.join(r.run_dir, "samples", f"{r.step:07d}.png"),
                            r.device, vae)
                if r.step % args.ckpt_every == 0 or r.step == r.total or stop:
                    save(r)
                if stop or r.step >= r.total:
                    break
    bar.close()
    return stop


def check_finite(r, bar, what, value):
    """A non-finite loss or gradient norm: stop without saving; the last good checkpoint stays the newest."""
    if not math.isfinite(value):
        msg = (f"the {what} became {value} at step {r.step + 1}; stopped without saving. The last good "
               f"checkpoint is in {r.run_dir}/checkpoints; try a lower --lr")
        r.log("error: " + msg)
        bar.close()
        raise UserError(msg)


def warn_if_long(r, seconds_per_step):
    days = (r.total - r.step) * seconds_per_step / 86400
    if days > 1:
        r.log(f"note: {r.total - r.step} steps to go at {seconds_per_step:.2f} s/step on this CPU: about {days:.1f} "
              f"days. For a first run on a CPU, see the CPU quickstart in README.md", echo=True)


def save(r):
    rngs = [rng_state(r.flip_gen)]
    if r.distributed:
        rngs = [None] * r.world
        dist.all_gather_object(rngs, rng_state(r.flip_gen))
    if r.rank == 0:
        state = {"model": r.model.state_dict(), "ema": r.ema.state_dict(), "opt": r.opt.state_dict(),
                 "sched": r.sched.state_dict(), "args": vars(r.args), "config": r.config, "step": r.step, "rng": rngs}
        path = os.path.join(r.run_dir, "checkpoints", f"{r.step:07d}.pt")
        r.log(f"saved checkpoint {path}" if save_checkpoint(path, state) else f"kept the existing {path}", echo=True)


def ddp_checks(r):
    """Log lines that show DDP did its job: disjoint data per process, identical weights at the end."""
    firsts = [None] * r.world
    dist.all_gather_object(firsts, list(r.sampler)[:10000])
    same = torch.ones((), device=r.device)
    for p in r.model.parameters():
        p0 = p.detach().clone()
        dist.broadcast(p0, src=0)
        same *= float(torch.equal(p0, p.detach()))
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    r.log(f"shards disjoint: {len(set().union(*map(set, firsts))) == sum(map(len, firsts))}")
    r.log(f"replicas identical: {bool(same.item())}")


def main(args, given=frozenset()):
    check_args(args)
    r = setup(args, given)
    r.log(r.scan_line, echo=True)
    r.log(f"args: {json.dumps(vars(r.args))}")
    r.log(f"{r.args.model}: {sum(p.numel() for p in r.model.parameters()):,} parameters, {len(r.dataset)} training "
          f"items, {r.world} process(es), device {r.device}")
    r.model.train()
    interrupted = train(r)
    r.log(f"interrupted at step {r.step}" if interrupted else f"done at step {r.step}")
    if r.distributed:
        ddp_checks(r)
        dist.destroy_process_group()
    if interrupted:
        if r.rank == 0:
            print(f"interrupted at step {r.step}; continue with --resume {r.run_dir}")
        sys.exit(130)


if __name__ == "__main__":
    run(main, *parse_args())
