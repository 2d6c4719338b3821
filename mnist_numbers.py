"""
MNIST numbers for Transfusion: the vocabulary, the training sequences, and drawing and
reading numbers with a trained model. train_mnist.py trains on them, mnist_eval.py
measures and pictures them, and a notebook can use them directly:

    from mnist_numbers import draw_number, read_number
    images = draw_number(model, "2026")      # (k, 1, 28, 28) in [0, 1]
    read_number(model, images)               # "2026", if the model reads its own drawing

A number is one training sequence (transfusion.py's segment format), in one of two orders:
    caption first:  BOS 2 0 ; 2 <img> 0 <img> EOS    (the model writes the number, then draws it)
    image first:    BOS <img> 2 <img> 0 ; 2 0 EOS    (it reads each image, then writes the number)
Each image sits beside its own digit: just after it when drawing (the digit is the image's
caption), just before it when reading (the image's caption follows it). ";" (SEP) closes
the number block: "the number is complete, draw now", or "these are all the images, write
the number now". So drawing the k-th image and reading the k-th digit are both about the
neighbouring token (docs/layout.md compares layouts without the pairs).
"""
import os

import torch

from transfusion import TransfusionConfig, add_noise, packed_batch

# vocabulary: the ten digits (or Fashion-MNIST classes) are their own ids, then the special tokens
VOCAB = [str(d) for d in range(10)] + ["<pad>", "<bos>", "<boi>", "<eoi>", "<eos>", ";"]
PAD, BOS, BOI, EOI, EOS, SEP = 10, 11, 12, 13, 14, 15
FASHION = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]

# how a trained model samples unless told otherwise: DDPM, 100 of the 1000 steps, guidance
# scale 2 (the paper: 250 steps and 5, or 3 in ablations; docs/defaults.md). A checkpoint
# stores its own (cfg_scale: the guidance scale, as the flag --cfg-scale names it).
SAMPLING = dict(steps=100, cfg_scale=2.0, sampler="ddpm")
# paired: each image beside its digit, both ways (above). read-grouped: reading as
# BOS <img> <img> ; 2 0 EOS instead. grouped: drawing as BOS 2 0 ; <img> <img> EOS too
# (docs/layout.md compares them).
LAYOUTS = ("paired", "read-grouped", "grouped")
# a digit's latent (§2.3) with --autoencoder: 4 channels of 8 x 8 (the 28 x 28 digit padded to
# 32 x 32, a quarter of its side), cut into 4 patches of 4 x 4, as the pixels are into 14 x 14
LATENT = (4, 8, 4)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

class MissingData(Exception):
    pass


def load_digits(data_dir: str, train: bool, dataset: str = "mnist", download: bool = True):
    """MNIST (or Fashion-MNIST) as uint8 images (N, 28, 28) and int64 labels (N,), via torchvision."""
    try:
        from torchvision.datasets import MNIST, FashionMNIST
    except ImportError as e:
        raise MissingData("torchvision is needed to read MNIST: pip install -r requirements.txt") from e
    cls = FashionMNIST if dataset == "fashion" else MNIST
    try:
        ds = cls(data_dir, train=train, download=download)
    except Exception as e:  # no network, bad files, ...
        raw = os.path.join(os.path.abspath(data_dir), cls.__name__, "raw")
        raise MissingData(
            f"could not load {cls.__name__} from {os.path.abspath(data_dir)} ({type(e).__name__}: {e}).\n"
            f"Put the four files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (optionally .gz) in {raw} and run again.") from e
    return ds.data, ds.targets


def write_standin_mnist(root: str, n_train: int = 200, n_test: int = 50, folder: str = "MNIST"):
    """A synthetic stand-in for MNIST in torchvision's raw layout under root/folder/raw, for tests
    and benchmarks without the data: digit d is a bright bar at row 2 + 2d on faint noise."""
    import struct
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        imgs = (torch.rand(n, 28, 28, generator=g) * 40).to(torch.uint8)
        for d in range(10):
            imgs[labels == d, 2 + 2 * d:4 + 2 * d, 4:24] = 255
        with open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + imgs.numpy().tobytes())
        with open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.to(torch.uint8).numpy().tobytes())
    return root


def to_model_range(images_u8):
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [-1, 1], the diffusion data range."""
    return images_u8.float().div(127.5).sub(1).unsqueeze(1)


def number_sequence(images, digits, caption_first: bool, layout: str = "paired"):
    """One training sequence for a number: its images (k, 1, 28, 28) and digits (k,).
    Neighbouring text is one segment: [BOS, 2, 0, SEP, 2], <img>, [0], <img>, [EOS]."""
    digits = digits.tolist()
    if not caption_first and layout == "paired":  # read: each image, then its digit; then the number
        seq = [torch.tensor([BOS])]
        for d, img in zip(digits, images):
            seq += [img, torch.tensor([d])]
        return seq[:-1] + [torch.tensor([digits[-1], SEP, *digits, EOS])]
    if not caption_first:   # read, grouped: the images, then the number
        return [torch.tensor([BOS]), *images, torch.tensor([SEP, *digits, EOS])]
    if layout == "grouped":  # draw: the number, then its images
        return [torch.tensor([BOS, *digits, SEP]), *images, torch.tensor([EOS])]
    seq, text = [], [BOS, *digits, SEP]   # draw, "paired": each image right after its own digit
    for d, img in zip(digits, images):
        seq += [torch.tensor(text + [d]), img]
        text = []
    return seq + [torch.tensor([EOS])]


def make_sequences(images, labels, gen, max_digits: int = 4, p_caption_first: float = 0.7,
                   layout: str = "paired"):
    """Digits (n, 1, 28, 28) in [-1, 1] and labels (n,) -> numbers of k = 1..max_digits digits
    (k uniform), every digit used once. Caption first with probability p_caption_first
    (train_mnist.py's default 0.7; the paper's §4.1 "Data": 0.8, docs/layout.md)."""
    return [number_sequence(images[i:i + k], labels[i:i + k], first, layout)
            for i, k, first in split_into_numbers(len(labels), gen, max_digits, p_caption_first)]


def split_into_numbers(n: int, gen, max_digits: int, p_caption_first: float):
    """n digits in a row -> numbers (first digit, k, caption first), k uniform in 1..max_digits
    (the last one shorter if the digits run out). A length and an order are drawn at once for as
    many numbers as there can be (n of one digit)."""
    lengths = torch.randint(1, max_digits + 1, (n,), generator=gen).tolist()
    caption_first = (torch.rand(n, generator=gen) < p_caption_first).tolist()
    numbers, i = [], 0
    for k, first in zip(lengths, caption_first):
        if i == n:
            break
        numbers.append((i, min(k, n - i), first))
        i += numbers[-1][1]
    return numbers


def number_batch(model, images, labels, gen, max_digits: int = 4, p_caption_first: float = 0.7):
    """Speed only, the default layout ("paired"): the packed training batch that
        transfusion_loss(model, make_sequences(images, labels, gen, ...), gen, packed=True)
    builds (condition dropout, the noise caps of §4.3.4, x_t), from the same random draws in the
    same order, the sequences written as lists of token ids (transfusion.packed_batch) instead of
    a tensor per segment: a test holds the two equal. Returns (batch, eps, t) for batch_loss."""
    cfg = model.cfg
    numbers = split_into_numbers(len(labels), gen, max_digits, p_caption_first)   # as make_sequences
    dropped = [False] * len(numbers)  # drop_condition: a caption-first number opens with its caption
    if model.training and cfg.cond_drop_prob > 0:
        draws = torch.rand(len(numbers), generator=gen).tolist()
        dropped = [first and r < cfg.cond_drop_prob for (_, _, first), r in zip(numbers, draws)]
    digits, N = labels.tolist(), cfg.n_patches
    seqs, which, t_max = [], [], []                                     # which: image m's digit in `images`

    def image(j, first):  # BOI, the N patches of image m = digit j, EOI
        which.append(j)
        t_max.append(cfg.T if first else cfg.image_first_max_t)         # max_timesteps
        return [BOI] + [-len(which)] * N + [EOI]

    for (i, k, first), drop in zip(numbers, dropped):                 # number_sequence, paired
        d = digits[i:i + k]
        if drop:                                                        # BOS <image>
            seq = [BOS] + image(i, first)
        elif first:                                                     # BOS 2 0 ; 2 <img> 0 <img> EOS
            seq = [BOS, *d, SEP]
            for j in range(k):
                seq += [d[j]] + image(i + j, first)
            seq += [EOS]
        else:                                                           # BOS <img> 2 <img> 0 ; 2 0 EOS
            seq = [BOS]
            for j in range(k):
                seq += image(i + j, first) + [d[j]]
            seq += [SEP, *d, EOS]
        seqs.append(seq)
    x0 = images[which].to(model.device)                                 # (M, C, I, I)
    t = 1 + (torch.rand(len(t_max), generator=gen) * torch.tensor(t_max, dtype=torch.float)).long()  # (M,)
    eps = torch.randn(x0.shape, generator=gen).to(model.device)
    xt = add_noise(x0, t.to(model.device), eps, model.alpha_bar)        # Eq. 2
    return packed_batch(cfg, seqs, xt, t, model.device), eps, t


def seq_len_needed(n_patches: int, max_digits: int) -> int:
    """Positions of the longest training sequence (paired, caption first), plus room for one
    more digit and image, so that a model that draws one image too many is seen doing it."""
    k = max_digits + 1
    return 1 + k + 1 + k * (1 + n_patches + 2) + 1


def mnist_config(**overrides) -> TransfusionConfig:
    """The model config for 28x28 digits with the vocabulary above: pixels, or with
    autoencoder=W the latent of an autoencoder (§2.3), LATENT = (channels, side, patch side)."""
    if overrides.get("autoencoder"):
        C, I, P = LATENT
        image = dict(image_size=I, channels=C, pixel_size=28, pixel_channels=1)
        overrides = {"patch_size": P, **overrides}
    else:
        I, image = 28, dict(image_size=28, channels=1)
    P = overrides.get("patch_size", TransfusionConfig.patch_size)
    base = dict(vocab_size=len(VOCAB), pad_id=PAD, bos_id=BOS, boi_id=BOI, eoi_id=EOI, eos_id=EOS,
                max_seq_len=seq_len_needed((I // P) ** 2 if P > 0 else 1, 4), **image)
    base.update(overrides)
    return TransfusionConfig(**base)



# ---------------------------------------------------------------------------
# Drawing and reading with a trained model
# ---------------------------------------------------------------------------

def _sampling(model, steps=None, guidance_scale=None, sampler=None):
    """The sampler settings for `model`: those given, else its checkpoint's, else SAMPLING."""
    d = {**SAMPLING, **getattr(model, "sample_defaults", {})}
    return dict(steps=steps or d["steps"], sampler=sampler or d["sampler"],
                guidance_scale=d["cfg_scale"] if guidance_scale is None else guidance_scale)


def as_model_images(images) -> torch.Tensor:
    """Handwritten digits -> (k, 1, 28, 28) floats in the model's range [-1, 1]. Takes floats in
    [0, 1], or uint8 pixels 0..255 as `load_digits` gives them (divided by 255); (k, 28, 28) or
    (k, 1, 28, 28). Anything else is a ValueError that says what to do."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a tensor (k, 1, 28, 28), not a {type(images).__name__}")
    if images.dtype == torch.uint8:
        images = images.float() / 255
    elif not images.is_floating_point():
        raise ValueError(f"images must be floats in [0, 1] or uint8 pixels 0..255, not {images.dtype}")
    if images.dim() == 3:
        images = images.unsqueeze(1)                                    # (k, 28, 28) -> (k, 1, 28, 28)
    if images.dim() != 4:  # the model checks the rest of the shape (transfusion.check_batch)
        raise ValueError(f"images must have shape (k, 1, 28, 28), not {tuple(images.shape)}")
    if len(images) == 0:
        raise ValueError("no images to read: give at least one (k >= 1)")
    if not images.isfinite().all():
        raise ValueError("images contain NaN or inf")
    lo, hi = images.min().item(), images.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(f"image values must be in [0, 1], not [{lo:g}, {hi:g}]"
                         + (": divide 0..255 pixels by 255" if hi > 1.5 else ""))
    return images * 2 - 1


@torch.no_grad()
def draw_numbers(model, numbers, *, steps=None, guidance_scale=None, sampler=None, batch_size=1000, seed=0,
                 on_step=None, use_cache=True):
    """Draw each number (a string of digits): the prompt is BOS <digits> ; and the model itself
    opens each image and decides when to stop (transfusion.generate, §3 "Inference").
    Returns, per number, (images (k, 1, 28, 28) in [0, 1], the full generated sequence):
    k is what the model drew, never padded."""
    kw = _sampling(model, steps, guidance_scale, sampler)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(numbers), batch_size):
        chunk = numbers[i:i + batch_size]
        prompts = [[torch.tensor([BOS] + [int(c) for c in n] + [SEP])] for n in chunk]
        longest = max(len(n) for n in chunk)
        seqs = model.generate(prompts, max_new_tokens=2 * longest + 3, generator=gen, on_step=on_step,
                              use_cache=use_cache, **kw)
        for seq in in_pixels(model, seqs):
            imgs = [((s.float() + 1) / 2).clamp(0, 1) for s in seq if s.is_floating_point()]
            out.append((torch.stack(imgs) if imgs else torch.zeros(0, 1, 28, 28), seq))
    return out


def in_pixels(model, seqs):
    """Sequences as the model reads and writes them -> the same with each image in pixels
    (1, 28, 28) in [-1, 1], on the CPU: a latent model's images decoded (§2.3), all at once."""
    images = [s for seq in seqs for s in seq if s.is_floating_point()]
    if not images:
        return [list(seq) for seq in seqs]
    pixels = iter(model.decode_images(torch.stack(images).to(model.device)).float().cpu())
    return [[next(pixels) if s.is_floating_point() else s for s in seq] for seq in seqs]


def draw_number(model, number: str, **kw):
    """The images (k, 1, 28, 28) in [0, 1] the model draws for one number, e.g. "2026"."""
    number = str(number)
    if not number.isdigit():
        raise ValueError(f"a number is a string of digits 0-9, not {number!r}")
    return draw_numbers(model, [number], **kw)[0][0]


def layout_of(model) -> str:
    """The layout a model was trained on (its checkpoint's --layout), which says how to prompt it."""
    return getattr(model, "sample_defaults", {}).get("layout", "paired")


@torch.no_grad()
def read_numbers(model, numbers, *, batch_size=2000, with_sequences=False):
    """Read handwritten numbers: each a tensor (k, 1, 28, 28) in [0, 1] (or as `as_model_images`
    takes them). The images come as
    the training data has them, then SEP ("these are all the images, write the number now"),
    and the model writes the number (greedy, §4.1) and EOS:
        paired layout: BOS <img> -> the model writes its digit, "2"; then the next image,
            and the model writes "0"; ...; then SEP. Each call of generate continues the
            sequence so far: the model reads each image as it comes, beside it.
        grouped layouts: BOS <img> ... <img> SEP, in one call.
    Returns strings of the digits written after SEP, up to EOS ("" if none; "?" marks a
    non-digit); with_sequences: (string, the whole sequence) pairs, for pictures."""
    device = next(model.parameters()).device
    numbers = [as_model_images(x).to(device) for x in numbers]         # each (k, 1, 28, 28) in [-1, 1]
    if model.autoencoder is not None:  # all at once: each (k, C, I, I), the latents the model reads (§2.3)
        latents = model.encode_images(torch.cat(numbers)).split([len(x) for x in numbers])
        numbers = list(latents)
    out = []
    for i in range(0, len(numbers), batch_size):
        chunk = numbers[i:i + batch_size]
        if layout_of(model) == "paired":
            seqs = [[torch.tensor([BOS])] for _ in chunk]
            for j in range(max(len(x) for x in chunk)):
                rows = [r for r, imgs in enumerate(chunk) if j < len(imgs)]
                prompts = [seqs[r] + [chunk[r][j]] for r in rows]
                for r, p, seq in zip(rows, prompts, model.generate(prompts, max_new_tokens=1, steps=1)):
                    # one token: its digit, we hope. Had it opened an image instead, the image it
                    # drew is dropped: the next image is the reader's, not the model's
                    seqs[r] = p + [s for s in seq[len(p):] if not s.is_floating_point()]
        else:
            seqs = [[torch.tensor([BOS])] + list(imgs) for imgs in chunk]
        prompts = [s + [torch.tensor([SEP])] for s in seqs]
        seqs = model.generate(prompts, max_new_tokens=max(len(x) for x in chunk) + 1, steps=1)
        for p, seq in zip(prompts, seqs):
            written = seq[len(p) - 1][1:].tolist()       # the text after SEP, up to an image if one was opened
            text = ""
            for tok in written:
                if tok == EOS:
                    break
                text += str(tok) if tok < 10 else "?"
            out.append((text, seq) if with_sequences else text)
    if with_sequences:
        texts, seqs = zip(*out) if out else ((), ())
        out = list(zip(texts, in_pixels(model, seqs)))
    return out


def read_number(model, images) -> str:
    """The number the model reads in handwritten digits (k, 1, 28, 28) in [0, 1]; uint8
    pixels 0..255 straight from `load_digits`, (k, 28, 28), are converted."""
    return read_numbers(model, [images])[0]


def generate_digits(model, labels, **kw):
    """One digit per label (N,), drawn from the prompt BOS "d" ; (a one-digit number).
    Returns (N, 1, 28, 28) in [0, 1]; a digit the model did not draw comes back blank
    (and counts as wrong for the referee)."""
    labels = torch.as_tensor(labels).long().flatten()
    drawn = draw_numbers(model, [str(int(d)) for d in labels], **kw)
    out = torch.zeros(len(labels), 1, 28, 28)
    for i, (imgs, _) in enumerate(drawn):
        if len(imgs):
            out[i] = imgs[0]
    return out


@torch.no_grad()
def caption_digits(model, images, *, batch_size=2000):
    """Label each image (N, 1, 28, 28) in [0, 1]: each is read as a one-digit number
    (`read_numbers`: BOS <image> 7 ; 7 EOS in the paired layout, the model writing both 7s).
    Returns (N,) digits; -1 unless it wrote exactly one digit after SEP before EOS."""
    texts = read_numbers(model, [x[None] for x in images], batch_size=batch_size)
    return torch.tensor([int(t) if len(t) == 1 and t.isdigit() else -1 for t in texts], dtype=torch.long)


def tokens_text(ids, names=None) -> str:
    """Token ids as text: digits (or class names), and the special tokens by name."""
    return " ".join((names[i] if names else str(i)) if i < 10 else VOCAB[i] for i in ids)
