"""Device batches and fastai v1's augmentation: one pass per epoch, the parameters' laws over
many draws, the geometry against fastai v1's own formulas, and crops in training and evaluation.
"""
import math

import numpy as np
import pytest
import torch

import data as B


def test_batches_one_pass_per_epoch_and_balance():
    imgs = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 4, 4).clone()
    labels = torch.tensor([0] * 8 + [1] * 2)
    train = B.Batches(imgs, labels, 3, 4, seed=1)
    batches = list(train)
    assert len(batches) == len(train) == 3  # the partial last batch is dropped
    assert all(x.shape == (3, 3, 4, 4) and x.dtype == torch.float32 for x, _ in batches)
    seen = [int(round((x[i, 0, 0, 0] * B.STD[0] + B.MEAN[0]).item() * 255))
            for x, _ in batches for i in range(3)]
    assert len(set(seen)) == 9  # no image twice in one pass
    assert [b[0].sum() for b in batches] != [b[0].sum() for b in train]  # reshuffled
    balanced = B.Batches(imgs, labels, 10, 4, balance=True, seed=0)
    ys = torch.cat([y for _ in range(50) for _, y in balanced])
    assert 0.4 < ys.float().mean().item() < 0.6  # the 20% class drawn half the time


def test_no_augmentation_is_identity_and_normalisation_is_imagenet():
    imgs = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    x, y = next(iter(B.Batches(imgs, torch.arange(4), 4, 8)))  # no aug given; y: which image
    for c in range(3):
        expect = (imgs[y, 0].float() / 255 - B.MEAN[c]) / B.STD[c]
        assert torch.allclose(x[:, c], expect, atol=1e-6)
    cl = B.normalize(imgs.float() / 255, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last)


def test_augmentation_invariants():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 32, 32)
    gen = torch.Generator().manual_seed(0)
    y = B.Augment()(x, gen)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 1
    assert not torch.allclose(x, y)
    same = B.Augment(rotate=0, zoom=1.0, warp=0, lighting=0, flip=False)(x, gen)
    assert torch.equal(same, x)  # the identity transform resamples exactly
    a = B.Augment()(x, torch.Generator().manual_seed(3))
    b = B.Augment()(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)  # reproducible from the seed


def test_each_transform_draws_its_own_coin_over_many_images():
    n = 20000
    p = B.Augment().draw(n, torch.Generator().manual_seed(0), "cpu")
    off = {"flip": ~p["flip"], "warp": (p["warp"] == 0).all(1), "rotate": p["angle"] == 0,
           "zoom": p["zoom"] == 1, "brightness": p["brightness"] == 0.5,
           "contrast": p["contrast"] == 1}
    rate = {k: v.float().mean().item() for k, v in off.items()}
    assert rate["flip"] == pytest.approx(0.5, abs=0.015)
    for k in ("warp", "rotate", "zoom", "brightness", "contrast"):  # p 0.75 each
        assert rate[k] == pytest.approx(0.25, abs=0.015), k
    for a in off:  # independent coins: the joint rate is the product of the two
        for b in off:
            if a < b:
                joint = (off[a] & off[b]).float().mean().item()
                assert joint == pytest.approx(rate[a] * rate[b], abs=0.01), (a, b)
    # one coin per transform leaves 1.6% of images with no geometric change at all (a single
    # coin for all geometry, as this repository once had, would leave 25%)
    geometry_off = (off["warp"] & off["rotate"] & off["zoom"]).float().mean().item()
    assert geometry_off == pytest.approx(0.25 ** 3, abs=0.005)


def test_parameter_ranges_and_laws():
    n = 20000
    p = B.Augment().draw(n, torch.Generator().manual_seed(1), "cpu")
    w = p["warp"][(p["warp"] != 0).all(1)]  # four corner magnitudes, uniform in +-0.2 each
    assert w.min() >= -0.2 and w.max() <= 0.2 and w.min() < -0.199 and w.max() > 0.199
    assert w.mean().abs() < 0.005 and w.var().item() == pytest.approx(0.2 ** 2 / 3, rel=0.05)
    assert np.abs(np.corrcoef(w.T.numpy()) - np.eye(4)).max() < 0.03  # four independent
    z = p["zoom"][p["zoom"] != 1]
    assert z.min() >= 1 and z.max() <= 1.1 and z.mean().item() == pytest.approx(1.05, abs=0.002)
    a = p["angle"][p["angle"] != 0]
    assert a.abs().max() <= 10 and a.abs().max() > 9.99 and a.var().item() == pytest.approx(
        100 / 3, rel=0.05)
    b = p["brightness"][p["brightness"] != 0.5]
    assert b.min() >= 0.4 and b.max() <= 0.6
    c = p["contrast"][p["contrast"] != 1].log()
    assert c.min() >= math.log(0.8) - 1e-6 and c.max() <= math.log(1.25) + 1e-6
    assert c.var().item() == pytest.approx(math.log(1.25) ** 2 / 3, rel=0.05)  # log-uniform
    for k in ("zoom_at", "crop_at"):
        assert p[k].min() >= 0 and p[k].max() <= 1 and p[k].mean().item() == pytest.approx(
            0.5, abs=0.01)


def test_crop_offsets_span_the_slack_in_training_and_are_centred_in_evaluation():
    n = 20000
    gen = torch.Generator().manual_seed(2)
    hw = torch.tensor([0.5, 2.0, 1.0]).repeat(n // 2)[:n]  # landscape 2:1, portrait 1:2, square
    at = B.Augment().draw(n, gen, "cpu")["crop_at"]
    C = B.crop_matrix(hw, at)
    land, port, sq = C[hw == 0.5], C[hw == 2.0], C[hw == 1.0]
    assert torch.allclose(land[:, 0, 0], torch.tensor(0.5)) and (land[:, 1, 1] == 1).all()
    tx = land[:, 0, 2]  # the window's centre: anywhere the 2:1 film leaves room for it
    assert tx.min() >= -0.5 and tx.max() <= 0.5 and tx.min() < -0.49 and tx.max() > 0.49
    assert (land[:, 1, 2] == 0).all()  # the short axis is taken whole
    assert port[:, 1, 2].abs().max() > 0.49 and (port[:, 0, 2] == 0).all()
    assert (sq[:, :2, 2] == 0).all()  # a square film has no slack
    centre = B.crop_matrix(hw, torch.full((n, 2), 0.5))
    assert (centre[:, :2, 2] == 0).all()  # evaluation: the centre crop
    assert torch.equal(B.crop_matrix(None, at)[0], torch.eye(3))  # squish: no crop


def test_crop_takes_the_right_window_of_the_film():
    # A 3:2 landscape film stored squished to 24x24: pixel value = its column in the film
    film = torch.linspace(0, 1, 24).view(1, 1, 1, 24).expand(1, 1, 24, 24)
    hw = torch.tensor([2 / 3])
    at = lambda x: torch.tensor([[x, 0.5]])
    left = B.sample(film, B.crop_matrix(hw, at(0.0)), 16)
    right = B.sample(film, B.crop_matrix(hw, at(1.0)), 16)
    assert left.shape == (1, 1, 16, 16)
    assert left.max() < 0.7 and left.min() < 0.02  # the left 2/3 of the film
    assert right.min() > 0.3 and right.max() > 0.98  # the right 2/3
    centre = B.view(film, 16, hw)
    assert centre.mean().item() == pytest.approx(0.5, abs=0.01)
    assert centre[..., 0].mean() > 0.15 and centre[..., -1].mean() < 0.85  # 1/6 cut each side
    assert torch.equal(B.view(film, 24), film)  # squished films are seen whole


def fastai_v1_coords(W, H, S, p):
    """fastai v1's sampling coordinates for one film, written out from its source
    (vision/image.py: apply_tfms, _affine_mult; vision/transform.py: _symmetric_warp,
    _find_coeffs, _rotate, _zoom, _flip_lr, _crop_pad_default), in pixels of the resized film.
    Its grid puts the edge pixels' centres at -1 and 1 (_affine_grid: linspace(-1, 1, W))."""
    ys, xs = np.meshgrid(np.linspace(-1, 1, H), np.linspace(-1, 1, W), indexing="ij")
    flow = np.stack([xs, ys], -1).reshape(-1, 2)  # _affine_grid of the resized film
    m = p["warp"]
    orig = [[-1, -1], [-1, 1], [1, -1], [1, 1]]
    targ = [[-1 - m[3], -1 - m[1]], [-1 - m[2], 1 + m[1]], [1 + m[3], -1 - m[0]],
            [1 + m[2], 1 + m[0]]]
    A, b = [], []
    for p1, p2 in zip(targ, orig):  # _find_coeffs(_orig_pts, targ_pts)
        A.append([p1[0], p1[1], 1, 0, 0, 0, -p2[0] * p1[0], -p2[0] * p1[1]])
        A.append([0, 0, 0, p1[0], p1[1], 1, -p2[1] * p1[0], -p2[1] * p1[1]])
        b += p2
    c = np.append(np.linalg.solve(np.array(A, float), np.array(b, float)), 1).reshape(3, 3)
    f = np.concatenate([flow, np.ones((len(flow), 1))], 1) @ c.T  # _apply_perspective
    flow = f[:, :2] / f[:, 2:]
    a = math.radians(p["angle"])
    R = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    s = p["zoom"]
    Z = np.array([[1 / s, 0, (1 - 1 / s) * (2 * p["zoom_at"][0] - 1)],
                  [0, 1 / s, (1 - 1 / s) * (2 * p["zoom_at"][1] - 1)], [0, 0, 1]])
    M = R @ Z  # affine_mat @ rotate, then @ zoom (the order of get_transforms)
    M[0, 1] *= H / W
    M[1, 0] *= W / H
    flow = (flow @ M[:2, :2].T + M[:2, 2]).reshape(H, W, 2)
    if p["flip"]:  # flip_lr on the resampled pixels
        flow = flow[:, ::-1]
    row = int((H - S + 1) * p["crop_at"][1])  # _crop_default
    col = int((W - S + 1) * p["crop_at"][0])
    flow = flow[row:row + S, col:col + S]
    return (flow + 1) / 2 * np.array([W - 1, H - 1])  # edge pixel centres at +-1 -> pixels


@pytest.mark.parametrize("W,H,flip", [(300, 200, False), (300, 200, True), (200, 300, True),
                                      (200, 200, False)])
def test_geometry_matches_fastai_v1_formulas(W, H, flip):
    S = min(W, H)
    p = {"warp": [0.15, -0.1, 0.05, -0.2], "angle": 8.0, "zoom": 1.08, "zoom_at": [0.3, 0.8],
         "flip": flip, "crop_at": [0.4, 0.4]}  # 0.4 x 100 px of slack: a whole pixel
    ref = fastai_v1_coords(W, H, S, p)
    t = {k: torch.tensor([v]) for k, v in p.items()}
    H3 = B.film_matrix(t, torch.tensor([H / W]))[0].double()
    u = (torch.arange(S, dtype=torch.float64) * 2 + 1) / S - 1  # output pixel centres
    ys, xs = torch.meshgrid(u, u, indexing="ij")
    g = torch.stack([xs, ys, torch.ones_like(xs)], -1) @ H3.T
    ours = (g[..., :2] / g[..., 2:] + 1) / 2 * torch.tensor([W, H]) - 0.5  # align_corners=False
    # the two pixel conventions differ by up to half a pixel at the film's edges
    assert np.abs(ours.numpy() - ref).max() < 1.0
    p_moved = dict(p, angle=-8.0)  # any change of the geometry is seen
    assert np.abs(fastai_v1_coords(W, H, S, p_moved) - ref).max() > 5


def test_lighting_is_brightness_then_contrast_in_logit_space():
    x = torch.tensor([0.2, 0.5, 0.9]).view(3, 1, 1, 1)
    b, c = torch.tensor([0.6, 0.4, 0.5]), torch.tensor([1.2, 0.8, 1.0])
    logit = lambda v: math.log(v / (1 - v))
    expect = [1 / (1 + math.exp(-(logit(v) + logit(bb)) * cc))
              for v, bb, cc in zip([0.2, 0.5, 0.9], b.tolist(), c.tolist())]
    assert B.lighting(x, b, c).flatten().tolist() == pytest.approx(expect, abs=1e-6)
    assert torch.allclose(B.lighting(x, torch.full((3,), 0.5), torch.ones(3)), x, atol=1e-6)


def test_batches_crop_films_without_augmentation_in_the_centre():
    film = torch.linspace(0, 255, 24).round().to(torch.uint8).view(1, 1, 1, 24).expand(
        4, 1, 24, 24).contiguous()
    hw = torch.full((4,), 2 / 3)
    x, _ = next(iter(B.Batches(film, torch.arange(4), 4, 16, hw=hw)))
    assert x.shape == (4, 3, 16, 16)
    raw = x[:, 0] * B.STD[0] + B.MEAN[0]
    assert torch.allclose(raw, B.view(film.float() / 255, 16, hw)[:, 0], atol=1e-6)


def test_an_epochs_draws_are_the_batch_by_batch_draws_on_the_cpu():
    # one torch.rand call for the epoch gives, on the CPU, the numbers one call per transform
    # and batch gave: the same augmentation, bit for bit, as before the epoch was vectorised
    aug, gen = B.Augment(), torch.Generator()
    gen.manual_seed(3)
    epoch = aug.draw(8, gen, "cpu", rows=slice(2, 6), steps=3)
    gen.manual_seed(3)
    one_by_one = [aug.draw(8, gen, "cpu", rows=slice(2, 6)) for _ in range(3)]
    gen.manual_seed(3)
    u = lambda *shape: torch.rand(8, *shape, generator=gen)  # the former draw(), transform
    for d in one_by_one:                                      # by transform
        flip = u() < 0.5
        warp = (u(4) * 2 - 1) * aug.warp * (u() < aug.p_affine)[:, None]
        assert torch.equal(d["flip"], flip[2:6]) and torch.equal(d["warp"], warp[2:6])
        u(), u(), u(), u(), u(2), u(2), u(), u(), u(), u()  # the rest: 18 numbers an image
    for k, v in epoch.items():
        assert v.shape == (12, *one_by_one[0][k].shape[1:])
        assert torch.equal(v, torch.cat([d[k] for d in one_by_one])), k


class AtenCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten operators called (on a GPU, most launch a kernel each)."""
    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_an_augmented_batch_is_a_few_dozen_aten_calls():
    # the epoch's draws and geometry are made once; a batch is a gather, one grid_sample,
    # the lighting and the normalisation (253 aten calls a batch before, 2026-11-28)
    imgs = torch.randint(0, 256, (64, 1, 40, 40), dtype=torch.uint8)
    hw = torch.rand(64) + 0.5
    calls = {}
    for n in (4, 8):
        train = B.Batches(imgs, torch.arange(64) % 4, 64 // n, 32, aug=B.Augment(), hw=hw)
        with AtenCalls() as c:
            assert len(list(train)) == n
        calls[n] = c.n
    per_batch = (calls[8] - calls[4]) / 4
    assert per_batch <= 40 and calls[4] - 4 * per_batch <= 300, calls  # setup: once an epoch
