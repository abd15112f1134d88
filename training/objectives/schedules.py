"""Values that change over optimizer steps: a term's weight, a temperature.

    schedule = parse_schedule(value)      # a number, or a dict (config), or raises ValueError
    schedule(step) -> float

Forms (YAML):
    0.5                                                   constant
    {kind: linear, start: 0, end: 1, from_step: 0, to_step: 1000}
        start until from_step, then linear to end at to_step, end after
    {kind: steps, boundaries: [500, 1500], values: [1.0, 0.5, 0.0]}
        values[i] while step < boundaries[i] (the last value from the last boundary on)

A schedule is a pure function of the step: a resumed run continues it exactly (no state).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Mapping, Sequence


class Schedule:
    def __call__(self, step: int) -> float:
        raise NotImplementedError

    @property
    def is_constant(self) -> bool:
        return False

    def always_zero(self) -> bool:
        """True when the value is 0 at every step (the term can be left out)."""
        return False


@dataclass(frozen=True)
class Constant(Schedule):
    value: float

    def __call__(self, step: int) -> float:
        return self.value

    @property
    def is_constant(self) -> bool:
        return True

    def always_zero(self) -> bool:
        return self.value == 0


@dataclass(frozen=True)
class Linear(Schedule):
    start: float
    end: float
    from_step: int
    to_step: int

    def __call__(self, step: int) -> float:
        if step <= self.from_step:
            return self.start
        if step >= self.to_step:
            return self.end
        frac = (step - self.from_step) / (self.to_step - self.from_step)
        return self.start + frac * (self.end - self.start)

    def always_zero(self) -> bool:
        return self.start == 0 and self.end == 0


@dataclass(frozen=True)
class Steps(Schedule):
    boundaries: tuple[int, ...]
    values: tuple[float, ...]

    def __call__(self, step: int) -> float:
        return self.values[bisect.bisect_right(self.boundaries, step)]

    def always_zero(self) -> bool:
        return all(v == 0 for v in self.values)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fields(spec: Mapping, kind: str, names: Sequence[str]) -> dict:
    unknown = sorted(set(spec) - {"kind", *names})
    missing = [n for n in names if n not in spec]
    if unknown or missing:
        raise ValueError(f"a {kind} schedule has exactly the keys kind, {', '.join(names)}"
                         f"{'; unknown: ' + ', '.join(unknown) if unknown else ''}"
                         f"{'; missing: ' + ', '.join(missing) if missing else ''}")
    return {n: spec[n] for n in names}


def parse_schedule(value: Any, minimum: float | None = 0.0) -> Schedule:
    """A Schedule from a config value; ValueError (one line) for a bad one. Every value the
    schedule can take must be >= `minimum` (None: no bound)."""
    if isinstance(value, Schedule):
        return value
    if _number(value):
        schedule, numbers = Constant(float(value)), [value]
    elif isinstance(value, Mapping):
        kind = value.get("kind")
        if kind == "linear":
            f = _fields(value, "linear", ("start", "end", "from_step", "to_step"))
            numbers = [f["start"], f["end"]]
            steps = [f["from_step"], f["to_step"]]
            if not all(map(_number, numbers)) or not all(isinstance(s, int) for s in steps) \
                    or not 0 <= steps[0] < steps[1]:
                raise ValueError("a linear schedule needs numbers start, end and integer steps "
                                 f"0 <= from_step < to_step, got {dict(value)}")
            schedule = Linear(float(f["start"]), float(f["end"]), *steps)
        elif kind == "steps":
            f = _fields(value, "steps", ("boundaries", "values"))
            bounds, numbers = list(f["boundaries"]), list(f["values"])
            if not all(isinstance(b, int) for b in bounds) or bounds != sorted(set(bounds)) \
                    or len(numbers) != len(bounds) + 1 or not all(map(_number, numbers)):
                raise ValueError("a steps schedule needs increasing integer boundaries and one "
                                 f"more number in values than boundaries, got {dict(value)}")
            schedule = Steps(tuple(bounds), tuple(float(v) for v in numbers))
        else:
            raise ValueError(f"schedule kind must be linear or steps, got {kind!r}")
    else:
        raise ValueError(f"must be a number or a schedule ({{kind: linear, ...}} or "
                         f"{{kind: steps, ...}}), got {value!r}")
    if minimum is not None and min(numbers) < minimum:
        raise ValueError(f"must be >= {minimum}, got {value!r}")
    return schedule
