"""
What the scripts (train.py, sample.py, encode_latents.py, bench.py) share, so that none imports another:
one-line errors, the device, the scan backend and the precision, checkpoint files and run folders, the VAE.
The model itself is in DiS.py.
"""
import argparse
import contextlib
import glob
import os
import signal
import sys
import warnings

import torch

import DiS

VAE_SCALE = 0.18215   # the Stable Diffusion VAE's latent scale factor


class UserError(Exception):
    """A problem with the user's input: reported as one line, no traceback."""


def run(main, *args):
    """A script's entry point: a UserError ends as one line 'error: ...' (exit code 2), Ctrl-C as one line
    (exit code 130); never a traceback for either."""
    signal.signal(signal.SIGINT, signal.default_int_handler)   # from here on, Ctrl-C is a KeyboardInterrupt
    try:
        return main(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


@contextlib.contextmanager
def deferred_ctrl_c():
    """Inside: the first Ctrl-C only sets flag["hit"] (the loop finishes its step, saves and stops);
    a second one stops at once."""
    flag = {"hit": False}

    def handler(signum, frame):
        if flag["hit"]:
            signal.default_int_handler(signum, frame)
        flag["hit"] = True
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def flag(name, value=None):
    """The flag a user types for an argument name, with a value if given: --lr 0.001, --no-class-cond."""
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{name.replace('_', '-')}"
    return f"--{name.replace('_', '-')}" + ("" if value is None else f" {value}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default, except None, whose meaning the help text itself explains."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_device_flag(parser):
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: the GPU when PyTorch sees one, else the CPU")


def pick_device(choice, index=0):
    """The device for --device (auto, cpu, cuda); on CUDA also TF32 matmuls, much faster on Ampere and newer
    GPUs at no visible cost to diffusion training (as DiT)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no GPU")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def add_scan_backend_flag(parser):
    parser.add_argument("--scan-backend", default="auto", choices=DiS.SCAN_BACKENDS,
                        help="DiS.SCAN_BACKEND: auto = on CUDA the fused Triton path once a first-use check passes, "
                             "else mamba-ssm's kernel where installed, else lean (on a CPU: PyTorch, small blocks "
                             "token-major); lean = the lean PyTorch scan; ref = the plain loop; mamba_ssm = mamba-ssm's "
                             "kernel; triton = the Triton scan; fused = Triton blocks (token-major, no flips); the last "
                             "three need CUDA")


def set_scan_backend(name, device):
    """DiS.SCAN_BACKEND = name, after checking that it can run on device (one line if it cannot). Returns the
    line the scripts print: which scan runs and why ("auto" decides here, with its first-use check on CUDA)."""
    if name == "mamba_ssm" and (DiS.mamba_selective_scan_fn is None or device.type != "cuda"):
        raise UserError("--scan-backend mamba_ssm needs mamba-ssm installed and a CUDA device; "
                        "use --scan-backend auto")
    if name in ("triton", "fused"):
        try:
            usable = DiS.triton_module(name).triton_scan_usable(torch.empty(0, device=device))
        except RuntimeError as e:
            raise UserError(str(e))
        if not usable:
            raise UserError(f"--scan-backend {name} needs a CUDA device (its Triton kernels run on a CPU only "
                            f"in Triton's slow interpreter); use --scan-backend auto")
    DiS.SCAN_BACKEND = name
    if name != "auto":
        return f"scan backend: {name} (--scan-backend {name})"
    with warnings.catch_warnings():   # the line returned says it all
        warnings.simplefilter("ignore")
        backend, reason = DiS.resolve_auto(device)
    return f"scan backend: {backend} (auto: {reason})"


def mixed_precision(device):
    """The one precision policy of training, sampling and bench.py: bf16 autocast on CUDA (the scan and the
    residual stream stay float32 inside DiS), plain float32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def adamw(params, lr, device, weight_decay=0.0):
    """The optimizer of train.py and bench.py: AdamW, as one fused kernel per step where PyTorch has one (CPU
    and CUDA): the same update as the default for-each one, without a dozen small ops per parameter tensor."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type in ("cpu", "cuda") or None)


#################################################################################
#                         Checkpoints and run folders                           #
#################################################################################
# A run folder: results/NNN-DiS-S-2/ with log.txt, checkpoints/0000100.pt (zero-padded steps), samples/.

def load_checkpoint(path, mmap=False):
    """torch.load(weights_only=True) with one-line errors for a missing, truncated or foreign file.
    mmap=True reads lazily: cheap when only the settings are wanted."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint (truncated or another format: {type(e).__name__})")
    if not isinstance(ckpt, dict) or not {"model", "args", "config"} <= ckpt.keys():
        raise UserError(f"{path} is not a DiS checkpoint made by train.py (it lacks model/args/config)")
    return ckpt


def model_from_config(config):
    """The model that a checkpoint's "config" (written by train.py) describes, with fresh weights."""
    return DiS.create_model(config["model"], image_size=config["input_size"], in_channels=config["in_channels"],
                            num_classes=config["num_classes"], learn_sigma=config["learn_sigma"])


def model_from_checkpoint(ckpt, path, weights="model"):
    """The model a checkpoint describes, with its weights ("model" or "ema")."""
    try:
        model = model_from_config(ckpt["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"the checkpoint describes a model this DiS.py cannot build ({e})")
    load_weights(model, ckpt[weights], path)
    return model


def load_weights(model, state, path):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"the weights in {path} do not fit this model ({first})")


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: an interrupted save never leaves a broken checkpoint,
    and an existing checkpoint is never overwritten. False if it existed."""
    if os.path.exists(path):
        return False
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return True


def run_checkpoints(run_dir):
    """The checkpoints of a run folder, lowest step first (names are zero-padded steps)."""
    return sorted(glob.glob(os.path.join(run_dir, "checkpoints", "*.pt")))


def run_of(ckpt_path):
    """The run folder that holds a checkpoint."""
    return os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path)))


def resolve_checkpoint(path):
    """A checkpoint file as given, or for a run folder its newest checkpoint by step."""
    if os.path.isdir(path):
        ckpts = run_checkpoints(path)
        if not ckpts:
            raise UserError(f"{path} is a folder without checkpoints/*.pt; pass a checkpoint file or a run folder")
        return ckpts[-1]
    return path


def first_difference(args, saved, names):
    """The first of `names` whose value differs between args and a run's saved settings; None if none does."""
    return next((name for name in sorted(names) if getattr(args, name) != saved.get(name)), None)


def find_run_to_resume(results_dir, args, must_match):
    """--resume auto: the newest checkpoint (by step) of the newest run in results_dir whose saved settings
    equal args in every name of must_match (the flags typed on the command line)."""
    newest_ckpt = {r: ckpts[-1] for r in glob.glob(os.path.join(results_dir, "*")) if (ckpts := run_checkpoints(r))}
    runs = sorted(newest_ckpt, key=lambda r: os.path.getmtime(newest_ckpt[r]))
    if not runs:
        raise UserError(f"--resume auto: no run in {results_dir} has a checkpoint; start one without --resume")
    saved = {r: load_checkpoint(newest_ckpt[r], mmap=True)["args"] for r in runs}
    for r in reversed(runs):
        if first_difference(args, saved[r], must_match) is None:
            return newest_ckpt[r]
    newest = runs[-1]
    name = first_difference(args, saved[newest], must_match)
    raise UserError(f"--resume auto: no run in {results_dir} matches the flags given; the newest, {newest}, "
                    f"has {flag(name, saved[newest].get(name))}, not {flag(name, getattr(args, name))}. Pass "
                    f"--resume with its run folder (keeping its settings) or start a new run without --resume")


def resume(args, given, may_change):
    """--resume: the checkpoint it names (a file, a run folder's newest, or for 'auto' the newest run whose
    settings match the flags given), the checkpoint itself, and the run's saved settings with the flags given
    on the command line on top. given: the flags typed; may_change: those a resumed run may change."""
    must_match = given - may_change
    path = (find_run_to_resume(args.results_dir, args, must_match) if args.resume == "auto"
            else resolve_checkpoint(args.resume))
    ckpt = load_checkpoint(path)
    changed = first_difference(args, ckpt["args"], must_match)
    if changed:
        raise UserError(f"--resume keeps the run's settings, and {run_of(path)} has "
                        f"{flag(changed, ckpt['args'].get(changed))}: drop {flag(changed)} or start a new run")
    # vars(args) first: a setting added to the scripts after this checkpoint was written takes its default
    typed = {k: getattr(args, k) for k in given | {"resume"}}
    return path, ckpt, argparse.Namespace(**{**vars(args), **ckpt["args"], **typed})


def rng_state(gen):
    """The random states a checkpoint keeps, so that a resumed run continues bit for bit."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "flip": gen.get_state()}


def set_rng_state(state, gen):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    gen.set_state(state["flip"])


class RunLog:
    """log.txt of the run (rank 0 only; other processes write nothing)."""

    def __init__(self, run_dir, rank):
        self.file = open(os.path.join(run_dir, "log.txt"), "a") if rank == 0 else None

    def __call__(self, msg, echo=False):
        if self.file:
            self.file.write(msg + "\n")
            self.file.flush()
            if echo:
                from tqdm import tqdm
                tqdm.write(msg)


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


#################################################################################
#                                   The VAE                                     #
#################################################################################

def load_vae(name, device):
    """diffusers' AutoencoderKL (hub name or local folder), for ImageNet latents."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise UserError("ImageNet latents need the VAE from diffusers: pip install diffusers")
    try:
        return AutoencoderKL.from_pretrained(name).to(device).eval()
    except Exception as e:
        raise UserError(f"could not load the VAE {name!r} ({type(e).__name__}); pass --vae with a local "
                        f"diffusers AutoencoderKL folder or make the hub reachable")


def to_images(x, vae=None):
    """Model-space samples -> images in [0, 1] (latents are decoded by the VAE first)."""
    if vae is not None:
        x = vae.decode(x / VAE_SCALE).sample
    return ((x.float() + 1) / 2).clamp(0, 1)
