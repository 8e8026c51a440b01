"""A plain DiT as a diffusers ``DiTPipeline`` folder (transformer, DDIM scheduler and optionally the VAE)."""
from __future__ import annotations

import os
import warnings

from ditgraft.data.vae import load_vae
from ditgraft.models.adapters import SLOTS
from ditgraft.models.diffusers_dit import _diffusers, _scheduler, to_diffusers_state_dict
from ditgraft.models.dit import DiT
from ditgraft.utils import atomic_folder

__all__ = ["export_diffusers"]


def export_diffusers(model: DiT, out: str, vae=None) -> str:
    """Write ``model`` (a plain DiT) as a DiTPipeline folder: transformer/, scheduler/ (DDIM), model_index.json and,
    when ``vae`` (a folder, hub id or AutoencoderKL) is given, vae/. Without it load the folder with
    ``DiTPipeline.from_pretrained(out, vae=...)``."""
    diffusers = _diffusers()
    c = model.config
    for i, block in enumerate(model.blocks):
        for slot in SLOTS:
            op = getattr(block, slot)
            if type(op).__name__ != {"attn": "MHA", "mlp": "MLP"}[slot]:
                raise ValueError(f"blocks.{i}.{slot} is {type(op).__name__}: only plain DiTs (MHA + MLP in every "
                                 "block) have a diffusers DiTTransformer2DModel equivalent")
    h, w = (c["input_size"], c["input_size"]) if isinstance(c["input_size"], int) else c["input_size"]
    problems = []
    if h != w:
        problems.append(f"input_size={c['input_size']} (diffusers' DiT is square)")
    if c["mlp_ratio"] != 4.0:
        problems.append(f"mlp_ratio={c['mlp_ratio']} (diffusers' DiT uses 4)")
    if not c["class_dropout_prob"] > 0:
        problems.append("class_dropout_prob=0 (diffusers' label table has a null-class row)")
    if any(getattr(b.mlp, "hidden", None) != int(c["hidden_size"] * 4) for b in model.blocks):
        problems.append("an MLP hidden size other than 4 x hidden_size")
    if problems:
        raise ValueError("this DiT has no DiTTransformer2DModel equivalent: " + "; ".join(problems))
    if c.get("timestep_freq_shift", 0) != 1:
        warnings.warn("the model computes timestep features as the original DiT (timestep_freq_shift=0); "
                      "diffusers' DiT uses downscale_freq_shift=1, so the exported model's outputs differ slightly "
                      "(as the official DiT weights do in diffusers)", stacklevel=2)
    tr = diffusers.DiTTransformer2DModel(
        num_attention_heads=c["num_heads"], attention_head_dim=c["hidden_size"] // c["num_heads"],
        in_channels=c["in_channels"], out_channels=model.out_channels, num_layers=c["depth"], sample_size=h,
        patch_size=c["patch_size"], num_embeds_ada_norm=c["num_classes"], norm_eps=c.get("mlp_norm_eps", 1e-6))
    sd = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
    tr.load_state_dict(to_diffusers_state_dict(sd, c["depth"]), strict=True)
    if isinstance(vae, (str, os.PathLike)):
        vae = load_vae(vae)
    pipe = diffusers.DiTPipeline(transformer=tr, vae=vae, scheduler=_scheduler())
    out = os.fspath(out)
    with atomic_folder(out) as tmp:
        pipe.save_pretrained(tmp)
    return out
