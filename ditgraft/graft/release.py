"""The grafting paper's released grafted DiT-XL/2 checkpoints -> ditgraft grafted checkpoints.

A release model (hub organisation ``grafting``, e.g. ``grafting/dit-xl2-mha-hyena_x-50p-fid2.74``) is two files:

- ``model.pt``: ``{'ema': state_dict}``, a full DiT state dict whose grafted blocks hold the new operator under the
  release's parameter names (ditgraft's operators use the same names and shapes, so it loads strictly);
- a YAML: ``operator: {type: mha | mlp, name, config_filepath}`` and ``sample_config`` with ``graft_indexes`` (the
  grafted blocks), ``dit_model_name`` (DiT-XL/2) and ``image_size`` (256).

``config_filepath`` points into the release repository, so operator sizes are read from the weights instead
(e.g. the kernel size from ``short_filter.weight``, an MLP's width from ``fc1.weight``). The one size the weights do
not show is SWA's window, which is the release's 4 (configs/sequence_mixers/swa.yaml: window_size [4, 4]).
The DiT itself is rebuilt from the weights (width, depth, patch, channels, classes, sigma) plus the registry entry
of ``dit_model_name`` for the head count; guidance mixes 3 channels, as in the release and DiT.
"""
from __future__ import annotations

import os

import torch
import yaml

from ditgraft.graft.surgery import ResolvedGraft, build_graft_operator, save_grafted
from ditgraft.models.adapters import set_slot
from ditgraft.models.checkpoints import load_official_state_dict
from ditgraft.models.dit import DIT_CONFIGS, DiT

__all__ = ["RELEASE_OPERATORS", "read_release_config", "load_release", "import_release"]

# release operator name (YAML operator.name) -> (slot, ditgraft operator)
RELEASE_OPERATORS = {
    ("mha", "hyena_x"): "hyena_x", ("mha", "hyena_y"): "hyena_y", ("mha", "hyena_se"): "hyena_se",
    ("mha", "mamba2"): "mamba2", ("mha", "swa"): "swa",
    ("mlp", "mlp"): "mlp", ("mlp", "mlp_hyena_x"): "mlp_hyena_x",
}
_SLOT = {"mha": "attn", "mlp": "mlp"}


def read_release_config(path: str) -> dict:
    """The YAML's operator type/name, the grafted blocks, the model name and image size (validated)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"release config {path!r} does not exist")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"release config {path}: not valid YAML ({err})") from None
    op = (data or {}).get("operator") if isinstance(data, dict) else None
    sc = (data or {}).get("sample_config") if isinstance(data, dict) else None
    if not isinstance(op, dict) or not isinstance(sc, dict):
        raise ValueError(f"release config {path}: needs the mappings 'operator' and 'sample_config'")
    key = (op.get("type"), op.get("name"))
    if key not in RELEASE_OPERATORS:
        allowed = ", ".join(f"{t}/{n}" for t, n in RELEASE_OPERATORS)
        raise ValueError(f"release config {path}: operator type/name = {key[0]}/{key[1]} is not allowed; "
                         f"allowed: {allowed}")
    idx = sc.get("graft_indexes")
    if not isinstance(idx, list) or not idx or not all(isinstance(i, int) and i >= 0 for i in idx):
        raise ValueError(f"release config {path}: sample_config.graft_indexes = {idx!r}; need a non-empty list of "
                         "block indices >= 0")
    return {"slot": _SLOT[key[0]], "operator": RELEASE_OPERATORS[key], "release_operator": key[1],
            "graft_indexes": sorted(set(idx)), "dit_model_name": sc.get("dit_model_name", "DiT-XL/2"),
            "image_size": sc.get("image_size", 256)}


def _dit_config(sd: dict[str, torch.Tensor], name: str, num_heads: int | None) -> dict:
    """The DiT config from the weights, the head count (and MLP ratio if every MLP is grafted) from the registry."""
    if name not in DIT_CONFIGS and num_heads is None:
        raise ValueError(f"sample_config.dit_model_name = {name!r} is not a known size ({', '.join(DIT_CONFIGS)}); "
                         "pass num_heads")
    base = DIT_CONFIGS.get(name, {})
    w = sd["x_embedder.proj.weight"]
    hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[-1]
    side = round(sd["pos_embed"].shape[1] ** 0.5)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out_ch = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    ratio = next((sd[f"blocks.{i}.mlp.fc1.weight"].shape[0] / hidden for i in range(depth)
                  if f"blocks.{i}.mlp.fc1.weight" in sd and f"blocks.{i}.mlp.fc2.weight" in sd
                  and sd[f"blocks.{i}.mlp.fc1.weight"].shape[1] == hidden), base.get("mlp_ratio", 4.0))
    return dict(input_size=side * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
                num_heads=num_heads or base["num_heads"], mlp_ratio=ratio, num_classes=rows - 1,
                class_dropout_prob=0.1, learn_sigma=out_ch == 2 * in_ch, cfg_channels=3)


def _operator_options(operator: str, sd: dict[str, torch.Tensor], prefix: str, dim: int) -> dict:
    """Sizes of the grafted operator at ``prefix`` (e.g. ``blocks.1.attn.``) read from its weights."""
    def shape(name):
        if prefix + name not in sd:
            raise ValueError(f"the weights have no {prefix}{name}, which a {operator} operator needs: does the YAML "
                             "name the operator these weights were trained with?")
        return sd[prefix + name].shape

    if operator in ("hyena_x", "hyena_se"):
        return {"kernel_size": int(shape("short_filter.weight")[-1])}
    if operator == "hyena_y":
        return {"kernel_size": int(shape("inner_filter.weight")[-1])}
    if operator == "mlp":
        return {"hidden": int(shape("fc1.weight")[0])}
    if operator == "mlp_hyena_x":
        return {"expansion_ratio": shape("out_proj.weight")[1] // dim,
                "kernel_size": int(shape("short_filter.weight")[-1])}
    if operator == "mamba2":
        nheads, d_inner = shape("A_log")[0], shape("out_proj.weight")[1]
        conv_dim = shape("conv1d.weight")[0]
        return {"d_state": (conv_dim - d_inner) // 2, "d_conv": int(shape("conv1d.weight")[-1]),
                "expand": d_inner // dim, "headdim": d_inner // nheads, "ngroups": 1,
                "direction": "bidirectional" if prefix + "conv1d_rev.weight" in sd else "causal"}
    if operator == "swa":
        shape("Wqkv.weight")
        return {"window": 4}
    raise ValueError(f"operator={operator!r} has no release reader")


def load_release(model_path: str, config_path: str, num_heads: int | None = None):
    """(grafted DiT, grafts, release info) from a release ``model.pt`` and its YAML; the weights load strictly."""
    cfg = read_release_config(config_path)
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"release model {model_path!r} does not exist")
    sd = load_official_state_dict(model_path)
    config = _dit_config(sd, cfg["dit_model_name"], num_heads)
    depth = config["depth"]
    bad = [i for i in cfg["graft_indexes"] if i >= depth]
    if bad:
        raise ValueError(f"sample_config.graft_indexes: {bad} out of range for the depth-{depth} model in the weights")
    slot_name = cfg["slot"]
    grafts = [ResolvedGraft(slot_name, i, cfg["operator"],
                            _operator_options(cfg["operator"], sd, f"blocks.{i}.{slot_name}.", config["hidden_size"]))
              for i in cfg["graft_indexes"]]
    model = DiT(**config)
    for g in grafts:
        set_slot(model, g.layer, g.slot, build_graft_operator(model, g))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{model_path} does not match {config_path} (operator {cfg['release_operator']} in blocks "
                         f"{cfg['graft_indexes']}): missing {sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]}")
    return model.eval(), grafts, {"model": os.path.abspath(model_path), "config": os.path.abspath(config_path),
                                  "operator": cfg["release_operator"], "dit_model_name": cfg["dit_model_name"],
                                  "image_size": cfg["image_size"]}


def import_release(model_path: str, config_path: str, out: str, num_heads: int | None = None) -> str:
    """Write the release model as a ditgraft grafted ``.safetensors`` (``ditgraft sample`` and ``eval`` read it)."""
    if not out.endswith(".safetensors"):
        raise ValueError(f"out={out!r}: a grafted checkpoint is a .safetensors file; end the name with .safetensors")
    model, grafts, info = load_release(model_path, config_path, num_heads)
    save_grafted(out, model, grafts, recipe=None, teacher_meta={"source": info["dit_model_name"]},
                 extra={"release": info})
    return out
