"""The merge-initialisation study of ``graft.restructure`` on the shipped testbed teacher:
``python scripts/restructure_study.py`` prints the table in that module's doc."""
from __future__ import annotations

import torch

from ditgraft.graft.data_split import load_split
from ditgraft.graft.restructure_train import merge_init_study
from ditgraft.models.checkpoints import load_dit


def main() -> None:
    """Print the merge-initialisation study on the shipped testbed teacher (the table in the module doc)."""
    torch.set_num_threads(1)
    teacher, _ = load_dit("testbed")
    _, _, xv, yv = load_split("mnist5k", 1, 256, seed=0)
    res = merge_init_study(teacher, xv, yv, seed=2)
    keys = list(next(iter(res.values())))
    print("merge init | " + " | ".join(keys))
    for how, row in res.items():
        print(f"{how:10s} | " + " | ".join(f"{row[k]:.4f}" for k in keys))


if __name__ == "__main__":
    main()
