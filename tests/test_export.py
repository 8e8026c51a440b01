"""Export to a folder that diffusers loads without ditgraft: every check of the exported model runs in a separate
``python -I`` process in which ``import ditgraft`` fails (a sys.meta_path blocker: the editable install would
otherwise still find it), and compares with ditgraft's own output on the same random inputs.

Measured (torch 2.13 CPU, diffusers 0.42.1, fp32): max |diff| 0.0 (bit-identical) for the grafted testbed (Hyena-X,
Mamba-2, SWA), the restructured testbed, a grafted tiny PixArt and a grafted diffusers DiT; the pipelines' images are identical to the
same pipelines run in-process on ditgraft's model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

pytest.importorskip("diffusers")

from helpers import tiny_dit  # noqa: E402

CHILD = r'''
import importlib.abc, json, sys

class NoDitgraft(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ditgraft" or name.startswith("ditgraft."):
            raise ImportError(f"{name} is blocked in this process")

sys.meta_path.insert(0, NoDitgraft())
try:
    import ditgraft  # noqa: F401
    raise SystemExit("ditgraft is importable; the check would prove nothing")
except ImportError:
    pass
import torch
import diffusers
from diffusers import AutoModel

def check(spec):
    model = AutoModel.from_pretrained(spec["folder"], trust_remote_code=True).eval()
    io = torch.load(spec["inputs"])
    out = {"class": type(model).__name__, "module": type(model).__module__}
    with torch.no_grad():
        if spec["kind"] == "dit":
            out["output"] = model(io["x"], timestep=io["t"], class_labels=io["y"]).sample
        else:
            out["output"] = model(io["x"], encoder_hidden_states=io["emb"], encoder_attention_mask=io["mask"],
                                  timestep=io["t"], added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                  return_dict=False)[0]
    if spec.get("pipeline") == "dit":
        pipe = diffusers.DiTPipeline.from_pretrained(spec["folder"], transformer=model)
        out["images"] = pipe(class_labels=[0, 1], num_inference_steps=3, guidance_scale=1.5, output_type="np",
                             generator=torch.Generator().manual_seed(0)).images
    elif spec.get("pipeline") == "pixart":
        vae = diffusers.AutoencoderKL.from_pretrained(spec["vae"])
        pipe = diffusers.PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=model,
                                             scheduler=diffusers.DPMSolverMultistepScheduler())
        size = model.config.sample_size * pipe.vae_scale_factor
        out["images"] = pipe(negative_prompt=None, prompt_embeds=io["emb"], prompt_attention_mask=io["mask"],
                             negative_prompt_embeds=io["neg"][0], negative_prompt_attention_mask=io["neg"][1],
                             num_inference_steps=2, height=size, width=size, use_resolution_binning=False,
                             output_type="pt", generator=torch.Generator().manual_seed(0)).images
    return out


specs = json.loads(sys.argv[1])
torch.save([check(s) for s in specs[1:]], specs[0])
'''


def run_without_ditgraft(tmp_path, *specs: dict) -> list[dict]:
    """Each spec (folder, inputs, kind, optional pipeline) checked in one ``python -I`` process without ditgraft."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    result = str(tmp_path / "result.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # diffusers copies a local folder's modeling file to <HF_MODULES_CACHE>/diffusers_modules/local/: a cache of this
    # test's own, so that parallel test runs cannot swap each other's file
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    done = subprocess.run([sys.executable, "-I", str(script), json.dumps([result, *specs])], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(result, weights_only=False)


def _perturb(model, seed=0):
    """Non-zero gates and random-ish weights everywhere, so every operator changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def _grafted_testbed():
    from ditgraft.graft.surgery import ResolvedGraft, graft_model, load_any

    teacher, _ = load_any("testbed")
    grafts = [ResolvedGraft("attn", 1, "hyena_x"), ResolvedGraft("attn", 3, "mamba2"),
              ResolvedGraft("attn", 5, "swa", {"window": 8})]
    return _perturb(graft_model(teacher, grafts)), {"grafts": [asdict(g) for g in grafts]}


def _dit_inputs(model, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    c, (h, w), p = model.in_channels, model.grid, model.patch_size
    x = torch.randn(n, c, h * p, w * p, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.cat([torch.randint(0, model.num_classes, (n - 1,), generator=g), torch.tensor([model.num_classes])])
    return x, t, y


def test_grafted_testbed_loads_without_ditgraft_and_reproduces_it(tmp_path):
    from ditgraft.export.hf import write_export

    student, meta = _grafted_testbed()
    out = write_export(student, meta, str(tmp_path / "export"))
    names = sorted(os.listdir(out))
    assert {"config.json", "modeling_ditgraft.py", "diffusion_pytorch_model.safetensors", "README.md",
            "scheduler", "model_index.json"} <= set(names)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["auto_map"] == {"AutoModel": "modeling_ditgraft.DitgraftDiT"}
    source = open(os.path.join(out, "modeling_ditgraft.py")).read()
    assert "import ditgraft" not in source and "from ditgraft" not in source
    # exactly the operators it uses: the grafted ones and the teacher's own MHA / MLP, no others, no registry
    for present in ("class HyenaX(", "class Mamba2(", "class SWA(", "class MHA(", "class MLP(", "class DiT("):
        assert present in source
    for absent in ("class HyenaSE(", "class HyenaY(", "class Local2D(", "class LinearAttention(", "@register(",
                   "class ParallelPair("):
        assert absent not in source
    x, t, y = _dit_inputs(student)
    torch.save({"x": x, "t": t, "y": y.clone().masked_fill(y == student.num_classes, 1000)}, tmp_path / "io.pt")
    (got,) = run_without_ditgraft(tmp_path, dict(folder=out, inputs=str(tmp_path / "io.pt"), kind="dit"))
    assert got["class"] == "DitgraftDiT" and not got["module"].startswith("ditgraft")
    with torch.no_grad():
        want = student(x, t, y)  # label 1000 (DiTPipeline's null class) is this model's null class 10
    assert (got["output"] - want).abs().max().item() == 0.0
    with pytest.raises(FileExistsError, match="not an empty folder"):
        write_export(student, meta, out)


def test_restructured_and_plain_testbed_reproduce_ditgraft(tmp_path):
    from ditgraft.export.hf import write_export
    from ditgraft.graft.restructure import resolve_restructure, restructure
    from ditgraft.graft.surgery import load_any

    teacher, meta = load_any("testbed")
    spec = resolve_restructure({"parallel_pairs": [[2, 3]], "drop": [6]}, 8)
    model = _perturb(restructure(load_any("testbed")[0], spec))
    cases = {"plain": (teacher, meta), "restructured": (model, {"restructure": spec})}
    specs, want = [], {}
    for name, (m, md) in cases.items():
        out = write_export(m, md, str(tmp_path / name))
        source = open(os.path.join(out, "modeling_ditgraft.py")).read()
        assert ("class ParallelPair(" in source) == (name == "restructured")
        x, t, y = _dit_inputs(m)
        torch.save({"x": x, "t": t, "y": y}, tmp_path / f"{name}.pt")
        specs.append(dict(folder=out, inputs=str(tmp_path / f"{name}.pt"), kind="dit"))
        with torch.no_grad():
            want[name] = m(x, t, y)
    for name, got in zip(cases, run_without_ditgraft(tmp_path, *specs)):
        assert (got["output"] - want[name]).abs().max().item() == 0.0, name


def test_grafted_latent_dit_runs_in_dit_pipeline_without_ditgraft(tmp_path):
    from diffusers import DiTPipeline

    from helpers import tiny_vae
    from ditgraft.export.hf import build_hub_model, write_export
    from ditgraft.graft.surgery import ResolvedGraft, graft_model

    model = tiny_dit(depth=2, input_size=8, patch_size=2, in_channels=4, num_classes=5).eval()
    grafts = [ResolvedGraft("attn", 1, "hyena_x")]
    student, meta = _perturb(graft_model(model, grafts)), {"grafts": [asdict(g) for g in grafts]}
    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)
    out = write_export(student, meta, str(tmp_path / "export"), vae=str(vae_dir))
    x, t, y = _dit_inputs(student)
    torch.save({"x": x, "t": t, "y": y}, tmp_path / "io.pt")
    (got,) = run_without_ditgraft(tmp_path, dict(folder=out, inputs=str(tmp_path / "io.pt"), kind="dit",
                                                 pipeline="dit"))
    assert got["images"].shape == (2, 16, 16, 3)
    # the same pipeline in this process on ditgraft's model: the same images
    pipe = DiTPipeline.from_pretrained(out, transformer=build_hub_model(student, meta))
    want = pipe(class_labels=[0, 1], num_inference_steps=3, guidance_scale=1.5, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
    assert abs(got["images"] - want).max() == 0.0


def test_grafted_diffusers_models_load_without_ditgraft_and_run_in_their_pipelines(tmp_path):
    """A grafted tiny PixArt (PixArtSigmaPipeline) and a grafted diffusers DiT (DiTPipeline)."""
    from diffusers_helpers import CAPTION_DIM, TOKENS, captions, latents, tiny_diffusers_dit, tiny_pixart
    from helpers import tiny_vae
    from ditgraft.export.hf import write_export
    from ditgraft.graft.surgery import ResolvedGraft, graft_model, load_grafted, save_grafted
    from ditgraft.models.families import model_call

    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)
    grafts = {"pixart": [ResolvedGraft("attn", 0, "hyena_x"), ResolvedGraft("attn", 2, "mamba2"),
                         ResolvedGraft("mlp", 1, "mlp", {"hidden": 24})],
              "dit": [ResolvedGraft("attn", 1, "hyena_x"), ResolvedGraft("attn", 3, "swa", {"window": 4})]}
    teachers = {"pixart": tiny_pixart(), "dit": tiny_diffusers_dit()}
    x, t, y = latents(2, 3), torch.tensor([5, 700]), torch.tensor([3, 1000])
    emb, mask = captions(2, 4)
    neg = (torch.zeros(2, TOKENS, CAPTION_DIM), torch.ones(2, TOKENS))
    torch.save({"x": x, "t": t, "y": y, "emb": emb, "mask": mask, "neg": neg}, tmp_path / "io.pt")
    specs, want = [], {}
    for name, teacher in teachers.items():
        path = str(tmp_path / f"{name}.safetensors")
        save_grafted(path, _perturb(graft_model(teacher, grafts[name])), grafts[name], {})
        student, meta = load_grafted(path)  # as the CLI loads it
        out = write_export(student, meta, str(tmp_path / name), vae=str(vae_dir) if name == "dit" else None)
        config = json.load(open(os.path.join(out, "config.json")))
        assert config["auto_map"]["AutoModel"] == "modeling_ditgraft.DitgraftDiffusersModel"
        assert config["base_class"] == type(teacher).__name__
        specs.append(dict(folder=out, inputs=str(tmp_path / "io.pt"), kind=name, pipeline=name, vae=str(vae_dir)))
        with torch.no_grad():
            want[name] = model_call(student)(x, t, (emb, mask) if name == "pixart" else y)
    got = dict(zip(teachers, run_without_ditgraft(tmp_path, *specs)))
    for name in teachers:
        assert (got[name]["output"] - want[name]).abs().max().item() == 0.0, name
    assert got["pixart"]["images"].shape == (2, 3, 16, 16) and torch.isfinite(got["pixart"]["images"]).all()
    assert got["dit"]["images"].shape == (2, 16, 16, 3)


def test_an_operator_outside_ditgraft_is_refused_by_name(tmp_path, monkeypatch):
    from torch import nn

    from ditgraft.export.hf import write_export
    from ditgraft.export.source import SelfContainedError
    from ditgraft.graft.surgery import ResolvedGraft, graft_model
    from ditgraft.operators import registry

    class Outsider(nn.Module):  # defined here, not in ditgraft: its source cannot be bundled
        def __init__(self, dim, heads, grid):
            super().__init__()
            self.lin = nn.Linear(dim, dim)

        def forward(self, x, grid=None):
            return self.lin(x)

    monkeypatch.setitem(registry._REGISTRY, "outsider", registry.OperatorSpec("outsider", Outsider, "attn", "test"))
    model = tiny_dit(depth=2, input_size=8, patch_size=2, in_channels=4, num_classes=5)
    grafts = [ResolvedGraft("attn", 1, "outsider")]
    student = graft_model(model, grafts)
    with pytest.raises(SelfContainedError, match="operator 'outsider' cannot be made self-contained"):
        write_export(student, {"grafts": [asdict(g) for g in grafts]}, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")
    # metadata that does not describe the model's modules is refused, not exported wrong
    with pytest.raises(SelfContainedError, match="does not rebuild this model"):
        write_export(graft_model(model, [ResolvedGraft("attn", 1, "hyena_x")]), {}, str(tmp_path / "y"))


def test_bundle_renames_clashing_names_and_keeps_the_code():
    from ditgraft.export.source import bundle_source
    from ditgraft.operators.attention import MHA
    from ditgraft.operators.mamba2 import Mamba2

    source, names = bundle_source([Mamba2, MHA])
    assert names == {Mamba2: "Mamba2", MHA: "MHA"}
    # a name several ditgraft modules define gets its module's suffix in every export (diffusers imports every
    # exported folder's module under one name, so two exports loaded in one process must agree)
    assert 'IMPLS__mamba2 = ("fast", "reference")' in source and 'IMPLS__attention = ("sdpa", "reference")' in source
    assert 'check_choice("impl", impl, IMPLS__attention)' in source
    namespace: dict = {}
    exec(compile(source, "bundle", "exec"), namespace)  # noqa: S102 - the module we just generated
    torch.manual_seed(0)
    ours = MHA(16, 2, (2, 2))
    theirs = namespace["MHA"](16, 2, (2, 2))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 16)
    assert torch.equal(ours(x), theirs(x))
