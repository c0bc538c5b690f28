"""From Hydra overrides to typed settings, in one place.

Each concern has one dataclass, next to the code that uses it; its fields hold
every rlt key with its default and one line of help:

    run      rlt.runs.RunConfig, rlt.runs.TeacherRunConfig (RL only)
    model    rlt.models.ModelConfig, rlt.models.LoraConfig (trained models)
    data     rlt.data.config.FormatConfig, rlt.data.config.DataConfig
    reward   rlt.rewards.config.RewardConfig
    rollout  rlt.generation.config.RolloutConfig
    tools    ScoreConfig / DistillConfig / EvalConfig in their entry points

The defaults of each concern are registered with Hydra's ConfigStore as
``rlt/<concern>`` and merged first, so the YAML recipes under cfgs/ only set
values and every key can be overridden as ``key=value``. After composition
the flat config is split: each key goes to the one concern that declares it
(values are type-checked against its dataclass), to the trl config class of
the run (SFTConfig / GRPOConfig; int/float/bool/str values are converted and
checked against its field types, and ranges trl does not check are refused), or
is an error naming the key.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from omegaconf import BooleanNode, FloatNode, IntegerNode, OmegaConf, StringNode
from omegaconf.errors import OmegaConfBaseException, ValidationError

from rlt.data.config import DataConfig, FormatConfig
from rlt.errors import ConfigError
from rlt.generation.config import RolloutConfig
from rlt.models import LoraConfig, ModelConfig
from rlt.rewards.config import RewardConfig
from rlt.runs import RunConfig, TeacherRunConfig

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "cfgs")

# Older, upstream and short names -> the names rlt uses (the one translation table).
RENAMES = {
    "max_seq_length": "max_length",
    "evaluation_strategy": "eval_strategy",
    "torch_dtype": "dtype",
    "warmup_ratio": "warmup_steps",  # transformers 5: a float in [0, 1) is a ratio
    "generation_aggregation_steps": "steps_per_generation",
    "resume_from_checkpoint": "resume_from",   # trl's scripts' key; rlt's trainers read resume_from
    # short names of the offline tools' command lines
    "teacher": "model_name_or_path",
    "model": "model_name_or_path",
    "student": "student_model",
    "dataset": "dataset_id_or_path",
    "split": "dataset_split",
    "max_tokens": "max_completion_length",
}

CONCERNS: dict[str, type] = {
    "run": RunConfig, "teacher_run": TeacherRunConfig, "model": ModelConfig, "lora": LoraConfig, "format": FormatConfig,
    "data": DataConfig, "reward": RewardConfig, "rollout": RolloutConfig,
}
TRAIN_CONCERNS = {
    "sft": ("run", "model", "lora", "format", "data"),
    "student_sft": ("run", "model", "lora", "format", "data"),
    "teacher_grpo": ("run", "teacher_run", "model", "lora", "format", "data", "reward", "rollout"),
}


def concern_defaults() -> dict[str, Any]:
    """{key: default} of every rlt setting (the concerns' fields)."""
    out = {}
    for cls in CONCERNS.values():
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
    return out


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def defaults_of(cls: type) -> dict[str, Any]:
    """The dataclass's defaults as plain values (lists, not tuples)."""
    return OmegaConf.to_container(OmegaConf.structured(cls))


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, cls in CONCERNS.items():
        cs.store(group="rlt", name=name, node=defaults_of(cls))


_register()


# ----------------------------------------------------------------------------------------- typed split
def translate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Apply RENAMES; a key given a value under both names is an error (a null under one name is no value)."""
    out = dict(cfg)
    for old, new in RENAMES.items():
        if old in out:
            if new in out and out[old] is not None and out[new] is not None:
                raise ConfigError(f"both {old!r} and {new!r} are set; keep only {new!r}")
            value = out.pop(old)
            if value is not None or new not in out:  # a null under one name leaves the other's value
                out[new] = value
    return out


def typed(cls: type, values: dict[str, Any]):
    """An instance of the dataclass ``cls`` from ``values`` (missing keys take the defaults).

    Types are checked against the field annotations; the dataclass's own checks run too.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), values)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        first = str(e).splitlines()[0]
        if "is not a ListConfig" in first:
            first = f"{cls.__name__}.{key} takes a list: write {key}=[a,b] (one item: {key}=[a])"
        raise ConfigError(f"{key}={values.get(key)!r}: {first}") from None


def split(cfg: dict[str, Any], concerns: tuple[type, ...], trl_cls: type | None = None):
    """({concern class: instance}, trl kwargs) from a flat composed config; unknown keys are an error."""
    cfg = translate({k: v for k, v in cfg.items() if k != "hydra"})
    owner: dict[str, type] = {}
    for c in concerns:
        for name in field_names(c):
            if name in owner:
                raise AssertionError(f"{name!r} is declared by both {owner[name].__name__} and {c.__name__}")
            owner[name] = c
    trl_fields = set(field_names(trl_cls)) if trl_cls else set()
    per: dict[type, dict] = {c: {} for c in concerns}
    kwargs, unknown = {}, []
    for key, value in cfg.items():
        if key in owner:
            per[owner[key]][key] = value
        elif key in trl_fields:
            kwargs[key] = value
        else:
            unknown.append(key)
    if unknown:
        where = " or fields of " + trl_cls.__name__ if trl_cls else ""
        raise ConfigError(f"unknown key(s) {sorted(unknown)}: not rlt settings{where}; check the spelling "
                          "(--help lists every key)")
    return {c: typed(c, per[c]) for c in concerns}, kwargs


# ----------------------------------------------------------------------------------------- trl settings
# Scalar field types of trl's config classes, converted as OmegaConf converts rlt's own fields.
SCALAR_NODES = {int: IntegerNode, float: FloatNode, bool: BooleanNode, str: StringNode}
SCALAR_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
NULL_IS_DERIVED = ("gradient_accumulation_steps",)  # null: derived by build_train_settings
LENGTHS = ("max_length", "max_completion_length")  # trl's; max_prompt_length is checked by DataConfig


def scalar_type(tp) -> tuple[type | None, bool]:
    """(int, float, bool or str; whether null is allowed) of a field annotated with one of them, optionally
    Optional; (None, ...) for any other annotation (unions with str, enums, lists: left to trl)."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    members = typing.get_args(tp) if union else (tp,)
    rest = [m for m in members if m is not type(None)]
    scalar = rest[0] if len(rest) == 1 and rest[0] in SCALAR_NODES else None
    return scalar, len(rest) < len(members)


def coerce_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the int/float/bool/str fields of the dataclass ``cls`` converted ("1e-5" for a float,
    "8" for an int); a value that does not convert is a ConfigError naming the key, the value and the type."""
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    out = dict(values)
    for key, value in values.items():
        tp, nullable = scalar_type(hints[key])
        if tp is None:
            continue
        nullable = nullable or defaults[key] is None or key in NULL_IS_DERIVED
        if value is None and nullable:
            continue
        try:
            out[key] = SCALAR_NODES[tp]().validate_and_convert(value)
        except ValidationError:
            accepted = SCALAR_WORDS[tp] + (" or null" if nullable else "")
            raise ConfigError(f"{key}={value!r}: {cls.__name__}.{key} takes {accepted}") from None
        if out[key] is None:
            raise ConfigError(f"{key}=null: {cls.__name__}.{key} takes {SCALAR_WORDS[tp]}")
    return out


def documented_choices(args_cls: type, key: str) -> list[str] | None:
    """The values trl's help for ``key`` lists after "Supported values are" (None when it lists none)."""
    f = next((f for f in dataclasses.fields(args_cls) if f.name == key), None)
    m = re.search(r"Supported values are (.*?)\.(?:\s|$)", (f.metadata.get("help", "") if f else ""))
    return re.findall(r"'(\w+)'", m.group(1)) if m else None


def check_trl_choices(args_cls: type, kw: dict[str, Any]) -> None:
    """Names trl checks only when it first uses them (the loss, the advantages: after a whole generation round;
    the reporting integrations: after the model loaded, on every rank), refused before anything loads."""
    loss = kw.get("loss_type")
    choices = documented_choices(args_cls, "loss_type")
    if loss is not None and choices and loss not in choices:
        raise ConfigError(f"loss_type={loss!r}: choose one of {choices} (trl's {args_cls.__name__})")
    scale = kw.get("scale_rewards")
    if scale is not None and scale not in ("group", "batch", "none", True, False):  # trl's compute-time check
        raise ConfigError(f"scale_rewards={scale!r}: choose group, batch or none (true/false: group/none)")
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    report = kw.get("report_to")
    names = [report] if isinstance(report, str) else list(report or [])
    unknown = [r for r in names if r not in INTEGRATION_TO_CALLBACK and r not in ("all", "none")]
    if unknown:
        raise ConfigError(f"report_to={report}: unknown integration(s) {unknown}; choose from "
                          f"{sorted(INTEGRATION_TO_CALLBACK)}, all or none")


# SFTConfig keys that act in trl's dataset preparation, the tokenizer or the model loading, none of which an rlt SFT
# run uses: it tokenizes the rows itself (the loss masks: rlt.trainers.sft), passes its own loaded model, and has
# tokenized with the model's own tokenizer before trl could change it. Set to anything but trl's default, refused.
SFT_UNUSED = {
    "packing": "rlt's rows are not packed; trl would only switch its collator to padding-free batches",
    "packing_strategy": "it only acts with packing",
    "eval_packing": "trl's dataset preparation, where it acts, does not run",
    "padding_free": "trl refuses it after the model loads when max_length is set, as the recipes do",
    "completion_only_loss": "the loss masks are rlt's (the explanation, or the student's whole turn)",
    "assistant_only_loss": "the loss masks are rlt's (the explanation, or the student's whole turn)",
    "dataset_text_field": "rlt reads the dataset's columns by data_format",
    "truncation_mode": "rows longer than max_length are dropped (and counted), never cut",
    "shuffle_dataset": "trl shuffles in its dataset preparation; the Trainer's sampler shuffles each epoch",
    "dataset_num_proc": "trl's dataset preparation does not run",
    "eos_token": "the data is tokenized with the model's own tokenizer before trl would change it",
    "chat_template_path": "the data is tokenized with the model's own tokenizer before trl would change it",
    "model_init_kwargs": "rlt loads the model (dtype, attn_implementation)",
}


def check_sft_unused(args_cls: type, kw: dict[str, Any]) -> None:
    """An :data:`SFT_UNUSED` key set to anything but trl's default: one line, before anything loads (trl would
    ignore it silently, or refuse it only after the model loaded on every rank)."""
    defaults = {f.name: f.default for f in dataclasses.fields(args_cls)}
    for key, why in SFT_UNUSED.items():
        if key in kw and key in defaults and kw[key] != defaults[key]:
            raise ConfigError(f"{key}={kw[key]}: rlt's SFT does not use it ({why}); drop the key")


def check_trl_ranges(kw: dict[str, Any]) -> None:
    """Values trl accepts but a run cannot use (or that trl divides by), refused before its config is built."""
    for key in ("steps_per_generation", "num_iterations"):   # trl divides by them
        if kw.get(key) is not None and kw[key] < 1:
            raise ConfigError(f"{key}={kw[key]} must be >= 1 (null: trl's default)")
    if kw.get("save_strategy", "steps") == "steps" and kw.get("save_steps") is not None and kw["save_steps"] <= 0:
        raise ConfigError(f"save_steps={kw['save_steps']}: with save_strategy=steps give a number of steps >= 1 (or "
                          "a fraction of the run in (0, 1)); transformers would never save, so a crash loses the run")
    steps = kw.get("max_steps")
    if steps is not None and steps != -1 and steps < 1:
        raise ConfigError(f"max_steps={steps}: give -1 (train num_train_epochs) or a number of steps >= 1")
    for key in LENGTHS:
        if kw.get(key) is not None and kw[key] < 1:
            raise ConfigError(f"{key}={kw[key]} must be >= 1 (tokens; null: no limit)")
    if "num_generations" in kw and kw["num_generations"] is None:
        raise ConfigError("num_generations=null: give the number of completions per prompt (>= 2)")
    g = kw.get("num_generations")
    if g is not None and g < 2:
        raise ConfigError(f"num_generations={g}: GRPO needs at least 2 completions per prompt")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        if kw.get(key) is not None and kw[key] < 1:
            raise ConfigError(f"{key}={kw[key]} must be >= 1")


def build_args(args_cls: type, kw: dict[str, Any], num_processes: int | None, n: int):
    """trl's config object from ``kw``; its own errors become one line naming the key(s)."""
    try:
        if num_processes is None:
            return args_cls(**kw)
        # trl's batch checks in __post_init__ count `num_processes`; the result is a plain args_cls
        args = sized_for(args_cls, num_processes)(**kw)
        args.__class__ = args_cls
        return args
    except (ValueError, TypeError) as e:  # trl/transformers name the field in their messages
        msg = str(e).strip().splitlines()[0]
        if "generation_batch_size" in msg:
            msg += (f" (generation_batch_size = per_device_train_batch_size x {n} processes x "
                    "generation_aggregation_steps; change generation_aggregation_steps or num_generations)")
        raise ConfigError(msg) from None
    except ArithmeticError as e:  # e.g. a count trl divides by is 0
        zero = sorted(k for k, v in kw.items() if v == 0 and not isinstance(v, bool))
        raise ConfigError(f"{args_cls.__name__} cannot use these settings ({e}); keys set to 0: {zero}; "
                          "counts and batch sizes must be >= 1") from None


# ----------------------------------------------------------------------------------------- training runs
@dataclasses.dataclass
class TrainSettings:
    """Everything a training run is configured with."""

    run: RunConfig
    model: ModelConfig
    lora: LoraConfig
    format: FormatConfig
    data: DataConfig
    args: Any                                    # trl SFTConfig / GRPOConfig
    composed: dict                               # the composed config (saved as rlt_config.yaml)
    teacher_run: TeacherRunConfig | None = None  # teacher_grpo only
    reward: RewardConfig | None = None
    rollout: RolloutConfig | None = None


def trl_class(trainer: str | None):
    if trainer == "teacher_grpo":
        from trl import GRPOConfig

        return GRPOConfig
    from trl import SFTConfig

    return SFTConfig


def compose(recipe: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The resolved config of a recipe with Hydra overrides.

    ``recipe``: a name under cfgs/run_cfg (``teacher_sft``), or a .yaml file anywhere (trl's ``--config``
    habit); a file outside cfgs/run_cfg is composed exactly like the built-in recipes, under its own name.
    """
    import shutil
    import tempfile

    from hydra import compose as hydra_compose, initialize_config_dir

    builtin = Path(CONFIG_DIR, "run_cfg")
    path = Path(recipe)
    is_file = path.suffix in (".yaml", ".yml") or len(path.parts) > 1
    extra = []
    with tempfile.TemporaryDirectory(prefix="rlt-recipe-") as tmp:
        if is_file:
            if not path.is_file():
                raise ConfigError(f"recipe {recipe}: no such file")
            name = path.stem
            if path.resolve().parent != builtin.resolve():
                # Hydra finds recipes as options of the run_cfg group: give the file a group of its own,
                # under a name no built-in recipe has, so the file given is the file used.
                name = f"user__{path.stem}"
                Path(tmp, "run_cfg").mkdir()
                shutil.copyfile(path, Path(tmp, "run_cfg", name + ".yaml"))
                extra = [f"hydra.searchpath=[file://{tmp}]"]
        else:
            name = recipe
            if not Path(builtin, name + ".yaml").is_file():
                known = sorted(p.stem for p in builtin.glob("*.yaml"))
                raise ConfigError(f"recipe {recipe!r}: not in cfgs/run_cfg (known: {', '.join(known)}); "
                                  "or give a .yaml path")
        try:
            with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
                base = [*extra, f"run_cfg@_global_={name}"]
                if any(_override_key(o) in _RENAMED for o in overrides):
                    keys = set(hydra_compose("train", overrides=base).keys())
                    overrides = [_to_recipe_name(o, keys) for o in overrides]
                cfg = hydra_compose("train", overrides=[*base, *overrides])
            out = OmegaConf.to_container(cfg, resolve=True)
        except Exception as e:  # hydra's errors name the key or the recipe
            raise ConfigError(hydra_message(e, trl_fields=_recipe_trl_fields(base))) from None
    out.pop("hydra", None)
    return out


_RENAMED = set(RENAMES) | set(RENAMES.values())  # either name of a renamed key


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _to_recipe_name(override: str, recipe_keys: set[str]) -> str:
    """An override of a renamed key under the name the recipe uses (``torch_dtype=X`` -> ``dtype=X`` when the
    recipe sets ``dtype``; ``+steps_per_generation=4`` -> ``generation_aggregation_steps=4`` when it sets that),
    so either name overrides the recipe's value; anything else unchanged."""
    key = _override_key(override)
    if key in recipe_keys:
        return override
    names = {key, RENAMES.get(key)} | {old for old, new in RENAMES.items() if new == key}
    there = [n for n in names if n and n in recipe_keys]
    if len(there) != 1:
        return override
    prefix = "~" if override.startswith("~") else ""  # the key exists: a plain override (or a deletion)
    return prefix + there[0] + override.lstrip("+~")[len(key):]


def hydra_message(e: Exception, tool: str | None = None, trl_fields: set[str] | None = None) -> str:
    """One line from a Hydra/OmegaConf error (the useful part is usually the first line, or its cause).
    ``tool``: an offline tool's name (its keys are fixed: a trl training key is simply not one of them).
    ``trl_fields``: the recipe's trl config fields (None: SFT's and GRPO's), for the ``+key`` hint."""
    text = str(e).strip() or repr(e)
    cause = e.__cause__ or e.__context__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    msg = lines[0] if lines else text
    if msg.startswith("Could not override") and "'" in msg:
        key = msg.split("'")[1]
        if tool:
            return f"unknown key {key!r}: not a setting of {tool} (python -m {tool} --help lists every key)"
        fields = _trl_field_names() if trl_fields is None else trl_fields
        if key in fields or RENAMES.get(key) in fields:
            return f"{key} is a trl setting this recipe does not set: add it as +{key}=VALUE"
        if key in _trl_field_names():
            return f"{key} is a setting of the other trainer (SFT or GRPO), not of this recipe's"
        if Path(CONFIG_DIR, key).is_dir():
            options = sorted(p.stem for p in Path(CONFIG_DIR, key).glob("*.yaml"))
            return f"{key} is a config group: write {key}@_global_=NAME (NAME one of {options})"
        return f"unknown key {key!r} (--help lists every key)"
    if cause is not None and str(cause).strip():
        msg = f"{msg} {str(cause).strip().splitlines()[0]}"
    return msg


def _trl_field_names() -> set[str]:
    from trl import GRPOConfig, SFTConfig

    return set(field_names(SFTConfig)) | set(field_names(GRPOConfig))


def _recipe_trl_fields(base: list[str]) -> set[str] | None:
    """The trl config fields of the recipe composed by ``base`` (None when it cannot be told)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return set(field_names(trl_class(hydra_compose("train", overrides=base).get("trainer"))))
    except Exception:  # the recipe itself is broken: the original error says so
        return None


def num_processes_from_env() -> int:
    # The process count is needed before TrainingArguments exists (to derive gradient accumulation), and
    # reading it must not start the process group, so it comes from the launcher's environment.
    return int(os.environ.get("WORLD_SIZE", "1"))


def gradient_accumulation(train_batch_size: int, per_device_train_batch_size: int, num_processes: int) -> int:
    """train_batch_size / (per_device_train_batch_size x num_processes), or a ConfigError naming all three."""
    denom = per_device_train_batch_size * num_processes
    if train_batch_size <= 0 or denom <= 0 or train_batch_size % denom:
        raise ConfigError(
            f"train_batch_size={train_batch_size} must be a positive multiple of per_device_train_batch_size="
            f"{per_device_train_batch_size} x number of processes={num_processes} (= {denom}); change "
            "train_batch_size, per_device_train_batch_size or the process count")
    return train_batch_size // denom


def sized_for(args_cls: type, num_processes: int) -> type:
    """`args_cls` whose batch arithmetic (trl's checks in __post_init__) counts `num_processes` processes.

    Used when settings are checked outside the launched ranks (``--check --processes N``)."""
    return type(args_cls.__name__, (args_cls,), {"world_size": property(lambda self: num_processes)})


def build_train_settings(cfg: dict, num_processes: int | None = None, **forced) -> TrainSettings:
    """Typed settings of a composed training config.

    gradient_accumulation_steps is derived from train_batch_size when null; without CUDA, bf16/tf32 are
    switched off (the CPU DeepSpeed path). No model or data is touched.
    """
    import torch

    trainer = cfg.get("trainer")
    if trainer not in TRAIN_CONCERNS:
        raise ConfigError(f"trainer={trainer!r}: choose one of {list(TRAIN_CONCERNS)} (the trainer_cfg group sets it)")
    args_cls = trl_class(trainer)
    names = TRAIN_CONCERNS[trainer]
    objs, kw = split(cfg, tuple(CONCERNS[n] for n in names), args_cls)
    parts = {n: objs[CONCERNS[n]] for n in names}
    run: RunConfig = parts["run"]
    kw = coerce_fields(args_cls, kw)
    check_trl_ranges(kw)
    check_trl_choices(args_cls, kw)
    if trainer != "teacher_grpo":
        check_sft_unused(args_cls, kw)
    n = num_processes_from_env() if num_processes is None else num_processes
    if n < 1:
        raise ConfigError(f"number of training processes ({n}) must be >= 1")
    per_device = kw.get("per_device_train_batch_size", 8)
    derived = gradient_accumulation(run.train_batch_size, per_device, n)
    if kw.get("gradient_accumulation_steps") is None:
        kw["gradient_accumulation_steps"] = derived
    elif kw["gradient_accumulation_steps"] != derived:
        raise ConfigError(
            f"gradient_accumulation_steps={kw['gradient_accumulation_steps']} disagrees with train_batch_size="
            f"{run.train_batch_size} / (per_device_train_batch_size={per_device} x processes={n}) = {derived}; "
            "set gradient_accumulation_steps=null to derive it")
    if not torch.cuda.is_available():
        kw["bf16"], kw["tf32"] = False, None
        kw["dataloader_pin_memory"] = False  # nothing to pin for without an accelerator
        # Without an accelerator accelerate leaves the backend unset and then counts a single process.
        if num_processes is None and n > 1:
            kw.setdefault("ddp_backend", "gloo")
    if kw.get("report_to") in (None, "none", []):
        kw["report_to"] = "none"
    kw.update(forced)
    groups = {f.name: f.default for f in dataclasses.fields(args_cls)}.get("num_generations")
    if groups is not None:   # GRPO; before trl's own check, which names its derived generation_batch_size
        g = kw.get("num_generations", groups)
        if run.train_batch_size % g:
            raise ConfigError(f"train_batch_size={run.train_batch_size} must be a multiple of num_generations={g} "
                              "(each optimizer step sees whole groups)")
    args = build_args(args_cls, kw, num_processes, n)
    return TrainSettings(args=args, composed=cfg, **parts)


# ----------------------------------------------------------------------------------------- offline tools
def compose_tool(prog: str, tool_cls: type, concerns: tuple[type, ...], argv: list[str], doc: str = "") -> dict:
    """{concern class: instance} from ``key=value`` arguments of an offline tool (rlt.score, ...).

    ``--help`` / ``-h`` prints every key with its default and help, then exits 0.
    """
    classes = (tool_cls, *concerns)
    if any(a in ("--help", "-h") for a in argv):
        sys.stdout.write(help_text(prog, classes, doc))
        raise SystemExit(0)
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    bad = [a for a in argv if "=" not in a or a.startswith("-")]
    if bad:
        raise ConfigError(f"arguments are key=value; got {bad[0]!r} (--help lists every key)")
    overrides, given = [], {}
    for a in argv:
        key, value = a.split("=", 1)
        name = RENAMES.get(key.lstrip("+"), key.lstrip("+"))
        if given.setdefault(name, key.lstrip("+")) != key.lstrip("+"):
            raise ConfigError(f"both {given[name]!r} and {key.lstrip('+')!r} are given, and both set {name!r}; "
                              "keep one")
        overrides.append(f"{name}={value}")
    node: dict[str, Any] = {}
    for c in classes:
        node.update(defaults_of(c))
    ConfigStore.instance().store(name=f"tool_{prog}", node=node)
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = OmegaConf.to_container(hydra_compose(f"tool_{prog}", overrides=overrides), resolve=True)
    except Exception as e:
        raise ConfigError(hydra_message(e, tool=prog)) from None
    cfg.pop("hydra", None)
    objs, _ = split(cfg, classes)
    return objs


def _type_name(tp) -> str:
    s = str(tp) if not isinstance(tp, type) else tp.__name__
    return s.replace("typing.", "").replace("NoneType", "None")


def help_text(prog: str, classes: tuple[type, ...], doc: str = "", trl_note: str = "", usage: str = "") -> str:
    """Every key of ``classes`` with type, default and help, grouped by class."""
    lines = [doc.strip(), ""] if doc else []
    lines.append(f"usage: {usage or prog + ' key=value ...'}   (lists as key=[a,b]; null for None)")
    aliases = {}
    for old, new in RENAMES.items():
        aliases.setdefault(new, []).append(old)
    for cls in classes:
        lines += ["", f"{cls.__name__}: {(cls.__doc__ or '').strip().splitlines()[0]}"]
        hints = typing.get_type_hints(cls)
        defaults = defaults_of(cls)
        for f in dataclasses.fields(cls):
            alias = f" (also: {', '.join(aliases[f.name])})" if f.name in aliases else ""
            lines.append(f"  {f.name}={defaults[f.name]!r}  [{_type_name(hints[f.name])}]{alias}")
            lines.append(f"      {f.metadata.get('help', '')}")
    if trl_note:
        lines += ["", trl_note]
    return "\n".join(lines) + "\n"


def train_help() -> str:
    """--help of rlt.train / launch.sh: the rlt keys of every trainer, then where the trl keys come from."""
    doc = ("Training: ./launch.sh N RECIPE [key=value ...] [offload|zero1] (or ./launch_with_server.sh V T RECIPE ...)."
           "\nRECIPE: a name in cfgs/run_cfg (teacher_sft, teacher_rlt, student_sft, tiny_*) or any .yaml path.")
    note = ("Any field of trl's SFTConfig (sft, student_sft) or GRPOConfig (teacher_grpo) is accepted as well, "
            "e.g. learning_rate, max_steps, per_device_train_batch_size, max_length, num_generations, temperature, "
            "max_completion_length, beta; a trl field that the recipe does not set is added with +key=value.\n"
            f"Older names translated: {', '.join(f'{a}->{b}' for a, b in RENAMES.items())}.")
    classes = tuple(CONCERNS[n] for n in TRAIN_CONCERNS["teacher_grpo"])
    return help_text("rlt.train", classes, doc, note,
                     usage="python -m rlt.train RECIPE [key=value ...] [--check] [--cfg job]")
