"""diffusers interop: a DiTTransformer2DModel folder loads as a ditgraft DiT that reproduces diffusers' output, and
an exported ditgraft DiT run by DiTPipeline reproduces ditgraft's output.

Measured (torch 2.13 CPU, diffusers 0.42.1, these tiny random models, fp32): load max |diff| 0.0 (bit-identical)
with the diffusers conventions, 0.37 (10% relative) with the original DiT conventions, which is why they are model
options; export round trip through DiTPipeline.from_pretrained max |diff| 0.0 (bit-identical). The assertions allow
1e-5 so that other BLAS builds pass."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from helpers import tiny_dit  # noqa: E402


def _random_diffusers_dit(seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                               num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=5, norm_num_groups=4)
    with torch.no_grad():
        for p in tr.parameters():
            p.normal_(0, 0.1)
        emb0 = tr.transformer_blocks[0].norm1.emb
        for b in tr.transformer_blocks[1:]:  # one shared embedder, as the conversion writes it
            b.norm1.emb.load_state_dict(emb0.state_dict())
    return tr.eval()


def _inputs(n: int = 4, classes: int = 5):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.tensor([0, 17, 500, 999])[:n],
            torch.tensor([0, 1, classes, 3])[:n])  # class `classes` = the null class


def test_diffusers_folder_loads_and_reproduces_diffusers_output(tmp_path):
    from ditgraft.graft.surgery import load_any
    from ditgraft.models.checkpoints import load_dit
    from ditgraft.models.diffusers_dit import load_diffusers_dit

    tr = _random_diffusers_dit()
    tr.save_pretrained(tmp_path / "dit")
    model, meta = load_dit(str(tmp_path / "dit"))
    assert model.config["timestep_freq_shift"] == 1 and model.config["mlp_norm_eps"] == 1e-5
    x, t, y = _inputs()
    with torch.no_grad():
        want = tr(x, timestep=t, class_labels=y).sample
        got = model(x, t, y)
        err = (got - want).abs().max().item()
        assert err < 1e-5, err
        original, _ = load_diffusers_dit(str(tmp_path / "dit"), conventions="original")
        assert (original(x, t, y) - want).abs().max().item() > 100 * max(err, 1e-7)
    assert load_any(str(tmp_path / "dit"))[0].config == model.config  # the CLI's loader takes the folder too


def test_export_runs_in_dit_pipeline_and_reproduces_ditgraft(tmp_path):
    from diffusers import DiTPipeline

    from helpers import tiny_vae
    from ditgraft.models.checkpoints import load_dit
    from ditgraft.export.diffusers_pipeline import export_diffusers

    # DiTPipeline assumes ImageNet's 1000 classes (its null class is 1000)
    model = tiny_dit(depth=2, input_size=8, patch_size=2, in_channels=4, num_classes=1000, timestep_freq_shift=1,
                     mlp_norm_eps=1e-5).eval()
    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)
    out = export_diffusers(model, str(tmp_path / "pipe"), vae=str(vae_dir))
    pipe = DiTPipeline.from_pretrained(out)
    x, t, y = _inputs(classes=1000)
    with torch.no_grad():
        want = model(x, t, y)
        got = pipe.transformer(x, timestep=t, class_labels=y).sample
    assert (got - want).abs().max().item() < 1e-5
    images = pipe(class_labels=[0, 1], num_inference_steps=2, guidance_scale=1.5, output_type="np").images
    assert images.shape == (2, 16, 16, 3)
    back, _ = load_dit(out)  # and back into ditgraft: the same weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_diffusers(model, out)


def test_export_refuses_grafted_models_and_warns_about_original_conventions(tmp_path):
    from ditgraft.graft.surgery import ResolvedGraft, graft_model
    from ditgraft.export.diffusers_pipeline import export_diffusers

    model = tiny_dit(depth=2, input_size=8, patch_size=2, in_channels=4, num_classes=5)
    with pytest.warns(UserWarning, match="downscale_freq_shift=1"):
        export_diffusers(model, str(tmp_path / "plain"))
    student = graft_model(model, [ResolvedGraft("attn", 1, "hyena_x")])
    with pytest.raises(ValueError, match="blocks.1.attn is HyenaX"):
        export_diffusers(student, str(tmp_path / "grafted"))


class _Recorder:
    """A stand-in diffusers class: records how ``from_pretrained`` is called; "no transformer/" on a hub repo."""
    calls: list = []

    @classmethod
    def from_pretrained(cls, source, subfolder=None):
        cls.calls.append((source, subfolder))
        if subfolder == "transformer" and not source.startswith(("/", ".")):
            raise OSError("no transformer/ in this repo")
        return "model"


def test_transformer_located_in_model_pipeline_and_hub_sources(tmp_path):
    from ditgraft.models.families.diffusers_common import load_transformer

    model, pipe = tmp_path / "model", tmp_path / "pipe" / "transformer"
    for folder in (model, pipe):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    _Recorder.calls = []
    load_transformer(_Recorder, str(model))
    load_transformer(_Recorder, str(pipe.parent))
    load_transformer(_Recorder, "owner/name")  # a hub model repo: transformer/ tried first, then the root
    assert _Recorder.calls == [(str(model), None), (str(pipe.parent), "transformer"),
                               ("owner/name", "transformer"), ("owner/name", None)]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_transformer(_Recorder, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a hub repo id"):
        load_transformer(_Recorder, str(tmp_path / "missing" / "model.safetensors"))
