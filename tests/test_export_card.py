"""The exported folder's model card (front matter, grafts, recipe, compute share, metrics with protocol and
intervals, from a run directory) and ``push`` against a local stand-in of the hub client: no network."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as `ditgraft graft` leaves it: student.safetensors (with its recipe), report.json (evaluations
    and compute) and a decision-protocol result."""
    from ditgraft.eval.decision import compare_features
    from ditgraft.graft.surgery import graft_model, load_any, resolve_grafts, save_grafted
    from ditgraft.recipe import load_recipe
    from ditgraft.utils import atomic_write_json

    d = tmp_path_factory.mktemp("run")
    recipe = load_recipe("testbed_hyena_x_50")
    teacher, tmeta = load_any("testbed")
    grafts = resolve_grafts(recipe, 8)
    save_grafted(str(d / "student.safetensors"), graft_model(teacher, grafts), grafts, recipe.to_dict(), tmeta)
    protocol = {"num": 500, "sampler": "ddim", "steps": 50, "cfg_scale": 1.5, "seed": 0}
    atomic_write_json(str(d / "report.json"), {
        "recipe": recipe.to_dict(),
        "eval": {"teacher": {"fid": 2.0, "accuracy": 0.97, "protocol": protocol},
                 "grafted": {"fid": 2.5, "fid_ratio_to_teacher": 1.25, "accuracy": 0.95, "protocol": protocol}},
        "compute": {"stage1_extraction_flops": 7.7e10, "stage1_operator_flops": 1.3e11, "stage2_flops": 2.0e11,
                    "total_flops": 4.1e11, "teacher_pretrain_flops": 1.4e15, "share_of_pretraining": 2.9e-4}})
    rng = np.random.default_rng(0)
    feats, ref = rng.normal(size=(40, 3)), rng.normal(size=(200, 3))
    result = compare_features(feats, rng.random(40) < 0.9, (ref.mean(0), np.cov(ref, rowvar=False)),
                              resamples=20)
    result.update(floor={"fid": 0.1}, seeds=[0, 1])
    result["model"]["fid_excess"] = result["model"]["fid"]["value"] - 0.1
    os.makedirs(d / "eval")
    atomic_write_json(str(d / "eval" / "grafted_decision.json"), result)
    return str(d)


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_cli_export_of_a_run_dir_writes_the_model_card(run_dir, tmp_path, capsys):
    from ditgraft.cli import main

    out = str(tmp_path / "export")
    assert main(["export", run_dir, "--out", out]) == 0
    assert "AutoModel.from_pretrained" in capsys.readouterr().out
    card = open(os.path.join(out, "README.md")).read()
    fm = _front_matter(card)
    assert fm["library_name"] == "diffusers" and fm["license"] == "mit"  # the testbed teacher is ditgraft's (MIT)
    assert fm["pipeline_tag"] == "unconditional-image-generation"
    assert {"ditgraft", "grafting", "hyena_x", "diffusers:DiTPipeline"} <= set(fm["tags"])
    assert "base_model" not in fm  # the testbed is no hub model
    assert "# testbed_hyena_x_50" in card
    assert "| attn | 1, 3, 5, 7 | hyena_x |" in card  # what was grafted where
    assert "Grafting cost: **0.029%**" in card
    assert "Protocol: 500 samples, ddim 50 steps, cfg 1.5, seed 0" in card and "| grafted | 2.5 | 1.25 |" in card
    assert "eval/grafted_decision.json" in card and "FID " in card and "[" in card  # pooled metric with interval
    assert "```yaml" in card and "operator: hyena_x" in card  # the recipe
    assert "reads label 1000 as its own null class" in card
    # the old command name still works (now the same export)
    assert main(["export-diffusers", run_dir, "--out", str(tmp_path / "again")]) == 0
    assert main(["export", run_dir, "--out", out]) == 2  # an existing folder: one line, no traceback
    assert "exists and is not empty" in capsys.readouterr().err


def test_front_matter_base_model_and_license_from_known_teachers():
    from ditgraft.export.card import front_matter

    fm = front_matter("pixart", {"recipe": {"teacher": {"source": "diffusers:PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"}},
                                 "grafts": [{"operator": "hyena_x", "slot": "attn", "layer": 0}]})
    assert fm["base_model"] == "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS" and fm["license"] == "openrail++"
    assert fm["pipeline_tag"] == "text-to-image" and "diffusers:PixArtSigmaPipeline" in fm["tags"]
    fm = front_matter("dit", {"teacher": {"source": "facebook/DiT-XL-2-256"}})
    assert fm["base_model"] == "facebook/DiT-XL-2-256" and fm["license"] == "cc-by-nc-4.0"
    assert "grafting" not in fm["tags"]
    assert "license" not in front_matter("dit", {"teacher": {"source": "/data/my_dit.pt"}})  # unknown: not guessed


class FakeHub:
    """A stand-in for huggingface_hub.HfApi: records calls; ``remote`` holds the files of existing repositories."""
    calls: list = []
    remote: dict = {}

    def __init__(self, token=None):
        self.token = token

    def repo_exists(self, repo_id):
        self.calls.append(("repo_exists", repo_id))
        return repo_id in self.remote

    def list_repo_files(self, repo_id):
        return list(self.remote[repo_id])

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return f"https://hub.invalid/{repo_id}"

    def upload_folder(self, folder_path, repo_id, commit_message=None):
        self.calls.append(("upload_folder", folder_path, repo_id))


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    FakeHub.calls, FakeHub.remote = [], {}
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return FakeHub


def test_push_uploads_private_by_default_and_refuses_without_token_or_over_other_content(run_dir, tmp_path, hub,
                                                                                          capsys):
    from ditgraft.cli import main

    out = str(tmp_path / "export")
    assert main(["export", run_dir, "--out", out]) == 0
    assert main(["push", out, "me/student"]) == 2  # no token anywhere
    assert "no hub token" in capsys.readouterr().err and hub.calls == []
    assert main(["push", out, "me/student", "--token", "t"]) == 0
    assert ("create_repo", "me/student", True, True) in hub.calls and ("upload_folder", out, "me/student") in hub.calls
    hub.calls.clear()
    os.environ["HF_TOKEN"] = "t"
    try:
        assert main(["push", out, "me/public", "--public"]) == 0
        assert ("create_repo", "me/public", False, True) in hub.calls
        hub.calls.clear()
        hub.remote["me/taken"] = {".gitattributes", "model.ckpt", "README.md"}
        assert main(["push", out, "me/taken"]) == 2
        assert "exists with other content (model.ckpt)" in capsys.readouterr().err
        assert not [c for c in hub.calls if c[0] in ("create_repo", "upload_folder")]
        hub.remote["me/student"] = {".gitattributes", "README.md", "config.json"}  # an earlier upload of this export
        assert main(["push", out, "me/student"]) == 0
        assert main(["push", str(tmp_path), "me/x"]) == 2  # not an export
        assert "not a ditgraft export" in capsys.readouterr().err
    finally:
        del os.environ["HF_TOKEN"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["auto_map"]["AutoModel"] == "modeling_ditgraft.DitgraftDiT"


def test_api_graft_then_export_model_carries_the_grafts(tmp_path):
    import ditgraft

    student = ditgraft.graft_model("testbed", operator="swa", layers=[2, 6], options={"window": 8})
    out = ditgraft.export_model(student, tmp_path / "swa")
    config = json.load(open(os.path.join(out, "config.json")))
    assert [(g["layer"], g["operator"], g["options"]) for g in config["grafts"]] == [(2, "swa", {"window": 8}),
                                                                                   (6, "swa", {"window": 8})]
    card = open(os.path.join(out, "README.md")).read()
    assert "| attn | 2, 6 | swa | {\"window\": 8} | random |" in card
    again = ditgraft.graft_model(student, operator="hyena_x", layers=[6, 7])  # a graft on a graft
    assert [(g["layer"], g["operator"]) for g in again.ditgraft_meta["grafts"]] == [(2, "swa"), (6, "hyena_x"),
                                                                                    (7, "hyena_x")]
    ditgraft.export_model(again, tmp_path / "again")  # rebuilds: the metadata describes every grafted slot
    assert "No evaluation was recorded" in card  # no run directory: nothing made up


def test_export_native_keeps_the_diffusers_class_export(tmp_path):
    from ditgraft.cli import main

    out = tmp_path / "native"
    with pytest.warns(UserWarning, match="downscale_freq_shift=1"):
        assert main(["export", "testbed", "--out", str(out), "--native"]) == 0
    assert json.load(open(out / "transformer" / "config.json"))["_class_name"] == "DiTTransformer2DModel"
    assert not (out / "modeling_ditgraft.py").exists()
