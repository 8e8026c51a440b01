"""Recipes: one YAML file describes a grafting experiment (teacher, grafts, stage 1, stage 2, evaluation).

Validated with pydantic; ``load_recipe`` turns every validation problem into one message per field that names the
field, the value and what is allowed. Layer selectors are resolved against the teacher's depth (and an analysis
result for the analysis-driven ones) by ``resolve_layers``.

Layer selectors (``layers:`` of a graft):
- a list of block indices ``[1, 3, 5]``;
- a Python slice string ``"1:8:2"`` (negative indices count from the end);
- ``all``; ``interleave`` (with ``fraction`` 0.5 / 0.75 / 1.0: the paper's sets, e.g. 50% = odd blocks);
- ``deepest``, ``most_local``, ``least_local`` (``fraction`` or ``count``; the last two read attention locality from
  ``ditgraft analyze`` output, computed on the fly when absent);
- ``auto``: rank layers by the stage-1 validation error of the candidate operator (relative MSE: val MSE divided
  by the target's variance), measured by a short probe distillation on every layer; keep the ``count`` easiest.
  With ``by: locality`` it is ``most_local``.
Written as a string (``layers: interleave``) or a mapping (``layers: {select: interleave, fraction: 0.75}``).
"""
from __future__ import annotations

from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ditgraft.operators import get_spec, operator_names

SELECTORS = ("all", "interleave", "deepest", "most_local", "least_local", "auto")
LOSSES = ("l1", "l2", "huber")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LayerSelector(Strict):
    select: Literal["all", "interleave", "deepest", "most_local", "least_local", "auto"]
    fraction: float | None = Field(default=None, gt=0, le=1)
    count: int | None = Field(default=None, ge=1)
    by: Literal["stage1_loss", "locality"] = "stage1_loss"
    probe_steps: int = Field(default=100, ge=1)


def _parse_layers(value: Any) -> Any:
    if isinstance(value, str):
        v = value.strip()
        if v in SELECTORS:
            return LayerSelector(select=v)
        if ":" in v:
            parts = v.split(":")
            if len(parts) > 3 or not all(p.strip().lstrip("-").isdigit() or p.strip() == "" for p in parts):
                raise ValueError(f"slice {value!r} is not a Python slice like '1:8:2'")
            return v
        raise ValueError(f"{value!r} is not a selector; use a list of indices, a slice 'a:b:c' or one of {SELECTORS}")
    return value


class Graft(Strict):
    slot: Literal["attn", "mlp"]
    layers: Union[list[int], str, LayerSelector]
    operator: str
    options: dict[str, Any] = Field(default_factory=dict)
    loss: Literal["l1", "l2", "huber"] | None = None  # default: l1 for attn, l2 for mlp (the paper's rule)
    huber_delta: float = Field(default=1.0, gt=0)
    init: Literal["random", "teacher"] = "random"

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v):
        return _parse_layers(v)

    @field_validator("operator")
    @classmethod
    def _operator(cls, v):
        names = operator_names()
        if v not in names:
            raise ValueError(f"{v!r} is not an operator; allowed: {', '.join(names)}")
        return v

    @model_validator(mode="after")
    def _slot_matches(self):
        spec = get_spec(self.operator)
        if spec.slot != self.slot:
            raise ValueError(f"operator {self.operator!r} replaces '{spec.slot}' slots, not slot={self.slot!r}")
        if self.loss is None:
            self.loss = "l1" if self.slot == "attn" else "l2"
        return self


class Teacher(Strict):
    # testbed | path to .safetensors / .pt | hf://owner/repo/file | diffusers:<model or pipeline dir, or hub repo>
    source: str = "testbed"
    model: str | None = None  # size name for official .pt files (default DiT-XL/2)
    image_size: int | None = None  # for official .pt files (latent = image / 8)


class Stage1(Strict):
    enabled: bool = True
    data: str = "mnist5k"  # dataset spec (mnist5k, an image folder, latents .npy/.npz) or a synth .npz
    samples: int = Field(default=2000, ge=1)
    val_samples: int = Field(default=256, ge=1)
    steps: int = Field(default=300, ge=1)  # per operator
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: float | None = Field(default=10.0, gt=0)
    eval_every: int = Field(default=50, ge=1)
    cache: Literal["auto", "memory", "disk", "stream"] = "auto"
    ram_budget_gb: float = Field(default=4.0, gt=0)
    cache_dtype: Literal["float32", "float16"] = "float32"
    extract_batch_size: int = Field(default=100, ge=1)


class Lora(Strict):
    """Stage 2 through LoRA adapters (peft) instead of all parameters; grafted operators still train fully."""
    rank: int = Field(default=64, ge=1)
    alpha: float = Field(default=64.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # module names (suffixes) that get adapters; defaults: diffusers attention and feed-forward layers
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                               "ff.net.2"], min_length=1)


class Stage2(Strict):
    enabled: bool = True
    data: str = "mnist5k"
    steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    decay_steps: int = Field(default=0, ge=0)  # linear LR decay to 0 over the last decay_steps steps
    ema_decay: float | None = Field(default=None, ge=0, lt=1)
    grad_clip: float | None = Field(default=10.0, gt=0)
    ckpt_every: int = Field(default=50, ge=1)
    lora: Lora | None = None  # None: finetune all parameters

    @model_validator(mode="after")
    def _decay_fits(self):
        room = max(0, self.steps - self.warmup_steps)
        if self.decay_steps > room:
            raise ValueError(f"decay_steps = {self.decay_steps} must be in [0, steps - warmup_steps] = [0, {room}]")
        return self


class Evaluation(Strict):
    enabled: bool = True
    num: int = Field(default=500, ge=10)
    steps: int = Field(default=25, ge=1)
    sampler: Literal["ddim", "ddpm"] = "ddim"
    cfg_scale: float = Field(default=1.5, ge=1)
    seed: int = 0
    baselines: list[Literal["teacher", "random_init"]] = Field(default_factory=lambda: ["teacher"])


class Recipe(Strict):
    name: str = "graft"
    description: str = ""
    teacher: Teacher = Field(default_factory=Teacher)
    grafts: list[Graft] = Field(min_length=1)
    stage1: Stage1 = Field(default_factory=Stage1)
    stage2: Stage2 = Field(default_factory=Stage2)
    eval: Evaluation = Field(default_factory=Evaluation)
    seed: int = 0
    device: str = "auto"

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        value = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see ditgraft/recipe.py for the schema)"
        lines.append(f"  - {loc or '(top level)'} = {value!r}: {msg}")
    return "\n".join(lines)


def parse_recipe(data: dict, source: str = "<dict>") -> Recipe:
    if not isinstance(data, dict):
        raise ValueError(f"invalid recipe {source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise ValueError(_format_errors(err, source)) from None


def load_recipe(path: str) -> Recipe:
    import os

    if not os.path.exists(path):
        bundled = os.path.join(os.path.dirname(__file__), "recipes", path if path.endswith(".yaml") else path + ".yaml")
        if os.path.exists(bundled):
            path = bundled
        else:
            raise FileNotFoundError(f"recipe={path!r}: no such file (nor a bundled recipe of that name; "
                                    f"see `ditgraft recipes`)")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"invalid recipe {path}: not valid YAML ({err})") from None
    return parse_recipe(data, path)


def bundled_recipes() -> list[str]:
    import os

    folder = os.path.join(os.path.dirname(__file__), "recipes")
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))


def parse_slice(text: str, depth: int) -> list[int]:
    parts = [int(p) if p.strip() else None for p in text.split(":")]
    return list(range(depth))[slice(*parts)]


def resolve_layers(selector, depth: int, analysis: dict | str | None = None,
                   probe_losses: dict[int, float] | None = None) -> list[int]:
    """Concrete sorted block indices for a graft's ``layers`` against a model of ``depth`` blocks."""
    from ditgraft.eval.layer_select import layer_count, select_layers

    if isinstance(selector, list):
        bad = [i for i in selector if not -depth <= i < depth]
        if bad:
            raise ValueError(f"layers={selector}: indices {bad} are out of range for depth {depth} (0..{depth - 1})")
        out = sorted({i % depth for i in selector})
    elif isinstance(selector, str):
        out = parse_slice(selector, depth)
    elif selector.select == "auto":
        count = layer_count(depth, selector.fraction if selector.fraction is not None else 0.5, selector.count)
        if selector.by == "locality":
            return select_layers("most_local", depth, analysis=analysis, count=count)
        if probe_losses is None:
            raise ValueError("layers: auto (by stage1_loss) needs the probe losses; run it through the graft pipeline")
        ranked = sorted(range(depth), key=lambda i: (probe_losses[i], i))
        out = sorted(ranked[:count])
    else:
        fraction = selector.fraction
        if selector.select == "interleave" and fraction is None and selector.count is None:
            fraction = 0.5
        out = select_layers(selector.select, depth, analysis=analysis,
                            fraction=fraction if fraction is not None else 0.5, count=selector.count)
    if not out:
        raise ValueError(f"layers={selector!r} selects no block of a depth-{depth} model")
    return out
