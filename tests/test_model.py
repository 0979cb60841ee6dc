"""Model: the fastai head, layer groups, freezing, and how weights are loaded (or refused)."""
import pytest
import torch
import torch.nn as nn
import torchvision

import model as M


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return M.build_model(4, weights="none")


def test_head_is_fastai_v1_create_head(net):
    kinds = [type(m) for m in net.head]
    assert kinds == [M.ConcatPool, nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.ReLU,
                     nn.BatchNorm1d, nn.Dropout, nn.Linear]
    assert net.head[1].num_features == 4096 and net.head[3].out_features == 512
    assert net.head[2].p == 0.25 and net.head[6].p == 0.5 and net.head[7].out_features == 4
    for lin in (net.head[3], net.head[7]):  # cnn_learner's init: Kaiming normal, zero bias
        fan_in = lin.weight.shape[1]
        assert lin.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.1)
        assert lin.weight.mean().abs() < 0.1 * (2 / fan_in) ** 0.5 and not lin.bias.any()
    x = torch.randn(2, 2048, 3, 3)
    pooled = net.head[0](x)
    assert torch.allclose(pooled[:, :2048], x.amax((2, 3)))
    assert torch.allclose(pooled[:, 2048:], x.mean((2, 3)))


def test_forward_shape(net):
    net.eval()
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 4)
    net.train()


def test_layer_groups_partition_the_parameters(net, capsys):
    groups = M.layer_groups(net)
    assert list(groups) == ["stem-layer2", "layer3-layer4", "head"]
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))  # disjoint
    assert set(ids) == {id(p) for p in net.parameters()}  # complete
    assert groups["stem-layer2"][0] is net.body[0].weight  # conv1 first
    assert any(p is net.body[7][-1].conv3.weight for p in groups["layer3-layer4"])
    out = capsys.readouterr().out
    assert "stem-layer2 1.44M" in out and "head" in out  # parameter counts are printed


def test_frozen_body_computes_no_weight_gradients_but_bn_trains(net):
    M.set_body_frozen(net, True)
    net.zero_grad(set_to_none=True)
    net(torch.randn(4, 3, 64, 64)).sum().backward()
    for m in net.body.modules():
        if isinstance(m, nn.Conv2d):
            assert not m.weight.requires_grad and m.weight.grad is None
        if isinstance(m, nn.BatchNorm2d):
            assert m.weight.grad is not None and m.bias.grad is not None
    assert all(p.grad is not None for p in net.head.parameters())
    M.set_body_frozen(net, False)
    assert all(p.requires_grad for p in net.parameters())


def test_weights_from_a_torchvision_state_dict(tmp_path):
    torch.manual_seed(1)
    r = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(r.state_dict(), path)
    m = M.build_model(3, weights=str(path), arch="resnet18")
    assert torch.equal(m.body[0].weight, r.conv1.weight)
    assert torch.equal(m.body[7][1].bn2.running_var, r.layer4[1].bn2.running_var)


def test_weights_from_our_checkpoint_keep_the_head(tmp_path):
    a = M.build_model(3, weights="none", arch="resnet18")
    torch.save({"model": a.state_dict(), "classes": ["a", "b", "c"]}, tmp_path / "ck.pt")
    b = M.build_model(3, weights=str(tmp_path / "ck.pt"), arch="resnet18")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    c = M.build_model(5, weights=str(tmp_path / "ck.pt"), arch="resnet18")  # new head
    assert torch.equal(c.body[0].weight, a.body[0].weight)


def test_wrong_weights_are_refused(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(SystemExit, match="does not fit resnet50"):
        M.build_model(3, weights=str(tmp_path / "r18.pth"))
    with pytest.raises(SystemExit, match="no such file"):
        M.build_model(3, weights=str(tmp_path / "missing.pth"))


def test_offline_imagenet_download_says_what_to_do(monkeypatch, tmp_path):
    def offline(*a, **k):
        raise OSError("Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.__class__,
                        "get_state_dict", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        M.build_model(4, weights="imagenet")
    msg = str(e.value)
    assert "resnet50-0676ba61.pth" in msg and str(tmp_path) in msg
    assert "--weights none" in msg and "--weights PATH" in msg
