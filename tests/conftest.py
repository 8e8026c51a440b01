import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models on a shared 2-core machine run fastest single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_dit(depth: int = 2, seed: int = 0, **kw):
    """A small testbed-family DiT with non-zero weights everywhere (adaLN-Zero would make blocks identities)."""
    from ditgraft.models.dit import DiT

    torch.manual_seed(seed)
    cfg = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=depth, num_heads=2, num_classes=10)
    cfg.update(kw)
    model = DiT(**cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model


class Crash(RuntimeError):
    """Raised by ``crash_on_call`` to simulate a run killed mid-way."""


def crash_on_call(fn, at: int):
    """``fn`` that raises Crash on its ``at``-th call (1-based) and behaves normally otherwise."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise Crash
        return fn(*args, **kwargs)

    return wrapped
