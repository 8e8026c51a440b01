"""LoRA finetuning through peft (an optional extra): adapters injected in place, so the model keeps its class and
its family's call, and merged back into plain weights (``merge_lora``) before saving."""
from __future__ import annotations

from torch import nn


def _peft():
    try:
        import peft
    except ModuleNotFoundError as err:  # pragma: no cover - depends on the install
        raise ModuleNotFoundError("stage2.lora needs peft: pip install 'ditgraft[diffusers]'") from err
    return peft


def add_lora(model: nn.Module, cfg, trainable=()) -> nn.Module:
    """Inject LoRA adapters (``cfg.rank``, ``cfg.alpha``, ``cfg.target_modules``, ``cfg.dropout``) into ``model``
    in place. Only the adapters train, plus every parameter of the modules in ``trainable`` (grafted operators)."""
    peft = _peft()
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                             lora_dropout=cfg.dropout, bias="none")
    try:
        model = peft.inject_adapter_in_model(config, model)
    except ValueError as err:
        raise ValueError(f"stage2.lora.target_modules={list(cfg.target_modules)!r}: {err}") from err
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    for module in trainable:
        module.requires_grad_(True)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the plain layer back (in place); returns ``model``."""
    from peft.tuners.lora import LoraLayer

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, module in targets:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return model
