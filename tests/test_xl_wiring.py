"""The paper's DiT-XL/2 recipes are wired end to end: DiT-XL/2 itself on the meta device (its size, no memory), and
a narrow stand-in of its depth, patch, heads and latent shape (random weights, no download) through surgery, one step
of stage 1 (disk cache) and one step of stage 2 on CPU with a tiny batch."""
import torch

from ditgraft.graft.stage1 import run_stage1
from ditgraft.graft.stage2 import run_stage2
from ditgraft.graft.surgery import graft_model, resolve_grafts
from ditgraft.models.dit import build_dit
from ditgraft.recipe import load_recipe


def test_dit_xl2_recipe_end_to_end(tmp_path):
    recipe = load_recipe("dit_xl2_hyena_x_50")
    with torch.device("meta"):
        xl = build_dit(recipe.teacher.model, input_size=recipe.teacher.image_size // 8)
    assert sum(p.numel() for p in xl.parameters()) == 675_129_632
    torch.manual_seed(0)
    # XL's depth, patch size, heads, classes and latent shape; width 1152 -> 64 (head size 72 -> 4)
    teacher = build_dit(recipe.teacher.model, input_size=recipe.teacher.image_size // 8, hidden_size=64).eval()
    assert (len(teacher.blocks), teacher.patch_size, teacher.num_heads) == (len(xl.blocks), 2, 16)
    grafts = resolve_grafts(recipe, len(teacher.blocks))
    assert [g.layer for g in grafts] == list(range(1, 28, 2))
    g = torch.Generator().manual_seed(0)
    x0, y = torch.randn(3, 4, 32, 32, generator=g), torch.randint(0, 1000, (3,), generator=g)
    s1 = recipe.stage1.model_copy(update={"samples": 2, "val_samples": 1, "steps": 1, "batch_size": 2,
                                          "eval_every": 1, "extract_batch_size": 2, "cache": "disk",
                                          "ram_budget_gb": 0.001})
    res = run_stage1(teacher, grafts, s1, x0[:2], y[:2], x0[2:], y[2:], str(tmp_path / "s1"), 0, "cpu",
                     progress=False, log=lambda *_: None)
    assert res["plan"]["mode"] == "disk" and len(res["operators"]) == 14
    assert all(torch.isfinite(torch.tensor(o["val_mse"])) for o in res["operators"].values())
    student = graft_model(teacher, grafts, seed=0)
    # the recipe's GPU scale settings (bf16 autocast, 2 micro-batches per step) do not apply to one sample on a CPU
    s2 = recipe.stage2.model_copy(update={"steps": 1, "batch_size": 1, "ema_decay": None, "ckpt_every": 1,
                                          "precision": "fp32", "grad_accum_steps": 1})
    # adaLN-Zero gates are 0 in a fresh model, so the grafted operators get no gradient yet; the final layer does
    before = student.final_layer.linear.weight.detach().clone()
    trained, history = run_stage2(student, s2, x0[:1], y[:1], str(tmp_path / "s2"), 0, progress=False)
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["loss"]))
    assert not torch.equal(before, trained.final_layer.linear.weight)
