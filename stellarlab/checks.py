"""Rules for arguments, written once beside the argument they govern, and the value helpers behind them.

A model or DataModule states what each of its arguments accepts in its `__init__` signature, e.g.
`dropout: Annotated[float, Number(minimum=0, below=1, example="model.dropout=0.1")] = 0.0`. The same
marker answers the pre-flight check of a composed config (`check_arguments`, called by
`stellarlab.run.validation` before any data are prepared) and the constructor called from plain Python
(`check_call`), so a new model or argument brings its rules along and no list elsewhere repeats them.
Rules that tie arguments of one class together live in its `check_together(cls, values)` classmethod.

Core module: stdlib, omegaconf and (lazily) hydra only, so `python train.py optimizer.lr=-1` is answered
before torch is imported.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from stellarlab.errors import ConfigError

#: Keys Hydra's `instantiate` reads itself.
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})


# -- value helpers ----------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """OmegaConf containers to plain lists/dicts (values are compared and printed as the user typed them)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _show(value: Any) -> str:
    """A value the way it is written on the command line: 1e-3, fast, [0.8,0.1,0.1], null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def _is_number(value: Any) -> bool:
    """A real number (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    """A real integer: Lightning asserts isinstance(max_epochs, int), so 30.0 is refused here, not after data preparation."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_number(
    key: str,
    value: Any,
    example: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    integer: bool = False,
    allow_null: bool = False,
    also: Sequence[Any] = (),
    also_note: str = "",
) -> None:
    """ConfigError unless `value` is a finite number (an integer if asked) in the given bounds.

    `minimum`/`maximum` are inclusive, `above`/`below` exclusive; `also` lists extra accepted values (e.g. -1).
    """
    if value is None and allow_null:
        return
    if _is_number(value) and value in also:
        return
    kind = "an integer" if integer else "a number"
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum:g}")
    if above is not None:
        bounds.append(f"> {above:g}")
    if maximum is not None:
        bounds.append(f"<= {maximum:g}")
    if below is not None:
        bounds.append(f"< {below:g}")
    want = kind + (" " + " and ".join(bounds) if bounds else "")
    if also:
        want += f" (or {', '.join(_show(a) for a in also)}{also_note})"
    if allow_null:
        want += " or null"
    ok = _is_int(value) if integer else (_is_number(value) and math.isfinite(value))
    if ok:
        v = float(value)
        ok = not (
            (minimum is not None and v < minimum)
            or (maximum is not None and v > maximum)
            or (above is not None and v <= above)
            or (below is not None and v >= below)
        )
    if not ok:
        raise ConfigError(f"{key}={_show(value)} is not valid: it must be {want}; e.g. {example}")


def check_int_list(key: str, value: Any, example: str, *, allow_empty: bool = True, minimum: int = 1,
                   scalar_ok: bool = False) -> list[int]:
    """A list of integers >= minimum (with `scalar_ok`, a single integer counts as a list of one)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if not isinstance(value, (list, tuple)) and not scalar_ok:
        raise ConfigError(f"{key}={_show(value)} is not valid: it must be a list of integers >= {minimum}; e.g. {example}")
    if not items and not allow_empty:
        raise ConfigError(f"{key}={_show(value)} is empty; give at least one value, e.g. {example}")
    if not all(_is_int(v) and int(v) >= minimum for v in items):
        raise ConfigError(f"{key}={_show(value)} is not valid: it must be integers >= {minimum}; e.g. {example}")
    return [int(v) for v in items]


def check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if str(value) not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1)
        hint = f"did you mean {key}={close[0]}? " if close else ""
        raise ConfigError(f"{key}={_show(value)} is not valid; {hint}valid values: {', '.join(choices)}")


# -- markers for `Annotated[...]` arguments -----------------------------------------------------------
class Rule:
    """What an argument accepts: `check(key, value)` returns None or raises a ConfigError naming `key`."""

    def check(self, key: str, value: Any) -> None:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class Number(Rule):
    """A finite number (an integer with `integer=True`) within the bounds; see `check_number`."""

    example: str
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None
    integer: bool = False
    allow_null: bool = False
    also: tuple = ()
    also_note: str = ""

    def check(self, key: str, value: Any) -> None:
        check_number(key, value, self.example, minimum=self.minimum, maximum=self.maximum, above=self.above,
                     below=self.below, integer=self.integer, allow_null=self.allow_null, also=self.also,
                     also_note=self.also_note)


@dataclass(frozen=True, kw_only=True)
class IntList(Rule):
    """A list of integers >= `minimum`; `scalar_ok`: one integer counts as a list of one."""

    example: str
    minimum: int = 1
    allow_empty: bool = True
    scalar_ok: bool = False

    def check(self, key: str, value: Any) -> None:
        check_int_list(key, value, self.example, allow_empty=self.allow_empty, minimum=self.minimum,
                       scalar_ok=self.scalar_ok)


@dataclass(frozen=True, kw_only=True)
class PositiveNumbers(Rule):
    """One finite number > 0 or a non-empty list of them (candidates tuned on validation)."""

    example: str

    def check(self, key: str, value: Any) -> None:
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items or not all(_is_number(a) and math.isfinite(a) and a > 0 for a in items):
            raise ConfigError(f"{key}={_show(value)} is not valid: it must be numbers > 0; e.g. {self.example}")


@dataclass(frozen=True, kw_only=True)
class NameList(Rule):
    """One or more non-empty names (none at all with `allow_empty`), each once (case-insensitively: catalogue
    columns are matched that way)."""

    example: str
    allow_empty: bool = False

    def check(self, key: str, value: Any) -> None:
        valid = isinstance(value, (list, tuple)) and (bool(value) or self.allow_empty)
        if not valid or not all(isinstance(n, str) and n for n in value):
            many = "zero or more" if self.allow_empty else "one or more"
            raise ConfigError(f"{key}={_show(value)} is not valid: name {many} labels, e.g. {self.example}")
        twice = sorted({n for n in value if [m.lower() for m in value].count(n.lower()) > 1})
        if twice:
            raise ConfigError(f"{key}={_show(value)} names {', '.join(twice)} more than once; list each label once")


class Choice(Rule):
    """One of the given names (compared as text, as typed on the command line)."""

    def __init__(self, *choices: str):
        self.choices = tuple(str(c) for c in choices)

    def __repr__(self) -> str:
        return f"Choice{self.choices!r}"

    def check(self, key: str, value: Any) -> None:
        check_choice(key, value, self.choices)


class Switch(Rule):
    """auto, true or false: a setting stellarlab decides by itself unless told."""

    def check(self, key: str, value: Any) -> None:
        if not (value is True or value is False or value == "auto"):
            raise ConfigError(f"{key} must be auto, true or false, got {value!r}")


class Flag(Rule):
    """true or false, nothing else: `maybe` or 1 would otherwise pass as truthy."""

    def check(self, key: str, value: Any) -> None:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={_show(value)} is not valid: it must be true or false; e.g. {key}=true")


# -- the rules of a class -----------------------------------------------------------------------------
def _init_chain(target: Any) -> list[Callable]:
    """The `__init__` functions whose arguments a call of `target` can reach (following **kwargs up the bases)."""
    if not inspect.isclass(target):
        return [target]
    chain = []
    for cls in target.__mro__:
        if cls is object or "__init__" not in vars(cls):
            continue
        init = vars(cls)["__init__"]
        chain.append(init)
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            break
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return chain


def _hints(fn: Callable) -> dict[str, Any]:
    """The evaluated annotations of `fn` with their `Annotated` extras; any that cannot be evaluated are skipped."""
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # one annotation naming what the module does not import must not hide the others
        hints = {}
        namespace = getattr(fn, "__globals__", {})
        for name, annotation in getattr(fn, "__annotations__", {}).items():
            try:
                hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation
            except Exception:
                continue
        return hints


def _rules_of(hint: Any) -> list[Rule]:
    if typing.get_origin(hint) is typing.Annotated:
        return [m for m in hint.__metadata__ if isinstance(m, Rule)]
    if typing.get_origin(hint) is Literal:
        return [Choice(*typing.get_args(hint))]
    return []


def argument_rules(target: Any) -> dict[str, list[Rule]]:
    """{argument: its rules} from the `__init__` annotations along the class's bases.

    The nearest class that gives an argument a marker decides; one that re-declares the argument without
    a marker (to convert it before passing it on) keeps its base's rules.
    """
    rules: dict[str, list[Rule]] = {}
    for init in _init_chain(target):
        for name, hint in _hints(init).items():
            if name != "return" and not rules.get(name):
                rules[name] = _rules_of(hint)
    return rules


def with_defaults(target: Any, values: Mapping) -> dict[str, Any]:
    """`values` over the defaults of the arguments it leaves out (for rules that tie several arguments)."""
    merged: dict[str, Any] = {}
    for init in reversed(_init_chain(target)):
        for p in inspect.signature(init).parameters.values():
            if p.default is not p.empty:
                merged[p.name] = p.default
    merged.update(values)
    return merged


def check_values(target: Any, values: Mapping, group: str) -> None:
    """Every given value against its argument's rules, then the `check_together` rules of each class in the chain."""
    values = {str(k): _plain(v) for k, v in values.items() if str(k) not in HYDRA_KEYS}
    rules = argument_rules(target)
    for name, value in values.items():
        for rule in rules.get(name, ()):
            rule.check(f"{group}.{name}", value)
    for cls in reversed(target.__mro__ if inspect.isclass(target) else ()):
        together = vars(cls).get("check_together")
        if together is not None:  # each owner's rule once, a base's first, no super() chain to remember
            together.__get__(None, target)(values)


def check_call(cls: type, args: tuple, kwargs: Mapping, group: str) -> None:
    """The arguments of a constructor call, checked by the class's rules before `__init__` runs.

    Called from `__new__`: a wrapper around `__init__` would sit between the `__init__` frames that
    Lightning's `save_hyperparameters` walks, and the subclass's arguments would be lost from `hparams`.
    A call `__init__` cannot bind (unknown or missing argument) is left to Python's own TypeError.
    """
    if not args and not kwargs:  # unpickling, copying
        return
    signature = inspect.signature(cls.__init__)
    try:
        bound = signature.bind(None, *args, **kwargs)
    except TypeError:
        return
    values: dict[str, Any] = {}
    for i, (name, value) in enumerate(bound.arguments.items()):
        kind = signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            values.update(value)
        elif kind != inspect.Parameter.VAR_POSITIONAL and i > 0:  # not self
            values[name] = value
    check_values(cls, values, group)


# -- config nodes -------------------------------------------------------------------------------------
def accepted_keys(target: Any) -> set[str] | None:
    """Keyword arguments a class (or function) accepts, following **kwargs up the base classes; None: any."""
    if inspect.isclass(target):
        names: set[str] = set()
        for cls in target.__mro__:
            if cls is object or "__init__" not in vars(cls):
                continue
            try:
                params = inspect.signature(cls.__init__).parameters.values()
            except (TypeError, ValueError):
                return None
            names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
            if not any(p.kind == p.VAR_KEYWORD for p in params):
                return names
        return None
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind != p.VAR_POSITIONAL}


def locate_target(group: str, node: Any) -> Any | None:
    """The class or function a config node's `_target_` names (None without one), or a ConfigError."""
    if node is None or "_target_" not in node:
        return None
    from hydra._internal.utils import (
        _locate,  # what hydra.utils.instantiate uses, without its error log
    )

    target_name = str(node["_target_"])
    try:
        return _locate(target_name)
    except Exception as err:  # ImportError with Hydra's explanation
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise ConfigError(
            f"{group}._target_={target_name} cannot be imported ({lines[-1] if lines else type(err).__name__}); "
            f"check the spelling or choose an option of the {group} group (python train.py --help lists them)"
        ) from None


def check_node_keys(target: Any, values: Mapping, group: str, supplied: frozenset[str] | set[str] = frozenset()) -> None:
    """Every key of a config node must be an argument of its `target`; `supplied` ones are filled in by stellarlab."""
    valid = accepted_keys(target)
    if valid is None:
        return
    target_name = str(values.get("_target_") or f"{target.__module__}.{target.__qualname__}")
    for key in values:
        key = str(key)
        if key in HYDRA_KEYS:
            continue
        if key in supplied:
            raise ConfigError(f"{group}.{key} is set by stellarlab itself (from the data or the run); remove {group}.{key}")
        if key not in valid:
            options = sorted(valid - set(supplied) - {"self"})
            close = difflib.get_close_matches(key, options, n=1)
            hint = f"did you mean {group}.{close[0]}? " if close else ""
            raise ConfigError(
                f"{group}.{key} is not an option of {target_name}; {hint}valid options: {', '.join(options)} "
                f"(remove it with ~{group}.{key})"
            )


def check_arguments(target: Any, values: Mapping, group: str, supplied: frozenset[str] | set[str] = frozenset()) -> None:
    """A config node for `target`: no unknown keys, every value within its argument's rules, the joint rules met."""
    check_node_keys(target, values, group, supplied)
    check_values(target, {k: v for k, v in values.items() if str(k) not in supplied}, group)


__all__ = [
    "HYDRA_KEYS", "Choice", "Flag", "IntList", "NameList", "Number", "PositiveNumbers", "Rule", "Switch", "accepted_keys",
    "argument_rules", "check_arguments", "check_call", "check_choice", "check_int_list", "check_node_keys",
    "check_number", "check_values", "locate_target", "with_defaults",
]
