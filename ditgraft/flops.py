"""FLOP accounting measured with torch's FlopCounterMode (matmuls, convolutions, attention)."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from ditgraft.models.families import family_of


def _cpu_flash_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, n, d = query_shape
    m = key_shape[-2]
    return 2 * 2 * b * h * n * m * d  # QK^T and PV


def _cpu_flash_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _cpu_flash_fwd(query_shape, key_shape, value_shape)  # dV, dP, dQ, dK


# torch's counter has no formula for the CPU flash kernels that SDPA uses here; without these attention counts 0.
_CUSTOM = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_fwd,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_bwd,
}


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of ``fn(*args, **kwargs)`` (a multiply-add counts as 2), including any backward it runs."""
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def dit_train_flops_per_sample(model, batch: int = 2) -> int:
    """Training FLOPs of one sample = 3 x forward (backward = 2 x forward). Measured backward counts are not
    used: torch's counter ignores ``groups`` in convolution backward and overcounts depthwise convolutions."""
    return 3 * dit_forward_flops_per_sample(model, batch)


def dit_forward_flops_per_sample(model, batch: int = 2) -> int:
    """Forward FLOPs of one sample of any model family, on random inputs of the model's sample shape."""
    family = family_of(model)
    device = next(model.parameters()).device
    x = torch.randn(family.sample_shape(model, batch), device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    cond = family.example_cond(model, batch, device)
    with torch.no_grad():
        return count_flops(family.forward, model, x, t, cond) // batch
