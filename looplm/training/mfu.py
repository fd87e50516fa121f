"""Model FLOPs utilisation: achieved matmul TFLOP/s over the hardware's dense peak.

MFU = achieved / (peak × processes), where ``achieved`` is the trainer's ``achieved_tflops``
(matmul FLOPs per token, 2 per multiply-add, × tokens/s of the whole run) and ``peak`` is one
device's dense bf16 tensor throughput.  ``train.peak_tflops`` gives the peak; left at 0 on CUDA
it is looked up below by ``torch.cuda.get_device_name``; unknown devices (and CPUs) get no MFU.

The table's figures are dense (no 2:4 sparsity) BF16 Tensor Core TFLOP/s from NVIDIA's
product datasheets (H100, H200, A100, A10, L4, L40, L40S, HGX B200; B200 is the 8-GPU board's
figure / 8).  The datasheets print the "with sparsity" figure, twice the dense one stored here.
"""

from __future__ import annotations

import re

import torch

# (pattern of torch.cuda.get_device_name, dense bf16 TFLOP/s); the first match wins, so the
# more specific names come first (e.g. "NVIDIA H100 PCIe" before "NVIDIA H100 80GB HBM3").
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H100", 989.0),          # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"H200.*NVL", 835.0),
    (r"H200", 989.0),          # SXM and GH200 (same Hopper tensor cores and clocks as H100 SXM)
    (r"B200", 2250.0),
    (r"A100", 312.0),          # SXM4 and PCIe
    (r"L40S", 362.0),
    (r"L40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)


def peak_tflops_for_name(name: str) -> float:
    """Dense bf16 peak of a GPU by its reported name; 0.0 when the name is not in the table."""
    for pattern, peak in GPU_PEAK_TFLOPS:
        if re.search(pattern, name, re.IGNORECASE):
            return peak
    return 0.0


def device_peak_tflops(device: torch.device) -> float:
    """The table's peak for a CUDA device; 0.0 on CPU or for an unknown GPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return 0.0
    return peak_tflops_for_name(torch.cuda.get_device_name(device))


def model_flops_utilization(achieved_tflops: float, peak_tflops: float, processes: int = 1) -> float:
    """achieved / (peak × processes): the fraction of the devices' dense peak the run reached."""
    return achieved_tflops / (peak_tflops * processes)
