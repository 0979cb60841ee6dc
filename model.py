"""COVID-ResNet: an ImageNet ResNet-50 body with fastai v1's classifier head.

    model = build_model(n_classes=4, weights="imagenet")   # or "none", or a .pth path
    groups = layer_groups(model)                            # stem..layer2 | layer3..4 | head
    set_body_frozen(model, True)                            # train the head (and BN) only
    logits = class_logits(model, model, films, size)        # evaluation's view of uint8 films

The head is the one fastai v1's `cnn_learner` put on every body, which the paper used:
concatenated average+max pooling, then BN-dropout-linear twice. Inputs are 3-channel,
ImageNet-normalised images (batches.py makes them from one-channel radiographs).
"""
import os
import torch
import torch.nn as nn
import torchvision

from batches import normalize, view
from devices import autocast

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class ConcatPool(nn.Module):
    """Average and max pooling side by side: (B, C, H, W) -> (B, 2C).

    Max pooling keeps a small, bright finding that averaging over the whole film would dilute.
    """

    def forward(self, x):
        return torch.cat([x.amax(dim=(2, 3)), x.mean(dim=(2, 3))], dim=1)


def make_head(n_features, n_classes, hidden=512, dropout=(0.25, 0.5)):
    """fastai v1's create_head: pool, then [BN, dropout, linear] twice, ReLU in between."""
    head = nn.Sequential(
        ConcatPool(),
        nn.BatchNorm1d(2 * n_features), nn.Dropout(dropout[0]),
        nn.Linear(2 * n_features, hidden), nn.ReLU(inplace=True),
        nn.BatchNorm1d(hidden), nn.Dropout(dropout[1]),
        nn.Linear(hidden, n_classes),
    )
    for m in head:  # fastai initialises the new linear layers with Kaiming normal
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return head


class COVIDResNet(nn.Module):
    def __init__(self, resnet, n_classes, ps=0.5):
        super().__init__()
        r = resnet  # a torchvision ResNet; its avgpool and fc are replaced by the head
        self.body = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool,
                                  r.layer1, r.layer2, r.layer3, r.layer4)
        self.head = make_head(r.fc.in_features, n_classes, dropout=(ps / 2, ps))  # fastai's ps

    def forward(self, x):  # x: (B, 3, H, W) normalised -> logits (B, n_classes), fp32
        features = self.body(x)
        # The head runs in fp32 even under bf16 autocast: logits, losses and probabilities
        # then carry fp32's 24 bits, not bf16's 8 (no rounded probabilities, no ties in
        # ROC-AUC). It costs nothing: two small linear layers on pooled features.
        with torch.autocast(x.device.type, enabled=False):
            return self.head(features.float())


def _imagenet_state_dict(arch):
    """Fetch torchvision's ImageNet weights through its own weights API and cache."""
    # IMAGENET1K_V1 is what `pretrained=True` gave in 2020, i.e. what fastai v1 and the paper used.
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # offline, proxy, corrupt download: say how to go on
        fname = os.path.basename(weights.url)
        where = os.path.join(torch.hub.get_dir(), "checkpoints", fname)
        raise SystemExit(
            f"Could not download the ImageNet weights for {arch} ({type(e).__name__}: {e}).\n"
            f"Either put {fname} (from {weights.url}) at {where},\n"
            f"or pass --weights PATH to a local state dict, "
            f"or --weights none to train from random initialisation.") from e


def _load_state_dict(path):
    if not os.path.isfile(path):
        raise SystemExit(f"--weights {path}: no such file. Use 'imagenet', 'none' or a .pth path.")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "model" in sd:  # one of our own checkpoints
        sd = sd["model"]
    return sd


# torchvision's ResNet names -> their index in COVIDResNet.body
_BODY_INDEX = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6",
               "layer4": "7"}


def _load_into(module, sd, weights, arch):
    """load_state_dict that names what does not fit instead of a wall of size mismatches."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise SystemExit(f"--weights {weights} does not fit {arch}: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(wrong)} of another shape "
                         f"(e.g. {(missing + unexpected + wrong)[:3]}). Is it another --arch?")
    module.load_state_dict(sd)


def build_model(n_classes, weights="imagenet", arch="resnet50", ps=0.5):
    """COVID-ResNet with `weights` = 'imagenet' | 'none' | a path to a state dict.

    A path may hold a torchvision ResNet state dict (its fc layer is ignored) or one of our
    checkpoints (then the head is loaded too, if its class count matches).
    """
    if arch not in ARCHS:
        raise SystemExit(f"--arch {arch}: choose one of {', '.join(ARCHS)}")
    model = COVIDResNet(getattr(torchvision.models, arch)(weights=None), n_classes, ps)
    if weights == "none":
        return model
    sd = _imagenet_state_dict(arch) if weights == "imagenet" else _load_state_dict(weights)
    if any(k.startswith("body.") for k in sd):  # one of ours
        head = {k: v for k, v in sd.items() if k.startswith("head.")}
        if head and head["head.7.weight"].shape[0] == n_classes:
            return _load_into(model, sd, weights, arch) or model
        sd = {k[5:]: v for k, v in sd.items() if k.startswith("body.")}
    else:  # torchvision's layout (conv1.weight, layer1.0.conv1.weight, ...); fc is replaced
        sd = {_BODY_INDEX[k.split(".")[0]] + k[k.index("."):]: v
              for k, v in sd.items() if k.split(".")[0] in _BODY_INDEX}
    _load_into(model.body, sd, weights, arch)
    return model


def layer_groups(model, verbose=True):
    """The three layer groups that get their own learning rates, as {name: [params]}.

    stem+layer1+layer2 (generic edges and textures) | layer3+layer4 (ImageNet-specific
    parts) | head (new). The same split as fastai's resnet meta: body cut at layer3.
    """
    b = model.body  # conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4
    groups = {
        "stem-layer2": [p for m in b[:6] for p in m.parameters()],
        "layer3-layer4": [p for m in b[6:] for p in m.parameters()],
        "head": list(model.head.parameters()),
    }
    if verbose:
        print("layer groups: " + ", ".join(
            f"{name} {sum(p.numel() for p in ps) / 1e6:.2f}M" for name, ps in groups.items()))
    return groups


def set_body_frozen(model, frozen):
    """Freeze or unfreeze the body's weights; its BatchNorm layers always stay trainable.

    As fastai's `train_bn`: BN statistics and affine parameters must adapt to radiographs,
    whose intensity histogram is far from ImageNet's. Frozen weights get requires_grad=False,
    so autograd computes no gradient for them (the backward pass still flows through the body
    to reach the BN parameters).
    """
    for m in model.body.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or \
                not list(m.parameters(recurse=False)):  # BatchNorm, SyncBatchNorm
            continue
        for p in m.parameters(recurse=False):
            p.requires_grad_(not frozen)


def load_checkpoint(path):
    """One of our checkpoints -> (model, checkpoint dict), with a clear error for anything else.

    path may be a run folder (its model.pt is taken). Loads with weights_only=True: tensors,
    numbers and strings only, so a checkpoint from elsewhere cannot run code.
    """
    if os.path.isdir(path):
        path = os.path.join(path, "model.pt")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such checkpoint (give a run folder or a .pt file)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding arbitrary objects
        raise SystemExit(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); is the file complete?") from e
    if not (isinstance(ck, dict) and {"model", "classes", "config"} <= set(ck)):
        raise SystemExit(f"{path}: not a COVID-ResNet checkpoint (it needs model, classes and "
                         f"config entries; train.py writes them)")
    model = COVIDResNet(getattr(torchvision.models, ck["config"]["arch"])(weights=None),
                        len(ck["classes"]))
    _load_into(model, ck["model"], path, ck["config"]["arch"])
    return model, ck


@torch.no_grad()
def class_logits(model, forward, images, size, hw=None, batch_size=256, transform=None,
                 amp=None, channels_last=False):
    """fp32 logits (N, C) for uint8 films (N, 1, T, T) on the model's device, in eval mode.

    forward is the model or its compiled version. Each batch is seen as evaluation sees it
    (batches.view: with --resize crop, hw each film's height / width, the centre crop), or
    through transform(x, hw) -> (B, 1, size, size), one pass of test-time augmentation.
    For a compiled forward the last batch is padded: one static shape, no recompilation.
    amp: the autocast dtype of the body (devices.precision), or None; channels_last: NHWC
    batches, as the model was converted.
    """
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float().div_(255)
        n, h = len(x), None if hw is None else hw[i:i + batch_size]
        x = transform(x, h) if transform else view(x, size, h)
        if n < batch_size and forward is not model:  # eager: no need to pay for padding
            x = torch.cat([x, x.new_zeros(batch_size - n, *x.shape[1:])])
        with autocast(images.device, amp):
            out.append(forward(normalize(x, channels_last))[:n].float())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.head[-1].out_features,
                                                  device=images.device)
