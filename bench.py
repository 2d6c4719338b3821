"""
How close training and sampling run to this machine's limit (like nanoGPT's MFU).

    python bench.py                  # CPU
    python bench.py --device cuda    # GPU (bf16 autocast in training, as train_mnist.py)
    python bench.py --device cuda --compile default   # training step under torch.compile

Prints one table; every figure is a median of several timed runs after warm-up,
in one process per row group (so each peak-memory figure is its own):
- the measured peak of a large square matmul in the training precision (fp32 on a CPU,
  bf16 on a GPU): the limit; on a CPU also the same product run as a 1x1 convolution,
  by oneDNN (the library behind the U-Net's convolutions), which on this project's AMD
  CPU runs twice as fast as torch.mm's MKL: MFU is given against both;
- training: ms/step, tokens/s, model FLOP/s and MFU = model FLOP/s / that peak, for the
  default MNIST config, one whole step: data, mask, loss, backward, clip, AdamW, EMA;
- sampling: seconds for 100 digits with the default sampler, with and without the
  KV cache, and the ratio; the same after a 40-token prompt, where the cache has a
  prefix to save (the MNIST prompt BOS "d" has almost none);
- peak memory (RSS on CPU, allocated on GPU) of training and of sampling;
- the same with the other patch encoder.
"""
import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import train_mnist as tm
from transfusion import Transfusion, TransfusionConfig


LONG_PROMPT = 40   # tokens: BOS and 39 copies of the digit


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, warmup=2, repeats=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(device, n=4096, dtype=torch.float32):
    """GFLOP/s of an n x n matmul (2 n^3 FLOPs), median of runs."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / median_time(lambda: a @ b, device, 2, 7) / 1e9


def conv_matmul_peak(n=4096):
    """GFLOP/s of the same n x n x n product run as a 1x1 convolution of an n-channel, n-pixel
    image: oneDNN's kernels instead of the BLAS behind torch.mm. On this project's AMD CPU the
    BLAS (MKL) reaches about half of what oneDNN does, so this is the truer limit of the chip;
    the U-Net's convolutions run on oneDNN (README, "Speed")."""
    assert n % 64 == 0
    x = torch.randn(1, n, 64, n // 64).contiguous(memory_format=torch.channels_last)  # (1, n, 64, n/64): n pixels
    w = torch.randn(n, n, 1, 1)                                                      # n -> n channels
    sec = median_time(lambda: torch.nn.functional.conv2d(x, w), torch.device("cpu"), 2, 7)
    return 2 * n ** 3 / sec / 1e9                                   # (n pixels x n) @ (n x n): 2 n^3 FLOPs


def train_flops_per_step(cfg, seq_lens, n_images):
    """Model FLOPs of one training step (forward + backward = 3 x forward), counted as
    nanoGPT/PaLM do: 2 FLOPs per multiply-add, backward twice the forward.

    Per token:   6 * (matmul weights a token passes through)
                 = 6 * (L * (4 D^2 + 3 D F) + D V)     # qkv + wo, SwiGLU (w1, w3, w2), LM head
               + 6 * L * 2 * S * D                     # attention: QK^T and AV over its sequence's S keys
    Per image:   linear patches: 6 * N * 2 * D * C P^2 (proj_in + proj_out)
                 U-Net patches:  6 * (each conv's k^2 * c_in * c_out * H_out * W_out multiply-adds)
    The LM head runs at every position (patches too), as the code does. Only real positions
    count: padding, norms, RoPE, softmax and the optimizer are the overhead MFU exposes.
    """
    D, L, F_, V = cfg.d_model, cfg.n_layers, cfg.ffn_hidden, cfg.vocab_size
    tokens = sum(S * (6 * (L * (4 * D * D + 3 * D * F_) + D * V) + 6 * L * 2 * S * D) for S in seq_lens)
    N, P, C, H = cfg.n_patches, cfg.patch_size, cfg.channels, cfg.image_size
    if cfg.patch_encoder == "linear":
        per_image = 6 * N * 2 * D * C * P * P
    else:
        c = cfg.unet_channels
        conv = lambda k, ci, co, hw: k * k * ci * co * hw * hw                  # multiply-adds
        per_image = 6 * (conv(3, C, c, H) + 2 * conv(3, c, c, H)                  # conv_in, down block
                         + conv(P, c, D, H // P) + conv(P, D, c, H // P)          # to/from tokens
                         + conv(3, 2 * c, c, H) + conv(3, c, c, H) + conv(1, 2 * c, c, H)  # up block + skip
                         + conv(3, c, C, H))                                      # conv_out
    per_image += 6 * (256 * D + D * D)                                            # timestep MLP
    return tokens + n_images * per_image


def make_args(encoder, device):
    args = tm.parse_args(["--device", device])
    args.patch_encoder = encoder
    return args


def bench_train(encoder, device, repeats, compile_mode=None):
    args = make_args(encoder, device.type)
    cfg = tm.model_config(args)
    torch.manual_seed(0)
    model = Transfusion(cfg).to(device)
    ema = copy.deepcopy(model)                  # before compiling: the EMA copy stays a plain module
    if compile_mode:
        # the model's forward pass compiled (mask, blocks, patches); the Python around it, which
        # builds the batch, stays eager. Shapes change every step (numbers of 1-4 digits, packed
        # rows), hence dynamic=True; "reduce-overhead" adds CUDA graphs, recorded per shape.
        model.compile(mode=compile_mode, dynamic=True)
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    opt = tm.configure_optimizer(model, args.lr)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4096, 1, 28, 28) * 2 - 1                       # stand-in digits: speed only
    labels = torch.randint(0, 10, (4096,), generator=gen)
    bf16 = tm.use_bf16(device)

    def step():  # the whole training step of train_mnist.train: sequences, then train_step
        idx = torch.randint(0, 4096, (args.batch_size,), generator=gen)
        seqs = tm.make_sequences(images[idx], labels[idx], gen)
        tm.train_step(model, opt, ema_params, model_params, seqs, gen, args.ema, bf16)

    sec = median_time(step, device, warmup=20 if compile_mode else 3, repeats=repeats)  # compiling is warm-up
    # the FLOPs of an average step: real positions of 20 steps' worth of numbers
    lens = [sum(cfg.n_patches + 2 if s.is_floating_point() else s.numel() for s in seq)
            for _ in range(20) for seq in tm.make_sequences(images[:args.batch_size], labels[:args.batch_size], gen)]
    flops = train_flops_per_step(cfg, lens, 20 * args.batch_size) / 20
    counted = None                                                     # not counted through a compiled model
    if not compile_mode:
        with FlopCounterMode(display=False) as counter:                # cross-check (counts padding too)
            idx = torch.randint(0, 4096, (args.batch_size,), generator=gen)
            model.loss(tm.make_sequences(images[idx], labels[idx], gen), generator=gen)[0].backward()
        model.zero_grad(set_to_none=True)
        counted = counter.get_total_flops()
    return dict(ms_per_step=1000 * sec, tokens_per_s=sum(lens) / 20 / sec,
                gflop_per_step=flops / 1e9, counted_gflop=None if counted is None else counted / 1e9,
                model_gflops=flops / sec / 1e9, params_m=model.num_params() / 1e6,
                batch=args.batch_size, seq_len=round(sum(lens) / len(lens)))


class ScriptedText(Transfusion):
    """Without a checkpoint: the text head is scripted (";" is followed by a digit, a digit
    opens an image, EOI ends the sequence) so the benchmark times the path a trained model takes."""

    def predict(self, h, batch, image_state):
        logits, eps = super().predict(h, batch, image_state)
        nxt = torch.where(batch.tokens == tm.SEP, 7, torch.where(batch.tokens < 10, tm.BOI, tm.EOS))
        return torch.full_like(logits, -1e4).scatter(-1, nxt[..., None], 0.0), eps


def bench_sample(encoder, device, repeats, ckpt):
    args = make_args(encoder, device.type)
    if ckpt and os.path.exists(ckpt) and tm.load_checkpoint(ckpt).cfg.patch_encoder == encoder:
        model, source = tm.load_checkpoint(ckpt, device), ckpt
    else:
        model, source = ScriptedText(tm.model_config(args)).to(device).eval(), "untrained, scripted text"
    labels = torch.arange(100) % 10
    kw = dict(steps=args.sample_steps, cfg_scale=args.cfg_scale, sampler=args.sampler)
    cached = tm.generate_digits(model, labels, batch_size=100, **kw)
    plain = tm.generate_digits(model, labels, batch_size=100, use_cache=False, **kw)
    diff = (cached - plain).abs().max().item()                        # float rounding only
    t_cache = median_time(lambda: tm.generate_digits(model, labels, batch_size=100, **kw), device, 1, repeats)
    t_plain = median_time(lambda: tm.generate_digits(model, labels, batch_size=100, use_cache=False, **kw),
                          device, 1, repeats)
    # The MNIST prompt BOS "d" leaves almost nothing to cache; a 40-token prompt shows what the
    # cache saves when there is a prefix (untrained weights, scripted text: same path, same work)
    scripted = ScriptedText(model.cfg).to(device).eval()
    prompts = [[torch.tensor([tm.BOS] + [int(d)] * (LONG_PROMPT - 1))] for d in labels]

    def long(use_cache):
        out = scripted.generate(prompts, max_new_tokens=3, use_cache=use_cache,
                                generator=torch.Generator().manual_seed(0), **kw)
        return torch.stack([seq[1] for seq in out])                    # (100, C, H, W)

    long_diff = (long(True) - long(False)).abs().max().item()
    l_cache = median_time(lambda: long(True), device, 1, repeats)
    l_plain = median_time(lambda: long(False), device, 1, repeats)
    return dict(sample_s_cache=t_cache, sample_s_nocache=t_plain, speedup=t_plain / t_cache, max_diff=diff,
                long_s_cache=l_cache, long_s_nocache=l_plain, long_speedup=l_plain / l_cache, long_max_diff=long_diff,
                sampler=f"{args.sampler} {args.sample_steps} steps, CFG {args.cfg_scale}", model=source)


def counted_cell(train_res):
    c = train_res["counted_gflop"]
    return "–" if c is None else f"{c:.2f}"


def pct(x):
    return f"{x:.0%}" if x >= 0.1 else f"{x:.2%}"   # a GPU running this tiny model shows a fraction of 1%


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main():
    p = argparse.ArgumentParser(description="training MFU and sampling speed of the default MNIST config")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ckpt", default="out/ckpt.pt", help="a trained model for the sampling rows, if present")
    p.add_argument("--compile", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="time the training step with the model compiled in this torch.compile mode")
    p.add_argument("--part", help=argparse.SUPPRESS)   # internal: run one part in this process
    args = p.parse_args()
    device = torch.device(args.device)
    if args.part:
        what, encoder = args.part.split(":")
        res = bench_train(encoder, device, args.repeats, args.compile) if what == "train" else \
            bench_sample(encoder, device, max(1, args.repeats // 2), args.ckpt)
        res["peak_mb"] = peak_memory_mb(device)
        print(json.dumps(res))
        return
    # the limit: the peak of the precision training runs in (fp32 on a CPU; bf16 autocast on a GPU)
    bf16 = tm.use_bf16(device)
    peak = matmul_peak(device, dtype=torch.bfloat16 if bf16 else torch.float32)
    prec = "bf16" if bf16 else "fp32"
    peak_dnn = conv_matmul_peak() if device.type == "cpu" and torch.backends.mkldnn.is_available() else None
    default = TransfusionConfig.patch_encoder
    encoders = [default, "linear" if default == "unet" else "unet"]
    res = {}
    for enc in encoders:
        for what in ("train", "sample"):
            cmd = [sys.executable, __file__, "--device", args.device, "--repeats", str(args.repeats),
                   "--ckpt", args.ckpt, "--part", f"{what}:{enc}"] + (["--compile", args.compile] if args.compile else [])
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"bench part {what}:{enc} failed:\n{run.stderr}")
            res[what, enc] = json.loads(run.stdout.strip().splitlines()[-1])
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if args.compile:
        name += f"; training rows with torch.compile(mode={args.compile!r}), sampling eager"
    print(f"\ndevice: {name}; torch {torch.__version__}")
    rows = [(f"{prec} matmul peak (4096x4096)", lambda e: f"{peak:.0f} GFLOP/s")]
    rows += [
        ("parameters", lambda e: f"{res['train', e]['params_m']:.2f} M"),
        ("train: ms/step (digits, mean positions per number)", lambda e: f"{res['train', e]['ms_per_step']:.0f} "
                                                       f"({res['train', e]['batch']}, {res['train', e]['seq_len']})"),
        ("train: tokens/s", lambda e: f"{res['train', e]['tokens_per_s']:.0f}"),
        ("train: model GFLOP/step (formula; torch's count)", lambda e: f"{res['train', e]['gflop_per_step']:.2f} "
                                                                       f"({counted_cell(res['train', e])})"),
        ("train: model GFLOP/s", lambda e: f"{res['train', e]['model_gflops']:.0f}"),
        ("train: MFU (model FLOP/s / peak)", lambda e: pct(res['train', e]['model_gflops'] / peak)),
    ]
    if peak_dnn:
        rows += [
            ("fp32 matmul as a 1x1 conv (oneDNN; 4096^3)", lambda e: f"{peak_dnn:.0f} GFLOP/s"),
            ("train: model FLOP/s / that oneDNN peak", lambda e: pct(res['train', e]['model_gflops'] / peak_dnn)),
        ]
    rows += [
        ("train: peak memory", lambda e: f"{res['train', e]['peak_mb']:.0f} MB"),
        ("sample 100 digits, KV cache", lambda e: f"{res['sample', e]['sample_s_cache']:.2f} s"),
        ("sample 100 digits, no cache", lambda e: f"{res['sample', e]['sample_s_nocache']:.2f} s"),
        ("KV-cache speed-up (max pixel difference)", lambda e: f"{res['sample', e]['speedup']:.2f}x "
                                                              f"({res['sample', e]['max_diff']:.1g})"),
        (f"after a {LONG_PROMPT}-token prompt: cache / none", lambda e: f"{res['sample', e]['long_s_cache']:.2f} s / "
                                                                   f"{res['sample', e]['long_s_nocache']:.2f} s"),
        (f"KV-cache speed-up, {LONG_PROMPT}-token prompt", lambda e: f"{res['sample', e]['long_speedup']:.2f}x "
                                                             f"({res['sample', e]['long_max_diff']:.1g})"),
        ("sample: peak memory", lambda e: f"{res['sample', e]['peak_mb']:.0f} MB"),
    ]
    head = ["", f"{encoders[0]} patches (default)", f"{encoders[1]} patches"]
    print("| " + " | ".join(head) + " |\n|---|---|---|")
    for label, fn in rows:
        print(f"| {label} | {fn(encoders[0])} | {fn(encoders[1])} |")
    for e in encoders:
        print(f"sampling ({e}): {res['sample', e]['sampler']}; model: {res['sample', e]['model']}")


if __name__ == "__main__":
    main()
