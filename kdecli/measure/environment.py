"""Where and on what a measurement ran: the machine (``Environment``) and the input (``InputInfo``).

Every report's header says both, so a figure read later names its device, dtype, thread count and
library versions, and the input's name, shape, softmax scale and mask.
"""

from __future__ import annotations

import platform

import torch

from kdecli.masks import FULL, Causal, Mask
from kdecli.measure.figures import Environment, InputInfo, Shape
from kdecli.qkv import QKV


def cpu_name() -> str:
    """The processor's marketing name where the OS tells it (Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, dtype: torch.dtype) -> Environment:
    """The machine a measurement runs on: torch, the device and its name, the working dtype, the
    thread count and Python."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return Environment(
        torch=torch.__version__,
        device=str(device),
        device_name=name,
        dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        python=platform.python_version(),
    )


def describe_input(qkv: QKV, scale: float, mask: Mask = FULL) -> InputInfo:
    """The input as run: its name, shape, layout, stored dtype, the softmax scale and the mask
    (``causal``, and ``query_offset`` when a causal mask's is not 0)."""
    return InputInfo(
        source=qkv.source,
        shape=Shape(**qkv.shape),
        layout=qkv.layout,
        dtype=str(qkv.q.dtype).removeprefix("torch."),
        scale=scale,
        causal=mask.is_causal,
        query_offset=mask.offset if isinstance(mask, Causal) else 0,
    )
