"""
Train Transfusion on handwritten numbers: one model that writes a number and draws it,
reads a handwritten number back, and does both on its own, on a laptop CPU.

    python train_mnist.py --data-dir ../data          # train for --steps, then measure and draw
    python train_mnist.py --out out --resume          # continue an interrupted run
    python train_mnist.py --out out --draw 2026 --gif # draw a number with a trained model

The training sequences are MNIST numbers of 1-4 digits (mnist_numbers.py), each written
before its images (caption first, 70%; the paper's §4.1: 80%) or read after them (image
first, 30%, noise capped at t <= 500 as in §4.3.4).

Outputs in --out: ckpt.pt (the whole training state: resumable), progress.png (redrawn
every few minutes while it trains), then the metrics (results.json) and pictures.

Importable without side effects; the names a notebook needs:
    from train_mnist import parse_args, train, load_checkpoint, draw_number, read_number
"""
import argparse
import copy
import math
import os
import signal
import sys
import threading
import time

import torch

import mnist_eval
from mnist_numbers import (BOI, BOS, EOI, EOS, FASHION, LAYOUTS, PAD, SAMPLING, SEP, VOCAB, MissingData,  # noqa: F401
                           as_model_images, caption_digits, draw_number, draw_numbers, generate_digits, layout_of,
                           LATENT, load_digits, make_sequences, mnist_config, number_batch, number_sequence,
                           read_number, read_numbers, seq_len_needed, to_model_range, tokens_text)
from transfusion import Transfusion, TransfusionConfig, batch_loss, bf16_is_fast

# the flags that set the model (TransfusionConfig's fields), and those that define a run: a
# resumed run takes them from its checkpoint
MODEL_FLAGS = ("d_model", "n_layers", "n_heads", "ffn_hidden", "patch_size", "patch_encoder", "unet_channels",
               "unet_downsample", "lam", "image_attention", "image_first_max_t", "min_snr_gamma", "autoencoder")
RUN_FLAGS = MODEL_FLAGS + ("seed", "steps", "batch_size", "max_digits", "caption_first", "layout", "lr", "warmup",
                           "lr_schedule", "ema", "fp32", "bf16", "dataset", "clean_t", "autoencoder_steps")
# speed only: the first steps, which a CPU run trains on one thread fewer while the referee trains
# in a helper process on the core left free (train, mnist_eval.referee_helper); on two cores the
# referee takes about as long (docs/speed.md)
REFEREE_CORE_STEPS = 1600
CKPT_FORMAT = 6   # what a checkpoint holds (6: RoPE turns pairs 2j, 2j+1); another format is refused
# what a checkpoint written before a flag existed trained with: its model's config, its run
OLDER_RUNS = {"unet_downsample": 1, "min_snr_gamma": 0.0, "autoencoder": 0}
OLDER_RUN_FLAGS = {**OLDER_RUNS, "lr_schedule": "cosine"}


def model_config(args) -> TransfusionConfig:
    """The model config that the command-line flags ask for."""
    kw = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}  # patch_size: None, the
    if args.clean_t is not None:                                                      # image kind's default
        kw["clean_t"] = args.clean_t
    cfg = mnist_config(**kw)
    return mnist_config(max_seq_len=seq_len_needed(cfg.n_patches, args.max_digits), **kw)


# ---------------------------------------------------------------------------
# Optimisation (§4.1 "Optimization")
# ---------------------------------------------------------------------------

def configure_optimizer(model, lr: float, weight_decay: float = 0.1):
    """AdamW(0.9, 0.95, eps 1e-8) as §4.1; weight decay on matrices only (as nanoGPT/Llama)."""
    params = [p for p in model.parameters() if p.requires_grad]   # not a frozen autoencoder's (§2.3)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type in ("cpu", "cuda")  # one kernel for the whole update
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def lr_at(step: int, total: int, lr: float, warmup: int, schedule: str = "cosine", min_ratio: float = 0.05):
    """Linear warmup, then the paper's cosine decay to lr/20 at the last step (§4.1: 3e-4 ->
    1.5e-5), or with schedule "linear" a straight line down to 0 (Bergsma et al. 2025, "Straight
    to Zero"; measured as a speed lever and not taken: docs/speed.md)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "linear":
        return lr * (1 - (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * step / total)))


def ema_decay(step: int, ema: float) -> float:
    """The EMA of the weights samples; its decay warms up as (1+step)/(10+step), so that a short
    run's average forgets the random initial weights, up to --ema (docs/defaults.md)."""
    return min(ema, (1 + step) / (10 + step))


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def use_bf16(device: torch.device, fp32: bool = False, cpu_bf16: bool = False) -> bool:
    """bf16 autocast where it pays (transfusion.bf16_is_fast: a GPU with bf16, a CPU with AVX-512 BF16 or AMX)
    unless --fp32; --bf16 asks for it on any CPU. Training runs under it, and on a CPU the
    evaluation's sampling too (`eval_precision`)."""
    if fp32:
        return False
    return bf16_is_fast(device) or (cpu_bf16 and device.type == "cpu")


def eval_precision(device: torch.device, bf16: bool):
    """The autocast the evaluation draws and reads under: training's choice on a CPU; fp32 on a
    GPU, where sampling is launch-bound. The referee judges in fp32. Drawing one number on demand
    (--draw) and the progress pictures stay fp32: with a few images bf16 does not pay, as
    autocast converts the weights at every call (one number: 3.3 s in fp32, 3.6-4.0 in bf16)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and device.type == "cpu")


def train_step(model, opt, ema_params, model_params, loss_fn, ema_decay: float, bf16: bool):
    """One optimisation step (§4.1): L = L_LM + lambda L_DDPM (loss_fn() returns (L, L_LM, L_DDPM)),
    backward, clip the gradient norm at 1.0, AdamW; then the EMA of the weights. Returns (lm, ddpm)
    as tensors (no sync)."""
    with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, lm, ddpm = loss_fn()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():  # ema += (1 - decay) * (model - ema): one foreach call for all tensors
        torch._foreach_lerp_(ema_params, model_params, 1 - ema_decay)
    return lm.detach(), ddpm.detach()


def run_step(state, args, images, labels, bf16: bool):
    """Step state["step"] of the run: its learning rate, the next batch of numbers from the
    data stream (a fresh permutation of the training digits each epoch), train_step.
    Everything follows the step count and the run's generator alone. Returns (lm, ddpm)."""
    step, gen = state["step"], state["gen"]
    for g in state["opt"].param_groups:
        g["lr"] = lr_at(step, args.steps, args.lr, args.warmup, args.lr_schedule)
    if state["order"] is None or state["cursor"] + args.batch_size > len(labels):
        state["order"], state["cursor"] = torch.randperm(len(labels), generator=gen), 0
    idx = state["order"][state["cursor"]:state["cursor"] + args.batch_size]
    state["cursor"] += args.batch_size
    model = state["model"]
    if args.layout == "paired":  # speed only: the batch of the `else` branch, built without a tensor per segment
        batch, eps, t = number_batch(model, images[idx], labels[idx], gen, args.max_digits, args.caption_first)
        loss_fn = lambda: batch_loss(model, batch, eps, t)                        # noqa: E731
    else:  # numbers as sequences of segments (mnist_numbers), then Eq. 4 on them, in packed rows
        seqs = make_sequences(images[idx], labels[idx], gen, args.max_digits, args.caption_first, args.layout)
        loss_fn = lambda: model.loss(seqs, generator=gen, packed=True)            # noqa: E731
    out = train_step(model, state["opt"], state["ema_params"], state["model_params"], loss_fn,
                     ema_decay(step, args.ema), bf16)
    state["step"] = step + 1
    return out


# ---------------------------------------------------------------------------
# Training: a fixed number of steps, safe on Ctrl-C, resumable
# ---------------------------------------------------------------------------

class StopOnCtrlC:
    """The first Ctrl-C (SIGINT) asks the loop to stop after the current step; a second one
    interrupts at once (the last checkpoint on disk is kept: it is replaced atomically)."""

    def __init__(self, log):
        self.requested, self.log, self.old = False, log, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again: stop now)")

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a kill mid-write leaves the old file whole."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def new_state(args, device):
    """Model, EMA, optimizer and the data stream of a fresh run of seed args.seed."""
    torch.manual_seed(args.seed)
    model = Transfusion(model_config(args)).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    learned = [p.requires_grad for p in model.parameters()]   # not a frozen autoencoder's (§2.3)
    return dict(model=model, ema=ema, opt=configure_optimizer(model, args.lr),
                gen=torch.Generator().manual_seed(args.seed), step=0, order=None, cursor=0,
                hist={"step": [], "lm": [], "ddpm": []}, seconds=0.0,   # for the EMA's lerp:
                ema_params=[p for p, y in zip(ema.parameters(), learned) if y],
                model_params=[p for p, y in zip(model.parameters(), learned) if y])


def checkpoint(state, args, finished: bool):
    """Everything a run needs to continue exactly where it stopped, and to sample."""
    return {"format": CKPT_FORMAT, "vocab": VOCAB, "config": dict(state["ema"].cfg.__dict__),
            "model": state["ema"].state_dict(), "sample_defaults": sample_defaults(args),
            "run": {k: getattr(args, k) for k in RUN_FLAGS}, "finished": finished,
            "train": {"step": state["step"], "model": state["model"].state_dict(),
                      "opt": state["opt"].state_dict(), "gen": state["gen"].get_state(),
                      "order": state["order"], "cursor": state["cursor"], "hist": state["hist"],
                      "seconds": state["seconds"]}}


def restore_state(ckpt, args, device):
    """The training state saved by `checkpoint`, on `device`."""
    state = new_state(args, device)
    tr = ckpt["train"]
    state["model"].load_state_dict(tr["model"])
    state["ema"].load_state_dict(ckpt["model"])
    state["opt"].load_state_dict(tr["opt"])
    # Adam's moments in their weight's memory layout (channels-last for the U-Net's convs): the
    # fused update walks both tensors' memory in step, and an older checkpoint may hold them contiguous
    for p, moments in state["opt"].state.items():
        for k, v in moments.items():
            if torch.is_tensor(v) and v.shape == p.shape:
                moments[k] = torch.empty_like(p).copy_(v)
    state["gen"].set_state(tr["gen"])
    state.update(step=tr["step"], order=tr["order"], cursor=tr["cursor"], hist=tr["hist"], seconds=tr["seconds"])
    return state


def sample_defaults(args):
    """How the trained model is sampled, and the layout that says how to prompt it."""
    return dict(steps=args.sample_steps, cfg_scale=args.cfg_scale, sampler=args.sampler, layout=args.layout)


def refuse_to_overwrite(path):
    """A new run never starts over an existing checkpoint: ValueError saying what to do instead."""
    if os.path.exists(path):
        ckpt = read_checkpoint(path) if os.path.getsize(path) else {}
        what = ("a finished run" if ckpt.get("finished") else
                f"an unfinished run (step {ckpt['train']['step']:,})" if ckpt else "a file")
        raise ValueError(f"{path} holds {what}: continue it with --resume (in Python: train(args, state)), "
                         f"evaluate it with --eval-only (load_checkpoint), or train into another --out "
                         f"(nothing was overwritten)")


def train(args, state=None, log=print, spare_a_core: bool = False, helper=None):
    """Train for args.steps steps; with `state` (a run interrupted in this Python process, or restored
    from a checkpoint), continue it. The LR schedule, the EMA warm-up and the data order follow
    the step count alone, so the same seed gives the same model. Saves <out>/ckpt.pt every
    --ckpt-every minutes and at the end, and <out>/progress.png every --progress-every minutes.
    A new run refuses to start over an existing checkpoint. Returns (state, how): how is
    "done", "interrupted" (Ctrl-C) or "capped" (--minutes).
    Speed only, spare_a_core (the command line's runs): on a CPU with several threads, train the
    first REFEREE_CORE_STEPS steps on one thread fewer, leaving a core to `helper` (an OnOneCore,
    mnist_eval.referee_helper: started here, after the autoencoder's fit), waited for at that
    step if it is still at work. A fixed step, not the helper's end, so that a seed gives the
    same model however fast the machine, resumed or not, helper or not: the thread count
    changes float rounding."""
    device = pick_device(args.device)
    path = os.path.join(args.out, "ckpt.pt")
    fresh = state is None
    if fresh:
        refuse_to_overwrite(path)
    images_u8, labels = load_digits(args.data_dir, train=True, dataset=args.dataset)
    images = to_model_range(images_u8)                                  # (n, 1, 28, 28) in [-1, 1]
    state = new_state(args, device) if fresh else state
    model, ema = state["model"], state["ema"]
    if model.autoencoder is not None:  # §2.3: the model learns on latents, encoded once
        if fresh:
            t_ae = time.time()
            latents = model.autoencoder.fit(images.to(device), args.autoencoder_steps,
                                            generator=torch.Generator().manual_seed(args.seed), log=log)
            ema.autoencoder.load_state_dict(model.autoencoder.state_dict())
            c = model.cfg
            log(f"autoencoder ({c.autoencoder} wide; a digit -> a latent {c.channels}x{c.image_size}x{c.image_size}) "
                f"trained in {(time.time() - t_ae) / 60:.2f} min")
        else:
            latents = model.encode_images(images.to(device))
        images = latents.cpu()                                          # (n, C, I, I)
    ema.sample_defaults = sample_defaults(args)   # how the progress pictures (and later users) sample
    bf16 = use_bf16(device, args.fp32, args.bf16)
    cfg = model.cfg
    log(f"device {device}{' (bf16 autocast; --fp32 turns it off)' if bf16 else ''}, "
        f"{model.num_params() / 1e6:.2f}M parameters, "
        f"{cfg.patch_encoder} patches {cfg.patch_size}x{cfg.patch_size} ({cfg.n_patches} per image), "
        f"{len(labels)} training digits, {args.batch_size} digits per step, numbers of 1-{args.max_digits} "
        f"digits ({args.layout} layout)")
    if not fresh:
        log(f"resuming at step {state['step']:,} of {args.steps:,}")
    os.makedirs(args.out, exist_ok=True)
    pending = []  # losses as tensors: read them only when printing (no sync every step)

    def flush():
        for s, a, b in pending:
            state["hist"]["step"].append(s)
            state["hist"]["lm"].append(float(a))
            state["hist"]["ddpm"].append(float(b))
        pending.clear()

    def progress_picture():  # the EMA model draws and reads with its own generator: training is untouched
        fig = mnist_eval.progress_figure(ema, images_u8[:4], labels[:4], state["step"], args.steps)
        mnist_eval.save_figure(fig, os.path.join(args.out, "progress.png"))

    t0 = time.time()
    t_log = t_save = t_picture = t0
    start_step, seconds0 = state["step"], state["seconds"]
    how = "done"
    threads = torch.get_num_threads()
    spared = spare_a_core and device.type == "cpu" and threads > 1 and state["step"] < REFEREE_CORE_STEPS
    if spared:
        torch.set_num_threads(threads - 1)
    if helper is not None and (spared or device.type != "cpu"):  # a GPU run leaves the CPU's cores free
        helper.start()
    with StopOnCtrlC(log) as ctrl_c:
        while state["step"] < args.steps:
            if spared and state["step"] == REFEREE_CORE_STEPS:   # the spare core back
                t_wait = time.time()
                if helper is not None:
                    helper.wait()
                torch.set_num_threads(threads)
                log(f"step {REFEREE_CORE_STEPS:,}: {threads} threads again (the referee "
                    f"{'was trained beside' if helper is not None else 'is saved'}; waited for it "
                    f"{time.time() - t_wait:.0f} s)")
            if ctrl_c.requested:
                how = "interrupted"
                break
            if args.minutes and time.time() - t0 >= args.minutes * 60:
                how = "capped"
                break
            step = state["step"]
            pending.append((step, *run_step(state, args, images, labels, bf16)))
            now = time.time()
            state["seconds"] = seconds0 + now - t0
            if args.progress_every and now - t_picture >= args.progress_every * 60:
                progress_picture()
                log(f"step {state['step']:,}: digits drawn and a number read, in {args.out}/progress.png")
                t_picture = time.time()
            if now - t_log >= args.log_every or state["step"] == args.steps:
                flush()
                rate = (state["step"] - start_step) / max(now - t0, 1e-9)
                k = min(20, len(state["hist"]["lm"]))
                log(f"step {state['step']:6,d}/{args.steps:,} | lm {sum(state['hist']['lm'][-k:]) / k:.4f} "
                    f"| ddpm {sum(state['hist']['ddpm'][-k:]) / k:.4f} | {rate:.2f} steps/s "
                    f"| ETA {(args.steps - state['step']) / rate / 60:.1f} min")
                t_log = now
            if now - t_save >= args.ckpt_every * 60:
                flush()
                save_atomic(checkpoint(state, args, finished=False), path)
                t_save = now
    torch.set_num_threads(threads)
    flush()
    save_atomic(checkpoint(state, args, finished=how == "done"), path)
    done = state["step"] - start_step
    log(f"trained {done:,} steps this run ({state['step']:,} of {args.steps:,}) in {(time.time() - t0) / 60:.2f} min")
    state["ema"].sample_defaults = sample_defaults(args)
    return state, how


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------

def read_checkpoint(path, device="cpu"):
    """The checkpoint dict, checked: ValueError with one line if it is not one of ours."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a checkpoint of train_mnist.py (torch.load: {type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"config", "model", "format"} <= set(ckpt):
        raise ValueError(f"{path} is not a checkpoint of train_mnist.py (no config/model/format entries)")
    if ckpt["format"] != CKPT_FORMAT:
        raise ValueError(f"{path} was written by another version of train_mnist.py (checkpoint format "
                         f"{ckpt['format']}, this one reads {CKPT_FORMAT}): train it again")
    return ckpt


def build_model(ckpt, path="checkpoint") -> Transfusion:
    """The EMA model of a checkpoint, in eval mode; ValueError with one line if it cannot be built."""
    try:
        model = Transfusion(TransfusionConfig(**{**OLDER_RUNS, **ckpt["config"]}))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: its model cannot be built ({first})") from None
    model.sample_defaults = ckpt.get("sample_defaults", {})
    return model.eval()


def load_checkpoint(path, device="cpu") -> Transfusion:
    """A trained Transfusion from ckpt.pt (its EMA weights), in eval mode."""
    return build_model(read_checkpoint(path, device), path).to(device)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def flag_type(kind, lo=None, hi=None, lo_open=False):
    """An argparse type: a `kind` in [lo, hi] (or (lo, hi] if lo_open), else argparse's one-line error."""
    def parse(text):
        x = kind(text)
        if lo is not None and (x <= lo if lo_open else x < lo) or hi is not None and x > hi:
            bound = f"{'above' if lo_open else 'at least'} {lo}" + (f" and at most {hi}" if hi is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, not {text}")
        return x
    parse.__name__ = kind.__name__   # argparse names the type in its "invalid int value" message
    return parse


def build_parser():
    c = TransfusionConfig  # the model's defaults live in one place: its config
    count, share = flag_type(int, 1), flag_type(float, 0, 1)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip(), allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data-dir", default="./data")
    a("--dataset", choices=["mnist", "fashion"], default="mnist", help="fashion: Fashion-MNIST's ten classes")
    a("--out", default="out")
    a("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    a("--seed", type=int, default=0)
    a("--steps", type=count, default=8000, help="training steps: the run's length and its LR schedule")
    a("--minutes", type=flag_type(float, 0, lo_open=True), help="optional cap on training wall time (the schedule "
                                                              "stays that of --steps; the run can be resumed)")
    a("--resume", action="store_true", help="continue the run saved in <out>/ckpt.pt")
    a("--ckpt-every", type=flag_type(float, 0, lo_open=True), default=2.0, help="minutes between checkpoints")
    a("--log-every", type=flag_type(float, 0), default=10.0, help="seconds between progress lines")
    a("--progress-every", type=flag_type(float, 0), default=3.0,
      help="minutes between progress pictures (<out>/progress.png); 0: none")
    a("--fp32", action="store_true", help="no bf16 autocast: train and sample in fp32 (the default on a CPU "
                                          "without bf16 instructions; with AVX-512 BF16, AMX or a GPU, bf16 is)")
    a("--bf16", action="store_true", help="bf16 autocast on a CPU without bf16 instructions too (there "
                                          "oneDNN emulates them)")
    # data
    a("--batch-size", type=count, default=128, help="digits per step (in numbers of 1..--max-digits digits)")
    a("--max-digits", type=count, default=4, help="longest number in training")
    a("--caption-first", type=share, default=0.7,
      help="share of numbers written before their images (the paper, §4.1: 80%%; here 70%%, docs/layout.md); "
           "the rest are read, images first")
    a("--layout", choices=LAYOUTS, default="paired",
      help="paired: each image beside its own digit (after it when drawing, before it when reading); "
           "read-grouped: reading as the images, then the number; grouped: drawing as the number, then its "
           "images, too (docs/layout.md)")
    # model (TransfusionConfig)
    for k in ("d_model", "n_layers", "n_heads", "ffn_hidden", "unet_channels", "unet_downsample"):
        a("--" + k.replace("_", "-"), type=count, default=getattr(c, k))
    a("--patch-size", type=count, help=f"default: {c.patch_size} on pixels (4 patches a digit), "
                                       f"{LATENT[2]} on latents (4 too)")
    a("--patch-encoder", choices=["linear", "unet"], default=c.patch_encoder)
    a("--autoencoder", type=flag_type(int, 0), default=16, metavar="WIDTH",
      help="the model learns on the latent of a conv autoencoder this wide, trained first (§2.3, "
           "transfusion.ImageAutoencoder); 0: on pixels (docs/speed.md)")
    a("--autoencoder-steps", type=count, default=4000, help="the autoencoder's training steps (16 digits each)")
    a("--image-attention", choices=["bidirectional", "causal"], default="bidirectional",
      help="within an image (§3, Table 5)")
    a("--image-first-max-t", type=flag_type(int, 1, 1000), default=c.image_first_max_t,
      help="noise cap for images before their caption (§4.3.4); 1000 turns it off")
    a("--lam", type=flag_type(float, 0), default=c.lam, help="lambda of Eq. 4 (paper: 5)")
    a("--min-snr-gamma", type=flag_type(float, 0), default=c.min_snr_gamma,
      help="0: the paper's plain diffusion MSE (Eq. 3); > 0: min-SNR-gamma weights over t, not the "
           "paper's (docs/speed.md)")
    a("--clean-t", type=flag_type(int, 1, 1000), help=f"the timestep a clean image is shown at (default: the "
                                                   f"checkpoint's, or {c.clean_t})")
    # optimisation
    a("--lr", type=flag_type(float, 0, lo_open=True), default=2.8e-3,
      help="peak learning rate (2e-3 x sqrt 2 for 128 digits a step: docs/speed.md)")
    a("--warmup", type=flag_type(int, 0), default=100)
    a("--lr-schedule", choices=["cosine", "linear"], default="cosine",
      help="after the warm-up: cosine decay to LR/20 (§4.1), or linear to 0 (not the paper's: docs/speed.md)")
    a("--ema", type=flag_type(float, 0, 0.999999), default=0.9995, help="EMA decay of the sampling weights")
    # sampling and evaluation
    a("--cfg-scale", type=flag_type(float, 0), default=SAMPLING["cfg_scale"], help="classifier-free guidance scale")
    a("--sampler", choices=["ddpm", "ddim"], default=SAMPLING["sampler"])
    a("--sample-steps", type=flag_type(int, 1, 1000), default=SAMPLING["steps"])
    a("--eval-only", action="store_true", help="no training: evaluate <out>/ckpt.pt")
    a("--draw", metavar="NUMBER", help="no training: draw NUMBER with <out>/ckpt.pt and save a picture")
    a("--gif", action="store_true", help="with --draw: also save the decoding loop as <out>/draw_NUMBER.gif")
    a("--cfg-sweep", metavar="S1,S2,...", help="with --eval-only: label->image and Frechet distance at each "
                                                 "guidance scale, and cfg_sweep.png")
    a("--eval-per-label", type=flag_type(int, 0), default=100, help="generated digits per label for the metrics")
    a("--eval-captions", type=flag_type(int, 0), default=10000, help="test digits to caption")
    a("--eval-numbers", type=flag_type(int, 0), default=500, help="4-digit numbers to draw")
    a("--eval-reading", type=flag_type(int, 0), default=2000, help="handwritten 4-digit test numbers to read")
    a("--referee-epochs", type=count, default=3)
    return p


def check_args(p, args):
    """The checks that involve several flags or a device: one argparse-style error line each."""
    if args.cfg_sweep is not None:
        try:
            assert all(float(x) >= 0 for x in args.cfg_sweep.split(","))
        except (ValueError, AssertionError):
            p.error(f"--cfg-sweep takes guidance scales >= 0 separated by commas, e.g. 1,1.5,2,3,5, "
                    f"not {args.cfg_sweep!r}")
        if not args.eval_only or args.eval_per_label < 1:
            p.error("--cfg-sweep goes with --eval-only and --eval-per-label of at least 1")
    if args.draw is not None and not (args.draw.isascii() and args.draw.isdigit()):
        p.error(f"--draw takes a number written with the digits 0-9, not {args.draw!r}")
    if args.gif and args.draw is None:
        p.error("--gif goes with --draw NUMBER")
    if args.bf16 and args.fp32:
        p.error("--bf16 and --fp32 ask for opposite things: give one")
    if args.device != "auto":
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            p.error(f"--device {args.device!r} is not a device torch knows (cpu, cuda, cuda:1, mps, ...)")
        if dev.type == "cuda" and not torch.cuda.is_available():
            p.error(f"--device {args.device}: no CUDA GPU is available here (try --device cpu)")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            p.error(f"--device {args.device}: MPS is not available here (try --device cpu)")
        if dev.type not in ("cpu", "cuda", "mps"):
            p.error(f"--device {args.device}: only cpu, cuda and mps are supported")
    try:
        model_config(args)
    except ValueError as e:  # the config's message, in the flags' names
        p.error(" ".join("--" + w.replace("_", "-") if w in MODEL_FLAGS else w for w in str(e).split(" ")))


def given_flags(parser, argv):
    """The dests of the flags written on the command line (not left at their defaults)."""
    return {action.dest for action in parser._actions for s in action.option_strings
            if any(tok == s or tok.startswith(s + "=") for tok in argv)}


def parse_args(argv=None):
    p = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    check_args(p, args)
    if args.patch_size is None:   # the image kind's default, resolved: a checkpoint records what was trained
        args.patch_size = model_config(args).patch_size
    args.given = given_flags(p, argv)
    args.parser = p
    return args


def resume_args(args, ckpt):
    """The run's settings from its checkpoint; a differing flag on the command line is an error."""
    saved = {**OLDER_RUN_FLAGS, **ckpt["run"]}
    run = {k: saved.get(k, args.parser.get_default(k)) for k in RUN_FLAGS}  # older runs lack newer flags
    if run["clean_t"] is None:   # not given: the t its model was built with (the default has changed)
        run["clean_t"] = ckpt["config"].get("clean_t")
    for k in RUN_FLAGS:
        if k in args.given and getattr(args, k) != run[k]:
            args.parser.error(f"--{k.replace('_', '-')} {getattr(args, k)} differs from the run being resumed "
                              f"({run[k]}): a resumed run keeps its settings (or start a new one with "
                              f"another --out)")
    for k in RUN_FLAGS:
        setattr(args, k, run[k])
    return args


def draw_main(args, model):
    """--draw NUMBER [--gif]: the images the model draws for NUMBER, as a picture (and the loop as a GIF)."""
    names = FASHION if getattr(args, "dataset", "mnist") == "fashion" else None
    path = os.path.join(args.out, f"draw_{args.draw}")
    t0 = time.time()
    if args.gif:
        imgs, seq = mnist_eval.decoding_gif(model, args.draw, path + ".gif", names=names)
    else:
        imgs, seq = draw_numbers(model, [args.draw])[0]
    mnist_eval.save_figure(mnist_eval.numbers_figure([(args.draw, imgs)], names=names), path + ".png")
    print(f"drew {len(imgs)} image{'s' * (len(imgs) != 1)} for {args.draw} in {time.time() - t0:.1f} s: "
          f"{path}.png" + (f" and {path}.gif" if args.gif else ""))
    return 0


def main(argv=None, log=print):
    args = parse_args(argv)
    path = os.path.join(args.out, "ckpt.pt")
    try:
        if args.eval_only or args.draw is not None:
            if not os.path.exists(path):
                raise ValueError(f"{path} does not exist: train a model first (or give --out)")
            ckpt = read_checkpoint(path)
            model = build_model(ckpt, path).to(pick_device(args.device))
            for k in ("cfg_scale", "sampler", "sample_steps"):
                if k in args.given:
                    model.sample_defaults[k.replace("sample_", "")] = getattr(args, k)
            if args.clean_t is not None:
                model.cfg.clean_t = args.clean_t
            if args.draw is not None:
                return draw_main(args, model)
            with eval_precision(model.device, use_bf16(model.device, args.fp32, args.bf16)):
                args.dataset = ckpt["run"].get("dataset", "mnist")
                if args.cfg_sweep:
                    mnist_eval.cfg_sweep(model, args, [float(s) for s in args.cfg_sweep.split(",")], log=log)
                    return 0
                tr = ckpt.get("train", {})
                mnist_eval.report(model, args, dict(hist=tr.get("hist"), seconds=tr.get("seconds", 0),
                                                    step=tr.get("step", 0)), log=log)
                return 0
        state = None
        if args.resume:
            if not os.path.exists(path):
                raise ValueError(f"--resume: there is no checkpoint at {path}")
            ckpt = read_checkpoint(path)
            if ckpt.get("finished"):
                raise ValueError(f"{path} is a finished run ({ckpt['train']['step']:,} steps): nothing to "
                                 f"resume; evaluate it with --eval-only")
            args = resume_args(args, ckpt)
            build_model(ckpt, path)   # its config must build, before anything is touched
            state = restore_state(ckpt, args, pick_device(args.device))
        else:
            refuse_to_overwrite(path)
        load_digits(args.data_dir, train=True, dataset=args.dataset)   # fail early, with directions
        load_digits(args.data_dir, train=False, dataset=args.dataset)
        referee = mnist_eval.referee_helper(args)   # trained beside the model, on a core of its own
        state, how = train(args, state, log=log, spare_a_core=True, helper=referee)
    except (MissingData, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nstopped at once; the last checkpoint written is kept ({path})", file=sys.stderr)
        return 130
    if how == "interrupted":
        log(f"saved {path} at step {state['step']:,} of {args.steps:,}. Continue with:\n"
            f"    python train_mnist.py --out {args.out} --data-dir {args.data_dir} --resume")
        return 130
    if how == "capped":
        log(f"--minutes {args.minutes:g} reached at step {state['step']:,} of {args.steps:,}: evaluating the model "
            f"as it stands (continue with --resume)")
    try:
        device = state["ema"].device
        with eval_precision(device, use_bf16(device, args.fp32, args.bf16)):
            mnist_eval.report(state["ema"], args, state, log=log, referee_helper=referee)
    except KeyboardInterrupt:
        print(f"\nevaluation stopped; the trained model is saved ({path}): evaluate it with --eval-only",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
