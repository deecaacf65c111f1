"""Value types of the config models: exact type checks and range checks with one-line messages.

A YAML value is checked the way users expect from a config file: an int key takes an int (not
"5", not 5.0, not true), a float key takes any finite number (also YAML 1.1's "2e-4", which
PyYAML reads as a string), a list key also takes "a,b" (handy on the command line). Each check
raises ValueError with the message that follows the key in the error line
(`training.max_steps: must be > 0, or -1 to train by epochs (got 0)`); trainkit.config turns
pydantic's ValidationError into that line.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator


class Expect:
    """Before-validator: `value` must be of one of `types` (or null when `nullable`); returns it coerced."""

    def __init__(self, *types: type, nullable: bool = False):
        self.types, self.nullable = types, nullable

    def type_name(self) -> str:
        return " or ".join(t.__name__ for t in self.types)

    def __call__(self, value: Any) -> Any:
        if value is None:
            if self.nullable:
                return None
            raise ValueError(f"must not be null (expected {self.type_name()})")
        types = self.types
        if bool in types and isinstance(value, bool):
            return value
        if float in types and isinstance(value, (int, float)) and not isinstance(value, bool):
            return finite(float(value))
        if float in types and isinstance(value, str):
            try:  # YAML 1.1 reads 2e-4 as a string
                number = float(value)
            except ValueError:
                pass
            else:
                return finite(number)
        if int in types and isinstance(value, int) and not isinstance(value, bool):
            return value
        if types == (list,) and isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        for t in types:
            if t not in (int, float, bool) and isinstance(value, t):
                return value
        raise ValueError(f"expected {self.type_name()}, got {type(value).__name__} {value!r}")


class ExpectAutoOrBool(Expect):
    """Before-validator: true, false or "auto" (a switch whose "auto" setting is worked out at run
    time, e.g. memory.gradient_checkpointing)."""

    def __init__(self):
        super().__init__(bool)

    def type_name(self) -> str:
        return "auto or bool"

    def __call__(self, value: Any) -> Any:
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError(f"expected auto, true or false, got {type(value).__name__} {value!r}")


def finite(value: float) -> float:
    """No float key has a meaning for inf or NaN (an infinite learning rate makes every weight
    non-finite at the first step)."""
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number (got {value!r})")
    return value


def check(condition, problem: str):
    """After-validator: `condition(value)` must hold for a set value, else `problem (got value)`."""
    def validate(value):
        if value is not None and not condition(value):
            raise ValueError(f"{problem} (got {value!r})")
        return value
    return AfterValidator(validate)


positive = check(lambda v: v > 0, "must be > 0")
non_negative = check(lambda v: v >= 0, "must be >= 0")
fraction = check(lambda v: 0 <= v < 1, "must be in [0, 1)")
unit_interval = check(lambda v: 0 <= v <= 1, "must be in [0, 1]")
positive_or_minus_one = check(lambda v: v > 0 or v == -1, "must be > 0, or -1 to train by epochs")

Int = Annotated[int, BeforeValidator(Expect(int))]
Float = Annotated[float, BeforeValidator(Expect(float))]
Bool = Annotated[bool, BeforeValidator(Expect(bool))]
Str = Annotated[str, BeforeValidator(Expect(str))]
List = Annotated[list, BeforeValidator(Expect(list))]
Mapping = Annotated[dict, BeforeValidator(Expect(dict))]
OptionalInt = Annotated[int | None, BeforeValidator(Expect(int, nullable=True))]
OptionalFloat = Annotated[float | None, BeforeValidator(Expect(float, nullable=True))]
OptionalStr = Annotated[str | None, BeforeValidator(Expect(str, nullable=True))]
OptionalMapping = Annotated[dict | None, BeforeValidator(Expect(dict, nullable=True))]
StrOrList = Annotated[str | list, BeforeValidator(Expect(str, list))]
AutoOrBool = Annotated[Literal["auto"] | bool, BeforeValidator(ExpectAutoOrBool())]

PositiveInt = Annotated[Int, positive]
NonNegativeInt = Annotated[Int, non_negative]
PositiveFloat = Annotated[Float, positive]
NonNegativeFloat = Annotated[Float, non_negative]
Fraction = Annotated[Float, fraction]
OptionalPositiveInt = Annotated[OptionalInt, positive]
OptionalPositiveFloat = Annotated[OptionalFloat, positive]


def one_of(*choices: str):
    """A str that must be one of `choices` (the annotation is the Literal, for readers and the README)."""
    def validate(value):
        value = Expect(str)(value)
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value
    return Annotated[Literal[choices], BeforeValidator(validate)]


def expected_types(field) -> Expect | None:
    """The Expect check of a model field (its types name the README's type column and pick the
    parser of environment-variable text)."""
    for meta in field.metadata:
        if isinstance(meta, BeforeValidator) and isinstance(meta.func, Expect):
            return meta.func
    return None
