"""Loading and saving DiT weights.

Sources a user can name (``load_dit``):
- ``testbed``: the teacher shipped with ditgraft (EMA weights, ditgraft/assets/testbed/teacher.safetensors);
  ``flowbed``, the flow-matching testbed teacher (an MMDiT, ditgraft/assets/flowbed/), loads through ``load_any``
  (``ditgraft.graft.surgery``), as every checkpoint of a family other than DiT;
- a ditgraft ``.safetensors`` file: weights plus JSON metadata (model config, and for grafted models the recipe),
  so nothing else is needed to rebuild the architecture;
- an official DiT ``.pt`` file (``DiT-XL-2-256x256.pt``: a plain state dict; training checkpoints: the ``ema`` entry),
  loaded strictly with ``torch.load(weights_only=True)``; the size comes from ``model`` (default DiT-XL/2) and
  ``image_size`` (latent = image / 8);
- ``hf://owner/repo/path/in/repo.safetensors`` (or .pt): fetched with huggingface_hub when a network exists;
  with HF_HUB_OFFLINE=1 it resolves from the local cache;
- a diffusers ``DiTTransformer2DModel`` folder (``save_pretrained`` output), a ``DiTPipeline`` folder, or a hub repo
  id ``owner/name`` (e.g. ``facebook/DiT-XL-2-256``): see models/diffusers_dit.py (needs the ``diffusers`` extra).
"""
from __future__ import annotations

import argparse
import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ditgraft.models.diffusers_dit import is_diffusers_source, load_diffusers_dit
from ditgraft.models.dit import DIT_CONFIGS, DiT, build_dit
from ditgraft.utils import atomic_path, non_finite_tensors, torch_load_weights

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
TESTBED_TEACHER = os.path.join(ASSETS, "testbed", "teacher.safetensors")
SHIPPED_TEACHERS = ("testbed", "flowbed")  # names a source may use: ditgraft/assets/<name>/teacher.safetensors


def shipped_path(source: str) -> str:
    """The file of a shipped teacher's name (``testbed``, ``flowbed``); any other source unchanged."""
    if source not in SHIPPED_TEACHERS:
        return source
    path = os.path.join(ASSETS, source, "teacher.safetensors")
    if not os.path.exists(path):
        how = " (train it: see ditgraft/assets/flowbed/README.md)" if source == "flowbed" else ""
        raise FileNotFoundError(f"the shipped {source} teacher is missing at {path}{how}")
    return path
METADATA_KEY = "ditgraft"


def save_safetensors(path: str, model: nn.Module, metadata: dict) -> None:
    """Weights + JSON metadata (``{"model_config": ..., "recipe": ...}``), written atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata={METADATA_KEY: json.dumps(metadata)})


def _unreadable(path: str, err: Exception) -> ValueError:
    size = os.path.getsize(path) if os.path.exists(path) else None
    what = "empty" if size == 0 else "truncated or corrupt"
    return ValueError(f"{path} is not a readable safetensors file ({what}, {size} bytes: {err}); "
                      "re-create or re-download it")


def read_metadata(path: str) -> dict:
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, err) from None
    if METADATA_KEY not in meta:
        raise ValueError(f"{path} has no ditgraft metadata; is it a ditgraft checkpoint? "
                         "(official DiT .pt files load with model=<size> instead)")
    try:
        out = json.loads(meta[METADATA_KEY])
    except ValueError as err:
        raise ValueError(f"{path}: its ditgraft metadata is not valid JSON ({err})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: its ditgraft metadata is not a JSON mapping; not a ditgraft checkpoint")
    return out


def tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a safetensors file, from its header alone (no tensor is read)."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, err) from None


DEPTH_KEYS = ("depth", "num_layers")  # DiT, diffusers transformers


def check_config_fits_file(config, shapes: dict[str, tuple[int, ...]], source: str,
                           restructured: bool = False) -> None:
    """Before any model is built: the sizes a model_config asks for must be those of the tensors in the file, so
    hostile metadata (depth 1,000,000, width 131,072, a huge image) fails at once instead of hanging or
    allocating. DiT configs are checked field by field; other families have their depth bounded by the file's
    tensor count (the meta-device build that follows compares every shape). A ``restructured`` model (parallel
    units, dropped blocks) holds at most its config's depth of top-level blocks."""
    if not isinstance(config, dict):
        return  # build_from_config names it
    for key in DEPTH_KEYS:
        v = config.get(key)
        if isinstance(v, int) and not 0 < v <= len(shapes):
            raise ValueError(f"{source}: model_config {key}={v} does not fit the file (it holds {len(shapes)} "
                             f"tensors); allowed: 1..{len(shapes)}")
    if any(k not in shapes for k in ("pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight")):
        return  # not a DiT (the MMDiT shares its patch embedding names, not its class table)
    _, n, hidden = shapes["pos_embed"]
    out_ch, in_ch, p, _ = shapes["x_embedder.proj.weight"]
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    size = config.get("input_size")
    patch = config.get("patch_size")
    grid = None
    if isinstance(patch, int) and patch > 0 and (isinstance(size, int) or (
            isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size))):
        h, w = (size, size) if isinstance(size, int) else size
        grid = (h // patch) * (w // patch)
    want = {"hidden_size": hidden, "depth": len(blocks), "patch_size": p, "in_channels": in_ch}
    if restructured:
        depth = config.get("depth")
        if isinstance(depth, int) and depth < len(blocks):
            raise ValueError(f"{source}: model_config depth={depth} does not fit the file's tensors; allowed: at "
                             f"least {len(blocks)} (from its blocks)")
        del want["depth"]
    for key, allowed in want.items():
        if key in config and config[key] != allowed:
            raise ValueError(f"{source}: model_config {key}={config[key]!r} does not fit the file's tensors; "
                             f"allowed: {allowed} (from its {'blocks' if key == 'depth' else 'patch embedding'})")
    if grid is not None and grid != n:
        raise ValueError(f"{source}: model_config input_size={size!r} (patch {patch}) gives {grid} patches; the "
                         f"file's pos_embed holds {n}")


def shape_mismatch(model: nn.Module, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """One readable ValueError for missing keys, unexpected keys and shape mismatches between ``model`` (built on
    any device, meta included) and the tensor shapes of ``source`` (the first few of each)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in own if k not in shapes]
    extra = [k for k in shapes if k not in own]
    wrong = [f"{k} {shapes[k]} (expected {own[k]})" for k in own if k in shapes and shapes[k] != own[k]]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", extra), ("wrong shapes", wrong)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    if problems:
        raise ValueError(f"{source} does not match the model it describes: " + "; ".join(problems))


def load_weights(path: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or a ValueError naming the file when it is empty/truncated/corrupt."""
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, err) from None


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with one readable ValueError for missing keys, unexpected keys
    and shape mismatches (the first few of each, naming ``source``)."""
    shape_mismatch(model, {k: tuple(v.shape) for k, v in state.items()}, source)
    model.load_state_dict(state, strict=True)


def build_from_config(config: dict | None, source: str) -> DiT:
    if not isinstance(config, dict):
        raise ValueError(f"{source}: its metadata has no model_config mapping (got {config!r}); "
                         "not a ditgraft model checkpoint")
    try:
        return DiT(**config)
    except (TypeError, ValueError, ArithmeticError) as err:  # ArithmeticError: e.g. mlp_ratio=1e308 (overflow)
        raise ValueError(f"{source}: model_config {config} cannot build a DiT ({err})") from None


def model_fingerprint(model: nn.Module) -> str:
    """A content hash of a model: its module structure and every tensor of its state dict (name, dtype, shape,
    bytes). Two loads of the same weights give the same hash whatever the file or path; any changed weight, graft
    or size gives another. Cached samples and metrics are keyed by it."""
    import hashlib

    h = hashlib.sha256(repr(model).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def build_checked(build, config, path: str, restructured: bool = False) -> nn.Module:
    """``build()`` once the file's header vouches for it: the config's sizes are checked against the tensor
    shapes, then the model is built on the meta device (no memory) and every shape compared, and only then built
    for real; a hostile or mismatched config fails in milliseconds."""
    shapes = tensor_shapes(path)
    check_config_fits_file(config, shapes, path, restructured)
    with torch.device("meta"):
        probe = build()
    shape_mismatch(probe, shapes, path)
    return build()


def require_finite(model: nn.Module, source: str) -> nn.Module:
    """Refuse a model with NaN/Inf weights (a diverged run) before spending time sampling or evaluating it."""
    bad = non_finite_tensors(model)
    if bad:
        raise ValueError(f"{source} has non-finite weights (NaN/Inf in {len(bad)} tensors, e.g. {', '.join(bad[:3])}); "
                         "it comes from a diverged run and cannot be sampled or evaluated")
    return model


def resolve_hub(source: str) -> str:
    """``hf://owner/repo/file`` -> local path via huggingface_hub (cache first when HF_HUB_OFFLINE=1)."""
    rest = source[len("hf://"):]
    parts = rest.split("/")
    if len(parts) < 3:
        raise ValueError(f"source={source!r}: hub sources look like hf://owner/repo/path/to/file.safetensors")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:]))


def load_official_state_dict(path: str) -> dict[str, torch.Tensor]:
    """An official DiT .pt: a plain state dict, or a training checkpoint {model, ema, opt, args} (ema is used)."""
    # DiT's train.py stores args as an argparse.Namespace: allow exactly that class, nothing else.
    obj = torch_load_weights(path, allowed=(argparse.Namespace,))
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        obj = obj["ema"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a DiT state dict (expected a dict of tensors, or a dict with an 'ema' entry)")
    return obj


def load_dit(source: str, model: str | None = None, image_size: int | None = None,
             map_location: str | torch.device = "cpu") -> tuple[DiT, dict]:
    """Load a plain (ungrafted) DiT and its metadata from any supported source (see module doc)."""
    source = shipped_path(source)
    if source.startswith("hf://"):
        source = resolve_hub(source)
    if is_diffusers_source(source):
        net, meta = load_diffusers_dit(source)
        return net.to(map_location).eval(), meta
    if not os.path.exists(source):
        raise FileNotFoundError(f"model {source!r}: no such file; allowed: 'testbed', a .safetensors/.pt path, "
                                "hf://owner/repo/file, a diffusers folder or hub repo id")
    if source.endswith(".safetensors"):
        meta = read_metadata(source)
        if meta.get("recipe") or meta.get("grafts") or meta.get("family", "dit") != "dit":
            raise ValueError(f"{source} is a grafted model or a {meta.get('family', 'dit')} model (not a plain DiT); "
                             "load it with ditgraft.graft.surgery.load_any (or ditgraft.load_model, which loads "
                             "any source)")
        net = build_checked(lambda: build_from_config(meta.get("model_config"), source), meta.get("model_config"),
                            source)
        load_state_strict(net, load_weights(source, map_location), source)
        return net.eval(), meta
    name = model or "DiT-XL/2"
    if name not in DIT_CONFIGS:
        raise KeyError(f"model={name!r} is unknown; allowed: {', '.join(DIT_CONFIGS)}")
    overrides = {}
    if image_size is not None:
        if image_size % 8:
            raise ValueError(f"image_size={image_size} must be divisible by 8 (the SD VAE downsamples by 8)")
        overrides["input_size"] = image_size // 8
    state = load_official_state_dict(source)  # a bad file fails before a large model is built
    net = build_dit(name, **overrides)
    load_state_strict(net, state, f"{source} (as {name})")
    return net.eval(), {"model_config": net.config, "source": source}
