"""Where and how the network runs: device, precision, memory layout, torch.compile, and the
calls that depend on the device, in one place for train.py, evaluate.py, predict.py and bench.py.

    dev = pick_device("auto")                  # the GPU where there is one, else the CPU
    amp = precision(dev, "auto")               # torch.bfloat16 on CUDA, None (fp32) on the CPU
    arithmetic(dev, amp)                       # what ran: "bf16 autocast", "fp32 (TF32 off)"
    with model.autocast(dev, amp): logits = net(x)
    cl = channels_last(dev, "auto")            # NHWC on CUDA
    compile_pays(images, size)                 # whether torch.compile repays itself
    sync(dev); peak_gib(dev)                   # that device's, not the current one's
    HostCopy(loss).value()                     # a loss read without waiting for later steps

The device only decides the defaults: --precision bf16 and --channels-last on run on the CPU
too, so every branch the GPU takes has run on a CPU before (the kernels aside).
"""
import os
import platform

import torch

PRECISIONS = ("auto", "bf16", "fp32", "tf32")
SWITCHES = ("auto", "on", "off")


def pick_device(name):
    """'auto': the GPU where there is one, else the CPU. Asking for a missing GPU is an error."""
    try:
        dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                           if name == "auto" else name)
    except RuntimeError as e:
        raise SystemExit(f"--device {name}: not a device (auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: no CUDA device is available; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise SystemExit(f"--device {name}: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s), numbered from 0")
        torch.cuda.set_device(dev)  # kernels, generators and memory stats of this GPU
    return dev


def precision(dev, name="auto"):
    """The autocast dtype for --precision, torch.bfloat16 or None, and whether fp32 math on
    CUDA may round to TF32 (10 bits of mantissa, not fp32's 23), set here for the process:

    bf16  the body under bf16 autocast (no GradScaler needed: bf16 has fp32's range), on
          either device; what stays fp32 (the head) is fp32, TF32 off;
    fp32  fp32 throughout, TF32 off, as a 2020 run computed (before Ampere, no TF32 existed;
          since then PyTorch lets cuDNN's convolutions use it by default);
    tf32  fp32 tensors, with cuDNN's convolutions and matmuls on TF32 tensor cores (PyTorch's
          default for convolutions); on the CPU, which has no TF32, fp32;
    auto  bf16 on CUDA, fp32 on the CPU."""
    if name not in PRECISIONS:
        raise SystemExit(f"--precision {name}: choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        name = "bf16" if dev.type == "cuda" else "fp32"
    if name == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit(f"--precision bf16: {torch.cuda.get_device_name(dev)} has no bf16 "
                         "support; use --precision fp32")
    torch.backends.cudnn.allow_tf32 = name == "tf32"  # flags of the CUDA backends: harmless
    torch.backends.cuda.matmul.allow_tf32 = name == "tf32"  # on a machine without one
    return torch.bfloat16 if name == "bf16" else None


def arithmetic(dev, amp):
    """The body's arithmetic as torch is set now, in words (for the log, config.json and the
    GPU check): bf16 autocast | fp32 (TF32 off) | fp32 with TF32 convolutions and matmuls |
    fp32 (on the CPU)."""
    if amp is not None:
        return "bf16 autocast"
    if dev.type != "cuda":
        return "fp32"
    tf32 = [what for what, on in (("convolutions", torch.backends.cudnn.allow_tf32),
                                  ("matmuls", torch.backends.cuda.matmul.allow_tf32)) if on]
    return f"fp32 with TF32 {' and '.join(tf32)}" if tf32 else "fp32 (TF32 off)"


def channels_last(dev, name="auto"):
    """--channels-last: NHWC lets tensor cores run convolutions without transposes; on the
    CPU the default NCHW is as fast for these sizes. auto: on for CUDA only."""
    if name not in SWITCHES:
        raise SystemExit(f"--channels-last {name}: choose one of {', '.join(SWITCHES)}")
    return name == "on" or (name == "auto" and dev.type == "cuda")


# Measured on one H100 (torch 2.11, bf16, channels_last, batch 256; issue #3): an eager
# ResNet-50 step ran at 10,755 img/s at 128 px; compiling took 64 s and saved 25% of the step
# time at 128 px and nothing measurable at 224 px. Each stage needs three graphs (frozen,
# unfrozen, evaluation). Compilation pays only when a quarter of the stage's eager compute
# exceeds that: beyond ~6 million images at 128 px, i.e. never on COVIDx-sized data.
COMPILE_S, COMPILE_GAIN, EAGER_IMG_S_128 = 64.0, 0.25, 10_755


def compile_pays(images, size):
    """Whether compiling a stage that trains on `images` images of `size` px saves time."""
    eager_s = images / (EAGER_IMG_S_128 * (128 / size) ** 2)
    return COMPILE_GAIN * eager_s > 3 * COMPILE_S


def cudnn_autotune(dev, setting="on"):
    """--cudnn-benchmark: on, cuDNN times its algorithms for each new convolution shape and
    keeps the fastest (seconds per shape, once; the project keeps one shape per stage); off,
    its heuristics choose; N, on with at most N algorithms tried a shape."""
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = setting != "off"
        if setting.isdigit():
            torch.backends.cudnn.benchmark_limit = int(setting)


def sync(dev):
    """Wait for `dev`, so that a wall-clock time means its work is done."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class HostCopy:
    """A device scalar on its way to the host without a wait: copied behind the work queued
    so far (on CUDA into pinned memory, an event recorded after the copy). ready() says
    whether it has arrived; value() waits for that copy only, never for the work queued
    after it (.item() would wait for all of it: the device would run dry)."""

    def __init__(self, t):
        t = t.detach().float()
        self.host, self.event = t, None  # on the CPU: computed already
        if t.is_cuda:
            self.host = torch.empty(t.shape, pin_memory=True).copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def ready(self):
        return self.event is None or self.event.query()

    def value(self):
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy().item()  # host memory: read without an operator


def generator_state(dev):
    """The state of the generator dropout draws from on `dev` (kept on the host: no wait)."""
    return torch.cuda.get_rng_state(dev) if dev.type == "cuda" else torch.get_rng_state()


def set_generator_state(dev, state):
    if dev.type == "cuda":
        torch.cuda.set_rng_state(state, dev)
    else:
        torch.set_rng_state(state)


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev, reserved=False):
    """Peak memory allocated by tensors on `dev` since reset_peak, or with reserved=True held
    by torch's caching allocator (tensors, cuDNN's workspaces, free blocks kept for reuse: what
    another process cannot have). CUDA only; None else."""
    if dev.type != "cuda":
        return None
    return (torch.cuda.max_memory_reserved(dev) if reserved else
            torch.cuda.max_memory_allocated(dev)) / 2 ** 30


def describe(dev):
    """The device in words, for logs and benchmark records."""
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        return f"{p.name} ({p.total_memory / 2 ** 30:.0f} GiB, sm_{p.major}{p.minor})"
    return f"CPU {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
