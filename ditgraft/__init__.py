"""ditgraft: graft new operators into pretrained diffusion transformers.

The main entry points (ditgraft/api.py; imported on first use, so ``import ditgraft`` stays cheap):
    load_model(source)                    any model source: testbed, .safetensors, .pt, run dir, diffusers, hf://
    graft_model(model, operator=...)      swap operators in (or recipe=...): the untrained student
    run_pipeline(recipe, run_dir)         stage 1 -> stage 2 -> eval -> report (``ditgraft graft``)
    sample(model, num)                    uint8 NHWC images and labels (latent models: vae=...)
    evaluate(images_or_npz, labels)       testbed or Inception metrics
    export_model(model, out)              a folder diffusers loads without ditgraft, with a model card
    push(out, repo_id)                    upload it to the hub (private by default)
and load_recipe, encode_folder, import_release, export_diffusers. Bad input raises ``InputError`` (a ValueError)
with the message the command line prints for it.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_model": "ditgraft.api", "graft_model": "ditgraft.api", "run_pipeline": "ditgraft.api",
    "sample": "ditgraft.api", "evaluate": "ditgraft.api", "export_model": "ditgraft.api",
    "push": "ditgraft.export.push", "InputError": "ditgraft.utils",
    "load_recipe": "ditgraft.recipe", "encode_folder": "ditgraft.data.vae",
    "import_release": "ditgraft.graft.release", "export_diffusers": "ditgraft.export.diffusers_pipeline",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ditgraft' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
