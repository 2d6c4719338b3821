"""
How well a Transfusion trained by train_mnist.py writes, draws and reads, and its pictures.

A small CNN referee (trained on the MNIST training set) judges the images the model draws;
its penultimate features give a Frechet distance (FID's formula, the referee in place of
Inception). The metrics, all printed by `python train_mnist.py` at the end of training:
- caption accuracy: each MNIST test digit read as a one-digit number, BOS <image> and the
  model writes its label, then ; and the model writes the number (greedy, §4.1);
- label->image: 100 digits per label from BOS "d" ; judged by the referee, and their
  Frechet distance to the 10,000 test digits;
- number -> images: random 4-digit numbers, prompt BOS 2 0 2 6 ; : exactly right when the
  model drew exactly four images, stopped (EOS), and the referee reads each as its digit;
- images -> number: four MNIST *test* digits, given one at a time as the training data has
  them (BOS <img> 2 <img> 0 ... ;, the model writing each digit after its image): exactly
  right when the model then writes the four digits after ;.

Pictures are matplotlib Figures built without pyplot or a global backend, returned to the
caller (a notebook shows them inline, with no `%matplotlib` magic) and saved by `save_figure`;
`decoding_gif` animates the decoding loop.
"""
import io
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import time

import matplotlib.figure
import torch
import torch.nn as nn
import torch.nn.functional as F

import mnist_numbers as mn
from transfusion import transfusion_mask


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

    def features(self, x):  # x in [0, 1], (n, 1, 28, 28)
        return self.fc(self.conv((x - 0.1307) / 0.3081))

    def forward(self, x):
        return self.head(self.features(x))


def train_referee(train_x, train_y, epochs=3, seed=0, log=print):
    """Adam with a cosine learning-rate decay: ~99% test accuracy in 3 epochs on a CPU."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Referee()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    n = len(train_y)
    total = epochs * math.ceil(n / 128)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / total)))
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(net(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log(f"referee epoch {ep + 1}/{epochs} done")
    return net.eval()


def referee_path(args):
    """Where the referee of args.out is kept (one per folder and dataset)."""
    return os.path.join(args.out, "referee.pt" if args.dataset == "mnist" else f"referee_{args.dataset}.pt")


def fit_referee(data_dir, dataset, epochs, path, log=print):
    """Train the referee on the training digits in fp32 and save it to `path` (atomically)."""
    x_u8, y = mn.load_digits(data_dir, train=True, dataset=dataset)
    with torch.autocast("cpu", enabled=False):  # fp32, as every referee
        referee = train_referee(x_u8.float().div(255).unsqueeze(1), y, epochs, log=log or (lambda line: None))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(referee.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    return referee


class OnOneCore:
    """Speed only: fn(*args) in a helper process (a fresh Python, `spawn`) on one thread while
    this process goes on: start() starts it, wait() waits for its end, result() for its return
    value. The helper ignores Ctrl-C (this process handles it) and dies with this process. The
    caller gives it a core: it runs on one thread fewer meanwhile (torch.set_num_threads), or
    the threads of both would wait on each other."""

    def __init__(self, fn, *args):
        self.fn, self.args, self.process = fn, args, None

    def start(self):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_end = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_one_core_main, args=(child_end, self.fn, self.args), daemon=True)
        self.process.start()
        child_end.close()
        return self

    def wait(self):
        multiprocessing.connection.wait([self.conn, self.process.sentinel])

    def result(self):
        self.wait()
        if not self.conn.poll():
            raise RuntimeError(f"the helper process died (exit code {self.process.exitcode})")
        ok, value = self.conn.recv()
        self.process.join()
        if not ok:
            raise RuntimeError(f"the helper process failed: {value}")
        return torch.load(io.BytesIO(value), weights_only=False)   # what our own helper saved


def _one_core_main(conn, fn, args):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    try:
        buf = io.BytesIO()
        torch.save(fn(*args), buf)   # one message of bytes, however many tensors the value holds
        conn.send((True, buf.getvalue()))
    except Exception as e:  # the parent raises it, with its message
        conn.send((False, f"{type(e).__name__}: {e}"))


def needs_referee(args):
    """The referee judges the images the model draws: none drawn, no referee needed."""
    return bool(args.eval_per_label or args.eval_numbers)


def referee_helper(args):
    """Speed only: the referee, to be trained in a helper process on a core of its own while the
    model trains on the others (train_mnist.train starts it and spares it a core), so that a
    cold run does not wait for it after training (docs/speed.md). None where it is already saved
    or no core is spare (one thread): `load_or_train_referee` then trains it here."""
    if not needs_referee(args) or os.path.exists(referee_path(args)) or torch.get_num_threads() < 2:
        return None
    return OnOneCore(fit_referee, args.data_dir, args.dataset, args.referee_epochs, referee_path(args), None)


def load_or_train_referee(args, log=print, helper=None):
    """The referee of args.out: trained once per folder and dataset, then reused. `helper`: the
    OnOneCore of `referee_helper`, waited for."""
    path = referee_path(args)
    if helper is not None and helper.process is not None:   # started: training it, or done
        referee = helper.result()
        log(f"referee trained beside the model, saved in {path}")
        return referee.eval()
    if os.path.exists(path):
        referee = Referee()
        referee.load_state_dict(torch.load(path, weights_only=True))
        log(f"referee loaded from {path}")
        return referee.eval()
    return fit_referee(args.data_dir, args.dataset, args.referee_epochs, path, log).eval()


@torch.no_grad()
@torch.autocast("cpu", enabled=False)   # the referee judges in fp32, whatever the model samples in
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
# The metrics
# ---------------------------------------------------------------------------

def random_numbers(n, k=4, seed=0):
    """n random k-digit strings (leading zeros allowed: every digit uniform)."""
    g = torch.Generator().manual_seed(seed)
    return ["".join(map(str, row)) for row in torch.randint(0, 10, (n, k), generator=g).tolist()]


def evaluate(model, args, log=print, referee_helper=None):
    """Every metric of the module docstring; returns them with the samples for the pictures."""
    test_u8, test_y = mn.load_digits(args.data_dir, train=False, dataset=args.dataset)
    test_x = test_u8.float().div(255).unsqueeze(1)                      # (n, 1, 28, 28) in [0, 1]
    m = dict(test_x=test_x, test_y=test_y)
    if needs_referee(args):
        t0 = time.time()
        referee = load_or_train_referee(args, log, referee_helper)
        m["referee_acc"] = float((batched(referee, test_x).argmax(1) == test_y).float().mean())
        log(f"referee test accuracy {m['referee_acc']:.2%} ({time.time() - t0:.0f} s)")

    # one digit from its label, and the Frechet distance to the test set; the floor is as many
    # real training digits (random, same labels) scored alike
    t0 = time.time()
    labels = torch.arange(10).repeat_interleave(args.eval_per_label)
    if len(labels):
        fake = mn.generate_digits(model, labels)
        m["gen_acc"] = float((batched(referee, fake).argmax(1) == labels).float().mean())
        train_u8, train_y = mn.load_digits(args.data_dir, train=True, dataset=args.dataset)
        g = torch.Generator().manual_seed(0)
        real_idx = torch.cat([(train_y == d).nonzero().flatten()[torch.randperm(int((train_y == d).sum()), generator=g)]
                              [:args.eval_per_label] for d in range(10)])
        f_test = batched(referee.features, test_x)
        m["fd"] = frechet_distance(batched(referee.features, fake), f_test)
        m["fd_real"] = frechet_distance(batched(referee.features, train_u8[real_idx].float().div(255).unsqueeze(1)),
                                        f_test)
        m["fake"] = fake
        log(f"label->image: {m['gen_acc']:.2%} of {len(labels)} digits read as their label by the referee; "
            f"Frechet distance {m['fd']:.1f} (real vs real {m['fd_real']:.1f}) ({time.time() - t0:.0f} s)")

    # one digit to its label
    t0 = time.time()
    n = min(args.eval_captions, len(test_y))
    if n:
        m["caps"] = mn.caption_digits(model, test_x[:n])
        m["caption_acc"] = float((m["caps"] == test_y[:n]).float().mean())
        log(f"caption accuracy {m['caption_acc']:.2%} on {n} test digits ({time.time() - t0:.0f} s)")

    # 4-digit numbers to images
    t0 = time.time()
    if args.eval_numbers:
        numbers = random_numbers(args.eval_numbers, seed=0)
        drawn = mn.draw_numbers(model, numbers, seed=1)
        right_count, digit_ok = [], []
        for number, (imgs, seq) in zip(numbers, drawn):
            stopped = not seq[-1].is_floating_point() and int(seq[-1][-1]) == mn.EOS
            right_count.append(len(imgs) == len(number) and stopped)
            read = batched(referee, imgs).argmax(1).tolist() if len(imgs) else []
            digit_ok.append([j < len(read) and read[j] == int(c) for j, c in enumerate(number)])
        ok = torch.tensor(digit_ok, dtype=torch.float)                   # (n, 4)
        rc = torch.tensor(right_count)
        m["draw_exact"] = float((rc & (ok.min(1).values == 1)).float().mean())
        m["draw_digit"] = float(ok.mean())
        m["draw_count_wrong"] = 1 - float(rc.float().mean())
        m["drawn"] = list(zip(numbers, drawn))
        log(f"number->images: {m['draw_exact']:.2%} of {len(numbers)} 4-digit numbers drawn exactly right "
            f"({m['draw_digit']:.2%} of digits; wrong image count {m['draw_count_wrong']:.2%}) "
            f"({time.time() - t0:.0f} s)")

    # handwritten 4-digit test numbers to text
    t0 = time.time()
    if args.eval_reading:
        g = torch.Generator().manual_seed(2)
        idx = torch.randint(0, len(test_y), (args.eval_reading, 4), generator=g)
        truth = ["".join(map(str, row)) for row in test_y[idx].tolist()]
        read, seqs = zip(*mn.read_numbers(model, list(test_x[idx]), with_sequences=True))  # each (4, 1, 28, 28)
        m["read_exact"] = sum(r == t for r, t in zip(read, truth)) / len(truth)
        m["read_digit"] = sum(j < len(r) and r[j] == c for r, t in zip(read, truth)
                              for j, c in enumerate(t)) / (4 * len(truth))
        m["reading"] = [(seq, t, r) for seq, t, r in zip(seqs[:8], truth[:8], read[:8])]
        log(f"images->number: {m['read_exact']:.2%} of {len(truth)} handwritten 4-digit test numbers read "
            f"exactly right ({m['read_digit']:.2%} of digits) ({time.time() - t0:.0f} s)")
    return m


# ---------------------------------------------------------------------------
# Pictures: each function returns a Figure; save_figure writes it
# ---------------------------------------------------------------------------

class Figure(matplotlib.figure.Figure):
    """A matplotlib Figure that a notebook shows as a picture in a fresh kernel: IPython asks
    any object for `_repr_png_`, so neither pyplot nor `%matplotlib inline` is needed."""

    def _repr_png_(self):
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        return buf.getvalue()


def save_figure(fig, path, dpi=90):
    """Save a figure as its file type says; the picture grows to hold every title and label."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def grid_figure(images, ncol, titles=None, title=None, cell=0.9):
    """Images (n, 1, 28, 28) in [0, 1] in rows of ncol, with optional per-image titles."""
    n, ncol = len(images), max(1, ncol)
    nrow = max(1, math.ceil(n / ncol))
    row_h = cell + (0.3 if titles else 0.0)
    fig = Figure(figsize=(ncol * cell, nrow * row_h + (0.4 if title else 0.1)))
    top = 1 - (0.4 / fig.get_figheight() if title else 0.02)
    axes = fig.subplots(nrow, ncol, squeeze=False,
                        gridspec_kw=dict(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.05,
                                         hspace=0.35 if titles else 0.05))
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            if titles:
                ax.set_title(titles[k], fontsize=8, pad=2)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def loss_figure(hist):
    fig = Figure(figsize=(8, 3))
    axes = fig.subplots(1, 2)
    for ax, key, name in ((axes[0], "lm", "LM loss (cross-entropy)"), (axes[1], "ddpm", "diffusion loss (MSE on eps)")):
        ys = hist[key]
        ax.plot(hist["step"], ys, lw=0.5, alpha=0.4)
        k = max(1, len(ys) // 50)
        ax.plot(hist["step"], [sum(ys[max(0, i - k):i + 1]) / len(ys[max(0, i - k):i + 1]) for i in range(len(ys))], lw=1.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    return fig


def mask_figure(model):
    """Fig. 4 for a two-digit training sequence, BOS 2 0 ; 2 <img> 0 <img> EOS, coloured by
    what attends to what."""
    from matplotlib.colors import ListedColormap
    cfg = model.cfg
    img = torch.zeros(cfg.channels, cfg.image_size, cfg.image_size)
    seq = mn.number_sequence(torch.stack([img, img]), torch.tensor([2, 0]), caption_first=True)
    batch = model.collate([model.with_markers(seq)])
    mask = transfusion_mask(batch.img_id, batch.valid, cfg.image_attention == "bidirectional")[0].cpu()  # (S, S)
    is_img = (batch.img_id[0] >= 0).cpu()
    kind = torch.zeros_like(mask, dtype=torch.long)                     # 0: blocked
    kind[mask] = 1                                                      # 1: causal
    kind[mask & is_img[:, None] & is_img[None, :] & ~torch.ones_like(mask).tril()] = 2  # 2: within an image
    names = [mn.VOCAB[t] if not f else "" for t, f in zip(batch.tokens[0].tolist(), is_img.tolist())]
    fig = Figure(figsize=(6.5, 6.5))
    ax = fig.subplots()
    ax.imshow(kind.numpy(), cmap=ListedColormap(["white", "#4C72B0", "#DD8452"]), vmin=0, vmax=2)
    ticks = [i for i, nm in enumerate(names) if nm]
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=7)
    ax.set_title("Transfusion attention (Fig. 4): blue causal, orange bidirectional within an image", fontsize=8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    fig.tight_layout()
    return fig


def sequence_items(seq, names=None):
    """A generated sequence (segments) -> items to draw: text as one string, images in [0, 1]."""
    items = []
    for s in seq:
        if s.is_floating_point():
            items.append(((s.float().cpu() + 1) / 2).clamp(0, 1))
        else:
            items.append(mn.tokens_text(s.tolist(), names))
    return items


def sequences_figure(rows, titles=None, title=None, cell=0.75):
    """One row per sequence, text and images in order as the model wrote them: rows are lists
    of items, each a string (text) or an image (1, 28, 28) in [0, 1]."""
    ncol = max(len(r) for r in rows)
    fig = Figure(figsize=(ncol * cell * 1.25, len(rows) * (cell + (0.25 if titles else 0)) + 0.45))
    axes = fig.subplots(len(rows), ncol, squeeze=False,
                        gridspec_kw=dict(left=0.01, right=0.99, bottom=0.01, top=1 - 0.45 / fig.get_figheight(),
                                         wspace=0.08, hspace=0.4 if titles else 0.1))
    for r, row in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c >= len(row):
                continue
            if isinstance(row[c], str):
                ax.text(0.5, 0.5, row[c], ha="center", va="center", fontsize=7, wrap=True)
            else:
                ax.imshow(row[c][0].numpy(), cmap="gray", vmin=0, vmax=1)
        if titles:
            axes[r][0].set_title(titles[r], fontsize=8, loc="left", pad=2)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def numbers_figure(drawn, names=None):
    """Numbers and the images drawn for them: [(number, images (k, 1, 28, 28) in [0, 1]), ...]."""
    rows = [[f'"{n}"'] + list(imgs) for n, imgs in drawn]
    return sequences_figure(rows, title="numbers drawn from BOS <digits> ; (the model opens each image "
                                        "and decides when to stop)")


def progress_figure(model, digits_u8, labels, step, steps):
    """What the model can do so far, for a picture while it trains: the digits 0-9 drawn
    (BOS d ;) and a handwritten number read, with generators of their own."""
    drawn = mn.generate_digits(model, torch.arange(10))
    read = mn.read_number(model, digits_u8)
    truth = "".join(str(int(d)) for d in labels)
    return sequences_figure([["drawn:"] + list(drawn),
                             ["read:"] + list(mn.as_model_images(digits_u8).add(1).div(2)) + [f'"{read}"']],
                            title=f"step {step:,} of {steps:,}: digits 0-9 drawn; {truth} read as {read or '(nothing)'}")


def decoding_gif(model, number: str, path, names=None, every=5):
    """The decoding loop of §3 as a GIF: the model writes the digits of BOS <number> ; one token
    at a time (LM mode); BOI switches to diffusion mode, and the image is shown every `every`
    denoising steps from noise to digit; EOI switches back. Returns (images, sequence) as
    `draw_numbers` does. Frames are drawn with PIL (matplotlib depends on it)."""
    from PIL import Image, ImageDraw, ImageFont
    steps_x = []   # (t, image) after each denoising step; a row draws its images one at a time
    (imgs, seq), = mn.draw_numbers(model, [number],  # x_t as pixels: a latent (§2.3) decoded
                                   on_step=lambda t, x: steps_x.append((t, model.decode_images(x[:1])[0, 0].cpu())))
    prompt = [mn.BOS] + [int(c) for c in number] + [mn.SEP]
    # the token stream the model read, BOI <image> EOI around each image (None: an image)
    stream = [t for seg in seq for t in ([mn.BOI, None, mn.EOI] if seg.is_floating_point() else seg.tolist())]
    steps = len(steps_x) // max(1, len(imgs))
    name = (lambda i: (names[i] if names else str(i)) if i < 10 else mn.VOCAB[i])
    font = ImageFont.load_default(size=14)
    tile, top = 56, 34
    cell_w = [tile + 4 if t is None else font.getlength(name(t)) + 10 for t in stream]
    width = int(max(640, sum(cell_w) + 20))

    def frame(n_cells, image, status):  # the first n_cells of the stream; `image` for the last None
        im = Image.new("RGB", (width, top + tile + 34), "white")
        d = ImageDraw.Draw(im)
        d.text((10, 8), f"Transfusion draws {number}, prompted with " + " ".join(name(t) for t in prompt),
               fill="black", font=font)
        x = 10
        for i, (t, w) in enumerate(zip(stream[:n_cells], cell_w)):
            if t is None:
                x_img = image if i == n_cells - 1 else imgs[stream[:i].count(None)][0] * 2 - 1
                pixels = ((x_img.clamp(-1, 1) + 1) * 127.5).byte().numpy()
                im.paste(Image.fromarray(pixels).resize((tile, tile), Image.NEAREST), (int(x) + 2, top))
            else:
                color = "#DD8452" if t in (mn.BOI, mn.EOI) else ("gray" if i < len(prompt) else "#2255AA")
                d.text((x + w / 2, top + tile / 2), name(t), fill=color, font=font, anchor="mm")
            x += w
        d.text((10, top + tile + 10), status, fill="black", font=font)
        return im

    frames, durations = [frame(len(prompt), None, "LM mode: the model reads the prompt")], [1200]
    k = 0                                                               # images drawn so far
    for n in range(len(prompt) + 1, len(stream) + 1):
        tok = stream[n - 1]
        if tok is None:  # diffusion mode: the image every `every` steps, each overwriting the last
            for i in range(every - 1, steps, every):
                t, x = steps_x[k * steps + i]
                frames.append(frame(n, x, f"diffusion mode: denoising step {i + 1} of {steps} (t = {t})"))
                durations.append(80)
            k += 1
            continue
        status = {mn.BOI: f"the model writes BOI: diffusion mode, {model.cfg.n_patches} patches of pure noise",
                  mn.EOI: "EOI: the image joins the sequence; back to LM mode",
                  mn.EOS: "the model writes EOS: the end"}.get(tok, f"LM mode: the model writes {name(tok)}")
        frames.append(frame(n, None, status))
        durations.append(700)
    durations[-1] = 3000
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0, optimize=True)
    return imgs, seq


def pictures(model, m, hist, out, names=None, log=print):
    """Save every picture of a run into `out`."""
    def save(fig, name):
        save_figure(fig, os.path.join(out, name))
    if "fake" in m:
        per = len(m["fake"]) // 10
        pick = torch.arange(10)[:, None] * per + torch.arange(min(10, per))
        save(grid_figure(m["fake"][pick.flatten()], ncol=min(10, per),
                         title='row d: digits drawn from the prompt BOS "d" ;'), "samples.png")
    if "caps" in m:
        k = min(20, len(m["caps"]))
        label = (lambda c: names[c] if names else f'"{c}"')
        save(grid_figure(m["test_x"][:k], ncol=10, titles=[label(int(c)) if c >= 0 else "?" for c in m["caps"][:k]],
                         title="test digits and the captions the model wrote"), "captions.png")
    frames = []
    mn.generate_digits(model, torch.tensor([7]),
                       on_step=lambda t, x: frames.append((model.decode_images(x[:1]).cpu() + 1) / 2))
    if frames:
        pick = sorted(set(round(i) for i in torch.linspace(0, len(frames) - 1, min(8, len(frames))).tolist()))
        save(grid_figure(torch.cat([frames[i] for i in pick]), ncol=len(pick), cell=1.4,
                         title='denoising "7" from noise (left) to image (right)'), "denoise.png")
    else:  # an untrained model may write something else than "7" and BOI: say so in the picture
        fig = Figure(figsize=(4, 1))
        fig.text(0.5, 0.5, 'asked for "7", the model opened no image', ha="center", va="center", fontsize=9)
        save(fig, "denoise.png")
    if "drawn" in m:
        save(sequences_figure([sequence_items(seq, names) for _, (_, seq) in m["drawn"][:8]],
                              title="4-digit numbers drawn: the whole generated sequence"), "numbers.png")
    if "reading" in m:
        rows = [sequence_items(seq, names) for seq, _, _ in m["reading"]]
        titles = [f"true {t}, read {r} {'(right)' if t == r else '(WRONG)'}" for _, t, r in m["reading"]]
        save(sequences_figure(rows, titles, title="handwritten test numbers read: the whole sequence, "
                                                  "the model's text between the given images"), "reading.png")
    free = model.generate([[torch.tensor([mn.BOS])] for _ in range(12)], max_new_tokens=16, temperature=1.0,
                          generator=torch.Generator().manual_seed(3), **mn._sampling(model))
    save(sequences_figure([sequence_items(s, names) for s in mn.in_pixels(model, free)],
                          title="free generation from BOS alone (text sampled at temperature 1)"), "free.png")
    if hist and hist["step"]:
        save(loss_figure(hist), "loss.png")
    save(mask_figure(model), "mask.png")


def cfg_sweep(model, args, scales, log=print):
    """Label->image accuracy and Frechet distance at each guidance scale (one checkpoint, the
    same labels and seeds at every scale), and cfg_sweep.png: one row per scale."""
    test_u8, _ = mn.load_digits(args.data_dir, train=False, dataset=args.dataset)
    referee = load_or_train_referee(args, log)
    f_test = batched(referee.features, test_u8.float().div(255).unsqueeze(1))
    labels = torch.arange(10).repeat_interleave(args.eval_per_label)
    rows, results = [], []
    for s in scales:
        t0 = time.time()
        fake = mn.generate_digits(model, labels, guidance_scale=s, seed=0)
        acc = float((batched(referee, fake).argmax(1) == labels).float().mean())
        fd = frechet_distance(batched(referee.features, fake), f_test)
        results.append((s, acc, fd))
        rows.append(fake[torch.arange(10) * args.eval_per_label])           # the first digit of each label
        log(f"CFG scale {s:g}: label->image {acc:.2%}, Frechet distance {fd:.1f} "
            f"({len(labels)} digits, {time.time() - t0:.0f} s)")
    fig = grid_figure(torch.cat(rows), ncol=10, title="one row per CFG scale (top: " +
                      ", ".join(f"{s:g}" for s in scales) + "); same labels and noise in every row")
    save_figure(fig, os.path.join(args.out, "cfg_sweep.png"))
    return results


def report(model, args, state, log=print, referee_helper=None):
    """Evaluate, save the pictures, print the results table of a run."""
    t0 = time.time()
    m = evaluate(model, args, log, referee_helper)
    names = mn.FASHION if args.dataset == "fashion" else None
    pictures(model, m, state["hist"] if state else None, args.out, names, log)
    t_eval = time.time() - t0
    lines = [f"\nresults ({args.out}):"]
    if state:
        lines.append(f"  training              {state['seconds'] / 60:.1f} min, {state['step']:,} steps")
    lines.append(f"  evaluation + pictures {t_eval / 60:.1f} min")
    precision = "bf16" if torch.is_autocast_enabled("cpu") else "fp32"     # train_mnist.eval_precision
    lines.append(f"  sampled in            {precision}")
    for key, name, fmt in (("caption_acc", "caption accuracy", "{:.2%}"), ("gen_acc", "label->image", "{:.2%}"),
                           ("fd", "Frechet distance", "{:.1f}"), ("draw_exact", "number->images exact", "{:.2%}"),
                           ("draw_digit", "  per digit", "{:.2%}"), ("draw_count_wrong", "  wrong image count", "{:.2%}"),
                           ("read_exact", "images->number exact", "{:.2%}"), ("read_digit", "  per digit", "{:.2%}")):
        if key in m:
            lines.append(f"  {name:21s} {fmt.format(m[key])}")
    log("\n".join(lines))
    # the same figures for scripts (ablations.py collects them): results.json beside ckpt.pt
    numbers = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
    if state:
        numbers.update(steps=state["step"], train_minutes=state["seconds"] / 60)
    numbers.update(eval_minutes=t_eval / 60, sampled_in=precision)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(numbers, f, indent=1, sort_keys=True)
    return m
