"""Recipes: one YAML file describes a grafting experiment (teacher, grafts, stage 1, stage 2, evaluation).

Validated with pydantic; ``load_recipe`` turns every validation problem into one message per field that names the
field, the value and what is allowed.

A graft's ``layers:`` is a list of block indices ``[1, 3, 5]``, a Python slice string ``"1:8:2"`` (negative indices
count from the end) or a layer selector of ``ditgraft.layers`` (``all``, ``interleave``, ``deepest``,
``most_local``, ``least_local``, ``auto``, ...: the registry there lists them and their rules), written as a string
(``layers: interleave``) or a mapping (``layers: {select: interleave, fraction: 0.75}``).
"""
from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

from ditgraft.layers import selector_names
from ditgraft.slots import SLOTS
from ditgraft.operators import get_spec, operator_names
from ditgraft.train.loop import LoopConfig
from ditgraft.utils import MAX_SEED

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a recipe name is one path component: runs/<name>
MAX_RECIPE_BYTES = 1 << 20

LOSSES = ("l1", "l2", "huber")
DEFAULT_LOSS = {"attn": "l1", "mlp": "l2"}  # the paper's stage-1 regression loss per slot


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # lr: .inf / .nan are refused by name


class LayerSelector(Strict):
    select: str
    fraction: float | None = Field(default=None, gt=0, le=1)
    count: int | None = Field(default=None, ge=1)
    by: Literal["stage1_loss", "locality"] = "stage1_loss"
    probe_steps: int = Field(default=100, ge=1)  # the probe distillation of selectors that need probe losses

    @field_validator("select")
    @classmethod
    def _select(cls, v):
        if v not in selector_names():
            raise ValueError(f"{v!r} is not a selector; allowed: {', '.join(selector_names())}")
        return v


def _parse_layers(value: Any) -> Any:
    if isinstance(value, str):
        v = value.strip()
        if v in selector_names():
            return LayerSelector(select=v)
        if ":" in v:
            parts = v.split(":")
            if len(parts) > 3 or not all(p.strip().lstrip("-").isdigit() or p.strip() == "" for p in parts):
                raise ValueError(f"slice {value!r} is not a Python slice like '1:8:2'")
            if len(parts) == 3 and parts[2].strip() and int(parts[2]) == 0:
                raise ValueError(f"slice {value!r}: the step must not be 0 (e.g. '1:8:2')")
            return v
        raise ValueError(f"{value!r} is not a selector; use a list of indices, a slice 'a:b:c' or one of {selector_names()}")
    return value


class Graft(Strict):
    slot: str
    layers: Union[list[int], str, LayerSelector]
    operator: str
    options: dict[str, Any] = Field(default_factory=dict)
    loss: Literal[LOSSES] | None = None  # default: DEFAULT_LOSS[slot] (the paper's rule)
    huber_delta: float = Field(default=1.0, gt=0)
    init: Literal["random", "teacher"] = "random"

    @field_validator("slot")
    @classmethod
    def _slot(cls, v):
        if v not in SLOTS:
            raise ValueError(f"{v!r} is not a slot; allowed: {', '.join(SLOTS)}")
        return v

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
            self.loss = DEFAULT_LOSS[self.slot]
        return self


class Restructure(Strict):
    """Depth restructuring (graft/restructure.py): parallel pairs of adjacent blocks and/or dropped blocks, indexed
    in the teacher; composable with ``grafts`` (operators are grafted into the teacher's blocks first)."""
    parallel_pairs: Union[Literal["all"], list[list[int]], None] = None
    drop: list[int] = Field(default_factory=list)
    merge_init: Literal["sum", "average", "first"] = "sum"
    loss: Literal["l1", "l2", "huber"] = "l1"
    huber_delta: float = Field(default=1.0, gt=0)
    stage1_train: Literal["unit", "merge"] = "unit"  # what stage 1 trains: both blocks + merge, or the merge alone
    from_scratch_lr: float = Field(default=5e-4, gt=0)  # the from_scratch baseline's LR (the teacher's pretraining)

    @field_validator("parallel_pairs", mode="before")
    @classmethod
    def _pairs(cls, v):
        if isinstance(v, str) and v != "all":
            raise ValueError(f"{v!r} is not allowed; use 'all' or a list of adjacent pairs like [[0, 1], [2, 3]]")
        if isinstance(v, list) and not all(isinstance(p, list) and len(p) == 2 for p in v):
            raise ValueError("each pair must be a list of two block indices [i, i+1]")
        return v

    @model_validator(mode="after")
    def _something(self):
        if not self.parallel_pairs and not self.drop:
            raise ValueError("give parallel_pairs (all or a list of [i, i+1] pairs) and/or drop (block indices)")
        return self


class Teacher(Strict):
    # testbed | path to .safetensors / .pt | hf://owner/repo/file | diffusers:<model or pipeline dir, or hub repo>
    source: str = "testbed"
    model: str | None = None  # size name for official .pt files (default DiT-XL/2)
    image_size: int | None = None  # for official .pt files (latent = image / 8)


LATENT_SUFFIXES = (".npy", ".npz")
DATA_OPTIONS = {"mnist5k": ("split",), "images": ("path", "image_size", "channels"),
                "latents": ("path", "scale", "labels")}  # the options each data source takes


class Data(Strict):
    """A stage's training data, with the options its loader needs. In a recipe either a mapping:
        {source: mnist5k}                          the testbed digits (its fixed train / validation split)
        {source: mnist5k, split: all}              one part of them (train | val | all), the last rows held out
        {source: images, path: DIR, image_size: 32, channels: 3}     an image folder (data/images.py)
        {source: latents, path: F.npz, scale: 0.18215, labels: L.npy}  precomputed latents (data/latents.py)
    or a string: ``mnist5k``, ``mnist5k:all`` or the path of a .npy / .npz latents file (also ``ditgraft synth``
    output). ``scale`` multiplies latents stored unscaled; ``labels`` is a labels .npy for a .npy latents file."""

    source: Literal["mnist5k", "images", "latents"] = "mnist5k"
    split: Literal["train", "val", "all"] | None = None
    path: str | None = None
    image_size: int | None = Field(default=None, ge=1)
    channels: Literal[1, 3] = 3
    scale: float | None = Field(default=None, gt=0)
    labels: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, v):
        if not isinstance(v, str):
            return v
        if v == "mnist5k" or v.startswith("mnist5k:"):
            split = v.partition(":")[2]
            return {"source": "mnist5k", **({"split": split} if split else {})}
        if v.lower().endswith(LATENT_SUFFIXES):
            return {"source": "latents", "path": v}
        raise ValueError(f"{v!r} is not a data source; use 'mnist5k', the path of a .npy/.npz latents file, or a "
                         "mapping such as {source: images, path: DIR, image_size: 32}")

    @model_validator(mode="after")
    def _options_fit_source(self):
        allowed = set(DATA_OPTIONS[self.source])
        given = {k for k in self.model_fields_set if k != "source"}
        if given - allowed:
            raise ValueError(f"source={self.source!r} takes no {', '.join(sorted(given - allowed))}; its options: "
                             f"{', '.join(sorted(allowed))}")
        if self.source != "mnist5k" and not self.path:
            raise ValueError(f"source={self.source!r} needs path")
        if self.source == "images" and self.image_size is None:
            raise ValueError("source='images' needs image_size (pixels per side, e.g. 256)")
        if self.source == "latents" and not self.path.lower().endswith(LATENT_SUFFIXES):
            raise ValueError(f"path={self.path!r}: latents are a .npy or .npz file")
        return self

    def text(self) -> str | None:
        """The string form of this data when it has one (what the recipe's string spelling parses to)."""
        if self.source == "mnist5k":
            return "mnist5k" + (f":{self.split}" if self.split else "")
        if self.source == "latents" and self.scale is None and self.labels is None:
            return self.path
        return None

    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        text = self.text()
        if text is not None:
            return text
        values = handler(self)
        return {"source": self.source, **{k: values[k] for k in DATA_OPTIONS[self.source] if values[k] is not None}}


class Stage1(Strict):
    enabled: bool = True
    data: Data = Field(default_factory=Data)  # also the source of the validation samples
    samples: int = Field(default=2000, ge=1)  # noised samples; more than the data's images: noised copies
    val_samples: int = Field(default=256, ge=1)
    # share of samples whose conditioning is the unconditional one (the teacher's label dropout; DiT trains with 0.1)
    cond_dropout: float = Field(default=0.0, ge=0, lt=1)
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
    # scale settings of the shared loop: bf16 autocast (CUDA only), micro-batches per rank and step
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_accum_steps: int = Field(default=1, ge=1)

    def loop_config(self, seed: int, progress: bool = True) -> LoopConfig:
        """The training loop's settings for stage 1 (validation and the best-operator check every eval_every)."""
        return LoopConfig.from_settings(self, ema_decay=None, ckpt_every=self.eval_every,
                                        log_every=max(1, self.eval_every // 5), seed=seed, progress=progress)


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
    data: Data = Field(default_factory=Data)
    # training images the batches are drawn from: a seeded random subset of the data's training rows (None: all);
    # the paper's stage-2 data share (10% or 20% of ImageNet)
    samples: int | None = Field(default=None, ge=1)
    steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    decay_steps: int = Field(default=0, ge=0)  # linear LR decay to 0 over the last decay_steps steps
    ema_decay: float | None = Field(default=None, ge=0, lt=1)
    grad_clip: float | None = Field(default=10.0, gt=0)
    ckpt_every: int = Field(default=50, ge=1)
    # scale settings of the shared loop: bf16 autocast (CUDA only), micro-batches per rank and step, and
    # recomputing each DiT block in backward instead of storing its activations
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_accum_steps: int = Field(default=1, ge=1)
    activation_checkpointing: bool = False
    # under torchrun: ddp replicates the weights on every rank; fsdp shards parameters, gradients and Adam state per
    # block (FSDP2), for teachers that do not fit one device
    sharding: Literal["ddp", "fsdp"] = "ddp"
    # loss = diffusion_weight * DiT's diffusion loss + distill_weight * MSE(student output, teacher output) on the
    # same noised input (output distillation; diffusion_weight 0 and distill_weight > 0: distillation alone)
    diffusion_weight: float = Field(default=1.0, ge=0)
    distill_weight: float = Field(default=0.0, ge=0)
    lora: Lora | None = None  # None: finetune all parameters

    @model_validator(mode="after")
    def _decay_fits(self):
        room = max(0, self.steps - self.warmup_steps)
        if self.decay_steps > room:
            raise ValueError(f"decay_steps = {self.decay_steps} must be in [0, steps - warmup_steps] = [0, {room}]")
        if self.diffusion_weight == 0 and self.distill_weight == 0:
            raise ValueError("diffusion_weight = 0 and distill_weight = 0 leave stage 2 no loss; give one of them > 0")
        if self.distill_weight == 0 and self.diffusion_weight != 1.0:
            raise ValueError(f"diffusion_weight = {self.diffusion_weight} without distillation only rescales the loss "
                             "(use lr); it weighs the diffusion loss against distill_weight > 0")
        return self

    def loop_config(self, seed: int, progress: bool = True) -> LoopConfig:
        """The training loop's settings for stage 2 (constant LR after the warmup, then the optional linear decay)."""
        return LoopConfig.from_settings(self, log_every=max(1, min(10, self.steps // 20)), seed=seed,
                                        progress=progress)


class Evaluation(Strict):
    enabled: bool = True
    num: int = Field(default=500, ge=10)
    steps: int = Field(default=25, ge=1)
    sampler: Literal["ddim", "ddpm", "euler"] = "ddim"  # euler: flow-matching teachers (SD3, Flux, Wan)
    cfg_scale: float = Field(default=1.5, ge=1)
    seed: Seed = 0
    batch_size: int = Field(default=250, ge=1)  # samples per sampling batch (part of the protocol: seeds are per batch)
    # depth_pruned / from_scratch (with restructure): the same total training FLOPs spent on the teacher with each
    # parallel pair's second block dropped, or on a DiT of the student's depth trained from random init
    baselines: list[Literal["teacher", "random_init", "depth_pruned", "from_scratch"]] = Field(
        default_factory=lambda: ["teacher"])
    vae: str | None = None  # latent models: AutoencoderKL folder or hub id that decodes the samples
    features: Literal["testbed", "inception"] = "testbed"
    reference: str | None = None  # inception features: the ADM reference batch .npz
    inception_weights: str | None = None  # default: $DITGRAFT_INCEPTION_WEIGHTS or the torch hub cache
    # caption-conditioned teachers (PixArt): the caption .npz whose captions (and negative prompt) the protocol
    # samples, caption i % n for sample i; default the stage-2 training data (else stage 1's)
    captions: str | None = None

    # decision: also sample every seed in ``seeds`` (the quick protocol's seed included), pool them, and compare
    # the student with the teacher (and the random-init baseline with the student) by paired bootstrap intervals
    protocol: Literal["quick", "decision"] = "quick"
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    target_ratio: float | None = Field(default=1.25, gt=0)  # FID ratio student / teacher, at most
    target_gap: float | None = Field(default=0.02, ge=0)  # class accuracy gap teacher - student, at most
    resamples: int = Field(default=500, ge=10)
    # sample through the family's compiled forward (torch.compile: the first batch pays the compile, tens of seconds
    # on a CPU; samples equal the eager ones to float rounding, so results are the same and cached alike)
    compile: bool = False

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @model_validator(mode="after")
    def _reference_given(self):
        if self.features == "inception" and self.reference is None:
            raise ValueError("features = 'inception' needs reference: PATH (an ADM reference batch .npz)")
        return self


# fields added after run directories were first recorded, and the value that means "not used": left out of the
# recorded recipe while they hold it, so that a run recorded before them still resumes
OMITTED_WHEN_UNSET = ((("restructure",), None), (("stage2", "samples"), None), (("eval", "compile"), False))


class Recipe(Strict):
    name: str = "graft"
    description: str = ""
    teacher: Teacher = Field(default_factory=Teacher)
    grafts: list[Graft] = Field(default_factory=list)
    restructure: Restructure | None = None
    stage1: Stage1 = Field(default_factory=Stage1)
    stage2: Stage2 = Field(default_factory=Stage2)
    eval: Evaluation = Field(default_factory=Evaluation)
    seed: Seed = 0
    device: str = "auto"
    log: Literal["tensorboard", "wandb", "trackio", "none"] = "none"  # experiment tracker (train/tracking.py)

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if not NAME.fullmatch(v) or v in (".", ".."):
            raise ValueError("must be a plain name (letters, digits, '.', '_', '-'; at most 100 characters, not "
                             "starting with '.' or '-'): it names the run directory runs/<name>")
        return v

    @model_validator(mode="after")
    def _has_work(self):
        if not self.grafts and self.restructure is None:
            raise ValueError("grafts = [] and there is no restructure section: give at least one graft or a "
                             "restructure section")
        if self.restructure is None and {"depth_pruned", "from_scratch"} & set(self.eval.baselines):
            raise ValueError(f"eval.baselines={self.eval.baselines}: depth_pruned and from_scratch need a "
                             "restructure section")
        return self

    def to_dict(self) -> dict:
        d = self.model_dump(mode="json")
        for path, unset in OMITTED_WHEN_UNSET:  # recipes that do not use these fields keep their recorded form
            parent = d
            for key in path[:-1]:
                parent = parent.get(key) or {}
            if path[-1] in parent and parent[path[-1]] is unset:
                del parent[path[-1]]
        return d


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
    data = resolve_bases(data, None, source) if "base" in data else data
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise ValueError(_format_errors(err, source)) from None


RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def find_recipe(name: str, folder: str | None = None) -> str:
    """The file of a recipe ``name``: a path (relative to ``folder``, then to the working directory) or the name of
    a bundled recipe."""
    candidates = ([os.path.join(folder, name)] if folder else []) + [
        name, os.path.join(RECIPES_DIR, name if name.endswith(".yaml") else name + ".yaml")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"recipe={name!r}: no such file (nor a bundled recipe of that name; see `ditgraft recipes`)")


def recipe_diff(a, b, prefix: str = "") -> list[str]:
    """The dotted names of the fields where two recipe mappings differ (``stage1.lr``, ``grafts``)."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [prefix or "(top level)"]
    out = []
    for key in list(a) + [k for k in b if k not in a]:
        out += recipe_diff(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
    return out


def deep_merge(base: dict, overrides: dict) -> dict:
    """``base`` updated by ``overrides``: mappings merge key by key (recursively), anything else (lists included)
    is replaced. Neither argument is changed."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class _RecipeLoader(yaml.SafeLoader):
    """Safe YAML that refuses what a recipe never needs and an attacker would use: aliases (``*a``: expansion
    bombs) and duplicate keys (one of the two would be dropped silently)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.MarkedYAMLError(problem="aliases (*name) are not allowed in a recipe; write the value out, "
                                               "or share fields with base:", problem_mark=self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class names it
                break
            if duplicate:
                raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r} (each key may appear once)",
                                           problem_mark=key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_yaml_file(path: str, what: str = "recipe") -> dict:
    """A recipe-like YAML file (recipe, sweep, search) as a mapping: UTF-8, at most MAX_RECIPE_BYTES, no
    duplicate keys and no aliases; every problem is one ``invalid {what} PATH: ...`` message."""
    size = os.path.getsize(path)
    if size > MAX_RECIPE_BYTES:
        raise ValueError(f"invalid {what} {path}: {size} bytes; a {what} is at most {MAX_RECIPE_BYTES} bytes")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"invalid {what} {path}: not UTF-8 text (byte {err.start}: {raw[err.start:err.start + 1]!r}); "
                         "save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"invalid {what} {path}: not valid YAML ({where}{problem})") from None
    if not isinstance(data, dict):
        raise ValueError(f"invalid {what} {path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def resolve_bases(data: dict, folder: str | None = None, source: str = "<dict>", _chain: tuple = ()) -> dict:
    """A recipe mapping with its ``base:`` chain applied: the base recipe (a bundled name or a path, relative to
    ``folder`` first), itself resolved, deep-merged with this recipe's fields. ``abstract`` (the mark of a base
    that is not runnable alone) is not inherited."""
    if "base" not in data:
        return data
    name = data["base"]
    if not isinstance(name, str):
        raise ValueError(f"invalid recipe {source}:\n  - base = {name!r}: must be a recipe name or path")
    try:
        path = find_recipe(name, folder)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"recipe {source}: base = {name!r}: {err}") from None
    key = os.path.realpath(path)
    if key in _chain:
        raise ValueError(f"invalid recipe {source}:\n  - base = {name!r}: recipes inherit from each other in a cycle")
    base = resolve_bases(read_yaml_file(path), os.path.dirname(path), path, _chain + (key,))
    base.pop("abstract", None)
    return deep_merge(base, {k: v for k, v in data.items() if k != "base"})


def resolved_recipe_dict(path: str) -> dict:
    """The recipe file ``path`` (or bundled name) as one mapping, its bases merged in, before validation."""
    path = find_recipe(path)
    return resolve_bases(read_yaml_file(path), os.path.dirname(path), path, (os.path.realpath(path),))


def load_recipe(path: str) -> Recipe:
    """Read, resolve (``base:``) and validate a recipe file or bundled recipe name."""
    file = find_recipe(path)
    data = resolved_recipe_dict(file)
    if data.get("abstract"):
        raise ValueError(f"recipe {file} is a base recipe (abstract: true), not runnable alone; name it as "
                         "`base:` in a recipe that adds the rest")
    return parse_recipe(data, file)


def bundled_recipes() -> list[str]:
    """The runnable bundled recipes (base recipes marked ``abstract: true`` are left out)."""
    names = sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith(".yaml"))
    return [n for n in names if not read_yaml_file(os.path.join(RECIPES_DIR, n + ".yaml")).get("abstract")]
