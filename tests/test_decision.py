"""The decision protocol: paired bootstrap intervals on synthetic features with a known truth, verdicts, and the
seeded, cached, paired sampling of two testbed-shaped models."""
import json
import os

import numpy as np
import pytest

from helpers import COMPILE_BATCH, compile_dit, tiny_dit
from ditgraft.eval import metrics
from ditgraft.eval.decision import (Targets, basic_interval, compare_features, decision_eval, format_decision,
                                    verdict, weighted_stats)
from ditgraft.eval.evaluate import protocol_for

D = 8
REF = (np.zeros(D), np.eye(D))  # the reference as exact population statistics: FID of a Gaussian is known


def true_fid(shift: float, var: float) -> float:
    """Frechet distance of N(shift * 1, var * I) to N(0, I)."""
    return D * (shift ** 2 + 1 + var - 2 * np.sqrt(var))


def paired_draw(rng, n: int):
    """Teacher features N(0.3, 1.21 I); student = teacher + shift + noise (the same rows: shared noise)."""
    z, e = rng.standard_normal((n, D)), rng.standard_normal((n, D))
    teacher = 0.3 + 1.1 * z
    student = 0.45 + 1.1 * z + 0.4 * e
    t_ok = rng.random(n) < 0.9
    s_ok = t_ok & (rng.random(n) < 0.95)  # the student gets wrong 5% of what the teacher gets right
    return student, s_ok, teacher, t_ok


def test_weighted_stats_equal_the_stats_of_repeated_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 4))
    counts = rng.integers(0, 4, 30)
    mu, sigma = weighted_stats(x, counts)
    mu_ref, sigma_ref = metrics.feature_stats(np.repeat(x, counts, axis=0))
    np.testing.assert_allclose(mu, mu_ref, atol=1e-12)
    np.testing.assert_allclose(sigma, sigma_ref, atol=1e-12)


def test_paired_intervals_cover_the_true_ratio_and_gap():
    """Over 40 independent draws the 95% intervals hold the population FID ratio and accuracy gap most times.

    FID from n samples is biased upwards; a plain percentile interval of the ratio covers the truth in about half
    of the draws here, the basic interval on the log scale in about 90% (33 of these 40)."""
    truth_ratio = true_fid(0.45, 1.37) / true_fid(0.3, 1.21)
    truth_gap = 0.9 * 0.05
    trials, ratio_hits, gap_hits = 40, 0, 0
    for trial in range(trials):
        s, s_ok, t, t_ok = paired_draw(np.random.default_rng(100 + trial), 400)
        r = compare_features(s, s_ok, REF, t, t_ok, resamples=200, seed=trial)
        ratio_hits += r["ratio"]["ci"][0] <= truth_ratio <= r["ratio"]["ci"][1]
        gap_hits += r["gap"]["ci"][0] <= truth_gap <= r["gap"]["ci"][1]
    assert ratio_hits >= 30 and gap_hits >= 30, (ratio_hits, gap_hits)  # 75% of the draws


def test_verdicts_come_from_the_interval():
    assert verdict((1.10, 1.25), 1.25) == "met"
    assert verdict((1.26, 1.40), 1.25) == "missed"
    assert verdict((1.20, 1.30), 1.25) == "inconclusive"
    assert verdict((1.0, 3.0), None) is None
    # the basic interval reflects the bootstrap spread about the point estimate
    assert basic_interval(2.0, np.array([2.5, 2.5, 2.5])) == (1.5, 1.5)
    assert basic_interval(2.0, np.array([2.5, 2.5, 2.5]), log=True) == pytest.approx((1.6, 1.6))


def test_identical_models_give_ratio_one_and_a_worse_model_misses():
    rng = np.random.default_rng(1)
    s, s_ok, t, t_ok = paired_draw(rng, 500)
    same = compare_features(t, t_ok, REF, t, t_ok, resamples=100)
    assert same["ratio"]["value"] == 1.0 and same["ratio"]["ci"][0] <= 1.0 <= same["ratio"]["ci"][1]
    assert same["gap"]["value"] == 0.0 and same["verdicts"] == {"ratio": "met", "gap": "met"}
    # a second model exactly as good as the teacher (independent noise): the interval holds 1, verdict not "missed"
    z = rng.standard_normal((500, D))
    twin = compare_features(0.3 + 1.1 * z, t_ok, REF, t, t_ok, Targets(ratio=1.0, gap=0.0), resamples=200)
    assert twin["ratio"]["ci"][0] <= 1.0 <= twin["ratio"]["ci"][1] and twin["verdicts"]["ratio"] == "inconclusive"
    # much worse: shifted features and a third of the labels wrong
    bad_ok = t_ok & (rng.random(500) < 0.66)
    bad = compare_features(t + 0.8, bad_ok, REF, t, t_ok, Targets(ratio=1.25, gap=0.02), resamples=100)
    assert bad["ratio"]["ci"][0] > 1.25 and bad["verdicts"] == {"ratio": "missed", "gap": "missed"}


def test_mismatched_pairs_are_a_clear_error():
    s, s_ok, t, t_ok = paired_draw(np.random.default_rng(2), 50)
    with pytest.raises(ValueError, match="pair one-to-one"):
        compare_features(s, s_ok, REF, t[:40], t_ok[:40], resamples=20)


@pytest.fixture
def small_reference(monkeypatch):
    """Every 15th digit of each split as the testbed reference (the full 4,500 take half a minute to featurise)."""
    from ditgraft.data.mnist5k import load_mnist5k
    from ditgraft.eval import evaluate
    from ditgraft.eval.classifier import testbed_features

    cache = {}

    def reference(split="train"):
        if split not in cache:
            x, y = load_mnist5k(split)
            cache[split] = testbed_features(x[::15])
            cache[split]["labels"] = y[::15].numpy()
        return cache[split]

    monkeypatch.setattr(evaluate, "_testbed_reference", reference)


def test_decision_eval_samples_each_seed_once_paired(tmp_path, small_reference):
    """Two tiny models at seeds 0 and 3: same labels, per-seed files (seed 0 under the quick protocol's own tag,
    so a quick evaluation's samples are reused), a second call samples nothing."""
    student = tiny_dit(depth=2, input_size=32, patch_size=8, seed=1)
    teacher = tiny_dit(depth=2, input_size=32, patch_size=8, seed=2)
    protocol = protocol_for(num=20, steps=2, batch_size=10)
    a, b = str(tmp_path / "student"), str(tmp_path / "teacher")
    out = decision_eval(student, a, [0, 3], protocol, teacher, b, resamples=20, progress=False)
    assert sorted(f for f in os.listdir(a) if f.endswith(".npz")) == ["samples.npz", "samples_seed3.npz"]
    assert sorted(f for f in os.listdir(b) if f.endswith(".npz")) == ["samples.npz", "samples_seed3.npz"]
    assert out["num"] == 40 and out["seeds"] == [0, 3]
    assert [r["seed"] for r in out["model"]["per_seed"]] == [0, 3]
    assert out["ratio"]["value"] == pytest.approx(out["model"]["fid"]["value"] / out["against"]["fid"]["value"])
    assert out["model"]["fid_excess"] == pytest.approx(out["model"]["fid"]["value"] - out["floor"]["fid"])
    assert json.load(open(os.path.join(a, "samples_decision.json")))["ratio"] == out["ratio"]
    assert "FID ratio" in format_decision(out)
    mtime = os.path.getmtime(os.path.join(b, "samples_seed3.npz"))
    again = decision_eval(student, a, [0, 3], protocol, teacher, b, resamples=20, progress=False)
    assert os.path.getmtime(os.path.join(b, "samples_seed3.npz")) == mtime and again["ratio"] == out["ratio"]
    with pytest.raises(ValueError, match="distinct seeds"):
        decision_eval(student, a, [0, 0], protocol, resamples=20, progress=False)


@pytest.mark.slow
def test_compiled_decision_protocol_equals_eager_and_shares_its_cache(tmp_path, small_reference):
    """``hooks={"compile": True}`` (``ditgraft eval --compile``, ``eval.compile``): the same decision as eager
    sampling (samples equal to float rounding, so uint8 images and FIDs agree), the metrics record how they were
    sampled, and a compiled request reuses samples cached by an eager run (compile is not part of the key)."""
    from ditgraft.eval.evaluate import read_metrics

    student, teacher = compile_dit(seed=1), compile_dit(seed=2)
    protocol = protocol_for(num=2 * COMPILE_BATCH, steps=2, batch_size=COMPILE_BATCH)
    runs = {}
    for name, hooks in (("eager", None), ("compiled", {"compile": True})):
        a, b = str(tmp_path / name / "student"), str(tmp_path / name / "teacher")
        runs[name] = decision_eval(student, a, [0, 3], protocol, teacher, b, resamples=20, progress=False,
                                   hooks=hooks)
        assert read_metrics(os.path.join(a, "samples_seed3_metrics.json"))["compiled"] is (hooks is not None)
    for key in ("model", "against"):
        assert runs["compiled"][key]["fid"]["value"] == pytest.approx(runs["eager"][key]["fid"]["value"], rel=1e-3)
    assert runs["compiled"]["ratio"]["value"] == pytest.approx(runs["eager"]["ratio"]["value"], rel=1e-3)
    a, b = str(tmp_path / "eager" / "student"), str(tmp_path / "eager" / "teacher")
    mtime = os.path.getmtime(os.path.join(a, "samples_seed3.npz"))
    again = decision_eval(student, a, [0, 3], protocol, teacher, b, resamples=20, progress=False,
                          hooks={"compile": True})
    assert os.path.getmtime(os.path.join(a, "samples_seed3.npz")) == mtime and again["ratio"] == runs["eager"]["ratio"]


def test_pipeline_eval_stage_runs_the_decision_protocol_when_asked(tmp_path, small_reference):
    from ditgraft.graft.pipeline import run_graft
    from ditgraft.models.checkpoints import save_safetensors
    from ditgraft.recipe import parse_recipe

    model = tiny_dit(depth=2, input_size=32, patch_size=8)
    teacher = str(tmp_path / "teacher.safetensors")
    save_safetensors(teacher, model, {"model_config": model.config, "pretrain": {"train_flops": 1e13}})
    recipe = parse_recipe({
        "name": "tiny", "teacher": {"source": teacher},
        "grafts": [{"slot": "attn", "layers": [1], "operator": "hyena_x"}],
        "stage1": {"samples": 16, "val_samples": 8, "steps": 2, "batch_size": 8, "eval_every": 2},
        "stage2": {"steps": 2, "batch_size": 8, "ckpt_every": 2},
        "eval": {"num": 10, "steps": 2, "baselines": ["teacher", "random_init"], "protocol": "decision",
                 "seeds": [0, 4], "resamples": 20},
    })
    run = str(tmp_path / "run")
    run_graft(recipe, run, progress=False, log=lambda *_: None)
    files = set(os.listdir(os.path.join(run, "eval")))
    # seed 0 is the quick protocol's own samples; seed 4 is added for each of the three models
    assert {"grafted.npz", "grafted_seed4.npz", "teacher.npz", "teacher_seed4.npz", "random_init_seed4.npz",
            "grafted_decision.json", "random_init_decision.json", "decision.txt"} <= files
    res = json.load(open(os.path.join(run, "eval", "grafted_decision.json")))
    assert res["num"] == 20 and res["targets"] == {"ratio": 1.25, "gap": 0.02}
    with pytest.raises(ValueError, match="seeds must be distinct"):
        parse_recipe({"grafts": [{"slot": "attn", "layers": [1], "operator": "hyena_x"}],
                      "eval": {"seeds": [1, 1]}})


def test_cli_rejects_bad_seeds(capsys):
    from ditgraft.cli import main

    assert main(["eval", "testbed", "--seeds", "0,a", "--device", "cpu"]) == 2
    assert "--seeds='0,a'" in capsys.readouterr().err
