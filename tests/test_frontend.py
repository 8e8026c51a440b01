"""The command line's one front end: one device rule, one --device option, option choices from the registries,
one rule from settings to the training loop."""
import argparse

import pytest
import torch

from ditgraft.cli import COMMANDS, build_parser
from ditgraft.utils import resolve_device


def _subcommands(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _option(sub, flag):
    return next((a for a in sub._actions if flag in a.option_strings), None)


@pytest.mark.parametrize("name, words", [
    ("gpu0", ["--device='gpu0'", "not a valid torch device", "'cpu', 'cuda'"]),
    ("xla", ["--device='xla'", "not on 'xla'", "'auto'"]),
])
def test_unknown_device_names_option_value_and_allowed(name, words):
    with pytest.raises(ValueError) as err:
        resolve_device(name, "--device")
    for w in words:
        assert w in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_is_refused_and_auto_is_cpu():
    with pytest.raises(ValueError, match="device='cuda:1': CUDA is not available"):
        resolve_device("cuda:1")
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")


def test_a_torch_device_passes_through():
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_bench_device_check_is_the_shared_rule():
    from ditgraft.bench.common import resolve_device_dtype

    with pytest.raises(ValueError, match="device='gpu0' is not a valid torch device"):
        resolve_device_dtype("gpu0")


def test_every_device_option_has_one_default():
    subs = _subcommands(build_parser())
    defaults = {name: _option(sub, "--device").default for name, sub in subs.items() if _option(sub, "--device")}
    assert len(defaults) >= 10, defaults
    assert set(defaults.values()) == {None}, defaults


def test_every_command_in_the_table_is_parsed_by_its_cmd_function():
    import ditgraft.cli as cli

    subs = _subcommands(build_parser())
    for name, *_ in COMMANDS:
        assert subs[name].get_default("fn") is getattr(cli, "cmd_" + name.replace("-", "_"))


def test_choices_come_from_the_registries(monkeypatch):
    import ditgraft.bench.family as family
    import ditgraft.diffusion.samplers as samplers
    import ditgraft.eval.evaluate as evaluate
    import ditgraft.explore.launchers as launchers
    import ditgraft.train.loop as loop
    import ditgraft.train.tracking as tracking

    monkeypatch.setattr(samplers, "SAMPLERS", samplers.SAMPLERS + ("fake_sampler",))
    monkeypatch.setattr(evaluate, "FEATURES", evaluate.FEATURES + ("fake_features",))
    monkeypatch.setattr(launchers, "CLUSTERS", launchers.CLUSTERS + ("fake_cluster",))
    monkeypatch.setattr(loop, "PRECISIONS", loop.PRECISIONS + ("fake_precision",))
    monkeypatch.setattr(tracking, "TRACKERS", tuple(tracking.TRACKERS) + ("fake_tracker",))
    monkeypatch.setattr(family, "FAMILIES", family.FAMILIES + ("fake_family",))
    subs = _subcommands(build_parser())
    assert "fake_sampler" in _option(subs["sample"], "--sampler").choices
    assert "fake_sampler" in _option(subs["synth"], "--sampler").choices
    assert "fake_features" in _option(subs["eval"], "--features").choices
    assert "fake_cluster" in _option(subs["sweep"], "--cluster").choices
    assert "fake_precision" in _option(subs["pretrain"], "--precision").choices
    assert "fake_tracker" in _option(subs["graft"], "--log").choices
    model = _subcommands(subs["bench"])["model"]
    assert "fake_family" in _option(model, "--family").choices


def test_sampler_choices_are_every_sampler():
    """Every sampler is a choice (euler for flow-matching models); the model's objective refuses the others."""
    from ditgraft.diffusion.samplers import SAMPLERS

    choices = _option(_subcommands(build_parser())["sample"], "--sampler").choices
    assert set(choices) == set(SAMPLERS) and "euler" in choices


def test_pretrain_loop_config_is_built_by_the_one_rule():
    from ditgraft.train.loop import LoopConfig

    args = build_parser().parse_args(["pretrain", "--steps", "7", "--warmup", "2", "--ema", "0.5", "--decay-steps",
                                      "3", "--precision", "bf16", "--grad-accum-steps", "2"])
    loop = LoopConfig.from_settings(args, warmup_steps=args.warmup, ema_decay=args.ema)
    assert (loop.steps, loop.warmup_steps, loop.ema_decay, loop.decay_steps, loop.precision,
            loop.grad_accum_steps, loop.ckpt_every) == (7, 2, 0.5, 3, "bf16", 2, 250)


def test_recipe_stage_loop_configs_keep_their_fields():
    from ditgraft.recipe import Stage1, Stage2

    s1 = Stage1(steps=40, eval_every=10, schedule="constant", precision="bf16").loop_config(seed=3, progress=False)
    assert (s1.steps, s1.ckpt_every, s1.log_every, s1.ema_decay, s1.schedule, s1.seed, s1.precision) == \
        (40, 10, 2, None, "constant", 3, "bf16")
    s2 = Stage2(steps=100, ckpt_every=20, ema_decay=0.9, decay_steps=5,
                activation_checkpointing=True).loop_config(seed=1)
    assert (s2.ckpt_every, s2.ema_decay, s2.decay_steps, s2.log_every, s2.activation_checkpointing,
            s2.schedule) == (20, 0.9, 5, 5, True, "constant")


def test_under_torchrun_cuda_is_this_ranks_gpu(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    assert chosen == [torch.device("cuda", 1)] * 2
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_device("cuda") == torch.device("cuda")
