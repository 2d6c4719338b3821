"""
How fast the default MNIST run trains and samples on this machine, and how close training
runs to the machine's limit (nanoGPT's MFU). No MNIST needed: stand-in digits.

    python bench.py                       # CPU, about a minute on 2 cores
    python bench.py --device cuda         # GPU (bf16 autocast in training, as train_mnist.py)
    python bench.py --ckpt out/ckpt.pt    # sampling rows with a trained model
    python bench.py --flags=--fp32        # fp32 where bf16 is the default (AVX-512 BF16, AMX, a GPU)

It prints one table, every time a median of several runs after warm-up:
- the training step as train_mnist.py runs it (`train_mnist.run_step`: the next batch of
  numbers in the default's mix, the loss, backward, clipping, AdamW, the EMA), its model
  FLOPs (a formula) and MFU = model FLOP/s / the measured peak of a large fp32 matmul;
- the same step inside a short stretch of the real training loop (`train_mnist.train` on the
  stand-in digits), timed in turn with the first in three rounds (a drifting machine slows
  both alike), and the line `train step: bench X ms, loop Y ms, ratio R`: R near 1 says that
  the first figure times what training does;
- sampling: 100 digits drawn in one batch with the default sampler, with and without the
  KV cache, and one 4-digit number drawn on demand (a trained model draws it; without one,
  scripted text opens one image after each digit);
- peak memory (RSS on a CPU, allocated memory on a GPU);
- with --profile: the share of the step's op time taken by convolutions, matmuls, attention,
  norms, the optimizer and the rest (torch.profiler).
"""
import argparse
import os
import platform
import resource
import statistics
import tempfile
import time

import torch

import train_mnist as tm
from mnist_numbers import _sampling, write_standin_mnist
from transfusion import Transfusion


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_times(fn, device, warmup=2, repeats=5):
    """Seconds of each of `repeats` calls of fn, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn, device, warmup=2, repeats=5):
    return statistics.median(step_times(fn, device, warmup, repeats))


def matmul_peak(device, n=2048, dtype=torch.float32):
    """GFLOP/s of an n x n matmul (2 n^3 FLOPs), median of runs."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / median_time(lambda: a @ b, device, 2, 7) / 1e9


def train_flops_per_step(cfg, seq_lens, n_images):
    """Model FLOPs of one training step (forward + backward = 3 x forward), counted as
    nanoGPT/PaLM do: 2 FLOPs per multiply-add, backward twice the forward.
    Per token:  6 * (L (4 D^2 + 3 D F) + D V)   qkv + wo, SwiGLU (w1, w3, w2), LM head
              + 6 * L * 2 * S * D             attention over its sequence's S keys
    Per image:  linear patches: 6 * N * 2 * D * C P^2; U-Net: 6 * (each conv's k^2 c_in c_out
                pixels + the patch projections), at the U-Net's resolution; + the timestep MLP.
    Only real positions count: padding, norms, softmax and the optimizer are what MFU exposes."""
    D, L, F_, V = cfg.d_model, cfg.n_layers, cfg.ffn_hidden, cfg.vocab_size
    tokens = sum(S * (6 * (L * (4 * D * D + 3 * D * F_) + D * V) + 6 * L * 2 * S * D) for S in seq_lens)
    N, P, C, side = cfg.n_patches, cfg.patch_size, cfg.channels, cfg.image_size
    if cfg.patch_encoder == "linear":
        per_image = 6 * N * 2 * D * C * P * P
    else:
        U, s = cfg.unet_channels, cfg.unet_downsample
        px, Cs = (side // s) ** 2, C * s * s                                       # pixels, channels in
        conv = lambda k, ci, co: k * k * ci * co * px                              # multiply-adds
        per_image = 6 * (conv(3, Cs, U) + 2 * conv(3, U, U)                        # conv_in, down block
                         + 2 * N * U * (P // s) ** 2 * D                           # to/from tokens
                         + conv(3, 2 * U, U) + conv(3, U, U) + conv(1, 2 * U, U)   # up block + skip
                         + conv(3, U, Cs))                                         # conv_out
    per_image += 6 * (256 * D + D * D)                                             # timestep MLP
    return tokens + n_images * per_image


# an op's kind: the first whose words its name holds (attention's q k^T and its mix of v are bmm)
KINDS = {"convolutions": ("conv",), "attention": ("bmm", "softmax", "masked_fill", "scaled_dot_product"),
         "matmuls": ("mm", "linear"), "optimizer": ("adam", "lerp", "foreach", "vector_norm"), "norms": ("norm",)}


def profile_step(step, n=10):
    """Where a training step's time goes: the share of each kind of op (self CPU time, torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    shares, total = {}, 0.0
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        kind = next((k for k, words in KINDS.items() if any(w in ev.key for w in words)), "elementwise and other")
        shares[kind] = shares.get(kind, 0.0) + ev.self_cpu_time_total
        total += ev.self_cpu_time_total
    return {k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}, total / n / 1000


def bench_train(args, data, device, repeats, rounds):
    """The training step as the loop runs it (bench), then a stretch of the loop itself; `rounds`
    times in turn, so that a machine whose speed drifts within seconds slows both alike."""
    flags = ["--data-dir", data, "--device", device.type, "--log-every", "0", "--progress-every", "0",
             "--steps", str(args.loop_steps), "--autoencoder-steps", "10"] + args.flags.split()
    run = tm.parse_args(flags + ["--out", os.path.join(data, "out")])       # timing needs no good autoencoder
    u8, labels = tm.load_digits(data, train=True)
    state = tm.new_state(run, device)
    images = state["model"].encode_images(tm.to_model_range(u8).to(device)).cpu()  # pixels or latents (§2.3)
    bf16 = tm.use_bf16(device, run.fp32, run.bf16)
    # warm-up: the first step of each new batch shape (58-64 images, a varying number of packed
    # rows) builds its kernels (oneDNN primitives); the loop below, later in the process, finds
    # them built. 12 steps sufficed on pixels; on latents the steps kept speeding up for ~30
    step = lambda: tm.run_step(state, run, images, labels, bf16)                    # noqa: E731
    steps, gaps = [], []
    for r in range(rounds):
        steps += step_times(step, device, warmup=args.warmup if r == 0 else 2, repeats=repeats)
        # the real loop: train() logs every step (--log-every 0); the time between two log lines is a step
        stamps = []
        tm.train(tm.parse_args(flags + ["--out", os.path.join(data, f"out{r}")]),
                 log=lambda line: stamps.append(time.perf_counter()) if line.startswith("step") else None)
        warm = min(10, len(stamps) // 2)                                      # warm-up steps left out
        gaps += [b - a for a, b in zip(stamps[warm:], stamps[warm + 1:])]
    sec, loop = statistics.median(steps), statistics.median(gaps)
    profile = profile_step(step) if args.profile else None
    gen = torch.Generator().manual_seed(0)
    seqs = [s for _ in range(20) for s in tm.make_sequences(images[:run.batch_size], labels[:run.batch_size], gen,
                                                           run.max_digits, run.caption_first, run.layout)]
    lens = [sum(state["model"].cfg.n_patches + 2 if x.is_floating_point() else x.numel() for x in s) for s in seqs]
    flops = train_flops_per_step(state["model"].cfg, lens, 20 * run.batch_size) / 20
    return dict(ms=1000 * sec, loop_ms=1000 * loop, profile=profile, gflop=flops / 1e9, gflops=flops / sec / 1e9,
                params=state["model"].num_params() / 1e6, positions=sum(lens) / 20, digits=run.batch_size)


class ScriptedText(Transfusion):
    """Without a checkpoint: the text head is scripted (";" is followed by a digit, a digit
    opens an image, EOI ends the sequence) so that the benchmark takes a trained model's path."""

    def predict(self, h, batch, image_state):
        logits, eps = super().predict(h, batch, image_state)
        nxt = torch.where(batch.tokens == tm.SEP, 7, torch.where(batch.tokens < 10, tm.BOI, tm.EOS))
        return torch.full_like(logits, -1e4).scatter(-1, nxt[..., None], 0.0), eps


def bench_sample(args, device, repeats, bf16):
    if args.ckpt and os.path.exists(args.ckpt):
        model, source = tm.load_checkpoint(args.ckpt, device), args.ckpt
    else:
        flags = tm.parse_args(args.flags.split())
        model = ScriptedText(tm.model_config(flags)).to(device).eval()
        model.sample_defaults = tm.sample_defaults(flags)                    # e.g. --sample-steps in --flags
        source = "untrained, scripted text"
    labels = torch.arange(args.sample_digits) % 10
    number = "2026" if source != "untrained, scripted text" else "7"   # the script draws one image
    with tm.eval_precision(device, bf16):                              # as the evaluation samples
        t_cache = median_time(lambda: tm.generate_digits(model, labels), device, 1, repeats)
        t_plain = median_time(lambda: tm.generate_digits(model, labels, use_cache=False), device, 1, repeats)
    t_draw = median_time(lambda: tm.draw_number(model, number), device, 1, repeats)   # as --draw: fp32
    drawn = len(tm.draw_number(model, number))
    kw = _sampling(model)
    return dict(cache=t_cache, plain=t_plain, draw=t_draw * (4 / max(1, drawn)), drawn=drawn, source=source,
                sampler=f"{kw['sampler']}, {kw['steps']} steps, guidance scale {kw['guidance_scale']}")


def cpu_name():
    """The CPU as lscpu names it: model name, family and model (Linux), else platform's word."""
    try:
        info = dict(line.split(":", 1) for line in open("/proc/cpuinfo").read().split("\n\n")[0].splitlines()
                    if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        return f"{info['model name']} (family {info['cpu family']}, model {info['model']})"
    except (OSError, KeyError):
        return platform.processor() or platform.machine()


def main(argv=None):
    p = argparse.ArgumentParser(description="training and sampling speed of the default MNIST run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=40, help="training steps run before the timed ones")
    p.add_argument("--loop-steps", type=int, default=40, help="steps of the real training loop, each round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the step's timing and the loop's, in turn")
    p.add_argument("--ckpt", default="out/ckpt.pt", help="a trained model for the sampling rows, if present")
    p.add_argument("--sample-digits", type=int, default=100, help="digits drawn in one batch")
    p.add_argument("--profile", action="store_true", help="also: where the training step's time goes, by kind of op")
    p.add_argument("--flags", default="", help="train_mnist.py flags for another model, e.g. \"--d-model 64\"")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    flags = tm.parse_args(args.flags.split())
    bf16 = tm.use_bf16(device, flags.fp32, flags.bf16)            # MFU against the peak of the dtype trained in
    peak = matmul_peak(device, dtype=torch.bfloat16 if bf16 else torch.float32)
    with tempfile.TemporaryDirectory() as data:
        write_standin_mnist(data, n_train=4096, n_test=64)
        tr = bench_train(args, data, device, args.repeats, args.rounds)
    sa = bench_sample(args, device, max(1, args.repeats // 4), bf16)
    mem = (torch.cuda.max_memory_allocated() if device.type == "cuda" else
           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
    rows = [(f"{'bf16' if bf16 else 'fp32'} matmul peak (2048x2048)", f"{peak:.0f} GFLOP/s"),
            ("parameters", f"{tr['params']:.2f} M"),
            (f"train: ms/step ({tr['digits']} digits, mean positions per step)",
             f"{tr['ms']:.1f} ({tr['positions']:.0f})"),
            ("train: model GFLOP/step (formula)", f"{tr['gflop']:.2f}"),
            ("train: model GFLOP/s; MFU", f"{tr['gflops']:.0f}; {tr['gflops'] / peak:.1%}"),
            (f"train: ms/step in the training loop ({args.rounds} x {args.loop_steps} steps)", f"{tr['loop_ms']:.1f}"),
            (f"sample {args.sample_digits} digits, KV cache", f"{sa['cache']:.2f} s"),
            (f"sample {args.sample_digits} digits, no cache", f"{sa['plain']:.2f} s"),
            ("draw a 4-digit number on demand", f"{sa['draw']:.2f} s" + ("" if sa["drawn"] == 4 else
                                                                       f" (4x one image: {sa['source']})")),
            ("peak memory", f"{mem:.0f} MB")]
    print("| | |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")
    print(f"sampling: {sa['sampler']}{', bf16 autocast (not on demand)' if bf16 and device.type == 'cpu' else ''}; "
          f"model: {sa['source']}")
    if tr["profile"]:
        shares, ms = tr["profile"]
        print(f"training step, ops only ({ms:.0f} ms of op time a step): " +
              ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    print(f"train step: bench {tr['ms']:.1f} ms, loop {tr['loop_ms']:.1f} ms, ratio {tr['loop_ms'] / tr['ms']:.2f}")


if __name__ == "__main__":
    main()
