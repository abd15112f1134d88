"""YAML files + `key=value` overrides -> a typed config object: the one loader for every config
this project reads (the training config, clip-stages recipes).

The schema is an OmegaConf structured dataclass, so an unknown key or a wrong type fails at once.
Overrides use one rule everywhere: `a.b.c=value` replaces (or, for a mapping value, merges into)
the node at that dotted path, creating an optional section that is still null, and reaching into
lists by index (`stages.1.student=...`); the value is parsed as YAML (`x=3` is an int, `x=null` is None, `x=[1,2]` a list). Every failure is a
`ConfigError` with ONE line naming the file or override and the key.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value: the message is one line that names the key (and where it came from)."""


def load_yaml(path: str) -> object:
    """A YAML file as an OmegaConf node; a missing file or a syntax error is one line."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    try:
        return OmegaConf.load(path)
    except UnicodeDecodeError as err:
        byte = err.object[err.start]
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start} is {byte:#04x})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: {where}not valid YAML ({problem})") from None


def apply_override(node, item: str):
    """`node` with `dotted.key=value` applied (the one override rule, see the module doc)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    key = item.split("=", 1)[0].strip()
    if not any(part.isdigit() for part in key.split(".")):
        # A merge also fills an optional section that is still null (model.mask.x=...).
        return OmegaConf.merge(node, OmegaConf.from_dotlist([item]))
    # Into a list by index (stages.1.student=...): a merge would replace the list by a dict.
    value = item.split("=", 1)[1]
    OmegaConf.update(node, key, OmegaConf.from_dotlist([f"v={value}"])["v"], merge=True)
    return node


def load_structured(schema: type[T], path: Optional[str], overrides: Sequence[str] = ()) -> T:
    """`schema`'s defaults <- the YAML file <- each override, in order -> a `schema` instance.

    Raises ConfigError naming the file or the override that brought the bad key."""
    source = path or "<overrides>"
    try:
        merged = OmegaConf.structured(schema)
        if path is not None:
            merged = OmegaConf.merge(merged, load_yaml(path))
        for item in overrides:
            source = f"override {item!r}"
            merged = apply_override(merged, item)
        source = path or "<config>"
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{source}: key {missing[0]}: required value is missing")
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        msg = str(getattr(err, "msg", None) or err).splitlines()[0]
        raise ConfigError(f"{source}: key {key}: {msg}") from None
