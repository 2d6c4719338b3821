"""The paper's ablations (§4.3) at MNIST scale: one row, one command.

Each row is `train_mnist.py` at BASE (below: the setting the README's table was measured at)
with one switch changed, trained from scratch for each seed into
<root>/<row>_s<seed>/ and evaluated with a lighter protocol than the default run's (LIGHT below:
500 generated digits instead of 1,000, 100 numbers drawn instead of 500, 500 read instead of 2,000;
all 10,000 captions), the same for every row. A finished run (its results.json exists) is not run
again, so a sweep can be stopped and restarted.

    python ablations.py --data-dir ../shared/data --rows linear linear-causal --seeds 0 1
    python ablations.py --table [--per-seed]     # the figures so far: mean (min-max) over seeds
    python ablations.py --denoise-loss --data-dir ../shared/data   # held-out noise-prediction loss by t,
                                                  # and how much lower the caption makes it
    python ablations.py --uncond --data-dir ../shared/data [--runs linear4_s0 ...]   # digits drawn
                                                  # with no caption at all: Frechet distance

--steps gives every row of one call a shorter common budget (say so beside the figures).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

# The setting the ablation table was measured at: 7x7 patches (16 per image), numbers read as
# BOS <img> <img> ; 2 0 EOS, 80% caption first (§4.1), the U-Net at full resolution, fp32 (the
# default on a CPU with bf16 instructions is bf16), 64 digits a step at LR 2e-3 on pixels, clean
# images shown at t = 50, guidance 1.75. Every row starts from it, so that each row reruns its
# figures; the default run differs (a latent's 4 patches, each image read beside its digit, 70%
# caption first, 128 digits a step, t = 200, guidance 2: docs/layout.md, docs/defaults.md).
BASE = ["--patch-size", "7", "--layout", "read-grouped", "--caption-first", "0.8", "--unet-downsample", "1",
        "--fp32", "--autoencoder", "0", "--batch-size", "64", "--lr", "2e-3", "--clean-t", "50",
        "--cfg-scale", "1.75"]
# row -> the flags that differ from BASE (README, "The paper's ablations")
ROWS = {
    "default": [],
    "causal": ["--image-attention", "causal"],                                    # Table 5, U-Net
    "linear": ["--patch-encoder", "linear"],                                      # Table 5/6, linear
    "linear-causal": ["--patch-encoder", "linear", "--image-attention", "causal"],  # Table 5, linear
    # Table 5 again with four layers, the depth at which linear patches begin to draw digits
    "linear4": ["--patch-encoder", "linear", "--n-layers", "4"],
    "linear4-causal": ["--patch-encoder", "linear", "--n-layers", "4", "--image-attention", "causal"],
    "p4": ["--patch-size", "4"],                                                  # Table 6, 49 patches
    "p4-linear": ["--patch-size", "4", "--patch-encoder", "linear"],
    "cap-off": ["--image-first-max-t", "1000"],                                   # Table 8
    "lam1": ["--lam", "1"],                                                       # §4.1: λ = 5
    "lam20": ["--lam", "20"],
}
LIGHT = ["--eval-per-label", "50", "--eval-numbers", "100", "--eval-reading", "500"]
METRICS = [("caption_acc", "caption", 100, "{:.2f}"), ("gen_acc", "label→image", 100, "{:.1f}"),
           ("fd", "Fréchet", 1, "{:.1f}"), ("draw_exact", "drawn exactly", 100, "{:.1f}"),
           ("read_exact", "read exactly", 100, "{:.1f}")]


def run(row, seed, args):
    out = os.path.join(args.root, f"{row}_s{seed}" + (f"_{args.steps}" if args.steps else ""))
    if os.path.exists(os.path.join(out, "results.json")):
        print(f"{out}: done before, skipped")
        return
    os.makedirs(out, exist_ok=True)
    shared = os.path.join(args.root, "referee.pt")          # one referee for every row: same judge, 1 min saved
    if os.path.exists(shared):
        shutil.copy(shared, os.path.join(out, "referee.pt"))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_mnist.py")
    cmd = [sys.executable, script, "--data-dir", args.data_dir, "--out", out, "--seed", str(seed),
           *(["--steps", str(args.steps)] if args.steps else []), *BASE, *ROWS[row], *LIGHT]
    print(" ".join(cmd[1:]), flush=True)
    with open(os.path.join(out, "log.txt"), "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"{out}: train_mnist.py exited with {rc}; see {out}/log.txt")
    if not os.path.exists(shared):
        shutil.copy(os.path.join(out, "referee.pt"), shared)


def table(root, per_seed=False):
    """A markdown table of every finished run under root: one line per row and budget (per_seed:
    one line per run)."""
    groups = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                r = json.load(f)
            row = name if per_seed else name.rsplit("_s", 1)[0]     # "<row>_s<seed>[_<steps>]"
            groups.setdefault((row, r["steps"]), []).append(r)
    lines = ["| row | steps | seeds | " + " | ".join(m[1] for m in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for (row, steps), runs in groups.items():
        cells = []
        for key, _, scale, fmt in METRICS:
            v = [r[key] * scale for r in runs if key in r]
            mean = fmt.format(sum(v) / len(v)) if v else "–"
            cells.append(f"{mean} ({fmt.format(min(v))}-{fmt.format(max(v))})" if len(v) > 1 else mean)
        lines.append(f"| {row} | {steps:,} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


DENOISE_T = (20, 100, 250, 500, 750, 950)


def denoise_loss(ckpt, data_dir, n=1000, ts=DENOISE_T):
    """What every model is trained to do, measured held out: the noise-prediction MSE (Eq. 3)
    on the first n MNIST test digits, each after its caption (`BOS d ; d <img> EOS`), at fixed
    noise levels t, with the same noise for every model. It asks how well the denoiser uses the
    image (what the attention mask changes), without a sampler or a referee in between.
    Returns (with_caption, without_caption), a loss per t each: the second scores the same noisy
    images in guidance's caption-free context (BOS BOI x_t), so the pair says how much the model
    leans on the digit it was asked for."""
    import torch
    import train_mnist as tm
    from transfusion import add_noise, unconditional_eps
    model = tm.load_checkpoint(ckpt)
    u8, labels = tm.load_digits(data_dir, train=False)
    x0, labels = model.encode_images(tm.to_model_range(u8[:n])), labels[:n]   # (n, C, I, I), (n,)
    gen = torch.Generator().manual_seed(0)
    cond, uncond = [], []
    for t in ts:
        eps = torch.randn(x0.shape, generator=gen)
        xt = add_noise(x0, torch.full((n,), t), eps, model.alpha_bar)   # (n, C, I, I)
        # the training layout of a one-digit number, its image shown at this t
        rows = [model.with_markers(tm.number_sequence(xt[i:i + 1], labels[i:i + 1], caption_first=True), t_clean=t)
                for i in range(n)]
        with torch.no_grad():
            eps_c = torch.cat([model(model.collate(rows[i:i + 250]))[1] for i in range(0, n, 250)])   # (n, 1, 28, 28)
            eps_u = torch.cat([unconditional_eps(model, xt[i:i + 250], t) for i in range(0, n, 250)])  # (n, 1, 28, 28)
        cond.append(float((eps_c - eps).pow(2).mean()))
        uncond.append(float((eps_u - eps).pow(2).mean()))
    return cond, uncond


# --uncond: digits per run and DDPM steps (the default run's sampler); main reads them at call
# time, so a test can make them small
UNCOND_N, UNCOND_STEPS = 500, 100


def unconditional_fd(ckpt, referee, data_dir, n=UNCOND_N, steps=UNCOND_STEPS):
    """Draw n digits with no caption at all: the sampler (DDPM, `steps` of the 1,000) run on the
    caption-free context alone, BOS BOI x_t, the prediction that guidance subtracts (§2.2).
    Without a digit to follow, the image must come from the denoiser's reading of the image
    itself, which is what the mask of Table 5 changes. Returns (Frechet distance of the n
    digits to the MNIST test set, by `referee`'s features; the referee's class counts; the
    digits (n, 1, 28, 28) in [0, 1])."""
    import torch
    import mnist_eval as me
    import train_mnist as tm
    from transfusion import ddpm_step, sampling_timesteps, unconditional_eps
    model = tm.load_checkpoint(ckpt)
    u8, _ = tm.load_digits(data_dir, train=False)
    gen = torch.Generator().manual_seed(0)                               # the same noise for every model
    cfg = model.cfg
    x = torch.randn(n, cfg.channels, cfg.image_size, cfg.image_size, generator=gen)   # x_T, (n, C, I, I)
    with torch.no_grad():
        for t, t_prev in sampling_timesteps(cfg.T, steps):
            eps = torch.cat([unconditional_eps(model, x[i:i + 250], t) for i in range(0, n, 250)])
            x = ddpm_step(x, eps, t, t_prev, model.alpha_bar, torch.randn(x.shape, generator=gen),
                          model.x0_range)                                # x_{t_prev}
    digits = (model.decode_images(x) + 1) / 2                            # (n, 1, 28, 28) in [0, 1]
    fd = me.frechet_distance(me.batched(referee.features, digits),
                             me.batched(referee.features, u8.float().div(255).unsqueeze(1)))
    return fd, torch.bincount(me.batched(referee, digits).argmax(1), minlength=10).tolist(), digits


def finished_runs(args):
    """The run folders under args.root that finished (results.json), or those of --runs; a name
    in --runs that did not finish ends the command, before any model is loaded."""
    names = sorted(n for n in os.listdir(args.root) if os.path.exists(os.path.join(args.root, n, "results.json")))
    missing = [r for r in args.runs or [] if r not in names]
    if missing:
        sys.exit(f"no finished run {', '.join(missing)} under {args.root}")
    return [n for n in names if not args.runs or n in args.runs]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=[])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=None, help="a common budget for every row of this call")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--root", default="ablations", help="one folder per run, under this one")
    p.add_argument("--table", action="store_true", help="print the table of the finished runs")
    p.add_argument("--per-seed", action="store_true", help="with --table: one line per run")
    p.add_argument("--denoise-loss", action="store_true",
                   help="print each finished run's held-out noise-prediction loss at fixed t, "
                        "and how much lower the caption makes it")
    p.add_argument("--uncond", action="store_true",
                   help="print the Frechet distance of 500 digits each finished run draws with no caption "
                        "(and save 40 of them: <run>/uncond.png)")
    p.add_argument("--runs", nargs="+", metavar="RUN", help="with --denoise-loss or --uncond: only these run "
                                                             "folders, e.g. linear4_s0 (default: every finished run)")
    args = p.parse_args(argv)
    if args.runs and not (args.denoise_loss or args.uncond):
        p.error("--runs goes with --denoise-loss or --uncond")
    if (args.table or args.denoise_loss or args.uncond) and not os.path.isdir(args.root):
        sys.exit(f"no runs under {args.root}")
    if args.denoise_loss:   # per run: the loss after the caption, then how much lower it is than without
        head = " | ".join(f"t = {t}" for t in DENOISE_T)
        print(f"| run | {head} | caption's gain: {head} |\n|---|" + "---|" * 2 * len(DENOISE_T))
        for name in finished_runs(args):
            cond, uncond = denoise_loss(os.path.join(args.root, name, "ckpt.pt"), args.data_dir)
            gain = [round(100 * (1 - c / u), 1) + 0.0 for c, u in zip(cond, uncond)]   # + 0.0: no "-0.0"
            print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in cond) + " | "
                  + " | ".join(f"{g:.1f}%" for g in gain) + " |", flush=True)
    if args.uncond:   # per run: digits drawn from BOS BOI alone, judged by the sweep's one referee
        import torch
        import mnist_eval as me
        names = finished_runs(args)
        referee = me.Referee()
        referee.load_state_dict(torch.load(os.path.join(args.root, "referee.pt"), weights_only=True))
        referee.eval()
        print("| run | Fréchet, no caption | referee's classes 0-9 |\n|---|---|---|")
        for name in names:
            fd, counts, digits = unconditional_fd(os.path.join(args.root, name, "ckpt.pt"), referee, args.data_dir,
                                                  UNCOND_N, UNCOND_STEPS)
            me.save_figure(me.grid_figure(digits[:40], 10, title=f"{name}: no caption, Fréchet {fd:.1f}"),
                           os.path.join(args.root, name, "uncond.png"))   # the first 40 of the 500
            print(f"| {name} | {fd:.1f} | {' '.join(map(str, counts))} |", flush=True)
    for row in args.rows:
        for seed in args.seeds:
            run(row, seed, args)
    if args.table or args.rows:
        print(table(args.root, args.per_seed))


if __name__ == "__main__":
    main()
