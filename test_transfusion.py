"""Tests of Transfusion's method, one property each (pytest, CPU, seeded, < 1 minute).

Run: pytest -q
"""
import math
import os

import pytest
import torch

import transfusion
from transfusion import (Transfusion, TransfusionConfig, add_noise, classifier_free_guidance, collate,
                         cosine_alpha_bar, ddim_step, ddpm_step, drop_condition, max_timesteps, objective,
                         pack, patchify, sampling_timesteps, transfusion_mask, unpatchify)

HERE = os.path.dirname(os.path.abspath(__file__))
BOS, BOI, EOI, EOS, PAD = 11, 12, 13, 14, 10

# Tiny tensors: one thread is as fast, and several fight any other job for the cores
# (with a training run beside it on 2 cores, the suite took 151 s instead of 5 s).
torch.set_num_threads(1)


def tiny_config(**kw):
    base = dict(d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, image_size=4, patch_size=2,
                channels=1, max_seq_len=40, patch_encoder="linear", unet_channels=8)
    base.update(kw)
    return TransfusionConfig(**base)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = Transfusion(tiny_config(**kw))
    with torch.no_grad():  # wake the zero-initialised output layers, so every path carries signal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def image(seed, size=4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, size, size, generator=g) * 2 - 1


def text(*ids):
    return torch.tensor(ids)


def forward(model, seqs):
    return model(model.collate([model.with_markers(s) for s in seqs]))


# ---- the attention mask (§3 "Transfusion Attention", Fig. 4) ----

# BOS BOI p p p p EOI 7 BOI p p p p EOI: text, image, text, image; 1 = may attend
FIG4 = """
1 . . . . . . . . . . . . .
1 1 . . . . . . . . . . . .
1 1 1 1 1 1 . . . . . . . .
1 1 1 1 1 1 . . . . . . . .
1 1 1 1 1 1 . . . . . . . .
1 1 1 1 1 1 . . . . . . . .
1 1 1 1 1 1 1 . . . . . . .
1 1 1 1 1 1 1 1 . . . . . .
1 1 1 1 1 1 1 1 1 . . . . .
1 1 1 1 1 1 1 1 1 1 1 1 1 .
1 1 1 1 1 1 1 1 1 1 1 1 1 .
1 1 1 1 1 1 1 1 1 1 1 1 1 .
1 1 1 1 1 1 1 1 1 1 1 1 1 .
1 1 1 1 1 1 1 1 1 1 1 1 1 1
"""


def test_mask_matches_hand_written_figure_4():
    model = tiny_model()
    batch = model.collate([model.with_markers([text(BOS), image(0), text(7), image(1)])])
    assert batch.tokens[0].tolist() == [BOS, BOI, PAD, PAD, PAD, PAD, EOI, 7, BOI, PAD, PAD, PAD, PAD, EOI]
    expected = torch.tensor([[c == "1" for c in row.split()] for row in FIG4.strip().splitlines()])
    assert torch.equal(transfusion_mask(batch.img_id, batch.valid)[0], expected)


def test_mask_never_attends_to_padding():
    model = tiny_model()
    batch = model.collate([model.with_markers([text(BOS, 3), image(0), text(EOS)]), [text(BOS, 4)]])
    mask = transfusion_mask(batch.img_id, batch.valid)
    real_queries = batch.valid[1]
    assert not mask[1][real_queries][:, ~batch.valid[1]].any()
    eye = torch.eye(batch.tokens.shape[1], dtype=torch.bool)
    assert torch.equal(mask[1][:, ~batch.valid[1]], eye[:, ~batch.valid[1]])   # a padding key: only itself sees it
    assert mask.any(-1).all()  # every row (padding included) has a key, so softmax is defined


def test_causal_image_attention_is_the_plain_lower_triangle_on_valid_keys():
    """The ablation of §4.3.1: with image_attention="causal" nothing is added to the causal mask."""
    model = tiny_model()
    batch = model.collate([model.with_markers([text(BOS), image(0), text(7), image(1)]),
                           model.with_markers([text(BOS, 4), image(2)])])
    S = batch.tokens.shape[1]
    tril = torch.ones(S, S, dtype=torch.bool).tril() & batch.valid[:, None, :]
    causal = transfusion_mask(batch.img_id, batch.valid, bidirectional=False)
    assert torch.equal(causal, tril | torch.eye(S, dtype=torch.bool))
    same_image = (batch.img_id[:, :, None] == batch.img_id[:, None, :]) & (batch.img_id[:, :, None] >= 0)
    assert torch.equal(transfusion_mask(batch.img_id, batch.valid), causal | same_image)   # the only difference


def test_causal_image_attention_stops_later_patches_reaching_earlier_ones():
    """Linear patches (no U-Net to mix pixels): only the mask can carry the last patch to the first."""
    bi = tiny_model(patch_encoder="linear")
    causal = tiny_model(patch_encoder="linear", image_attention="causal")
    causal.load_state_dict(bi.state_dict())
    x = image(3)
    y = x.clone()
    y[:, 2:, 2:] -= 0.5                                 # the last patch in raster order
    a, b = [text(BOS, 3), x, text(5)], [text(BOS, 3), y, text(5)]
    (lb, eb), (lc, ec) = forward(bi, [a]), forward(causal, [a])
    (_, eb2), (_, ec2) = forward(bi, [b]), forward(causal, [b])
    first = lambda eps: patchify(eps, 2)[0, 0]          # the noise prediction of the first patch
    last = lambda eps: patchify(eps, 2)[0, -1]
    assert torch.allclose(first(ec), first(ec2), atol=1e-6)           # causal: the first patch cannot see it
    assert not torch.allclose(first(eb), first(eb2), atol=1e-4)       # bidirectional: it can
    assert not torch.allclose(last(ec), last(ec2), atol=1e-4)         # the changed patch itself still moves
    start = 2 + 1                                                     # BOS 3 BOI, then the patches
    assert torch.allclose(lb[:, :start], lc[:, :start], atol=1e-6)    # text before the image: unchanged
    text_only = [[text(BOS, 3, 4, 5)]]
    assert torch.allclose(forward(bi, text_only)[0], forward(causal, text_only)[0], atol=1e-6)


# ---- what each output may depend on ----

def test_pack_places_every_sequence_once_within_capacity():
    lengths = [5, 3, 2, 4, 1, 5, 2]
    where = pack(lengths, capacity=5)
    cells = {(r, o + k) for (r, o), n in zip(where, lengths) for k in range(n)}
    assert len(cells) == sum(lengths)                                   # no two sequences overlap
    assert all(o + n <= 5 for (r, o), n in zip(where, lengths))         # no row overflows
    assert 1 + max(r for r, _ in where) == 5                            # 22 positions in 5 rows of 5


@pytest.mark.parametrize("encoder", ["linear", "unet"])
def test_packed_rows_give_the_padded_batch_loss_and_gradients(encoder):
    """Training packs short sequences into shared rows: the mask keeps them apart and their
    positions restart, so the loss and every gradient are the padded batch's."""
    model = tiny_model(patch_encoder=encoder).train()
    seqs = [[text(BOS, 3), image(0), text(EOS)], [text(BOS), image(1), image(2), text(4, 5, EOS)],
            [text(BOS, 7)], [text(BOS), image(3), text(EOS)], [text(BOS, 1, 2)]]
    rows = [model.with_markers(s, t_clean=400) for s in seqs]
    eps = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    results = []
    for packed in (False, True):
        batch = collate(model.cfg, rows, "cpu", packed=packed)
        model.zero_grad()
        loss, lm, ddpm = objective(model.cfg, batch, *model(batch), eps)
        loss.backward()
        results.append((batch, [lm, ddpm], [p.grad.clone() for p in model.parameters()]))
    (padded, losses0, grads0), (packed, losses1, grads1) = results
    longest = max(padded.valid.sum(1)).item()
    assert packed.tokens.shape[0] < padded.tokens.shape[0] and packed.tokens.shape[1] == longest
    assert packed.valid.sum() == padded.valid.sum()                     # the same positions, less padding
    for a, b in zip(losses0 + grads0, losses1 + grads1):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_packed_rows_give_each_image_its_own_prediction_wherever_it_lands():
    """An image whose sequence is packed after another one in a row: its patches are found at
    their new columns, and every image's noise prediction and the LM loss are the padded batch's."""
    model = tiny_model()
    seqs = [[text(BOS, 3), image(0), text(4), image(1), text(EOS)],     # 16 positions: a row of its own
            [text(BOS, 1, 2, 3, 4, 5, 6, 7)],                          # 8: first in the next row ...
            [text(BOS), image(2), text(EOS)],                          # 8: ... and this one after it
            [text(BOS, 5), image(3)]]                                   # 8: the third row
    rows = [model.with_markers(s, t_clean=300) for s in seqs]
    padded, packed = collate(model.cfg, rows, "cpu"), collate(model.cfg, rows, "cpu", packed=True)
    assert packed.tokens.shape == (3, 16) and packed.img_col.tolist() != padded.img_col.tolist()
    r, c = packed.patch_index(model.cfg.n_patches)
    assert torch.equal(packed.img_id[r, c], torch.arange(4).repeat_interleave(model.cfg.n_patches))
    (l0, e0), (l1, e1) = model(padded), model(packed)
    assert torch.allclose(e0, e1, atol=1e-5)
    eps = torch.randn_like(e0)
    torch.testing.assert_close(objective(model.cfg, padded, l0, e0, eps), objective(model.cfg, packed, l1, e1, eps),
                               atol=1e-5, rtol=1e-4)


def test_changing_a_later_text_token_leaves_earlier_outputs_unchanged():
    model = tiny_model()
    a = [text(BOS, 3), image(0), text(5, 6, EOS)]
    b = [text(BOS, 3), image(0), text(5, 9, EOS)]
    (la, ea), (lb, eb) = forward(model, [a]), forward(model, [b])
    i = 1 + 1 + 4 + 1 + 1   # index of the changed token (after BOS 3 BOI p p p p EOI 5)
    assert torch.allclose(la[:, :i], lb[:, :i], atol=1e-6)
    assert torch.allclose(ea, eb, atol=1e-6)           # the image came before: untouched
    assert not torch.allclose(la[:, i:], lb[:, i:])    # the token itself and later ones see it


def test_one_patch_reaches_its_own_image_but_nothing_before_it():
    model = tiny_model()
    x2 = image(2)
    y2 = x2.clone()
    y2[:, :2, :2] += 0.5                               # the top-left patch of the second image
    a = [text(BOS, 3), image(1), text(4), x2]
    b = [text(BOS, 3), image(1), text(4), y2]
    (la, ea), (lb, eb) = forward(model, [a]), forward(model, [b])
    start = 2 + 1 + 4 + 1 + 1 + 1                      # first patch of the second image
    assert torch.allclose(la[:, :start], lb[:, :start], atol=1e-6)   # nothing before the image moves
    assert torch.allclose(ea[0], eb[0], atol=1e-6)     # the first image's noise prediction neither
    pa, pb = patchify(ea[1:], 2)[0], patchify(eb[1:], 2)[0]          # (N, P*P) per patch
    assert not torch.allclose(pa[1:], pb[1:], atol=1e-4)             # its other patches do (bidirectional)


def test_image_is_causal_across_images_but_bidirectional_inside():
    """Sanity check of the contrast in §4.3.1: the last patch also reaches the first one."""
    model = tiny_model()
    x = image(3)
    y = x.clone()
    y[:, 2:, 2:] -= 0.5                                 # the last patch in raster order
    _, ea = forward(model, [[text(BOS), x]])
    _, eb = forward(model, [[text(BOS), y]])
    assert not torch.allclose(patchify(ea, 2)[0, 0], patchify(eb, 2)[0, 0], atol=1e-4)


def test_rope_turns_each_pair_by_its_positions_angle():
    """apply_rope, as cos and sin: the pair (x[2j], x[2j+1]) at position p turns by the angle
    p * theta^(-2j/Dh); lengths are kept, position 0 is left as it is."""
    from transfusion import apply_rope, rope_table
    Dh, theta = 8, 10000.0
    x = torch.randn(3, 5, Dh, generator=torch.Generator().manual_seed(0))   # (H, S, Dh)
    y = apply_rope(x, rope_table(Dh, 5, theta))
    angle = torch.arange(5.0)[:, None] * theta ** (-torch.arange(0, Dh, 2) / Dh)  # (S, Dh/2)
    a, b = x[..., 0::2], x[..., 1::2]
    assert torch.allclose(y[..., 0::2], a * angle.cos() - b * angle.sin(), atol=1e-5)
    assert torch.allclose(y[..., 1::2], a * angle.sin() + b * angle.cos(), atol=1e-5)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)          # a rotation keeps lengths
    assert torch.equal(y[:, 0], x[:, 0])


def test_rope_outputs_depend_only_on_relative_positions():
    model = tiny_model()
    items = model.with_markers([text(BOS, 3), image(0), text(EOS)])
    l0, e0 = model(model.collate([items]))
    l5, e5 = model(model.collate([items], start_pos=[5]))
    assert torch.allclose(l0, l5, atol=1e-5) and torch.allclose(e0, e5, atol=1e-5)


# ---- patches ----

def test_patchify_is_raster_order_and_unpatchify_inverts_it():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).view(2, 3, 4, 4)
    p = patchify(x, 2)                                  # (2, 4, 12)
    assert p.shape == (2, 4, 12)
    assert torch.equal(p[0, 1].view(3, 2, 2), x[0, :, 0:2, 2:4])   # second patch: top-right
    assert torch.equal(p[0, 2].view(3, 2, 2), x[0, :, 2:4, 0:2])   # third: bottom-left
    assert torch.equal(unpatchify(p, 2, 3), x)


@pytest.mark.parametrize("encoder", ["linear", "unet"])
def test_the_noise_prediction_depends_on_the_timestep_it_is_told(encoder):
    """The same x_t shown at two different t gets two different predictions: the timestep
    embedding reaches the patches (§3, footnote 6)."""
    model = tiny_model(patch_encoder=encoder)
    x = image(4)
    _, e1 = model(model.collate([[text(BOS, 3, BOI), (x, 100)]]))
    _, e2 = model(model.collate([[text(BOS, 3, BOI), (x, 900)]]))
    assert not torch.allclose(e1, e2, atol=1e-4)


def test_a_half_resolution_unet_still_sees_every_pixel():
    """--unet-downsample 2 folds each 2x2 pixel block into channels before the U-Net's blocks
    (pixel-unshuffle) and back after: nothing is thrown away, so every input pixel moves the
    noise prediction, which keeps the image's shape."""
    model = tiny_model(patch_encoder="unet", unet_downsample=2, image_size=8, patch_size=4)
    x = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    _, e0 = model(model.collate([[text(BOS, 3, BOI), (x, 500)]]))
    assert e0.shape == (1, 1, 8, 8)
    for i, j in [(0, 0), (0, 1), (1, 0), (1, 1), (5, 6), (7, 7)]:   # every position of a 2x2 block, and others
        x2 = x.clone()
        x2[0, i, j] += 0.5
        _, e2 = model(model.collate([[text(BOS, 3, BOI), (x2, 500)]]))
        assert not torch.allclose(e0, e2, atol=1e-6), (i, j)


# ---- diffusion (§2.2) ----

def test_cosine_schedule_matches_closed_form_and_is_monotone():
    T, s = 1000, 0.008
    ab = cosine_alpha_bar(T, s, 0.999)
    assert ab.shape == (T + 1,) and ab[0] == 1
    assert (ab[1:] < ab[:-1]).all()                     # more noise at every step
    assert ab[1] > 0.9999 and ab[T] < 1e-4
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in (1, 250, 500, 900):                        # beta is not clipped here
        assert abs(ab[t].item() - f(t) / f(0)) < 1e-5


def test_add_noise_is_equation_2():
    ab = cosine_alpha_bar(1000)
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([1, 500, 1000])
    xt = add_noise(x0, t, eps, ab)
    for i in range(3):
        assert torch.allclose(xt[i], ab[t[i]].sqrt() * x0[i] + (1 - ab[t[i]]).sqrt() * eps[i])


@pytest.mark.parametrize("step", [ddpm_step, ddim_step])
def test_samplers_recover_x0_given_the_true_noise(step):
    """With an oracle eps-predictor every sampler must land exactly on the data."""
    ab = cosine_alpha_bar(1000)
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x0.shape, generator=g)
    for t, t_prev in sampling_timesteps(1000, 50):
        eps = (x - ab[t].sqrt() * x0) / (1 - ab[t]).sqrt()
        x = step(x, eps, t, t_prev, ab, torch.randn(x0.shape, generator=g))
    assert torch.allclose(x, x0, atol=1e-4)


def test_sampling_timesteps_respace_1000_to_250():
    pairs = sampling_timesteps(1000, 250)
    assert len(pairs) == 250 and pairs[0][0] == 1000 and pairs[-1] == (1, 0)
    assert all(t > tp for t, tp in pairs) and all(pairs[i][1] == pairs[i + 1][0] for i in range(249))


def test_guidance_scale_1_is_conditional_and_0_unconditional():
    c, u = torch.randn(5), torch.randn(5)
    assert torch.allclose(classifier_free_guidance(c, u, 1.0), c, atol=1e-6)   # up to rounding
    assert torch.allclose(classifier_free_guidance(c, u, 0.0), u, atol=1e-6)
    assert torch.allclose(classifier_free_guidance(c, u, 3.0), c + 2 * (c - u))


def test_model_uses_the_cosine_schedule_with_the_papers_constants():
    """T = 1000 steps (§2.2), Nichol & Dhariwal's s = 0.008 and beta clipped at 0.999: the last
    step keeps 0.1% of alpha_bar, so alpha_bar_T is tiny but x_0 can still be inverted."""
    cfg = TransfusionConfig()
    assert (cfg.T, cfg.cosine_s, cfg.max_beta) == (1000, 0.008, 0.999)
    ab = cosine_alpha_bar(1000, 0.008, 0.999)
    assert torch.equal(Transfusion(tiny_config()).alpha_bar, ab)
    assert abs((ab[1000] / ab[999]).item() - (1 - 0.999)) < 1e-6 and ab[1000] > 0   # beta_T clipped


@pytest.mark.parametrize("steps", [1, 7, 250, 1000])
def test_sampling_timesteps_are_evenly_spaced_from_T_down_to_0(steps):
    pairs = sampling_timesteps(1000, steps)
    ts = [t for t, _ in pairs]
    assert len(pairs) == steps and ts[0] == 1000 and pairs[-1][1] == 0
    assert [tp for _, tp in pairs] == ts[1:] + [0]          # each step starts where the last one ended
    if steps > 1:
        assert ts[-1] == 1                                  # the last jump is from t = 1 to the data
        gap = 999 / (steps - 1)
        assert all(math.floor(gap) <= a - b <= math.ceil(gap) for a, b in zip(ts, ts[1:]))
    if steps == 1000:
        assert ts == list(range(1000, 0, -1))


def test_predict_x0_inverts_equation_2_and_clips_to_the_data_range():
    from transfusion import predict_x0
    ab = cosine_alpha_bar(1000)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(8, 1, 4, 4, generator=g) * 1.8 - 0.9, torch.randn(8, 1, 4, 4, generator=g)
    for t in (1, 300, 700):
        xt = ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * eps
        assert torch.allclose(predict_x0(xt, eps, ab[t]), x0, atol=1e-4)
        wild = predict_x0(xt, eps + 3, ab[t])                # a bad noise estimate: x_0 would leave [-1, 1]
        assert wild.min() >= -1 and wild.max() <= 1
        assert torch.allclose(wild, ((xt - (1 - ab[t]).sqrt() * (eps + 3)) / ab[t].sqrt()).clamp(-1, 1), atol=1e-5)


def forward_draws(x0, t, ab, n, g):
    """n samples of x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I), with their noise."""
    eps = torch.randn((n,) + tuple(x0.shape[1:]), generator=g)
    return ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * eps, eps


@pytest.mark.parametrize("step", [ddpm_step, ddim_step])
def test_one_sampler_step_from_q_xt_lands_on_q_xtprev_given_the_true_noise(step):
    """The marginal is kept: if x_t ~ q(x_t | x_0) and the step knows the true noise, x_{t_prev}
    ~ q(x_{t_prev} | x_0), with mean sqrt(ab_prev) x_0 and variance 1 - ab_prev, at every jump
    of a respaced schedule (DDPM: through its posterior's mean and variance; DDIM: exactly)."""
    ab = cosine_alpha_bar(1000)
    pairs = sampling_timesteps(1000, 10)                     # (1000, 889), (889, 778), ..., (112, 1), (1, 0)
    g = torch.Generator().manual_seed(0)
    n = 20000
    x0 = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)   # 16 pixels, each its own x_0
    for t, t_prev in [pairs[0], pairs[4], pairs[-2], pairs[-1]]:
        xt, eps = forward_draws(x0, t, ab, n, g)
        x = step(xt, eps, t, t_prev, ab, torch.randn(xt.shape, generator=g))
        r = x - ab[t_prev].sqrt() * x0                       # should be N(0, 1 - ab_prev) in every pixel
        var = (1 - ab[t_prev]).item()
        assert r.mean(0).abs().max() < 5 * math.sqrt(var / n) + 1e-4, (t, t_prev)
        assert abs(r.pow(2).mean().item() - var) < 0.02 * var + 1e-6, (t, t_prev)
        if step is ddim_step:                               # deterministic: the same noise, moved to t_prev
            assert torch.allclose(x, ab[t_prev].sqrt() * x0 + (1 - ab[t_prev]).sqrt() * eps, atol=2e-3)


def test_ddpm_step_is_the_posterior_of_ho_et_al_eq_7():
    """q(x_{t_prev} | x_t, x_0) with beta of the jump: mean sqrt(ab_prev) beta / (1 - ab_t) x_0
    + sqrt(1 - beta) (1 - ab_prev) / (1 - ab_t) x_t, variance (1 - ab_prev) / (1 - ab_t) beta."""
    ab = cosine_alpha_bar(1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 4, 4, generator=g) * 1.8 - 0.9
    for t, t_prev in [(1000, 889), (600, 400), (250, 249), (112, 1), (40, 0)]:
        xt, eps = forward_draws(x0, t, ab, 4, g)
        beta = 1 - ab[t] / ab[t_prev]
        mu = (ab[t_prev].sqrt() * beta / (1 - ab[t]) * x0
              + (1 - beta).sqrt() * (1 - ab[t_prev]) / (1 - ab[t]) * xt)
        var = (1 - ab[t_prev]) / (1 - ab[t]) * beta
        z = torch.randn(xt.shape, generator=g)
        mean = ddpm_step(xt, eps, t, t_prev, ab, torch.zeros_like(z))
        assert torch.allclose(mean, mu, atol=2e-3 if t == 1000 else 1e-5), (t, t_prev)
        assert torch.allclose(ddpm_step(xt, eps, t, t_prev, ab, z) - mean, var.sqrt() * z, atol=1e-5), (t, t_prev)
    assert torch.allclose(mean, x0, atol=1e-5)               # the last jump, to t = 0: x_0 itself, no noise


@pytest.mark.parametrize("step", [ddpm_step, ddim_step])
def test_a_zero_length_step_leaves_x_t_where_it_is_even_when_x0_is_clipped(step):
    """t_prev = t: nothing to denoise. DDPM's jump has beta = 0; DDIM recomputes the noise that
    is consistent with its clipped x_0, so it lands on x_t too."""
    ab = cosine_alpha_bar(1000)
    g = torch.Generator().manual_seed(0)
    xt, eps = torch.randn(4, 1, 4, 4, generator=g), 3 * torch.randn(4, 1, 4, 4, generator=g)   # x_0 clipped
    for t in (20, 500, 900):
        assert torch.allclose(step(xt, eps, t, t, ab, torch.randn(xt.shape, generator=g)), xt, atol=1e-5)


# ---- the training objective (§3, Eq. 4) ----

def test_no_lm_loss_at_boi_patches_or_padding():
    model = tiny_model()
    seqs = [model.with_markers([text(BOS, 3), image(0), text(5, EOS)]), model.with_markers([text(BOS, 4)])]
    batch = model.collate(seqs)
    logits, eps_hat = model(batch)
    eps = torch.randn_like(eps_hat)
    base = objective(model.cfg, batch, logits, eps_hat, eps)[1]
    no_loss_inputs = (batch.tokens == BOI) | ~batch.valid | (batch.img_id >= 0)
    noisy = logits + 10 * torch.randn_like(logits) * no_loss_inputs[..., None]
    assert torch.allclose(objective(model.cfg, batch, noisy, eps_hat, eps)[1], base)
    # ... and the targets there (patch and padding ids) are never read
    batch.tokens = batch.tokens.masked_fill((batch.img_id >= 0) | ~batch.valid, 7)
    assert torch.allclose(objective(model.cfg, batch, logits, eps_hat, eps)[1], base)
    # while a text input does carry LM loss (here: EOI predicting 5)
    at_eoi = (batch.tokens == EOI)[..., None]
    assert not torch.allclose(objective(model.cfg, batch, logits + 10 * at_eoi * torch.randn_like(logits),
                                        eps_hat, eps)[1], base)


def test_lm_loss_trains_the_model_to_open_images():
    """The token before BOI is a text input, so BOI is a target: the model learns to emit it."""
    model = tiny_model()
    batch = model.collate([model.with_markers([text(BOS, 3), image(0)])])
    logits, eps_hat = model(batch)
    boost = torch.zeros_like(logits)
    boost[0, 1, BOI] = 50.0                            # input "3" predicting BOI
    lm = objective(model.cfg, batch, logits, eps_hat, torch.zeros_like(eps_hat))[1]
    assert objective(model.cfg, batch, logits + boost, eps_hat, torch.zeros_like(eps_hat))[1] < lm


def test_lm_targets_are_the_next_text_token_but_none_from_boi_or_patches():
    """Eq. 1 on the stream BOS 3 BOI <4 patches> EOI 5 EOS: every text input predicts the next
    token (EOS and BOI included); BOI predicts nothing (footnote 8), nor do patches or padding."""
    model = tiny_model()
    batch = model.collate([model.with_markers([text(BOS, 3), image(0), text(5, EOS)]),
                           model.with_markers([text(BOS), image(1), image(2), text(EOS)]),
                           model.with_markers([text(BOS, 4)])])
    no = -1
    assert batch.targets[0].tolist()[:10] == [3, BOI, no, no, no, no, no, 5, EOS, no]
    assert batch.targets[1].tolist() == [BOI, no, no, no, no, no, BOI, no, no, no, no, no, EOS, no]
    assert batch.targets[2].tolist() == [4, no] + [no] * 12


def test_diffusion_loss_is_a_mean_over_images_of_per_image_mse():
    model = tiny_model()
    seqs = [model.with_markers([text(BOS, 1), image(0), text(2), image(1)]),
            model.with_markers([text(BOS, 3), image(2)])]
    batch = model.collate(seqs)
    logits, eps_hat = model(batch)
    eps = eps_hat.detach() + torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1)   # image m is off by m+1
    ddpm = objective(model.cfg, batch, logits, eps_hat, eps)[2]
    assert torch.allclose(ddpm, torch.tensor((1 + 4 + 9) / 3))  # each image weighs the same


def test_total_loss_is_lm_plus_lambda_ddpm():
    model = tiny_model(lam=5.0)
    total, lm, ddpm = model.loss([[text(BOS, 3), image(0), text(EOS)]], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(total, lm + 5.0 * ddpm)


def test_defaults_are_the_papers_lambda_5_and_noise_cap_500():
    cfg = TransfusionConfig()
    assert (cfg.lam, cfg.image_first_max_t, cfg.T) == (5.0, 500, 1000)   # Eq. 4's lambda (§4.1), §4.3.4's cap


def test_the_loss_shows_each_image_at_its_t_and_regresses_the_noise_it_added(monkeypatch):
    """Eq. 2-3 inside transfusion_loss: the model sees x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps
    together with that image's own t, and its prediction is scored against that same eps."""
    import transfusion
    model = tiny_model(cond_drop_prob=0.0)
    noised, scored = [], []
    add_noise_, objective_ = transfusion.add_noise, transfusion.objective
    monkeypatch.setattr(transfusion, "add_noise",
                        lambda x0, t, eps, ab: noised.append((x0, t, eps)) or add_noise_(x0, t, eps, ab))
    monkeypatch.setattr(transfusion, "objective",
                        lambda cfg, batch, logits, eps_hat, eps, weight=None: scored.append((batch, eps)) or
                        objective_(cfg, batch, logits, eps_hat, eps, weight))
    model.loss([[text(BOS, 3), image(0), text(EOS)], [text(BOS), image(1), text(4), image(2), text(EOS)]],
               generator=torch.Generator().manual_seed(0))
    (x0, t, eps), (batch, target) = noised[0], scored[0]
    assert torch.equal(x0, torch.stack([image(0), image(1), image(2)]))     # the clean images, in order
    assert len(set(t.tolist())) == 3                                        # each its own t
    assert torch.equal(batch.t, t) and torch.equal(target, eps)
    ab = model.alpha_bar[t].view(-1, 1, 1, 1)
    assert torch.allclose(batch.images, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)


def test_images_before_their_caption_are_capped_at_t_500():
    """§4.3.4: every image of a sequence that opens with an image, the later ones too (each is
    followed by its caption); no image of a sequence that opens with text."""
    model = tiny_model()
    seqs = [[text(BOS), image(0), text(3, EOS)],                           # image first
            [text(BOS, 3), image(1), text(EOS)],                           # caption first
            [text(BOS), image(2), text(4), image(3), text(5, EOS)],        # image first: both capped
            [text(BOS, 4, 5, 4), image(4), text(5), image(5), text(EOS)]]  # caption first: neither
    assert max_timesteps(model.cfg, seqs) == [500, 1000, 500, 500, 1000, 1000]


def test_a_dropped_caption_does_not_cap_the_noise(monkeypatch):
    """Unconditional examples must cover t up to T, or guidance has no unconditional
    prediction at high noise."""
    import transfusion
    model = tiny_model(cond_drop_prob=1.0).train()
    seen = []
    real = transfusion.add_noise
    monkeypatch.setattr(transfusion, "add_noise", lambda x0, t, eps, ab: seen.append(t) or real(x0, t, eps, ab))
    model.loss([[text(BOS, 3), image(0), text(EOS)]] * 64, generator=torch.Generator().manual_seed(0))
    assert seen[0].max() > 500


def timesteps_the_loss_draws(model, seqs, monkeypatch, seed=0):
    """The t that transfusion_loss gives each image, in order (M,): a spy on add_noise stops
    the loss there, before the forward pass, so that thousands of draws cost little."""
    import transfusion

    class Drawn(Exception):
        pass

    seen = []

    def spy(x0, t, eps, alpha_bar):
        seen.append(t.clone())
        raise Drawn
    monkeypatch.setattr(transfusion, "add_noise", spy)
    with pytest.raises(Drawn):
        model.loss(seqs, generator=torch.Generator().manual_seed(seed))
    return seen[0]


def assert_uniform_up_to(t, cap, exact_ends=True):
    """t (n,) looks like draws uniform in 1..cap."""
    assert t.min() >= 1 and t.max() <= cap
    assert t.max() > 0.98 * cap and t.min() <= 0.02 * cap          # both ends are reached
    if exact_ends:
        assert t.min() == 1 and t.max() == cap
    assert abs(t.float().mean().item() - (cap + 1) / 2) < 0.04 * cap


def test_images_before_their_caption_never_draw_t_above_500_in_the_loss(monkeypatch):
    """§4.3.4 where the loss draws t: each image of an image-first sequence is noised at
    t in 1..500, each image of a caption-first one at t in 1..T, image by image in a mixed batch."""
    model = tiny_model(cond_drop_prob=0.0)
    block = [[text(BOS), image(0), text(3, EOS)],                      # image first: 500
             [text(BOS, 3), image(1), image(2), text(EOS)],            # caption first: T, T
             [text(BOS), image(3), text(4), image(4), text(5, EOS)],   # image first: 500, 500
             [text(BOS, 4), image(5), text(EOS)]]                      # caption first: T
    caps = [500, 1000, 1000, 500, 500, 1000]
    t = timesteps_the_loss_draws(model, block * 2000, monkeypatch).view(2000, len(caps))   # (draws, images)
    for slot, cap in enumerate(caps):                       # every image its own cap: none shifted
        assert_uniform_up_to(t[:, slot], cap, exact_ends=False)
    capped = torch.tensor(caps) == 500
    assert_uniform_up_to(t[:, capped].flatten(), 500)       # 6000 draws: t = 1 and t = 500 both occur
    assert_uniform_up_to(t[:, ~capped].flatten(), 1000, exact_ends=False)


def test_a_dropped_caption_keeps_its_images_caption_first_noise_range(monkeypatch):
    """Condition dropout turns BOS 3 <image> into BOS <image>: that image is still trained at
    every t up to T (it is the unconditional prediction guidance needs at high noise), while
    image-first sequences, which dropout leaves alone, keep their cap of 500."""
    model = tiny_model(cond_drop_prob=1.0).train()
    block = [[text(BOS), image(0), text(3), image(1), text(4, EOS)],  # image first, kept: 500, 500
             [text(BOS, 3), image(2), text(5), image(3), text(EOS)],  # dropped to BOS <image 2>: T
             [text(BOS, 4), image(4), text(EOS)],                     # dropped to BOS <image 4>: T
             [text(BOS), image(5), text(4, EOS)]]                     # image first, kept: 500
    caps = [500, 500, 1000, 1000, 500]                                # image 3 went with its caption
    t = timesteps_the_loss_draws(model, block * 1000, monkeypatch)
    assert t.shape == (1000 * len(caps),)
    t = t.view(1000, len(caps))
    for slot, cap in enumerate(caps):
        assert_uniform_up_to(t[:, slot], cap, exact_ends=False)


def test_condition_dropout_happens_only_in_training(monkeypatch):
    """cond_drop_prob = 1: a training loss sees BOS <image> (the later image gone with its
    caption); the same loss in eval mode sees the whole sequence."""
    seqs = [[text(BOS, 3), image(0), text(4), image(1), text(EOS)]]
    model = tiny_model(cond_drop_prob=1.0)
    assert timesteps_the_loss_draws(model.train(), seqs, monkeypatch).numel() == 1
    assert timesteps_the_loss_draws(model.eval(), seqs, monkeypatch).numel() == 2


def test_condition_dropout_leaves_bos_and_the_image():
    """The caption goes, and so does the text after the image: BOS <image> EOI -> EOS would
    contradict the image-first data (BOS <image> EOI -> caption) that trains the captioner."""
    model = tiny_model(cond_drop_prob=1.0)
    x = image(0)
    dropped = drop_condition(model.cfg, [[text(BOS, 3), x, text(EOS)], [text(BOS), x, text(3, EOS)],
                                         [text(BOS, 3), x, text(4), image(1), text(EOS)]])
    assert dropped[0][0].tolist() == [BOS] and dropped[0][1] is x and len(dropped[0]) == 2
    assert len(dropped[2]) == 2 and dropped[2][1] is x
    assert dropped[1][0].tolist() == [BOS] and dropped[1][2].tolist() == [3, EOS]
    keep = TransfusionConfig(**{**model.cfg.__dict__, "cond_drop_prob": 0.0})
    assert drop_condition(keep, [[text(BOS, 3), x]])[0][0].tolist() == [BOS, 3]


# ---- learning and decoding (§3 "Inference") ----

@pytest.fixture(scope="module")
def trained_tiny():
    """A tiny model overfit to two sequences: "3" draws one image, BOS <image> is captioned "5"."""
    torch.manual_seed(0)
    model = Transfusion(tiny_config(cond_drop_prob=0.0))
    seqs = [[text(BOS, 3), image(7), text(EOS)], [text(BOS), image(8), text(5, EOS)]]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for i in range(150):
        total, lm, ddpm = model.loss(seqs * 8, generator=g)
        first = first or (lm.item(), ddpm.item())
        opt.zero_grad()
        total.backward()
        opt.step()
    return model.eval(), first, (lm.item(), ddpm.item())


def test_tiny_model_overfits_a_tiny_batch(trained_tiny):
    _, (lm0, ddpm0), (lm1, ddpm1) = trained_tiny
    # 2 of the 6 text targets follow BOS, which is "3" or BOI half the time each:
    # ln(2) nats there is all a perfect model can do, a mean of ln(2)/3 per target
    floor = math.log(2) / 3
    assert lm0 > 2.0 and lm1 < floor + 0.03 and ddpm1 < 0.5 * ddpm0


def test_generate_opens_an_image_of_n_patches_then_eoi(trained_tiny):
    model, _, _ = trained_tiny
    out = model.generate([[text(BOS, 3)], [text(BOS), image(8)]], steps=20, generator=torch.Generator().manual_seed(0))
    seq = out[0]
    assert [s.tolist() if not s.is_floating_point() else tuple(s.shape) for s in seq] == [[BOS, 3], (1, 4, 4), [EOS]]
    stream = model.collate([model.with_markers(seq)])
    assert stream.tokens[0, :3].tolist() == [BOS, 3, BOI]
    assert (stream.img_id[0, 3:7] == 0).all() and stream.tokens[0, 7:].tolist() == [EOI, EOS]   # N = 4
    assert seq[1].abs().max() <= 1
    assert out[1][-1].tolist() == [5, EOS]            # the image prompt gets its caption


def test_generated_image_resembles_the_training_image(trained_tiny):
    model, _, _ = trained_tiny
    img = model.generate([[text(BOS, 3)]], steps=50, guidance_scale=1.0, generator=torch.Generator().manual_seed(1))[0][1]
    assert (img - image(7)).pow(2).mean() < 0.5 * (image(8) - image(7)).pow(2).mean()


@pytest.mark.parametrize("encoder", ["linear", "unet"])
def test_kv_cached_decoding_equals_full_recomputation(encoder):
    model = tiny_model(patch_encoder=encoder)
    prompts = [[text(BOS, 3)], [text(BOS), image(5)], [text(BOS, 2, 6)]]
    kw = dict(steps=8, max_new_tokens=6, temperature=1.0, guidance_scale=2.0)
    fast = model.generate(prompts, generator=torch.Generator().manual_seed(0), **kw)
    slow = model.generate(prompts, generator=torch.Generator().manual_seed(0), use_cache=False, **kw)
    assert any(s.is_floating_point() for seq in fast for s in seq[1:])   # an image was drawn
    for a, b in zip(fast, slow):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.allclose(x.float(), y.float(), atol=1e-4)


def test_unet_slices_give_the_numbers_of_one_call():
    model = tiny_model(patch_encoder="unet")
    u = model.patches
    x, temb = torch.randn(7, 1, 4, 4), torch.randn(7, model.cfg.d_model)
    with torch.no_grad():
        u.slice = 100
        h, skip = u.encode(x, temb)
        y = u.decode(h, temb, skip)
        u.slice = 3                                     # 7 images: slices of 3, 3 and 1
        h3, skip3 = u.encode(x, temb)
        y3 = u.decode(h3, temb, skip3)
    torch.testing.assert_close(h3, h, rtol=0, atol=1e-6)
    torch.testing.assert_close(skip3, skip, rtol=0, atol=1e-6)
    torch.testing.assert_close(y3, y, rtol=0, atol=1e-6)


def test_guidance_encodes_each_x_t_once_and_draws_what_two_encodings_draw(monkeypatch):
    import transfusion
    model = tiny_model(patch_encoder="unet", max_seq_len=20)
    force_next_token(model, {3: BOI, EOI: 4, 4: BOI})     # two images a row, drawn in two phases
    prompts = [[text(BOS, 3)], [text(BOS, 2, 6, 3)]]
    kw = dict(steps=3, max_new_tokens=8, guidance_scale=2.0)
    calls = []
    encode = type(model.patches).encode
    monkeypatch.setattr(type(model.patches), "encode",
                        lambda self, x, temb: calls.append(len(x)) or encode(self, x, temb))
    once = model.generate(prompts, generator=torch.Generator().manual_seed(0), **kw)
    assert calls == [2] * 4 + [2] * 4          # per phase: 3 steps encoding x_t once, then the clean images

    class Twice:  # DownPathOnce switched off: both passes encode x_t
        def __init__(self, patches):
            pass

        def __enter__(self):
            pass

        def __exit__(self, *exc):
            pass
    monkeypatch.setattr(transfusion, "DownPathOnce", Twice)
    calls.clear()
    twice = model.generate(prompts, generator=torch.Generator().manual_seed(0), **kw)
    assert len(calls) == 2 * (2 * 3 + 1)
    assert [sum(s.is_floating_point() for s in a) for a in once] == [2, 2]
    assert [len(a) for a in once] == [len(b) for b in twice]
    for a, b in zip(once, twice):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert "encode" not in vars(model.patches)             # the block put the method back


def test_min_snr_weights_only_the_low_noise_steps_and_off_is_the_papers_loss(monkeypatch):
    import transfusion
    ab = cosine_alpha_bar(1000)
    w = transfusion.min_snr_weight(ab[1:], 5.0)                           # t = 1..1000
    snr = ab[1:] / (1 - ab[1:])
    assert torch.allclose(w[snr <= 5], torch.ones(int((snr <= 5).sum())))  # noisy steps keep weight 1
    assert torch.allclose(w[snr > 5], 5 / snr[snr > 5]) and (w[snr > 5] < 1).all()
    # the objective weighs each image's MSE; the loss passes the weights of the t it drew
    model = tiny_model()
    batch = model.collate([model.with_markers([text(BOS, 1), image(0), text(2), image(1), image(2)])])
    logits, eps_hat = model(batch)
    eps = eps_hat.detach() + torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1)   # MSEs 1, 4, 9
    ddpm = objective(model.cfg, batch, logits, eps_hat, eps, torch.tensor([1.0, 0.5, 0.0]))[2]
    assert torch.allclose(ddpm, torch.tensor((1 + 2 + 0) / 3))
    seen = []
    monkeypatch.setattr(transfusion, "min_snr_weight", lambda ab_t, g: seen.append(g) or torch.zeros_like(ab_t))
    seq = [[text(BOS, 3), image(0), text(EOS)]]
    assert tiny_model().loss(seq, generator=torch.Generator().manual_seed(0))[2] > 0 and not seen
    assert TransfusionConfig().min_snr_gamma == 0                          # the paper's Eq. 3 by default
    assert tiny_model(min_snr_gamma=5.0).loss(seq, generator=torch.Generator().manual_seed(0))[2] == 0
    assert seen == [5.0]


def test_kv_cache_logits_match_a_full_forward():
    from transfusion import KVCache, forward_cached
    model = tiny_model()
    items = model.with_markers([text(BOS, 3), image(0), text(5, 6)])
    full, _ = model(model.collate([items]))
    cache = KVCache()
    forward_cached(model, model.collate([items[:2]]), cache)            # BOS 3 | BOI
    step, _ = forward_cached(model, model.collate([items[2:4]], start_pos=[3]), cache)   # ... BOI, then patches + EOI
    last, _ = forward_cached(model, model.collate([items[4:]], start_pos=[3 + 4 + 1]), cache)   # ... then 5 6
    assert torch.allclose(step[0], full[0, 3:8], atol=1e-5)
    assert torch.allclose(last[0], full[0, 8:], atol=1e-5)


def force_next_token(model, rule):
    """Rig the LM head: the token after input a is rule[a] (EOS otherwise); images untouched."""
    predict_ = model.predict

    def rigged(h, batch, image_state):
        logits, eps = predict_(h, batch, image_state)
        nxt = torch.full_like(batch.tokens, EOS)
        for a, b in rule.items():
            nxt[batch.tokens == a] = b
        return torch.full_like(logits, -1e4).scatter(-1, nxt[..., None], 0.0), eps

    model.predict = rigged


def test_each_row_takes_its_own_path():
    model = tiny_model()
    force_next_token(model, {3: BOI, 4: EOS})          # "3" opens an image, "4" ends the text
    out = model.generate([[text(BOS, 3)], [text(BOS, 4)]], steps=4)
    assert [s.is_floating_point() for s in out[0]] == [False, True, False] and out[0][-1].tolist() == [EOS]
    assert len(out[1]) == 1 and out[1][0].tolist() == [BOS, 4, EOS]


def test_boi_without_room_for_the_image_ends_the_row():
    model = tiny_model(max_seq_len=6)                  # BOS 3 BOI + 4 patches + EOI = 8 > 6
    force_next_token(model, {3: BOI})
    out = model.generate([[text(BOS, 3)]], steps=2)
    assert len(out[0]) == 1 and out[0][0].tolist() == [BOS, 3]   # no half image, no dangling BOI


def assert_same_segments(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.allclose(x, y, atol=1e-4) if x.is_floating_point() else torch.equal(x, y)


def test_reference_decoding_loop_and_batched_generate_agree():
    """generate_reference (one prompt, no cache: §3 "Inference" as written) and the batched,
    KV-cached generate make the same segments from the same seed."""
    kw = dict(steps=4, max_new_tokens=6, temperature=1.0, guidance_scale=2.0)
    free = tiny_model()
    one = tiny_model()
    force_next_token(one, {3: BOI})                     # BOS 3 BOI <image> EOI EOS
    two = tiny_model(max_seq_len=20)                    # room for two images of 4 patches, not three
    force_next_token(two, {3: BOI, EOI: 4, 4: BOI})     # BOS 3 <image> 4 <image> 4, then BOI without room
    cases = [(free, [text(BOS, 2, 6)], None), (free, [text(BOS), image(5)], None),
             (one, [text(BOS, 3)], 1), (two, [text(BOS, 3)], 2)]
    for model, prompt, n_images in cases:
        for seed in (0, 1):
            ref = model.generate_reference(prompt, generator=torch.Generator().manual_seed(seed), **kw)
            fast = model.generate([prompt], generator=torch.Generator().manual_seed(seed), **kw)[0]
            assert_same_segments(ref, fast)
            assert len(ref) > len(prompt) or ref[-1].numel() > prompt[-1].numel()   # something was generated
            if n_images is not None:
                assert sum(s.is_floating_point() for s in ref) == n_images


def test_kv_cache_hides_the_columns_a_waiting_row_skipped():
    """Row 0 opens an image at once and waits while row 1 writes 5 6: every cached call adds a
    column to every row, so row 0's cache holds columns it sat out. Its image must not see them:
    cached decoding equals recomputing each row from its start."""
    model = tiny_model()
    force_next_token(model, {3: BOI, 4: 5, 5: 6, 6: BOI, EOI: 7})
    prompts = [[text(BOS, 3)], [text(BOS, 4)]]
    kw = dict(steps=3, max_new_tokens=8, guidance_scale=2.0)
    fast = model.generate(prompts, generator=torch.Generator().manual_seed(0), **kw)
    slow = model.generate(prompts, generator=torch.Generator().manual_seed(0), use_cache=False, **kw)
    assert [s.tolist() for s in fast[1] if not s.is_floating_point()] == [[BOS, 4, 5, 6], [7, EOS]]
    assert [s.tolist() for s in fast[0] if not s.is_floating_point()] == [[BOS, 3], [7, EOS]]
    for a, b in zip(fast, slow):
        assert_same_segments(a, b)


@pytest.mark.parametrize("decoder", ["generate_reference", "generate", "generate without cache"])
def test_guidance_pushes_each_image_away_from_its_bos_boi_prediction(decoder, monkeypatch):
    """Classifier-free guidance as the decoders use it: at every denoising step the sampler gets
    eps_u + s (eps_c - eps_u), where eps_c is the model's prediction in the image's own context
    (its prompt, the earlier images) and eps_u the prediction in the context BOS BOI <x_t>, for
    the first image and a later one alike. Both are recomputed here from plain forward passes."""
    import transfusion
    scale = 3.0
    model = tiny_model(max_seq_len=20)                 # room for two images of 4 patches, not three
    force_next_token(model, {3: BOI, EOI: 4, 4: BOI})  # BOS .. 3 <image> 4 <image> 4, then no room
    seen = []                                          # (x_t, the eps the sampler got, t) at each step
    ddpm = transfusion.SAMPLERS["ddpm"]
    monkeypatch.setitem(transfusion.SAMPLERS, "ddpm",
                        lambda x, eps, t, *a: seen.append((x.clone(), eps.clone(), t)) or ddpm(x, eps, t, *a))
    prompts = [[text(BOS, 3)], [text(BOS, 2, 6, 3)]]
    kw = dict(steps=3, max_new_tokens=8, guidance_scale=scale, generator=torch.Generator().manual_seed(0))
    if decoder == "generate_reference":
        prompts = prompts[:1]
        outs = [model.generate_reference(prompts[0], **kw)]
    else:
        outs = model.generate(prompts, use_cache=decoder == "generate", **kw)
    contexts = [[model.with_markers(out[:k]) + [text(BOI)] for k, seg in enumerate(out) if seg.is_floating_point()]
                for out in outs]                       # what each drawn image came after
    assert all(len(c) == 2 for c in contexts)          # each row drew two images
    assert len(seen) == 2 * 3                           # two drawing phases of 3 steps, the rows together
    apart = 0.0
    for i, (x, eps, t) in enumerate(seen):
        assert x.shape[0] == len(prompts)
        for b in range(len(prompts)):
            xt = (x[b], t)
            cond = model(model.collate([contexts[b][i // 3] + [xt]]))[1][-1]
            uncond = model(model.collate([[text(BOS, BOI), xt]]))[1][0]
            assert torch.allclose(eps[b], uncond + scale * (cond - uncond), atol=1e-4), (decoder, i, b)
            apart = max(apart, (cond - uncond).abs().max().item())
    assert apart > 1e-2                                # the two contexts do predict differently


def test_the_method_trains_and_decodes_without_the_speed_section():
    """Sections 1-9 alone, executed in a fresh namespace (no packing, no KV cache, no batched
    generate): a tiny model's loss falls, and generate_reference follows §3 "Inference":
    BOS 3 -> BOI, an image of noise denoised, EOI, and back to text."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfusion.py")
    source = open(path, encoding="utf-8").read()
    head, header, _ = source.partition("\n# ---- 10. Speed")
    assert header, "transfusion.py has no section 10 header"
    ns = {"__name__": "transfusion_sections_1_to_9"}
    exec(compile(head, "transfusion.py, sections 1-9", "exec"), ns)
    assert not {"pack_batch", "KVCache", "forward_cached", "generate"} & set(ns)   # the speed section is gone
    torch.manual_seed(0)
    model = ns["Transfusion"](ns["TransfusionConfig"](**{**tiny_config().__dict__, "cond_drop_prob": 0.0}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        total, lm, ddpm = model.loss([[text(BOS, 3), image(7), text(EOS)]] * 8, generator=g)
        losses.append((lm.item(), ddpm.item()))
        opt.zero_grad()
        total.backward()
        opt.step()
    (lm0, ddpm0), (lm1, ddpm1) = losses[0], losses[-1]
    assert lm1 < 0.1 * lm0 and ddpm1 < ddpm0
    reads = []                                          # every sequence the decoding loop shows the model
    collate_ = ns["collate"]
    ns["collate"] = lambda cfg, seqs, *a, **k: reads.append(seqs) or collate_(cfg, seqs, *a, **k)
    out = ns["generate_reference"](model.eval(), [text(BOS, 3)], steps=5, guidance_scale=3.0,
                                   generator=torch.Generator().manual_seed(0))
    assert [s.tolist() if not s.is_floating_point() else tuple(s.shape) for s in out] == [[BOS, 3], (1, 4, 4), [EOS]]
    assert out[1].abs().max() <= 1
    last = reads[-1][0]                                 # the read that wrote EOS: BOS 3 | BOI | image | EOI
    assert [x.tolist() for x in (last[0], last[1], last[3])] == [[BOS, 3], [BOI], [EOI]]
    assert torch.equal(last[2][0], out[1]) and last[2][1] == model.cfg.clean_t   # the drawn image, clean


# ---- bad input gets a clear error ----

@pytest.mark.parametrize("seq, message", [
    ([text(BOS), torch.rand(1, 5, 5)], "shape"),
    ([text(BOS), torch.rand(3, 4, 4)], "shape"),
    ([text(BOS), torch.rand(4, 4)], "shape"),
    ([text(BOS, 16)], "outside the vocabulary"),
    ([text(BOS, -1)], "outside the vocabulary"),
    ([text(BOS, BOI)], "BOI"),
    ([text(BOS, 3), image(0), text(PAD)], "PAD"),
    ([text(*([BOS] * 41))], "longer than max_seq_len"),
    ([text(BOS)] + [image(0)] * 7, "longer than max_seq_len"),
    ([], "non-empty"),
    ([text(BOS), [1, 2]], "not a tensor"),
    ([torch.tensor([[BOS]])], "1-D"),
    ([torch.tensor([True])], "dtype"),
])
def test_bad_input_raises_value_error(seq, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model.loss([seq])
    with pytest.raises(ValueError, match=message):
        model.generate([seq], steps=2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_image_with_nan_or_inf_raises_naming_the_segment(bad):
    model = tiny_model()
    x = image(1)
    x[0, 2, 3] = bad
    seqs = [[text(BOS, 3), image(0), text(EOS)], [text(BOS, 4), image(2), text(5), x]]
    with pytest.raises(ValueError, match="image segment 3 of sequence 1 contains NaN or inf"):
        model.loss(seqs)
    with pytest.raises(ValueError, match="image segment 3 of sequence 1 contains NaN or inf"):
        model.generate(seqs, steps=2)


def test_empty_batch_raises():
    model = tiny_model()
    with pytest.raises(ValueError, match="empty"):
        model.loss([])
    with pytest.raises(ValueError, match="empty"):
        model.generate([])


def test_bad_config_and_sampler_arguments_raise():
    with pytest.raises(ValueError, match="patch_size"):
        TransfusionConfig(image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="unet_channels"):
        TransfusionConfig(patch_encoder="unet", unet_channels=0)
    TransfusionConfig(patch_encoder="unet", unet_channels=12)  # any width: the GroupNorm has one group
    with pytest.raises(ValueError, match="clean_t"):
        TransfusionConfig(clean_t=0)
    with pytest.raises(ValueError, match="image_attention"):
        TransfusionConfig(image_attention="full")
    model = tiny_model()
    with pytest.raises(ValueError, match="sampler"):
        model.generate([[text(BOS)]], sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        model.generate([[text(BOS)]], steps=0)


# ---- train_mnist.py on a synthetic stand-in for MNIST ----

def write_fake_mnist(root, folder="MNIST"):
    """Tiny MNIST in torchvision's raw layout (digit d: a bright bar at row 2 + 2d), as bench.py uses."""
    from mnist_numbers import write_standin_mnist
    return write_standin_mnist(root, folder=folder)


TINY_RUN = ["--batch-size", "8", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--ffn-hidden", "64",
            "--unet-channels", "8", "--sample-steps", "3", "--referee-epochs", "1", "--log-every", "0",
            "--autoencoder-steps", "5", "--autoencoder", "4"]   # a latent model, as the default, but small
NO_EVAL = ["--eval-per-label", "0", "--eval-captions", "0", "--eval-numbers", "0", "--eval-reading", "0"]


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_mnist(str(root))
    return str(root)


def run_script(data, out, *extra, log=None):
    import train_mnist as tm
    lines = []
    rc = tm.main(["--data-dir", data, "--out", str(out), *TINY_RUN, *extra], log=log or lines.append)
    return rc, lines


def test_train_script_end_to_end_on_synthetic_digits(fake_data, tmp_path):
    import train_mnist as tm
    out = tmp_path / "out"
    rc, lines = run_script(fake_data, out, "--steps", "4", "--eval-per-label", "2", "--eval-captions", "20",
                           "--eval-numbers", "3", "--eval-reading", "3")
    assert rc == 0
    for name in ("ckpt.pt", "samples.png", "captions.png", "denoise.png", "loss.png", "mask.png", "referee.pt",
                 "numbers.png", "reading.png", "free.png"):
        assert (out / name).stat().st_size > 0, name
    report = "\n".join(lines)
    for metric in ("caption accuracy", "label->image", "Frechet distance", "number->images exact",
                   "images->number exact", "wrong image count"):
        assert metric in report, metric
    model = tm.load_checkpoint(str(out / "ckpt.pt"))
    assert model.autoencoder is not None and model.cfg.image_size == 8 and not model.training  # latents (§2.3)
    digits = tm.generate_digits(model, torch.tensor([3, 7]), steps=2)
    assert digits.shape == (2, 1, 28, 28) and digits.min() >= 0 and digits.max() <= 1
    caps = tm.caption_digits(model, digits)
    assert caps.shape == (2,) and caps.dtype == torch.long and ((caps >= -1) & (caps <= 9)).all()
    drawn = tm.draw_number(model, "42", steps=2)
    assert drawn.dim() == 4 and drawn.shape[1:] == (1, 28, 28)     # k images: what the model drew
    assert isinstance(tm.read_number(model, digits), str)


def test_train_script_missing_data_is_a_message_not_a_traceback(tmp_path, capsys, monkeypatch):
    import train_mnist as tm
    import torchvision.datasets.mnist as tvm
    monkeypatch.setattr(tvm.MNIST, "download", lambda self: (_ for _ in ()).throw(RuntimeError("offline")))
    rc = tm.main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "train-images-idx3-ubyte" in err and "Traceback" not in err


# ---- latent images (§2.3): an autoencoder trained first, then frozen ----

def test_a_fitted_autoencoder_gives_unit_latents_inside_their_bounds_and_decodes_back(fake_data):
    import torch.nn.functional as F
    import mnist_numbers as mn
    from transfusion import ImageAutoencoder
    x = mn.to_model_range(mn.load_digits(fake_data, True)[0])            # (n, 1, 28, 28) in [-1, 1]
    torch.manual_seed(0)
    ae = ImageAutoencoder(mn.mnist_config(autoencoder=8))
    before = F.mse_loss(ae.decode(ae.encode(x)), x)
    fitted = ae.fit(x, steps=40, batch_size=32, generator=torch.Generator().manual_seed(0))
    z = ae.encode(x)
    assert torch.equal(fitted, z)                                        # fit returns encode's latents, bit for bit
    assert z.shape == (len(x), 4, 8, 8) and z.dtype == torch.float32
    # each channel at the scale the noise schedule assumes: mean 0, variance 1 over the training images
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(z.std((0, 2, 3)), torch.ones(4), atol=1e-4)
    assert (ae.lo <= z).all() and (z <= ae.hi).all() and (ae.lo < ae.hi).all()   # the samplers' clip box
    back = ae.decode(z)
    assert back.shape == x.shape and back.min() >= -1 and back.max() <= 1
    assert ae.decode(20 * z[:8]).abs().max() <= 1                        # pixels in range, whatever the latent
    assert ae.decode(z[:0]).shape == (0, 1, 28, 28) and ae.encode(x[:0]).shape == (0, 4, 8, 8)   # none: none
    assert F.mse_loss(back, x) < 0.5 * before                          # it learned to reconstruct
    with torch.autocast("cpu", dtype=torch.bfloat16):                   # fp32 under the model's autocast
        assert ae.encode(x[:8]).dtype == torch.float32 and torch.allclose(ae.encode(x[:8]), z[:8], atol=1e-5)
    assert not any(p.requires_grad or p.grad is not None for p in ae.parameters())   # frozen, no stale gradient


def test_the_channels_last_autoencoder_computes_the_plain_convs(fake_data):
    # speed only: the convs run channels-last; the layers' plain (N, C, H, W) results, handed on
    # in the plain layout (a later .view of a channels-last tensor would fail)
    import torch.nn.functional as F
    import mnist_numbers as mn
    from transfusion import ImageAutoencoder
    x = mn.to_model_range(mn.load_digits(fake_data, True)[0][:16])
    torch.manual_seed(0)
    ae = ImageAutoencoder(mn.mnist_config(autoencoder=8))
    plain = {k: v.contiguous() for k, v in ae.state_dict().items()}
    z_ref = torch.func.functional_call(ae.enc, {k[4:]: v for k, v in plain.items() if k.startswith("enc.")},
                                       (F.pad(x, (2,) * 4, value=-1.0),))
    x_ref = torch.func.functional_call(ae.dec, {k[4:]: v for k, v in plain.items() if k.startswith("dec.")},
                                       (z_ref,))[..., 2:30, 2:30]
    z, back = ae.raw_encode(x), ae.raw_decode(z_ref)
    assert z.is_contiguous() and back.is_contiguous() and back.shape == x.shape
    assert torch.allclose(z, z_ref, atol=1e-5) and torch.allclose(back, x_ref, atol=1e-5)


def test_predict_x0_clips_each_latent_number_to_its_own_bounds():
    from transfusion import predict_x0
    lo = -torch.arange(1.0, 9.0).view(2, 2, 2)                           # a box per number: [-1, 1] ... [-8, 8]
    x0 = torch.tensor([5.0, -5.0]).repeat(4).view(1, 2, 2, 2)
    ab = torch.tensor(1.0)                                               # alpha_bar = 1: x_0 = x_t
    got = predict_x0(x0, torch.zeros_like(x0), ab, (lo, -lo))
    assert torch.equal(got, torch.maximum(torch.minimum(x0, -lo), lo))
    assert got.flatten().tolist() == [1, -2, 3, -4, 5, -5, 5, -5]       # clipped where outside, kept inside


def test_a_latent_model_samples_inside_the_box_and_draws_and_reads_pixels(fake_data):
    import bench
    import mnist_numbers as mn
    torch.manual_seed(0)
    model = bench.ScriptedText(mn.mnist_config(autoencoder=8, d_model=32, n_heads=2, n_layers=1, ffn_hidden=64,
                                               unet_channels=8)).eval()   # text scripted: "7" opens an image
    u8 = mn.load_digits(fake_data, True)[0]
    model.autoencoder.fit(mn.to_model_range(u8), steps=5, generator=torch.Generator().manual_seed(0))
    lo, hi = model.x0_range
    assert lo is model.autoencoder.lo and hi is model.autoencoder.hi and (hi > 1).any()   # not pixels' [-1, 1]
    xs = []
    (imgs, seq), = mn.draw_numbers(model, ["7"], steps=3, on_step=lambda t, x: xs.append(x.clone()))
    x = xs[-1]                                                            # the last step's x_0, clipped
    assert x.shape == (1, 4, 8, 8) and (lo - 1e-5 <= x).all() and (x <= hi + 1e-5).all()
    assert imgs.shape == (1, 1, 28, 28) and 0 <= imgs.min() and imgs.max() <= 1      # decoded to pixels
    assert torch.allclose(imgs[0], (model.decode_images(x)[0] + 1) / 2, atol=1e-5)
    assert [tuple(s.shape) for s in seq if s.is_floating_point()] == [(1, 28, 28)]   # the sequence in pixels too
    (text, read_seq), = mn.read_numbers(model, [u8[:2]], with_sequences=True)      # pixels in, encoded once
    given = [s for s in read_seq if s.is_floating_point()][:2]         # (the scripted text draws one more)
    assert all(torch.allclose(g, model.decode_images(model.encode_images(mn.as_model_images(d[None])))[0], atol=1e-5)
               for g, d in zip(given, u8[:2])) and len(given) == 2      # what the model read, as pixels


def test_training_steps_leave_the_autoencoder_as_fitted(fake_data):
    import train_mnist as tm
    args = tm.parse_args(["--data-dir", fake_data, *TINY_RUN])
    state = tm.new_state(args, torch.device("cpu"))
    model = state["model"]
    u8, labels = tm.load_digits(fake_data, True)
    model.autoencoder.fit(tm.to_model_range(u8), steps=5)
    fitted = {k: v.clone() for k, v in model.autoencoder.state_dict().items()}
    learned = sum(p.numel() for g in state["opt"].param_groups for p in g["params"])
    assert learned == model.num_params() == sum(p.numel() for p in state["model_params"])   # no autoencoder
    images = model.encode_images(tm.to_model_range(u8))
    for _ in range(3):
        tm.run_step(state, args, images, labels, bf16=False)
    assert all(torch.equal(v, model.autoencoder.state_dict()[k]) for k, v in fitted.items())


# ---- handwritten numbers: layouts, caps, prompt boundaries ----

def test_training_sequences_follow_the_paper_mix():
    import train_mnist as tm
    g = torch.Generator().manual_seed(0)
    imgs, labels = torch.zeros(4000, 1, 28, 28), torch.arange(4000) % 10
    seqs = tm.make_sequences(imgs, labels, g, p_caption_first=0.8)
    caption_first = sum(s[0].numel() > 1 for s in seqs) / len(seqs)   # BOS <number> ; ...
    assert 0.77 < caption_first < 0.83                 # §4.1: caption first 80% of the time
    sizes = [sum(x.is_floating_point() for x in s) for s in seqs]
    assert sum(sizes) == 4000 and set(sizes) == {1, 2, 3, 4}   # every digit once, numbers of 1-4 digits
    assert all(0.2 < sizes.count(k) / len(sizes) < 0.3 for k in (1, 2, 3, 4))
    assert all(s[0][0] == tm.BOS and s[-1][-1] == tm.EOS for s in seqs)
    more_reading = tm.make_sequences(imgs, labels, g, p_caption_first=0.6)   # --caption-first 0.6
    assert 0.57 < sum(s[0].numel() > 1 for s in more_reading) / len(more_reading) < 0.63


@pytest.mark.parametrize("encoder", ["linear", "unet"])
def test_the_fast_training_batch_is_the_methods_batch_and_loss(encoder):
    """Speed only: train_mnist.py builds each step's batch with mnist_numbers.number_batch; it
    must be the batch that make_sequences and transfusion_loss build from the same generator
    (the numbers, condition dropout, the noise caps, t, eps, x_t, packing, mask and targets),
    and give the same loss."""
    import mnist_numbers as mn
    from transfusion import batch_loss
    torch.manual_seed(0)
    model = Transfusion(mn.mnist_config(d_model=32, n_heads=2, ffn_hidden=64, unet_channels=4, patch_encoder=encoder,
                                        patch_size=7, cond_drop_prob=0.3)).train()   # 30%: several drops a batch
    imgs, labels = torch.rand(96, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (96,))
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        seqs = mn.make_sequences(imgs, labels, g)
        with pytest.MonkeyPatch.context() as mp:   # the loss's batch, eps and t, before the forward pass
            mp.setattr(transfusion, "batch_loss", lambda model, batch, eps, t: (batch, eps, t))
            slow, eps, t = transfusion.transfusion_loss(model, seqs, g, packed=True)
        fast, eps_f, t_f = mn.number_batch(model, imgs, labels, torch.Generator().manual_seed(seed))
        assert torch.equal(eps, eps_f) and torch.equal(t, t_f) and t.max() > 500         # caption-first t > 500
        assert len(t) < 96                                                                 # some captions dropped
        for name in ("tokens", "img_id", "valid", "pos", "mask", "targets", "images", "t", "img_row", "img_col"):
            assert torch.equal(getattr(slow, name), getattr(fast, name)), name
        torch.testing.assert_close(torch.stack(batch_loss(model, fast, eps_f, t_f)),
                                   torch.stack(batch_loss(model, slow, eps, t)), rtol=0, atol=0)


def stream(seq):
    """A training sequence as the model sees it: token names, 'img' for each image."""
    import train_mnist as tm
    names = []
    for seg in seq:
        names += ["img"] if seg.is_floating_point() else [tm.VOCAB[int(t)] for t in seg]
    return " ".join(names)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_number_layouts_and_noise_caps(k):
    import train_mnist as tm
    digits = torch.tensor([2, 0, 2, 6][:k])
    imgs = torch.zeros(k, 1, 28, 28)
    num = " ".join(map(str, digits.tolist()))
    seqs = {(layout, first): tm.number_sequence(imgs, digits, caption_first=first, layout=layout)
            for layout in tm.LAYOUTS for first in (True, False)}
    draw_pairs = " ".join(f"{d} img" for d in digits.tolist())
    read_pairs = " ".join(f"img {d}" for d in digits.tolist())
    imgs_only = " ".join(["img"] * k)
    assert stream(seqs["paired", True]) == f"<bos> {num} ; {draw_pairs} <eos>"
    assert stream(seqs["paired", False]) == f"<bos> {read_pairs} ; {num} <eos>"
    assert stream(seqs["read-grouped", True]) == f"<bos> {num} ; {draw_pairs} <eos>"
    assert stream(seqs["read-grouped", False]) == f"<bos> {imgs_only} ; {num} <eos>"
    assert stream(seqs["grouped", True]) == f"<bos> {num} ; {imgs_only} <eos>"
    assert stream(seqs["grouped", False]) == f"<bos> {imgs_only} ; {num} <eos>"
    from transfusion import check_batch, max_timesteps
    cfg = tm.mnist_config(d_model=32, n_heads=2, n_layers=1, ffn_hidden=64, unet_channels=4)   # pixels, as imgs
    check_batch(cfg, list(seqs.values()))              # all fit max_seq_len
    # §4.3.4: images before their caption (all of an image-first number) are capped at t <= 500
    for (layout, first), seq in seqs.items():
        assert max_timesteps(cfg, [seq]) == [1000 if first else 500] * k, layout


class Oracle:
    """A perfect reader for read_numbers: it continues each prompt as the training sequence
    `truth` does (a stream of token names), and checks that the prompt is a prefix of it."""

    autoencoder = None                                 # it reads pixels

    def __init__(self, truth, layout):
        self.truth, self.sample_defaults, self.prompts = truth.split(), {"layout": layout}, []

    def parameters(self):
        return iter([torch.zeros(1)])

    def generate(self, prompts, max_new_tokens, **kw):
        import train_mnist as tm
        out = []
        for p in prompts:
            seen = stream(p).split()
            assert self.truth[:len(seen)] == seen, "a prompt that is not the start of a training sequence"
            self.prompts.append(" ".join(seen))
            new = torch.tensor([tm.VOCAB.index(t) for t in self.truth[len(seen):len(seen) + max_new_tokens]])
            # as generate returns it: text written after text extends that segment
            out.append(list(p[:-1]) + [torch.cat([p[-1], new])] if not p[-1].is_floating_point() else list(p) + [new])
        return out


@pytest.mark.parametrize("layout", ["paired", "read-grouped"])
def test_prompts_end_where_the_training_sequence_switches_mode(layout):
    # drawing: the prompt "BOS 2 0 ;" is the training sequence up to where the model takes over
    # (it writes "2" and opens the first image). Reading: every prompt read_number gives the
    # model is the training sequence up to a token the model writes: in the paired layout each
    # image's digit, then, after ";", the number
    import train_mnist as tm
    imgs, digits = torch.rand(2, 1, 28, 28), torch.tensor([2, 0])
    draw = stream(tm.number_sequence(imgs, digits, caption_first=True, layout=layout))
    assert draw.startswith("<bos> 2 0 ; 2 img") and draw.count(";") == 1
    oracle = Oracle(stream(tm.number_sequence(imgs, digits, caption_first=False, layout=layout)), layout)
    assert tm.read_number(oracle, imgs) == "20"
    assert oracle.prompts == (["<bos> img", "<bos> img 2 img", "<bos> img 2 img 0 ;"] if layout == "paired"
                              else ["<bos> img img ;"])


def number_model_vocab(**kw):
    return tiny_model(vocab_size=16, **kw)             # the MNIST vocabulary: ten digits, five specials and ";"


@pytest.fixture(scope="module")
def trained_numbers():
    """A tiny model overfit on two numbers, "35" and "7", in both orders."""
    import train_mnist as tm
    torch.manual_seed(0)
    model = Transfusion(tiny_config(vocab_size=16, cond_drop_prob=0.0))
    imgs = {"35": torch.stack([image(3), image(5)]), "7": image(7)[None]}
    seqs = [tm.number_sequence(imgs[n], torch.tensor([int(c) for c in n]), first)
            for n in imgs for first in (True, False)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        total, _, _ = model.loss(seqs * 6, generator=g)
        opt.zero_grad()
        total.backward()
        opt.step()
    return model.eval(), imgs


def test_a_tiny_model_opens_one_image_per_digit_then_stops(trained_numbers):
    import train_mnist as tm
    model, _ = trained_numbers
    drawn = tm.draw_numbers(model, ["35", "7"], steps=10)
    (two, seq2), (one, seq1) = drawn
    assert len(two) == 2 and len(one) == 1
    assert seq2[-1][-1] == tm.EOS and seq1[-1][-1] == tm.EOS   # it decided to stop
    assert [int(seg[-1]) for seg in seq2 if not seg.is_floating_point()][:2] == [3, 5]  # each digit before its image


def test_read_number_returns_the_caption_of_its_training_images(trained_numbers):
    import train_mnist as tm
    model, imgs = trained_numbers
    as_01 = {n: (x + 1) / 2 for n, x in imgs.items()}  # read_number takes images in [0, 1]
    assert tm.read_number(model, as_01["35"]) == "35"
    assert tm.read_number(model, as_01["7"]) == "7"


def test_a_reader_that_opens_images_of_its_own_keeps_only_the_given_ones():
    """Where a digit belongs the model may open an image instead: read_numbers drops what it
    drew (the next image is the reader's), so the sequence holds the given images and fits."""
    import train_mnist as tm
    model = number_model_vocab()
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + 100 * torch.nn.functional.one_hot(torch.tensor(BOI), out.shape[-1]))
    (read, seq), = tm.read_numbers(model, [torch.rand(4, 1, 4, 4)], with_sequences=True)
    sep = next(i for i, s in enumerate(seq) if not s.is_floating_point() and tm.SEP in s.tolist())
    assert sum(s.is_floating_point() for s in seq[:sep]) == 4   # the four given images, none of its own
    assert read == ""                                            # and it wrote no digit


def test_kv_cache_and_recomputation_agree_on_a_multi_image_prompt():
    model = number_model_vocab()
    prompts = [[text(BOS), image(1), image(2), text(15)], [text(BOS, 3, 5, 15, 3), image(4), text(5)]]
    kw = dict(steps=5, max_new_tokens=5, temperature=1.0, guidance_scale=2.0)
    fast = model.generate(prompts, generator=torch.Generator().manual_seed(0), **kw)
    slow = model.generate(prompts, generator=torch.Generator().manual_seed(0), use_cache=False, **kw)
    for a, b in zip(fast, slow):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and (torch.equal(x, y) if not x.is_floating_point() else torch.allclose(x, y, atol=1e-4))


# ---- runs defined by steps: reproducible, safe on Ctrl-C, resumable ----

def ckpt_tensors(path):
    ck = torch.load(path, weights_only=True)
    return ck, {**{"ema." + k: v for k, v in ck["model"].items()},
                **{"raw." + k: v for k, v in ck["train"]["model"].items()}}


def test_same_seed_same_model(fake_data, tmp_path):
    for name in ("a", "b"):
        assert run_script(fake_data, tmp_path / name, "--steps", "6", *NO_EVAL)[0] == 0
    (ca, ta), (cb, tb) = ckpt_tensors(tmp_path / "a" / "ckpt.pt"), ckpt_tensors(tmp_path / "b" / "ckpt.pt")
    assert ca["train"]["hist"] == cb["train"]["hist"] and len(ca["train"]["hist"]["lm"]) == 6
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not (tmp_path / "a" / "referee.pt").exists()     # nothing drawn to judge: no referee trained


def test_a_run_spares_a_core_for_its_first_steps_and_the_split_is_a_step_not_a_clock(fake_data, tmp_path,
                                                                                    monkeypatch):
    """The referee trains in a helper process while the model trains: the command line's run
    trains its first REFEREE_CORE_STEPS steps on one thread fewer, then on all of them again, at
    that step whatever the helper is doing (the thread count changes float rounding)."""
    import train_mnist as tm
    threads = torch.get_num_threads()
    seen, step_ = [], tm.train_step
    monkeypatch.setattr(tm, "REFEREE_CORE_STEPS", 3)
    monkeypatch.setattr(tm, "train_step", lambda *a, **k: seen.append(torch.get_num_threads()) or step_(*a, **k))
    assert run_script(fake_data, tmp_path / "a", "--steps", "5", *NO_EVAL, "--eval-per-label", "1")[0] == 0
    fewer = max(threads - 1, 1)
    assert seen == [fewer] * 3 + [threads] * 2 and torch.get_num_threads() == threads
    assert (tmp_path / "a" / "referee.pt").exists()                 # the helper's work, waited for


def test_a_helper_process_trains_the_referee_this_process_trains_on_one_thread(fake_data, tmp_path):
    """OnOneCore runs a function in a fresh Python on one thread: the referee it trains (and saves)
    is the one trained here with one thread; an error in it comes back with its message."""
    import mnist_eval as me
    threads = torch.get_num_threads()
    helper = me.OnOneCore(me.fit_referee, fake_data, "mnist", 1, str(tmp_path / "a.pt"), None).start()
    try:
        torch.set_num_threads(1)
        here = me.fit_referee(fake_data, "mnist", 1, str(tmp_path / "b.pt"), None)
    finally:
        torch.set_num_threads(threads)
    referee, saved = helper.result(), torch.load(tmp_path / "a.pt", weights_only=True)
    for k, v in here.state_dict().items():
        assert torch.equal(referee.state_dict()[k], v) and torch.equal(saved[k], v)
    with pytest.raises(RuntimeError, match="ValueError: math domain error"):
        me.OnOneCore(math.sqrt, -1.0).start().result()


def test_bf16_is_the_default_only_where_it_pays_and_gives_the_fp32_loss_to_bf16_rounding(tmp_path):
    import train_mnist as tm
    from transfusion import bf16_is_fast
    cpu = torch.device("cpu")
    flags = tmp_path / "cpuinfo"
    flags.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw\n")       # AVX-512, no bf16
    assert not bf16_is_fast(cpu, str(flags)) and not bf16_is_fast(cpu, str(tmp_path / "none"))
    flags.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")    # a Zen 4: AVX-512 BF16
    assert bf16_is_fast(cpu, str(flags))
    flags.write_text("processor\t: 0\nflags\t\t: fpu amx_bf16 amx_tile\n")            # a Xeon with AMX
    assert bf16_is_fast(cpu, str(flags)) and not bf16_is_fast(torch.device("meta"), str(flags))
    assert tm.use_bf16(cpu) == bf16_is_fast(cpu)                          # the default: this CPU's answer
    assert tm.use_bf16(cpu, cpu_bf16=True) and not tm.use_bf16(cpu, True) and not tm.use_bf16(cpu, True, True)
    with pytest.raises(SystemExit):
        tm.parse_args(["--bf16", "--fp32"])
    model = tiny_model(patch_encoder="unet").train()
    seqs = [[text(BOS, 3), image(0), text(EOS)], [image(1), text(4, EOS)]]
    losses = []
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses.append(torch.stack(model.loss(seqs, generator=torch.Generator().manual_seed(0))).float())
    assert not torch.equal(losses[0], losses[1])                          # autocast did round
    assert torch.allclose(losses[0], losses[1], rtol=0.01)                # bf16: 8 bits of mantissa


def test_attention_is_sdpa_with_the_mask_and_runs_in_fp32_under_bf16_autocast():
    """The written-out attention is softmax(q k^T / sqrt(Dh)) v over the keys the mask allows
    (torch's scaled_dot_product_attention as the reference). Llama's reference computes its
    softmax in fp32; under bf16 autocast ours does too: fp32 attention of the bf16 queries,
    keys and values, not bf16 attention."""
    from transfusion import Attention
    cfg = tiny_config()
    attn = Attention(cfg)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, cfg.n_heads, 6, cfg.d_model // cfg.n_heads, generator=g).bfloat16() for _ in range(3))
    mask = torch.ones(6, 6, dtype=torch.bool).tril() | (torch.rand(6, 6, generator=g) < 0.3)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fp32, bf16 = sdpa(q.float(), k.float(), v.float(), attn_mask=mask), sdpa(q, k, v, attn_mask=mask)
    heads_joined = lambda a: a.transpose(1, 2).reshape(2, 6, -1)       # (B, H, S, Dh) -> (B, S, D)
    with torch.no_grad():
        assert torch.allclose(attn.attend(q.float(), k.float(), v.float(), mask), attn.wo(heads_joined(fp32)), atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = attn.attend(q, k, v, mask)
            assert torch.allclose(y.float(), attn.wo(heads_joined(fp32)).float(), atol=1e-6)
            assert not torch.allclose(y.float(), attn.wo(heads_joined(bf16)).float(), atol=1e-6)  # not bf16's


def test_the_evaluation_samples_in_trainings_precision_on_a_cpu_and_the_referee_judges_in_fp32():
    import mnist_eval
    import train_mnist as tm
    cpu = torch.device("cpu")
    with tm.eval_precision(cpu, True):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
        referee = mnist_eval.Referee().eval()
        x = torch.rand(3, 1, 28, 28)
        judged = mnist_eval.batched(referee, x)
    with tm.eval_precision(cpu, False):
        assert not torch.is_autocast_enabled("cpu")
    assert judged.dtype == torch.float32 and torch.equal(judged, mnist_eval.batched(referee, x))


def test_a_minutes_cap_that_is_not_reached_changes_nothing(fake_data, tmp_path):
    run_script(fake_data, tmp_path / "a", "--steps", "5", *NO_EVAL)
    run_script(fake_data, tmp_path / "b", "--steps", "5", "--minutes", "60", *NO_EVAL)
    (_, ta), (_, tb) = ckpt_tensors(tmp_path / "a" / "ckpt.pt"), ckpt_tensors(tmp_path / "b" / "ckpt.pt")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def ctrl_c_at(step):
    """A log function that presses Ctrl-C (a real SIGINT) when the progress line of `step` appears."""
    import signal
    lines = []

    def log(msg):
        lines.append(msg)
        if msg.startswith(f"step {step:6,d}/"):
            os.kill(os.getpid(), signal.SIGINT)
    return log, lines


def test_ctrl_c_saves_a_loadable_checkpoint_and_says_how_to_resume(fake_data, tmp_path):
    import train_mnist as tm
    log, lines = ctrl_c_at(3)
    rc, _ = run_script(fake_data, tmp_path, "--steps", "8", *NO_EVAL, log=log)
    assert rc == 130                                   # non-zero, and no exception escaped
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ck["train"]["step"] == 3 and not ck["finished"]
    assert tm.load_checkpoint(tmp_path / "ckpt.pt").cfg.d_model == 32
    assert any("--resume" in m for m in lines) and not (tmp_path / "samples.png").exists()   # no evaluation


def test_resume_ends_in_the_model_of_the_uninterrupted_run(fake_data, tmp_path, monkeypatch):
    import train_mnist as tm
    assert run_script(fake_data, tmp_path / "straight", "--steps", "8", *NO_EVAL)[0] == 0
    log, _ = ctrl_c_at(4)
    assert run_script(fake_data, tmp_path / "split", "--steps", "8", *NO_EVAL, log=log)[0] == 130
    calls = []
    step_ = tm.train_step
    monkeypatch.setattr(tm, "train_step", lambda *a, **k: calls.append(1) or step_(*a, **k))
    assert run_script(fake_data, tmp_path / "split", "--resume", *NO_EVAL)[0] == 0
    assert len(calls) == 4                             # only the remaining steps were trained
    (ca, ta), (cb, tb) = ckpt_tensors(tmp_path / "straight" / "ckpt.pt"), ckpt_tensors(tmp_path / "split" / "ckpt.pt")
    assert cb["finished"] and ca["train"]["hist"] == cb["train"]["hist"]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_of_a_checkpoint_with_contiguous_adam_moments(fake_data, tmp_path):
    """Checkpoints from before the U-Net went channels-last hold Adam's moments contiguous;
    resuming one still ends in the uninterrupted run's model (the fused update walks raw memory)."""
    assert run_script(fake_data, tmp_path / "straight", "--steps", "4", *NO_EVAL)[0] == 0
    log, _ = ctrl_c_at(2)
    assert run_script(fake_data, tmp_path / "split", "--steps", "4", *NO_EVAL, log=log)[0] == 130
    ck = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    moments = [v for st in ck["train"]["opt"]["state"].values() for v in st.values() if v.dim() == 4]
    assert moments and not all(v.is_contiguous() for v in moments)     # the U-Net's are channels-last
    for st in ck["train"]["opt"]["state"].values():
        st.update({k: v.contiguous() for k, v in st.items()})
    torch.save(ck, tmp_path / "split" / "ckpt.pt")
    assert run_script(fake_data, tmp_path / "split", "--resume", *NO_EVAL)[0] == 0
    (_, ta), (_, tb) = ckpt_tensors(tmp_path / "straight" / "ckpt.pt"), ckpt_tensors(tmp_path / "split" / "ckpt.pt")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_refuses_other_settings_and_a_new_run_never_overwrites(fake_data, tmp_path, capsys):
    log, _ = ctrl_c_at(2)
    run_script(fake_data, tmp_path, "--steps", "6", *NO_EVAL, log=log)
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as e:               # a flag that differs from the run: refused, named
        run_script(fake_data, tmp_path, "--resume", "--steps", "9")
    assert e.value.code == 2 and "--steps 9 differs" in capsys.readouterr().err
    rc, _ = run_script(fake_data, tmp_path, "--steps", "6")   # no --resume: refused, nothing overwritten
    assert rc == 1 and "--resume" in capsys.readouterr().err
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert run_script(fake_data, tmp_path, "--resume", *NO_EVAL)[0] == 0
    rc, _ = run_script(fake_data, tmp_path, "--resume")        # a finished run has nothing to resume
    assert rc == 1 and "finished" in capsys.readouterr().err


def test_resume_of_a_run_saved_before_a_flag_existed_takes_that_flags_default(fake_data, tmp_path):
    import train_mnist as tm
    log, _ = ctrl_c_at(2)
    run_script(fake_data, tmp_path, "--steps", "4", "--lr-schedule", "linear", *NO_EVAL, log=log)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert tm.resume_args(tm.parse_args(["--resume"]), ckpt).lr_schedule == "linear"   # recorded, kept
    del ckpt["run"]["caption_first"]                      # as written before --caption-first existed
    del ckpt["run"]["lr_schedule"]                        # ... and before --lr-schedule: the cosine it had
    ckpt["config"]["clean_t"] = 50                        # built when clean images were shown at t = 50
    torch.save(ckpt, tmp_path / "ckpt.pt")
    args = tm.resume_args(tm.parse_args(["--resume"]), ckpt)
    assert args.caption_first == tm.build_parser().get_default("caption_first") and args.steps == 4
    assert args.lr_schedule == "cosine" and tm.model_config(args).clean_t == 50
    with pytest.raises(SystemExit):                       # and a differing value is still refused
        tm.resume_args(tm.parse_args(["--resume", "--caption-first", "0.6"]), ckpt)


def test_lr_warms_up_then_falls_straight_to_zero_or_on_the_papers_cosine():
    from train_mnist import lr_at
    total, peak, warm = 1100, 2.0, 100
    cos = [lr_at(s, total, peak, warm) for s in range(total)]             # the default: §4.1's cosine
    lin = [lr_at(s, total, peak, warm, "linear") for s in range(total)]
    assert lin[:warm] == cos[:warm] == [peak * (s + 1) / warm for s in range(warm)]   # the same warm-up
    assert lin[warm] == peak and lin[warm + 500] == pytest.approx(peak / 2)  # a straight line ...
    assert lin[-1] == pytest.approx(peak / 1000) and lr_at(total, total, peak, warm, "linear") == 0  # ... to 0
    assert all(a >= b for a, b in zip(lin[warm:], lin[warm + 1:]))
    assert cos[-1] == pytest.approx(peak / 20, rel=1e-3)                 # §4.1: 3e-4 -> 1.5e-5
    assert [lr_at(s, 5, peak, 8) for s in range(5)] == [peak * (s + 1) / 8 for s in range(5)]  # all warm-up


def test_a_file_that_is_not_our_checkpoint_is_one_line_of_error(tmp_path, capsys):
    import train_mnist as tm
    (tmp_path / "bytes").write_bytes(os.urandom(256))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    bad_cfg = {"format": tm.CKPT_FORMAT, "config": {"d_model": 30, "n_heads": 4}, "model": {}}
    torch.save(bad_cfg, tmp_path / "badcfg.pt")
    for name, message in (("bytes", "not a checkpoint"), ("other.pt", "not a checkpoint"), ("badcfg.pt", "cannot be built")):
        with pytest.raises(ValueError, match=message) as e:
            tm.load_checkpoint(tmp_path / name)
        assert "\n" not in str(e.value)
    os.makedirs(tmp_path / "out")
    os.replace(tmp_path / "bytes", tmp_path / "out" / "ckpt.pt")
    assert tm.main(["--out", str(tmp_path / "out"), "--eval-only"]) == 1
    err = capsys.readouterr().err
    assert "not a checkpoint" in err and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--device", "tpu"], "--device"),
    (["--batch-size", "0"], "--batch-size"),
    (["--patch-size", "5"], "--patch-size 5"),
    (["--steps", "-1"], "--steps"),
    (["--steps", "0"], "--steps"),
    (["--d-model", "30"], "--d-model"),
    (["--draw", "20x6"], "--draw"),
    (["--caption-first", "1.2"], "--caption-first"),
] + ([(["--device", "cuda"], "no CUDA GPU")] if not torch.cuda.is_available() else []))
def test_bad_command_line_values_are_one_argparse_line(flags, message, capsys):
    import train_mnist as tm
    with pytest.raises(SystemExit) as e:
        tm.parse_args(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


# ---- using a trained model: the command line, Fashion-MNIST, notebook-safe pictures ----

def test_draw_and_cfg_sweep_from_the_command_line_save_pictures(fake_data, tmp_path, capsys):
    import train_mnist as tm
    run_script(fake_data, tmp_path, "--steps", "2", *NO_EVAL)
    capsys.readouterr()
    assert tm.main(["--out", str(tmp_path), "--draw", "2026", "--sample-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "draw_2026.png" in printed and (tmp_path / "draw_2026.png").stat().st_size > 0
    lines = []
    assert tm.main(["--out", str(tmp_path), "--data-dir", fake_data, "--eval-only", "--cfg-sweep", "1,3",
                    "--eval-per-label", "1", "--sample-steps", "2", "--referee-epochs", "1"], log=lines.append) == 0
    assert sum(m.startswith("CFG scale") for m in lines) == 2 and (tmp_path / "cfg_sweep.png").stat().st_size > 0


def test_fashion_mnist_reads_its_own_layout(tmp_path):
    write_fake_mnist(str(tmp_path / "data"), folder="FashionMNIST")
    rc, lines = run_script(str(tmp_path / "data"), tmp_path / "out", "--dataset", "fashion", "--steps", "2",
                           *NO_EVAL)
    assert rc == 0 and (tmp_path / "out" / "ckpt.pt").exists()


def test_pictures_are_returned_as_figures_without_touching_the_global_backend():
    import matplotlib
    from matplotlib.figure import Figure
    import mnist_eval
    before = matplotlib.get_backend()
    fig = mnist_eval.grid_figure(torch.rand(12, 1, 28, 28), ncol=6, titles=[str(i) for i in range(12)])
    assert isinstance(fig, Figure) and matplotlib.get_backend() == before
    model = Transfusion(__import__("train_mnist").mnist_config(d_model=32, n_heads=2, n_layers=1, ffn_hidden=64,
                                                               unet_channels=4))
    assert isinstance(mnist_eval.mask_figure(model), Figure)


# ---- safe to use from a notebook: refusals, pictures, the decoding GIF ----

def test_train_from_python_refuses_a_finished_run_and_continues_only_when_asked(fake_data, tmp_path, capsys):
    import train_mnist as tm
    out = tmp_path / "out"
    assert run_script(fake_data, out, "--steps", "2", *NO_EVAL)[0] == 0
    before = (out / "ckpt.pt").read_bytes()
    args = tm.parse_args(["--data-dir", fake_data, "--out", str(out), *TINY_RUN, "--steps", "2"])
    with pytest.raises(ValueError, match="holds a finished run: continue it with --resume"):
        tm.train(args, log=lambda m: None)                    # what re-running a notebook cell does
    assert (out / "ckpt.pt").read_bytes() == before           # nothing was overwritten
    capsys.readouterr()
    assert run_script(fake_data, out, "--steps", "2", *NO_EVAL)[0] != 0
    assert "holds a finished run" in capsys.readouterr().err      # the command line says the same


def test_progress_pictures_leave_the_trained_model_unchanged(fake_data, tmp_path):
    """The pictures draw with their own generator: a run with a picture after every step ends
    in the checkpoint of a run without any."""
    lines = []
    run_script(fake_data, tmp_path / "plain", "--steps", "4", "--progress-every", "0", *NO_EVAL)
    run_script(fake_data, tmp_path / "pics", "--steps", "4", "--progress-every", "1e-9", *NO_EVAL, log=lines.append)
    assert (tmp_path / "pics" / "progress.png").stat().st_size > 0
    assert not (tmp_path / "plain" / "progress.png").exists()
    assert sum("progress.png" in m for m in lines) == 4     # one picture per step here, each announced
    (_, ta), (_, tb) = ckpt_tensors(tmp_path / "plain" / "ckpt.pt"), ckpt_tensors(tmp_path / "pics" / "ckpt.pt")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_read_number_refuses_what_it_cannot_read_and_takes_uint8_pixels():
    import train_mnist as tm
    torch.manual_seed(0)
    model = Transfusion(tm.mnist_config(d_model=32, n_heads=2, n_layers=1, ffn_hidden=64, unet_channels=4)).eval()
    with pytest.raises(ValueError, match="no images"):
        tm.read_number(model, torch.zeros(0, 1, 28, 28))
    with pytest.raises(ValueError, match="divide"):        # floats in 0..255: the fix is named
        tm.read_number(model, torch.full((2, 1, 28, 28), 200.0))
    with pytest.raises(ValueError, match="uint8"):
        tm.read_number(model, torch.zeros(2, 1, 28, 28, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        tm.read_number(model, torch.full((2, 1, 28, 28), float("nan")))
    u8 = (torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    assert tm.read_number(model, u8) == tm.read_number(model, u8.float().div(255).unsqueeze(1))  # load_digits' pixels


def test_every_picture_shows_itself_in_a_notebook_without_pyplot():
    """IPython displays any object with _repr_png_: no `%matplotlib inline` needed."""
    import mnist_eval
    import train_mnist as tm
    model = Transfusion(tm.mnist_config(d_model=32, n_heads=2, n_layers=1, ffn_hidden=64, unet_channels=4))
    figs = [mnist_eval.grid_figure(torch.rand(4, 1, 28, 28), ncol=4), mnist_eval.mask_figure(model),
            mnist_eval.loss_figure({"step": [1, 2], "lm": [2.0, 1.0], "ddpm": [1.0, 0.5]}),
            mnist_eval.numbers_figure([("42", torch.rand(2, 1, 28, 28))])]
    for fig in figs:
        assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_pictures_keep_their_titles_inside_the_picture(tmp_path):
    import matplotlib.image
    import mnist_eval
    fig = mnist_eval.numbers_figure([("7", torch.rand(1, 1, 28, 28))])   # a long title over a narrow picture
    path = mnist_eval.save_figure(fig, str(tmp_path / "n.png"), dpi=90)
    width = matplotlib.image.imread(path).shape[1]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig.set_dpi(90)
    title = fig._suptitle.get_window_extent(FigureCanvasAgg(fig).get_renderer())
    assert width >= title.width > fig.get_figwidth() * 90                # the title is wider than the axes


def test_decoding_gif_shows_each_token_and_every_few_denoising_steps(trained_numbers, tmp_path):
    from PIL import Image
    import mnist_eval
    model, _ = trained_numbers
    model.sample_defaults = dict(steps=10, cfg_scale=1.0, sampler="ddpm")
    try:
        imgs, seq = mnist_eval.decoding_gif(model, "35", str(tmp_path / "d.gif"), every=5)
    finally:
        del model.sample_defaults
    written = sum(len(seg) for seg in seq if not seg.is_floating_point()) - 4 + 2 * len(imgs)  # after BOS 3 5 ;
    frames = Image.open(tmp_path / "d.gif").n_frames
    # the prompt, then one frame per token written (BOI and EOI included) and 10 / 5 denoising frames
    # per image; a GIF merges a frame identical to the one before it, so at most this many
    assert len(imgs) == 2 and 2 * len(imgs) < frames <= 1 + written + 2 * len(imgs)


# ---- every command and code block the README shows runs, on tiny sizes ----

def readme_commands():
    """The shell commands of README.md: lines of its bash blocks and `python ...` in its text."""
    import re
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    lines = [line.strip() for block in re.findall(r"```bash\n(.*?)```", readme, re.S) for line in block.splitlines()]
    return list(dict.fromkeys(c for c in lines + re.findall(r"`(python [^`]+)`", readme) if c)), readme


def test_every_command_the_readme_shows_runs_on_tiny_sizes(tmp_path, monkeypatch, capsys):
    """Each README command, verbatim but for DIR and tiny sizes appended (argparse: the last flag
    wins), runs to the end; then the README's Python block, on the checkpoint it made."""
    import re
    import shlex
    import ablations
    import bench
    import train_mnist as tm
    commands, readme = readme_commands()
    data, out = write_fake_mnist(str(tmp_path / "data")), str(tmp_path / "out")
    small_eval = ["--eval-per-label", "1", "--eval-captions", "10", "--eval-numbers", "1", "--eval-reading", "1"]
    monkeypatch.setattr(ablations, "LIGHT", TINY_RUN[:-2] + small_eval)   # rows stay on BASE's pixels

    def train_in_process(cmd, stdout, stderr):    # ablations.py's `python train_mnist.py ...`, without a new Python
        assert cmd[1].endswith("train_mnist.py")
        return tm.main(cmd[2:], log=lambda m: stdout.write(m + "\n"))
    monkeypatch.setattr(ablations.subprocess, "call", train_in_process)
    ran = []
    for cmd in sorted(commands, key=lambda c: "--draw" in c or "--eval-only" in c):   # train before drawing
        # the README's placeholders: DIR (the data), ROW ... (ablation rows), S (a seed)
        argv = shlex.split(cmd.replace("DIR", data).replace("ROW ...", "causal").replace("--seed S", "--seed 0"))
        if argv[0] in ("pip", "pytest"):       # CI's install step, and this suite
            continue
        assert argv[0] == "python", cmd
        script, flags = argv[1], argv[2:]
        if script == "train_mnist.py" and ("--draw" in flags or "--eval-only" in flags):
            rc = tm.main(flags + ["--out", out, "--sample-steps", "2"], log=lambda m: None)
        elif script == "train_mnist.py":
            fresh = out if not os.path.exists(os.path.join(out, "ckpt.pt")) else f"{out}_{len(ran)}"   # a new run each
            rc = tm.main(flags + ["--out", fresh, *TINY_RUN, "--steps", "2", *small_eval], log=lambda m: None)
        elif script == "bench.py":
            rc = bench.main(flags + ["--repeats", "1", "--warmup", "2", "--loop-steps", "3", "--rounds", "2",
                                     "--sample-digits", "2", "--flags", " ".join(TINY_RUN[:14])])
        elif script == "ablations.py":
            rc = ablations.main(flags + ["--seeds", "0", "--steps", "2", "--root", str(tmp_path / "abl")])
        else:
            raise AssertionError(f"the README shows {cmd!r}: teach this test to run it")
        assert rc in (0, None), cmd
        ran.append(script)
    assert {"train_mnist.py", "bench.py", "ablations.py"} <= set(ran)
    assert os.path.exists(os.path.join(out, "draw_2026.gif"))
    printed = capsys.readouterr().out
    assert "| causal |" in printed                                 # ablations.py printed its table
    # bench.py compares its training step with the real loop's in one line
    assert re.search(r"^train step: bench [\d.]+ ms, loop [\d.]+ ms, ratio [\d.]+$", printed, re.M), printed
    # the Python blocks, on the checkpoint made above; its 2-step model draws nothing yet, so its text
    # head is scripted to open an image after each digit (bench.ScriptedText)
    load = tm.load_checkpoint

    def load_scripted(path, device="cpu"):
        model = load(path, device)
        model.__class__ = bench.ScriptedText
        return model
    monkeypatch.setattr(tm, "load_checkpoint", load_scripted)
    for block in re.findall(r"```python\n(.*?)```", readme, re.S):
        ns = {}
        exec(compile(block.replace('"out/ckpt.pt"', repr(os.path.join(out, "ckpt.pt"))), "README", "exec"), ns)
        assert len(ns["images"]) >= 1 and isinstance(ns["model"], Transfusion)


# ---- the notebook: every code cell runs, in order, on tiny sizes ----

def test_the_notebook_runs_cell_by_cell_on_tiny_sizes(monkeypatch, tmp_path):
    """transfusion.ipynb's code cells executed in order in one namespace, as a kernel would, with
    TRANSFUSION_NOTEBOOK_TINY=1 (its first cell switches to a tiny model and stand-in digits).
    A cell ending in a figure would show it: the figures offer PNG to the notebook."""
    import ast
    import json
    monkeypatch.setenv("TRANSFUSION_NOTEBOOK_TINY", "1")
    monkeypatch.chdir(tmp_path)                        # no out/ckpt.pt here: the notebook trains its own
    nb = json.load(open(os.path.join(HERE, "transfusion.ipynb"), encoding="utf-8"))
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 8 and not any(line.lstrip().startswith(("%", "!")) for c in cells for line in c.splitlines())
    ns, shown = {}, []
    for i, src in enumerate(cells):
        tree = ast.parse(src)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, f"notebook cell {i}", "exec"), ns)
        if last is not None:                           # what the kernel would display
            shown.append(eval(compile(ast.Expression(last.value), f"notebook cell {i}", "eval"), ns))
    figures = [x for x in shown if hasattr(x, "_repr_png_")]
    assert len(figures) >= 3 and all(f._repr_png_()[:4] == b"\x89PNG" for f in figures)
    assert isinstance(ns["model"], Transfusion)


# ---- ablations.py: rows that parse, a table that averages ----

def test_every_ablation_row_is_a_valid_command_and_the_table_averages_seeds(tmp_path):
    import json
    import ablations
    import train_mnist as tm
    for row, flags in ablations.ROWS.items():
        args = tm.parse_args(["--out", str(tmp_path / row), *ablations.BASE, *flags, *ablations.LIGHT])  # exits on a bad flag
        assert args.eval_per_label == 50 and args.layout == "read-grouped"
        assert args.fp32                                               # as the table was measured, on any CPU
        assert args.patch_size == (4 if row.startswith("p4") else 7)   # the row's switch wins over BASE
    for seed, cap in ((0, 0.97), (1, 0.99)):
        os.makedirs(tmp_path / f"linear_s{seed}")
        (tmp_path / f"linear_s{seed}/results.json").write_text(json.dumps(dict(caption_acc=cap, fd=20.0 + seed, steps=300)))
    line = [l for l in ablations.table(str(tmp_path)).splitlines() if l.startswith("| linear |")]
    assert line == ["| linear | 300 | 2 | 98.00 (97.00-99.00) | – | 20.5 (20.0-21.0) | – | – |"]


def test_ablations_uncond_draws_every_model_from_the_same_noise(fake_data, tmp_path, monkeypatch, capsys):
    import ablations
    import mnist_eval as me
    root = tmp_path / "abl"
    assert run_script(fake_data, root / "tiny_s0", "--steps", "2", *NO_EVAL)[0] == 0
    referee = me.Referee().eval()
    ckpt = str(root / "tiny_s0" / "ckpt.pt")
    fd, counts, digits = ablations.unconditional_fd(ckpt, referee, fake_data, n=40, steps=3)
    assert sum(counts) == 40 and fd > 0                            # every digit drawn is given a class
    assert digits.shape == (40, 1, 28, 28) and 0 <= digits.min() and digits.max() <= 1
    fd2, counts2, digits2 = ablations.unconditional_fd(ckpt, referee, fake_data, n=40, steps=3)
    assert (fd2, counts2) == (fd, counts) and torch.equal(digits2, digits)   # the same x_T and noise each call
    (root / "tiny_s0" / "results.json").write_text("{}")           # finished, as ablations.run leaves a run
    torch.save(referee.state_dict(), root / "referee.pt")          # the sweep's one referee
    argv = ["--uncond", "--data-dir", fake_data, "--root", str(root), "--runs", "tiny_s0"]
    monkeypatch.setattr(ablations, "UNCOND_N", 40)
    monkeypatch.setattr(ablations, "UNCOND_STEPS", 3)
    ablations.main(argv)
    assert f"| tiny_s0 | {fd:.1f} | {' '.join(map(str, counts))} |" in capsys.readouterr().out
    assert (root / "tiny_s0" / "uncond.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="no finished run other_s0"):
        ablations.main(argv + ["other_s0"])
