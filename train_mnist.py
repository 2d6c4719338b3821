"""
Train Transfusion on MNIST: one model that writes a digit's label and draws a digit
from its label, in minutes on a laptop CPU.

    python train_mnist.py                        # downloads MNIST to ./data, trains 10 min
    python train_mnist.py --data-dir ../data --minutes 3 --out out3

Sequences use the model's segment format (transfusion.py, section 6):
    caption first (80%, §4.1 "Data"):   BOS "7" BOI <image> EOI EOS
    image first   (20%, noise t <= 500, §4.3.4):   BOS BOI <image> EOI "7" EOS
With --max-images K, sequences of up to K digits: BOS 3 <img> 1 <img> EOS, so the
model also learns when to open another image and when to stop.

Outputs in --out: ckpt.pt, samples.png, captions.png, denoise.png, loss.png,
mask.png, referee.pt; and at the end the metrics (caption accuracy, label->image
accuracy and Frechet distance judged by a small CNN referee).

Importable without side effects:
    from train_mnist import load_checkpoint, generate_digits, caption_digits
"""
import argparse
import copy
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from transfusion import Transfusion, TransfusionConfig, transfusion_mask

# vocabulary: the ten digits are their own ids, then the special tokens
VOCAB = [str(d) for d in range(10)] + ["<pad>", "<bos>", "<boi>", "<eoi>", "<eos>"]
PAD, BOS, BOI, EOI, EOS = 10, 11, 12, 13, 14

# the default run, tuned on a 2-core CPU (README, "Results")
DEFAULTS = dict(d_model=128, n_layers=2, n_heads=4, ffn_hidden=344, patch_size=7,
                patch_encoder="unet", unet_channels=16, batch_size=64, lr=2e-3,
                warmup=100, ema=0.9995, lam=5.0, cfg_scale=1.75, sampler="ddpm", sample_steps=100)


def mnist_config(**overrides) -> TransfusionConfig:
    """The model config for 28x28 digits with the vocabulary above."""
    base = dict(vocab_size=len(VOCAB), pad_id=PAD, bos_id=BOS, boi_id=BOI, eoi_id=EOI, eos_id=EOS,
                image_size=28, channels=1, max_seq_len=64)
    base.update(overrides)
    return TransfusionConfig(**base)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

class MissingData(Exception):
    pass


def load_mnist(data_dir: str, train: bool, download: bool = True):
    """MNIST as uint8 images (N, 28, 28) and int64 labels (N,), via torchvision."""
    try:
        from torchvision.datasets import MNIST
    except ImportError as e:
        raise MissingData("torchvision is needed to read MNIST: pip install -r requirements.txt") from e
    try:
        ds = MNIST(data_dir, train=train, download=download)
    except Exception as e:  # no network, bad files, ...
        raise MissingData(
            f"could not load MNIST from {os.path.abspath(data_dir)} ({type(e).__name__}: {e}).\n"
            f"Put the four files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (optionally .gz) in "
            f"{os.path.join(os.path.abspath(data_dir), 'MNIST', 'raw')} and run again.") from e
    return ds.data, ds.targets


def to_model_range(images_u8):
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [-1, 1], the diffusion data range."""
    return images_u8.float().div(127.5).sub(1).unsqueeze(1)


def make_sequences(images, labels, gen, max_images: int = 1, p_caption_first: float = 0.8):
    """Digits (N, 1, 28, 28) in [-1, 1] and labels (N,) -> N // k training sequences.
    Caption first 80% of the time (§4.1 "Data"), otherwise image first."""
    seqs, i, n = [], 0, len(labels)
    while i < n:
        k = 1 if max_images == 1 else int(torch.randint(1, max_images + 1, (), generator=gen))
        k = min(k, n - i)
        caption_first = float(torch.rand((), generator=gen)) < p_caption_first
        seq = [torch.tensor([BOS])]
        for j in range(i, i + k):
            label = labels[j:j + 1]
            seq += [label, images[j]] if caption_first else [images[j], label]
        seq.append(torch.tensor([EOS]))
        # merge neighbouring text pieces: [BOS] [7] -> [BOS, 7]
        merged = []
        for seg in seq:
            if merged and not seg.is_floating_point() and not merged[-1].is_floating_point():
                merged[-1] = torch.cat([merged[-1], seg])
            else:
                merged.append(seg)
        seqs.append(merged)
        i += k
    return seqs


# ---------------------------------------------------------------------------
# Optimisation (§4.1 "Optimization")
# ---------------------------------------------------------------------------

def configure_optimizer(model, lr: float, weight_decay: float = 0.1):
    """AdamW(0.9, 0.95, eps 1e-8) as §4.1; weight decay on matrices only (as nanoGPT/Llama)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type in ("cpu", "cuda")  # one kernel for the whole update: ~5% faster steps here
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def lr_at(progress: float, step: int, lr: float, warmup: int, min_ratio: float = 0.05):
    """Linear warmup, then cosine decay to lr/20 (the paper: 3e-4 -> 1.5e-5)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def model_config(args) -> TransfusionConfig:
    """The model config that the command-line flags ask for."""
    return mnist_config(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                        ffn_hidden=args.ffn_hidden, patch_size=args.patch_size,
                        patch_encoder=args.patch_encoder, unet_channels=args.unet_channels, lam=args.lam,
                        **({} if args.clean_t is None else dict(clean_t=args.clean_t)))


def use_bf16(device: torch.device, fp32: bool = False) -> bool:
    """bf16 autocast on a GPU that has it (unless --fp32); fp32 on a CPU, where bf16 was
    no faster (README, "Speed")."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported() and not fp32


def train_step(model, opt, ema_params, model_params, seqs, gen, ema_decay: float, bf16: bool):
    """One optimisation step (§4.1): L = L_LM + lambda L_DDPM, backward, clip the gradient
    norm at 1.0, AdamW; then the EMA of the weights. Returns (lm, ddpm) as tensors (no sync)."""
    with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, lm, ddpm = model.loss(seqs, generator=gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():  # ema += (1 - decay) * (model - ema): one foreach call for all tensors
        torch._foreach_lerp_(ema_params, model_params, 1 - ema_decay)
    return lm.detach(), ddpm.detach()


def train(args, log=print):
    """Train on MNIST for --minutes of wall time (or exactly --steps steps).
    Returns the EMA model and the loss history."""
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images_u8, labels = load_mnist(args.data_dir, train=True)
    images = to_model_range(images_u8)
    cfg = model_config(args)
    model = Transfusion(cfg).to(device)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    opt = configure_optimizer(model, args.lr)
    bf16 = use_bf16(device, args.fp32)
    log(f"device {device}{' (bf16 autocast)' if bf16 else ''}, {model.num_params() / 1e6:.2f}M parameters, "
        f"{cfg.patch_encoder} patches {cfg.patch_size}x{cfg.patch_size} ({cfg.n_patches} per image), "
        f"{len(labels)} training digits")
    budget = args.minutes * 60
    hist = {"step": [], "lm": [], "ddpm": []}
    pending = []  # losses as tensors: read them only when printing (no sync every step)
    order = torch.randperm(len(labels), generator=gen)
    cursor, step, t_start, t_log = 0, 0, time.time(), time.time()
    while True:
        elapsed = time.time() - t_start
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(progress, step, args.lr, args.warmup)
        n = args.batch_size * args.max_images
        if cursor + n > len(labels):
            order, cursor = torch.randperm(len(labels), generator=gen), 0
        idx = order[cursor:cursor + n]
        cursor += n
        seqs = make_sequences(images[idx], labels[idx], gen, args.max_images)
        # the EMA of the weights is what samples; its decay warms up so that a short run's
        # average does not keep the random initial weights. The warm-up term 1 - 9/(10 + step)
        # stays below the default --ema 0.9995 until step 17,990 (0.999: 8,990), so a 10-minute
        # CPU run (~9,600 steps) never reaches it: it averages over about its last ninth
        # (README, Stage 4)
        decay = min(args.ema, (1 + step) / (10 + step))
        lm, ddpm = train_step(model, opt, ema_params, model_params, seqs, gen, decay, bf16)
        pending.append((step, lm, ddpm))
        step += 1
        now = time.time()
        if now - t_log >= args.log_every or (args.steps and step == args.steps):
            for s, a, b in pending:
                hist["step"].append(s)
                hist["lm"].append(float(a))
                hist["ddpm"].append(float(b))
            pending = []
            rate = step / (now - t_start)
            left = (args.steps - step) / rate if args.steps else budget - (now - t_start)
            k = min(20, len(hist["lm"]))
            log(f"step {step:5d} | lm {sum(hist['lm'][-k:]) / k:.4f} | ddpm {sum(hist['ddpm'][-k:]) / k:.4f} "
                f"| {rate:.2f} steps/s | {max(left, 0) / 60:.1f} min left")
            t_log = now
    for s, a, b in pending:
        hist["step"].append(s)
        hist["lm"].append(float(a))
        hist["ddpm"].append(float(b))
    log(f"trained {step} steps ({step * args.batch_size} sequences) in {(time.time() - t_start) / 60:.2f} min")
    ema.sample_defaults = dict(steps=args.sample_steps, cfg_scale=args.cfg_scale, sampler=args.sampler)
    return ema, hist


# ---------------------------------------------------------------------------
# Using a trained model (importable)
# ---------------------------------------------------------------------------

# 2: the U-Net's GroupNorm has one group. A format-1 U-Net checkpoint (eight groups) has the
# same tensor shapes, so it would load without error and then compute something else.
CKPT_FORMAT = 2


def save_checkpoint(model, path):
    torch.save({"config": model.cfg.__dict__, "model": model.state_dict(), "vocab": VOCAB,
                "sample_defaults": getattr(model, "sample_defaults", {}), "format": CKPT_FORMAT}, path)


def load_checkpoint(path, device="cpu") -> Transfusion:
    """A trained Transfusion from ckpt.pt, in eval mode."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if ckpt["config"].get("patch_encoder") == "unet" and ckpt.get("format", 1) != CKPT_FORMAT:
        raise ValueError(f"{path} was trained by an earlier version of this code (its U-Net's GroupNorm had "
                         f"8 groups, now 1): train it again")
    model = Transfusion(TransfusionConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.sample_defaults = ckpt.get("sample_defaults", {})
    return model.to(device).eval()


def _sampling(model, steps, cfg_scale, sampler):
    d = {**dict(steps=DEFAULTS["sample_steps"], cfg_scale=DEFAULTS["cfg_scale"], sampler=DEFAULTS["sampler"]),
         **getattr(model, "sample_defaults", {})}
    return dict(steps=steps or d["steps"], cfg_scale=d["cfg_scale"] if cfg_scale is None else cfg_scale,
                sampler=sampler or d["sampler"])


@torch.no_grad()
def generate_digits(model, labels, *, steps=None, cfg_scale=None, sampler=None, batch_size=250,
                    seed=0, on_step=None, use_cache=True):
    """Draw one digit per label (N,): the prompt is BOS "d" and the model opens the image
    itself (Transfusion.generate). Returns (N, 1, 28, 28) in [0, 1]; a digit the model
    did not draw comes back blank (and counts as wrong for the referee)."""
    kw = _sampling(model, steps, cfg_scale, sampler)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels).long().flatten()
    out = torch.zeros(len(labels), 1, 28, 28)
    for i in range(0, len(labels), batch_size):
        prompts = [[torch.tensor([BOS, int(d)])] for d in labels[i:i + batch_size]]
        seqs = model.generate(prompts, max_new_tokens=3, generator=gen, on_step=on_step, use_cache=use_cache, **kw)
        for j, seq in enumerate(seqs):
            imgs = [s for s in seq if s.is_floating_point()]
            if imgs:
                out[i + j] = (imgs[0].float().cpu() + 1) / 2
    return out.clamp(0, 1)


@torch.no_grad()
def caption_digits(model, images, *, batch_size=500):
    """Label each image (N, 1, 28, 28) in [0, 1]: the prompt is BOS <image> and the model
    writes the caption (greedy, §4.1). Returns (N,) digits, -1 where it wrote no digit."""
    device = next(model.parameters()).device
    out = torch.full((len(images),), -1, dtype=torch.long)
    for i in range(0, len(images), batch_size):
        prompts = [[torch.tensor([BOS]), (x.float() * 2 - 1).to(device)] for x in images[i:i + batch_size]]
        for j, seq in enumerate(model.generate(prompts, max_new_tokens=1)):
            text = seq[-1] if not seq[-1].is_floating_point() else torch.tensor([])
            if len(seq) > 2 and len(text) and int(text[0]) < 10:
                out[i + j] = int(text[0])
    return out


# ---------------------------------------------------------------------------
# The referee: a small CNN that judges generated digits
# ---------------------------------------------------------------------------

class Referee(nn.Module):
    """A LeNet-style CNN (~99% MNIST test accuracy). Its 128-d penultimate layer gives
    the features of the Frechet distance (as Inception's pool layer does for FID)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def features(self, x):  # x in [0, 1], (N, 1, 28, 28)
        return self.fc(self.conv((x - 0.1307) / 0.3081))

    def forward(self, x):
        return self.head(self.features(x))


def train_referee(train_x, train_y, epochs=3, seed=0, log=print):
    """Adam with a cosine learning-rate decay: ~99% test accuracy in 3 epochs on a CPU."""
    torch.manual_seed(seed)
    net = Referee()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    n = len(train_y)
    total = epochs * math.ceil(n / 128)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / total)))
    for ep in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n, 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(net(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log(f"referee epoch {ep + 1}/{epochs} done")
    return net.eval()


@torch.no_grad()
def batched(fn, x, bs=1000):
    return torch.cat([fn(x[i:i + bs]) for i in range(0, len(x), bs)])


def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + Tr(Sa + Sb - 2 (Sa Sb)^1/2) between two feature sets (n, d)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    # Tr((Sa Sb)^1/2) = sum of sqrt of the eigenvalues of Sa^1/2 Sb Sa^1/2 (symmetric PSD)
    ea, va = torch.linalg.eigh(sa)
    sqrt_a = va @ torch.diag(ea.clamp(min=0).sqrt()) @ va.T
    eig = torch.linalg.eigvalsh(sqrt_a @ sb @ sqrt_a).clamp(min=0)
    return float((mu_a - mu_b).pow(2).sum() + sa.trace() + sb.trace() - 2 * eig.sqrt().sum())


# ---------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------

def save_grid(images, path, nrow, titles=None, title=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(images)
    ncol = nrow
    nr = math.ceil(n / ncol)
    fig, axes = plt.subplots(nr, ncol, figsize=(max(ncol * 0.8, 2.5), nr * (0.95 if titles else 0.8)), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            if titles:
                ax.set_title(titles[k], fontsize=7, pad=2)
    fig.tight_layout(pad=0.2, rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()) if title else (0, 0, 1, 1))
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_loss_plot(hist, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    for a, key, name in ((ax[0], "lm", "LM loss (cross-entropy)"), (ax[1], "ddpm", "diffusion loss (MSE on eps)")):
        a.plot(hist["step"], hist[key], lw=0.5, alpha=0.4)
        k = max(1, len(hist[key]) // 50)
        smooth = [sum(hist[key][max(0, i - k):i + 1]) / len(hist[key][max(0, i - k):i + 1]) for i in range(len(hist[key]))]
        a.plot(hist["step"], smooth, lw=1.5)
        a.set_title(name, fontsize=9)
        a.set_xlabel("step")
        a.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_mask_plot(model, path):
    """Fig. 4 for one training sequence: the mask of BOS 3 BOI <img> EOI 1 BOI <img> EOI EOS,
    coloured by what attends to what."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    cfg = model.cfg
    img = torch.zeros(cfg.channels, cfg.image_size, cfg.image_size)
    seq = [torch.tensor([BOS, 3]), img, torch.tensor([1]), img, torch.tensor([EOS])]
    batch = model.collate([model.with_markers(seq)])
    mask = transfusion_mask(batch.img_id, batch.valid)[0]              # (S, S)
    is_img = batch.img_id[0] >= 0
    kind = torch.zeros_like(mask, dtype=torch.long)                    # 0: blocked
    kind[mask] = 1                                                     # 1: causal
    kind[mask & is_img[:, None] & is_img[None, :] & ~torch.ones_like(mask).tril()] = 2  # 2: bidirectional in-image
    names = [VOCAB[t] if not f else "" for t, f in zip(batch.tokens[0].tolist(), is_img.tolist())]
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(kind.numpy(), cmap=ListedColormap(["white", "#4C72B0", "#DD8452"]), vmin=0, vmax=2)
    ticks = [i for i, nm in enumerate(names) if nm]
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=7)
    ax.set_title("Transfusion attention (Fig. 4): blue causal, orange within-image bidirectional", fontsize=8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--out", default="out")
    p.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on a GPU: train in fp32, as on a CPU")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall time; the LR schedule follows it")
    p.add_argument("--steps", type=int, default=0, help="train exactly this many steps instead of --minutes")
    p.add_argument("--max-images", type=int, default=1, help="digits per sequence, up to K")
    p.add_argument("--log-every", type=float, default=5.0, help="seconds between progress lines")
    for k in ("d_model", "n_layers", "n_heads", "ffn_hidden", "patch_size", "unet_channels", "batch_size", "warmup"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=DEFAULTS[k])
    p.add_argument("--patch-encoder", choices=["linear", "unet"], default=DEFAULTS["patch_encoder"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--lam", type=float, default=DEFAULTS["lam"], help="lambda of Eq. 4 (paper: 5)")
    p.add_argument("--ema", type=float, default=DEFAULTS["ema"],
                   help="EMA decay of the weights used for sampling, once the warm-up (1+step)/(10+step) exceeds it")
    p.add_argument("--cfg-scale", type=float, default=DEFAULTS["cfg_scale"])
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default=DEFAULTS["sampler"])
    p.add_argument("--sample-steps", type=int, default=DEFAULTS["sample_steps"])
    p.add_argument("--eval-per-label", type=int, default=100, help="generated digits per label for the metrics")
    p.add_argument("--eval-captions", type=int, default=10000, help="test digits to caption")
    p.add_argument("--referee-epochs", type=int, default=3)
    p.add_argument("--clean-t", type=int, default=None,
                   help=f"the timestep a clean image is shown at (default: the checkpoint's, or "
                        f"TransfusionConfig.clean_t = {TransfusionConfig.clean_t} for a new model)")
    p.add_argument("--eval-only", action="store_true",
                   help="no training: evaluate <out>/ckpt.pt with the sampler flags and --clean-t given")
    p.add_argument("--caption-split", choices=["test", "train"], default="test",
                   help="with --eval-only --eval-per-label 0: caption random digits of this split")
    args = p.parse_args(argv)
    if args.eval_per_label < 1 and not args.eval_only:
        p.error("--eval-per-label must be at least 1 (0 only with --eval-only: captions alone)")
    return args


def evaluate(model, args, log=print):
    """The three metrics of the README, judged by the referee CNN."""
    test_u8, test_y = load_mnist(args.data_dir, train=False)
    test_x = test_u8.float().div(255).unsqueeze(1)                     # (N, 1, 28, 28) in [0, 1]
    t0 = time.time()
    ref_path = os.path.join(args.out, "referee.pt")
    if os.path.exists(ref_path):
        referee = Referee()
        referee.load_state_dict(torch.load(ref_path, weights_only=True))
        referee.eval()
        log(f"referee loaded from {ref_path}")
    else:
        train_u8, train_y = load_mnist(args.data_dir, train=True)
        referee = train_referee(train_u8.float().div(255).unsqueeze(1), train_y, args.referee_epochs, log=log)
        torch.save(referee.state_dict(), ref_path)
    ref_acc = float((batched(referee, test_x).argmax(1) == test_y).float().mean())
    log(f"referee test accuracy {ref_acc:.2%} ({time.time() - t0:.0f} s)")

    t0 = time.time()
    labels = torch.arange(10).repeat_interleave(args.eval_per_label)
    fake = generate_digits(model, labels)
    gen_acc = float((batched(referee, fake).argmax(1) == labels).float().mean())
    # Frechet distance on referee features: the generated digits against all 10,000 test
    # digits; the floor is as many real training digits (random, same labels) scored alike
    # (MNIST's files are not in random order: their first digits come from other writers)
    train_u8, train_y = load_mnist(args.data_dir, train=True)
    g = torch.Generator().manual_seed(0)
    real_idx = torch.cat([(train_y == d).nonzero().flatten()[torch.randperm(int((train_y == d).sum()), generator=g)]
                          [:args.eval_per_label] for d in range(10)])
    f_test = batched(referee.features, test_x)
    fd = frechet_distance(batched(referee.features, fake), f_test)
    fd_real = frechet_distance(batched(referee.features, train_u8[real_idx].float().div(255).unsqueeze(1)), f_test)
    log(f"label->image: {gen_acc:.2%} of {len(labels)} generated digits read as their label; "
        f"Frechet distance {fd:.1f} (real vs real: {fd_real:.1f}) ({time.time() - t0:.0f} s)")

    t0 = time.time()
    n = min(args.eval_captions, len(test_y))
    caps = caption_digits(model, test_x[:n])
    cap_acc = float((caps == test_y[:n]).float().mean())
    log(f"caption accuracy {cap_acc:.2%} on {n} test digits ({time.time() - t0:.0f} s)")
    return dict(referee_acc=ref_acc, gen_acc=gen_acc, fd=fd, fd_real=fd_real, caption_acc=cap_acc,
                fake=fake, test_x=test_x, caps=caps)


def eval_only(args):
    """Re-measure a trained checkpoint with other sampler settings or another clean_t (the
    README's tables). With --eval-per-label 0, only the caption accuracy, on --caption-split."""
    path = os.path.join(args.out, "ckpt.pt")
    if not os.path.exists(path):
        print(f"error: --eval-only needs a trained checkpoint at {path}", file=sys.stderr)
        return 1
    try:
        model = load_checkpoint(path)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model.sample_defaults = dict(steps=args.sample_steps, cfg_scale=args.cfg_scale, sampler=args.sampler)
    if args.clean_t is not None:
        model.cfg.clean_t = args.clean_t
    print(f"{path}: {args.sampler} {args.sample_steps} steps, CFG {args.cfg_scale}, "
          f"clean images at t = {model.cfg.clean_t}")
    if args.eval_per_label > 0:
        evaluate(model, args)
        return 0
    x_u8, y = load_mnist(args.data_dir, train=args.caption_split == "train")
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:args.eval_captions]
    caps = caption_digits(model, x_u8[idx].float().div(255).unsqueeze(1))
    print(f"caption accuracy {float((caps == y[idx]).float().mean()):.2%} on {len(idx)} random {args.caption_split} digits")
    return 0


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    try:
        load_mnist(args.data_dir, train=True)   # fail early, with directions, if the data is missing
        load_mnist(args.data_dir, train=False)
        if args.eval_only:
            return eval_only(args)
        model, hist = train(args)
    except MissingData as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    t_train = time.time() - t0
    save_checkpoint(model, os.path.join(args.out, "ckpt.pt"))
    t1 = time.time()
    m = evaluate(model, args)
    # pictures
    save_grid(m["fake"][torch.arange(10)[:, None] * args.eval_per_label + torch.arange(min(10, args.eval_per_label))].flatten(0, 1)
              if args.eval_per_label >= 10 else m["fake"], os.path.join(args.out, "samples.png"), nrow=10,
              title='row d: digits generated from the prompt "d"')
    k = min(20, len(m["caps"]))
    save_grid(m["test_x"][:k], os.path.join(args.out, "captions.png"), nrow=10,
              titles=[f'"{int(c)}"' if c >= 0 else "?" for c in m["caps"][:k]], title="test digits and the captions the model wrote")
    frames = []
    generate_digits(model, torch.tensor([7]), on_step=lambda t, x: frames.append(((x[:1].cpu() + 1) / 2).clamp(0, 1)))
    if frames:
        pick = sorted(set(int(round(i)) for i in torch.linspace(0, len(frames) - 1, min(10, len(frames))).tolist()))
        save_grid(torch.cat([frames[i] for i in pick]), os.path.join(args.out, "denoise.png"), nrow=len(pick),
                  title='denoising "7" from noise (left) to image (right)')
    else:  # an undertrained model may answer "7" without opening an image
        save_grid(torch.zeros(1, 1, 28, 28), os.path.join(args.out, "denoise.png"), nrow=1,
                  title='the model did not open an image after "7"')
    save_loss_plot(hist, os.path.join(args.out, "loss.png"))
    save_mask_plot(model, os.path.join(args.out, "mask.png"))
    print(f"\nresults ({args.out}): training {t_train / 60:.1f} min, evaluation and pictures {(time.time() - t1) / 60:.1f} min")
    print(f"  caption accuracy      {m['caption_acc']:.2%}  (MNIST test digits)")
    print(f"  label->image accuracy {m['gen_acc']:.2%}  (referee: {m['referee_acc']:.2%} test accuracy)")
    print(f"  Frechet distance      {m['fd']:.1f}  (real vs real {m['fd_real']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
