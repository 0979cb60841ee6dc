"""Device batches: one pass per epoch, no augmentation means identity, invariants of the rest."""
import torch

import batches as B


def test_batches_one_pass_per_epoch_and_balance():
    imgs = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 4, 4).clone()
    labels = torch.tensor([0] * 8 + [1] * 2)
    train = B.Batches(imgs, labels, 3, seed=1)
    batches = list(train)
    assert len(batches) == len(train) == 3  # the partial last batch is dropped
    assert all(x.shape == (3, 3, 4, 4) and x.dtype == torch.float32 for x, _ in batches)
    seen = [int(round((x[i, 0, 0, 0] * B.STD[0] + B.MEAN[0]).item() * 255))
            for x, _ in batches for i in range(3)]
    assert len(set(seen)) == 9  # no image twice in one pass
    assert [b[0].sum() for b in batches] != [b[0].sum() for b in train]  # reshuffled
    balanced = B.Batches(imgs, labels, 10, balance=True, seed=0)
    ys = torch.cat([y for _ in range(50) for _, y in balanced])
    assert 0.4 < ys.float().mean().item() < 0.6  # the 20% class drawn half the time


def test_no_augmentation_is_identity_and_normalisation_is_imagenet():
    imgs = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    x, y = next(iter(B.Batches(imgs, torch.arange(4), 4)))  # no aug given; y: which image
    for c in range(3):
        expect = (imgs[y, 0].float() / 255 - B.MEAN[c]) / B.STD[c]
        assert torch.allclose(x[:, c], expect, atol=1e-6)
    cl = B.normalize(imgs.float() / 255, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last)


def test_augmentation_invariants():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 32, 32)
    gen = torch.Generator().manual_seed(0)
    y = B.Augment(flip=True)(x, gen)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 1
    assert not torch.allclose(x, y)
    same = B.Augment(rotate=0, zoom=1.0, warp=0, lighting=0)(x, gen)
    assert torch.allclose(same, x, atol=1e-5)  # the identity transform resamples exactly
    a = B.Augment()(x, torch.Generator().manual_seed(3))
    b = B.Augment()(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)  # reproducible from the seed
