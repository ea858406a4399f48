"""Measure what a module costs: FLOPs, memory and time, the way the paper's efficiency table compares them.

- FLOPs: ``torch.utils.flop_counter`` over one forward (2 FLOPs per multiply-add; convs and matmuls, which
  dominate), counted on the ``meta`` device so large models cost no compute.
- Saved memory: bytes of the tensors autograd keeps for backward, parameters and the module's input
  excluded (they exist anyway), each storage counted once.
- Peak memory: the most memory allocated above the starting point during forward + backward, from the CUDA
  allocator on GPU and from the profiler's allocation events on CPU. The paper's memory column is of this
  kind (GPU memory of the block during training).
- Time: median of forward + backward over a few repeats.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

MIB = 2**20


@dataclass(frozen=True)
class Profile:
    """One row of an efficiency table. Memory in MiB, time in milliseconds, FLOPs in GFLOPs (forward)."""

    name: str
    params: int
    gflops: float
    saved_mib: float
    peak_mib: float
    time_ms: float


def count_flops(module: nn.Module, *inputs: Tensor) -> int:
    """FLOPs of one forward pass of ``module`` on ``inputs`` (any device, ``meta`` included)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops()


def count_flops_on_meta(build: Callable[[], nn.Module], input_shape: Sequence[int]) -> int:
    """FLOPs of ``build()``'s forward on a tensor of ``input_shape``, without allocating or computing."""
    with torch.device("meta"):
        module = build()
    return count_flops(module, torch.empty(*input_shape, device="meta"))


def saved_tensor_bytes(module: nn.Module, x: Tensor) -> int:
    """Bytes autograd saves for backward in ``module(x)``, excluding parameters and ``x`` itself."""
    excluded = {p.untyped_storage().data_ptr() for p in module.parameters()}
    excluded.add(x.untyped_storage().data_ptr())
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded and tensor.device.type != "meta":
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    return sum(storages.values())


def _forward_backward(module: nn.Module, x: Tensor) -> None:
    module(x).float().sum().backward()


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null: the profiler's native library logs every start and stop there,
    whatever its log-level variable says once torch is loaded."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak of allocated-minus-freed bytes while ``fn`` runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced():
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        prof.start()
    try:
        fn()
    finally:
        with _native_stderr_silenced():
            prof.stop()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted(
        (event for event in events if event.get("name") == "[memory]" and event["args"]["Device Type"] == 0),
        key=lambda event: event["ts"],
    )
    current = peak = 0
    for event in memory:
        current += event["args"]["Bytes"]
        peak = max(peak, current)
    return peak


def peak_memory_bytes(module: nn.Module, x: Tensor) -> int:
    """Peak memory allocated above the starting point during one forward + backward of ``module(x)``."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        start = torch.cuda.memory_allocated(x.device)
        _forward_backward(module, x)
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device) - start
    return _cpu_peak_bytes(lambda: _forward_backward(module, x))


def time_forward_backward(module: nn.Module, x: Tensor, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time in milliseconds of forward + backward."""

    def sync() -> None:
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

    timings = []
    for step in range(warmup + repeats):
        module.zero_grad(set_to_none=True)
        x.grad = None
        sync()
        start = time.perf_counter()
        _forward_backward(module, x)
        sync()
        if step >= warmup:
            timings.append((time.perf_counter() - start) * 1000)
    return statistics.median(timings)


def profile_module(
    name: str,
    build: Callable[[], nn.Module],
    input_shape: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
) -> Profile:
    """Measure one module built by ``build()`` on a random input of ``input_shape``."""
    flops = count_flops_on_meta(build, input_shape)
    module = build().to(device=device, dtype=dtype)
    x = torch.randn(*input_shape, device=device, dtype=dtype, requires_grad=True)
    return Profile(
        name=name,
        params=sum(p.numel() for p in module.parameters()),
        gflops=flops / 1e9,
        saved_mib=saved_tensor_bytes(module, x) / MIB,
        peak_mib=peak_memory_bytes(module, x) / MIB,
        time_ms=time_forward_backward(module, x, repeats=repeats),
    )


def format_table(rows: Sequence[Profile], reference: str) -> str:
    """A plain-text table of ``rows`` with each figure's ratio to the row named ``reference``."""
    base = next(row for row in rows if row.name == reference)
    header = (
        f"{'module':<24}{'params':>10}{'GFLOPs':>9}{'/ref':>7}{'saved MiB':>11}{'/ref':>7}"
        f"{'peak MiB':>10}{'/ref':>7}{'fwd+bwd ms':>12}{'/ref':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.name:<24}{row.params:>10,}{row.gflops:>9.2f}{row.gflops / base.gflops:>7.3f}"
            f"{row.saved_mib:>11.1f}{row.saved_mib / base.saved_mib:>7.3f}"
            f"{row.peak_mib:>10.1f}{row.peak_mib / base.peak_mib:>7.3f}"
            f"{row.time_ms:>12.1f}{row.time_ms / base.time_ms:>7.3f}"
        )
    return "\n".join(lines)


def compare_attention(
    feature_size: tuple[int, int] = (97, 97),
    channels: int = 512,
    batch: int = 1,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    include_autograd: bool = False,
) -> list[Profile]:
    """The paper's efficiency comparison: Non-local vs criss-cross R=1/2/3 vs rows-then-columns.

    The default is the paper's setting: a 769x769 image at output stride 8 gives 97x97 features of 512
    channels (queries/keys at 64). ``include_autograd`` adds criss-cross R=2 differentiated by plain
    autograd (``impl='autograd'``) for comparison with the hand-written backward.
    """
    from ccnet.attention import AxialAttention, CrissCrossAttention, NonLocal2d, RecurrentAttention

    def criss_cross(recurrence: int) -> Callable[[], nn.Module]:
        return lambda: RecurrentAttention(CrissCrossAttention(channels), recurrence)

    builds: dict[str, Callable[[], nn.Module]] = {"non-local": lambda: NonLocal2d(channels)}
    for recurrence in (1, 2, 3):
        builds[f"criss-cross R={recurrence}"] = criss_cross(recurrence)
    if include_autograd:
        builds["criss-cross R=2 autograd"] = lambda: RecurrentAttention(
            CrissCrossAttention(channels, impl="autograd"), 2
        )
    builds["rows-then-columns"] = lambda: AxialAttention(channels)
    shape = (batch, channels, *feature_size)
    return [
        profile_module(name, build, shape, device=device, dtype=dtype, repeats=repeats)
        for name, build in builds.items()
    ]


def model_summary(name: str, num_classes: int, image_size: tuple[int, int], **overrides: object) -> str:
    """Params and forward GFLOPs of a registered model on one image, counted on the meta device."""
    from ccnet.models import build_ccnet

    def build() -> nn.Module:
        return build_ccnet(name, num_classes, **overrides).eval()

    flops = count_flops_on_meta(build, (1, 3, *image_size))
    with torch.device("meta"):
        params = sum(p.numel() for p in build().parameters())
    return (
        f"{name} ({num_classes} classes) at {image_size[0]}x{image_size[1]}: "
        f"{params / 1e6:.2f} M params, {flops / 1e9:.1f} GFLOPs per image (forward)"
    )
