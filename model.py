"""COVID-ResNet: the network, its layer groups, the optimizer and the training step.

    model = build_model(n_classes=4, weights="imagenet")   # or "none", or a .pth path
    groups = layer_groups(model)                            # stem..layer2 | layer3..4 | head
    set_body_frozen(model, True)                            # train the head (and BN) only
    opt = make_optimizer(model, wd=0.01)                    # fastai v1's Adam, one group each
    loss = train_step(model, opt, x, y)                     # forward, backward, step
    logits = class_logits(model, model, batches)            # evaluation, in eval mode

What it teaches: an ImageNet ResNet-50 body under the head fastai v1's `cnn_learner` put on
every body, which the paper used (concatenated average+max pooling, then BN-dropout-linear
twice); the three layer groups that get their own learning rates; freezing that leaves
BatchNorm training; fastai's Adam; one precision path for the step. Inputs are 3-channel,
ImageNet-normalised images (data.py makes them from one-channel radiographs). This file
imports nothing of the project: loading a trained run's checkpoint lives in
machinery/checkpoint.py, the devices and torch.compile in machinery/devices.py.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class ConcatPool(nn.Module):
    """Average and max pooling side by side: (B, C, H, W) -> (B, 2C).

    Max pooling keeps a small, bright finding that averaging over the whole film would dilute.
    """

    def forward(self, x):
        return torch.cat([x.amax(dim=(2, 3)), x.mean(dim=(2, 3))], dim=1)


def make_head(n_features, n_classes, dropout, hidden=512):
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


PS = 0.5  # fastai's head dropout (its ps): p of the last dropout, half of it for the first


class COVIDResNet(nn.Module):
    def __init__(self, resnet, n_classes, ps=PS):
        super().__init__()
        r = resnet  # a torchvision ResNet; its avgpool and fc are replaced by the head
        self.body = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool,
                                  r.layer1, r.layer2, r.layer3, r.layer4)
        self.head = make_head(r.fc.in_features, n_classes, (ps / 2, ps))

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
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, another format, a pickle of code
        raise SystemExit(f"--weights {path}: not a state dict torch.load can read "
                         f"({type(e).__name__}: {str(e)[:200]})") from e
    if isinstance(sd, dict) and "model" in sd:  # one of our own checkpoints
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise SystemExit(f"--weights {path}: holds a {type(sd).__name__}, not a state dict")
    return sd


# torchvision's ResNet names -> their index in COVIDResNet.body
_BODY_INDEX = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6",
               "layer4": "7"}


def load_weights(module, sd, weights, arch):
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


def fetch_weights(weights="imagenet", arch="resnet50"):
    """The state dict `weights` names ('imagenet': downloaded once, then torch's cache; a
    path), or None for 'none'. train.py fetches them before it decodes any film: a run that
    cannot get its weights stops at once, not after minutes of decoding."""
    if arch not in ARCHS:
        raise SystemExit(f"--arch {arch}: choose one of {', '.join(ARCHS)}")
    if weights == "none":
        return None
    return _imagenet_state_dict(arch) if weights == "imagenet" else _load_state_dict(weights)


def build_model(n_classes, weights="imagenet", arch="resnet50", ps=PS, sd=None):
    """COVID-ResNet with `weights` = 'imagenet' | 'none' | a path to a state dict (sd: that
    state dict, if fetch_weights() fetched it already).

    A path may hold a torchvision ResNet state dict (its fc layer is ignored) or one of our
    checkpoints (then the head is loaded too, if its class count matches).
    """
    sd = fetch_weights(weights, arch) if sd is None else sd
    model = COVIDResNet(getattr(torchvision.models, arch)(weights=None), n_classes, ps)
    if sd is None:  # --weights none
        return model
    if any(k.startswith("body.") for k in sd):  # one of ours
        head = {k: v for k, v in sd.items() if k.startswith("head.")}
        if head and head["head.7.weight"].shape[0] == n_classes:
            return load_weights(model, sd, weights, arch) or model
        sd = {k[5:]: v for k, v in sd.items() if k.startswith("body.")}
    else:  # torchvision's layout (conv1.weight, layer1.0.conv1.weight, ...); fc is replaced
        sd = {_BODY_INDEX[k.split(".")[0]] + k[k.index("."):]: v
              for k, v in sd.items() if k.split(".")[0] in _BODY_INDEX}
    load_weights(model.body, sd, weights, arch)
    return model


GROUPS = ("stem-layer2", "layer3-layer4", "head")  # the layer groups, in the optimizer's order


def layer_groups(model, verbose=True):
    """The three layer groups that get their own learning rates, as {name: [params]}.

    stem+layer1+layer2 (generic edges and textures) | layer3+layer4 (ImageNet-specific
    parts) | head (new). The same split as fastai's resnet meta: body cut at layer3.
    """
    b = model.body  # conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4
    groups = dict(zip(GROUPS, [[p for m in b[:6] for p in m.parameters()],
                               [p for m in b[6:] for p in m.parameters()],
                               list(model.head.parameters())]))
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


# ---------------------------------------------------------------------------------------------
# How it learns: fastai v1's Adam over the layer groups, and one training step

BETAS = (0.9, 0.99)  # fastai v1's Adam: beta1 0.9 (the one-cycle moves it), beta2 0.99


def make_optimizer(model, wd, verbose=True):
    """fastai v1's optimizer: Adam with decoupled weight decay (its true_wd, torch's AdamW),
    one param group per layer group, named, so that each group gets its own learning rate.

    The fused kernel updates every parameter in one kernel, on CUDA and (torch 2.4 and later)
    on the CPU, 3-4x faster there than the for-each kernel; the update is the same. The LR set
    here is a placeholder: the LR finder and the one-cycle schedule write each group's LR
    before every step."""
    groups = layer_groups(model, verbose)
    return torch.optim.AdamW([{"params": ps, "name": name} for name, ps in groups.items()],
                             lr=1e-3, betas=BETAS, weight_decay=wd, fused=True)


def autocast(device, dtype):
    """bf16 autocast on `device` when dtype is torch.bfloat16 (bf16 has fp32's range: no
    GradScaler needed); nothing, plain fp32, when dtype is None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_step(forward, opt, x, y, amp=None, weight=None):
    """One step: forward (under autocast with dtype `amp`, the head in fp32) and the
    cross-entropy loss (class weights `weight` or None), backward, the optimizer's step.

    forward is the model, or what calls it (torch.compile's version, DistributedDataParallel).
    Returns the loss still on the device: the step never waits for it."""
    with autocast(x.device, amp):
        loss = F.cross_entropy(forward(x), y, weight=weight)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def class_logits(model, forward, batches, amp=None):
    """fp32 logits (N, C) in eval mode, from evaluation batches (x, n): x normalised, its
    first n rows real (data.eval_batches; the rest pad a compiled forward's last batch).

    forward is the model or its compiled version; amp the autocast dtype of the body or None.
    """
    was_training = model.training
    model.eval()
    out = []
    for x, n in batches:
        with autocast(x.device, amp):
            out.append(forward(x)[:n].float())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(
        0, model.head[-1].out_features, device=next(model.parameters()).device)


def gradcam(model, x, target):
    """Grad-CAM of class `target` for one normalised image x (1, 3, H, W) -> (h, w) in [0, 1].

    The body's output (layer4) is weighted per channel by the mean gradient of the target
    logit, summed, and rectified: the regions whose features raise that class's score.
    """
    model.eval()
    with torch.enable_grad():
        feats = model.body(x).detach().requires_grad_(True)  # (1, C, h, w)
        # autograd.grad, not backward: no gradient is left on the model's weights
        grad, = torch.autograd.grad(model.head(feats)[0, target], feats)
    weights = grad.mean(dim=(2, 3), keepdim=True)  # (1, C, 1, 1)
    cam = F.relu((weights * feats).sum(1))[0].detach()  # (h, w)
    return cam / cam.max() if cam.max() > 0 else cam
