"""The condition language of `match:`: tests on values, combined with all / any / not.

```yaml
match:
  Modality: [CR, DX]                      # a list: any one of these values (`in`)
  BodyPartExamined: CHEST                 # a single value: `equals`
  PatientAge: {at_least: 18}              # an Age String "045Y" compares as 45 years
  SeriesDescription: {regex: "(?i)tomo"}
  ImageType: {contains: DERIVED}          # for attributes that hold several values
  not: {calling_ae: TESTMODALITY}
```

Several tests in one mapping must all hold. Conditions are parsed once, at load, from the
YAML document itself, so every problem names its line and column; a comparison that can
never work (a regex on a number, `greater_than` on a code string) is a load error, not a
rule that silently never fires. Evaluation says which condition failed and what the image
actually holds, for `cadnode rules explain`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from pydicom.valuerep import DA, DT, TM

from cadnode.core.ordering import COMPARE, Order
from cadnode.core.yamlfile import position
from cadnode.route.values import Kind, Selector, Subject, Unreadable, Values, age_in_years
from cadnode.route.values import parse_selector as _parse_selector


class Op(StrEnum):
    equals = "equals"
    in_ = "in"
    regex = "regex"
    less_than = "less_than"
    at_most = "at_most"
    greater_than = "greater_than"
    at_least = "at_least"
    between = "between"
    contains = "contains"
    within = "within"
    exists = "exists"
    missing = "missing"


COMBINATORS = ("all", "any", "not")
# The ordered operators, shared with `when:` on engine answers (cadnode.infer.conditions).
_COMPARE: dict[Op, Callable[[Any, Any], bool]] = {Op(o.value): COMPARE[o] for o in Order}
_ORDERED_OPS = tuple(_COMPARE)

Unit = Sequence[Subject]  # what one evaluation looks at: an image, a series or a study
Location = tuple[int | str, ...]  # keys and indexes from the top of the YAML document


@dataclass(frozen=True)
class Verdict:
    ok: bool
    condition: str  # the condition as written, e.g. "ViewPosition in [PA, AP]"
    actual: str = ""  # what the images hold, e.g. "'LL'" or "missing"
    line: int | None = None  # where the condition is in the rules file

    def reason(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.condition}" + (f" (actual: {self.actual})" if self.actual else "")


class Condition(Protocol):
    @property
    def text(self) -> str: ...

    def check(self, unit: Unit) -> Verdict: ...


@dataclass(frozen=True)
class ValueTest:
    """One operator applied to the values one selector reads."""

    selector: Selector
    op: Op
    operand: Any  # already in the selector's kind (a number, a date, a compiled regex, ...)
    written: str
    line: int | None = None

    @property
    def text(self) -> str:
        return f"{self.selector.text} {self.op.value} {self.written}"

    def check(self, unit: Unit) -> Verdict:
        values = self.selector.read(unit)
        return Verdict(self.holds(values), self.text, values.describe(), self.line)

    def holds(self, values: Values) -> bool:
        present = [v for v in values.typed if not isinstance(v, Unreadable)]
        if self.op is Op.exists:
            return bool(values.typed) is self.operand
        if self.op is Op.missing:
            return (not values.typed) is self.operand
        if self.op is Op.equals and isinstance(self.operand, list):
            return values.typed == self.operand  # the whole list of values, in order
        if self.op is Op.contains:
            return all(wanted in present for wanted in self.operand)
        return any(self._holds_for(value) for value in present)

    def _holds_for(self, value: Any) -> bool:
        if self.op is Op.equals:
            return bool(value == self.operand)
        if self.op is Op.in_:
            return value in self.operand
        if self.op is Op.regex:
            return self.operand.search(str(value)) is not None
        if self.op is Op.within:
            return any(value in network for network in self.operand)
        try:
            return _COMPARE[self.op](value, self.operand)
        except TypeError:  # e.g. a date-time in the file against a date in the rule
            return False


@dataclass(frozen=True)
class AllOf:
    parts: tuple[Condition, ...]
    line: int | None = None

    @property
    def text(self) -> str:
        return " and ".join(part.text for part in self.parts) or "(always)"

    def check(self, unit: Unit) -> Verdict:
        for part in self.parts:
            verdict = part.check(unit)
            if not verdict.ok:
                return verdict  # the first condition that failed is the one explain names
        return Verdict(True, self.text, line=self.line)


@dataclass(frozen=True)
class AnyOf:
    parts: tuple[Condition, ...]
    line: int | None = None

    @property
    def text(self) -> str:
        return "any of (" + "; ".join(part.text for part in self.parts) + ")"

    def check(self, unit: Unit) -> Verdict:
        verdicts = [part.check(unit) for part in self.parts]
        for verdict in verdicts:
            if verdict.ok:
                return verdict
        failures = "; ".join(
            v.condition + (f" (actual: {v.actual})" if v.actual else "") for v in verdicts
        )
        return Verdict(False, f"none of the alternatives holds: {failures}", line=self.line)


@dataclass(frozen=True)
class Not:
    part: Condition
    line: int | None = None

    @property
    def text(self) -> str:
        return f"not ({self.part.text})"

    def check(self, unit: Unit) -> Verdict:
        inner = self.part.check(unit)
        return Verdict(not inner.ok, self.text, inner.actual, self.line)


ALWAYS = AllOf(())


@dataclass
class Problems:
    """Problems in one YAML file, each as `file:line:column: key: message (got value)`."""

    path: Path
    document: Any
    problems: list[str] = field(default_factory=list)

    def problem(self, where: Location, message: str, value: Any = None) -> None:
        line, column = position(self.document, where) or (0, 0)
        key = ".".join(str(part) for part in where)
        shown = "" if value is None or isinstance(value, dict | list) else f" (got {value!r})"
        self.problems.append(f"{self.path}:{line}:{column}: {key}: {message}{shown}")

    def line(self, where: Location) -> int | None:
        found = position(self.document, where)
        return found[0] if found else None


@dataclass
class Parser(Problems):
    """Builds conditions from the YAML document, collecting every problem with its position."""

    multi_scope: bool = False  # series / study scope: each attribute holds many images' values

    def condition(self, node: Any, where: Location) -> Condition:
        if node is None:
            return ALWAYS
        if not isinstance(node, dict):
            self.problem(
                where,
                "expected a mapping of tests (Attribute: value, or all / any / not)",
                node,
            )
            return ALWAYS
        parts = [self._entry(str(key), value, (*where, key)) for key, value in node.items()]
        return parts[0] if len(parts) == 1 else AllOf(tuple(parts), self.line(where))

    def _entry(self, key: str, value: Any, where: Location) -> Condition:
        if key in ("all", "any"):
            if not isinstance(value, list) or not value:
                self.problem(where, f"'{key}' takes a list of conditions", value)
                return ALWAYS
            parts = tuple(self.condition(item, (*where, i)) for i, item in enumerate(value))
            combined = AllOf if key == "all" else AnyOf
            return combined(parts, self.line(where))
        if key == "not":
            return Not(self.condition(value, where), self.line(where))
        try:
            selector = _parse_selector(key)
        except ValueError as error:
            self.problem(where, str(error))
            return ALWAYS
        if isinstance(value, dict):
            tests = [self._test(selector, str(op), arg, (*where, op)) for op, arg in value.items()]
            if not tests:
                self.problem(where, "expected a value or a mapping of operators, got {}")
            return tests[0] if len(tests) == 1 else AllOf(tuple(tests), self.line(where))
        return self._test(selector, "in" if isinstance(value, list) else "equals", value, where)

    def _test(self, selector: Selector, name: str, raw: Any, where: Location) -> ValueTest:
        try:
            op = Op(name)
        except ValueError:
            self.problem(where, f"unknown operator: expected one of {', '.join(Op)}", name)
            return ValueTest(selector, Op.exists, True, "", None)
        try:
            operand = self._operand(selector, op, raw)
        except ValueError as error:
            self.problem(where, str(error), raw)
            return ValueTest(selector, Op.exists, True, "", None)
        return ValueTest(selector, op, operand, _written(raw), self.line(where))

    def _operand(self, selector: Selector, op: Op, raw: Any) -> Any:
        """The operand in the selector's kind, or ValueError saying what was expected."""
        kind, name = selector.kind, selector.text
        if op in (Op.exists, Op.missing):
            if not isinstance(raw, bool):
                raise ValueError(f"'{op}' takes true or false")
            return raw
        if kind is Kind.opaque:
            raise ValueError(
                f"{name} is a sequence or binary attribute: only exists / missing apply "
                "(for a sequence, test an attribute inside it: Sequence.Keyword)"
            )
        if op is Op.regex:
            if not kind.textual:
                raise ValueError(
                    f"regex applies to text, but {name} is a {kind.value}: {_hint(kind)}"
                )
            if not isinstance(raw, str):
                raise ValueError("regex takes a pattern in quotes")
            try:
                return re.compile(raw)
            except re.error as error:
                raise ValueError(f"not a valid regular expression: {error}") from error
        if op in _ORDERED_OPS and not kind.ordered:
            raise ValueError(
                f"'{op}' compares numbers, dates, times and ages, but {name} is "
                f"{kind.value}: use equals, in or regex"
            )
        if op is Op.within:
            if kind is not Kind.address:
                raise ValueError("'within' takes networks and applies to source_address only")
            return [_network(item) for item in _as_list(raw)]
        if op is Op.between:
            if not isinstance(raw, list) or len(raw) != 2:
                raise ValueError("'between' takes two bounds: [lowest, highest]")
            low, high = (operand_value(kind, item) for item in raw)
            if low > high:
                raise ValueError("'between' takes the lower bound first")
            return (low, high)
        if op is Op.in_:
            if not isinstance(raw, list) or not raw:
                raise ValueError("'in' takes a list of values; for one value use equals")
            return [operand_value(kind, item) for item in raw]
        if op is Op.contains:
            if not (selector.multi_valued or self.multi_scope):
                raise ValueError(
                    f"{name} holds one value; contains is for attributes with several "
                    "(ImageType) or for series / study scope: use equals or in"
                )
            return [operand_value(kind, item) for item in _as_list(raw)]
        if isinstance(raw, list):  # equals a whole list of values
            if not selector.multi_valued or self.multi_scope:
                raise ValueError(
                    f"a list compares with every value of {name} in order, which only "
                    "attributes with several values have (ImageType) at instance scope: "
                    "use in for any one of several values, contains for some of several"
                )
            return [operand_value(kind, item) for item in raw]
        return operand_value(kind, raw)


def operand_value(kind: Kind, raw: Any) -> Any:
    """A value written in the rules file, in `kind`; ValueError says what was expected."""
    try:
        return _PARSE_OPERAND[kind](raw)
    except (TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"expected {_EXPECTED[kind]}: {raw!r} is not one") from error


def _number(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise TypeError(raw)
    return float(raw)


def _date(raw: Any) -> dt.date:
    if isinstance(raw, dt.datetime) or not isinstance(raw, dt.date | str):
        raise TypeError(raw)
    if isinstance(raw, dt.date):
        return raw
    return dt.date.fromisoformat(raw) if "-" in raw else _dicom(DA, raw, dt.date)


def _time(raw: Any) -> dt.time:
    if not isinstance(raw, str):  # 0830 unquoted is the number 830 in YAML
        raise TypeError(raw)
    return dt.time.fromisoformat(raw) if ":" in raw else _dicom(TM, raw, dt.time)


def _datetime(raw: Any) -> dt.datetime:
    if isinstance(raw, dt.datetime):
        return raw.replace(tzinfo=None)
    if isinstance(raw, dt.date):
        return dt.datetime(raw.year, raw.month, raw.day)
    if not isinstance(raw, str):
        raise TypeError(raw)
    if "-" in raw or ":" in raw:
        return dt.datetime.fromisoformat(raw).replace(tzinfo=None)
    value: dt.datetime = _dicom(DT, raw, dt.datetime)
    return value.replace(tzinfo=None)


def _age(raw: Any) -> float:
    if isinstance(raw, str) and not raw.strip().replace(".", "", 1).isdigit():
        return age_in_years(raw)
    return _number(raw)


def _text(raw: Any) -> str:
    if not isinstance(raw, str):  # a number here lost its leading zeros: ask for quotes
        raise TypeError(raw)
    return raw.strip()


def _address(raw: Any) -> Any:
    return ipaddress.ip_address(_text(raw))


def _dicom(kind: Callable[[str], Any], raw: str, python_type: type) -> Any:
    value = kind(raw)
    if not isinstance(value, python_type):
        raise ValueError(raw)
    return value


def _network(raw: Any) -> Any:
    try:
        return ipaddress.ip_network(_text(raw), strict=False)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"expected a network like 10.0.0.0/8 or an address: {raw!r} is not one"
        ) from error


_PARSE_OPERAND: dict[Kind, Callable[[Any], Any]] = {
    Kind.number: _number,
    Kind.date: _date,
    Kind.time: _time,
    Kind.datetime: _datetime,
    Kind.age: _age,
    Kind.text: _text,
    Kind.name: _text,
    Kind.address: _address,
}

_EXPECTED = {
    Kind.number: "a number",
    Kind.date: "a date like 2024-01-31 or 20240131",
    Kind.time: "a time in quotes like '08:30' or '083000'",
    Kind.datetime: "a date-time like 2024-01-31T08:30:00",
    Kind.age: "an age in years (45) or an Age String (045Y, 006M)",
    Kind.text: "text (quote values that look like numbers: '0001')",
    Kind.name: "a name, or one component of it, as text",
    Kind.address: "an IP address like 10.0.0.7",
}


def _hint(kind: Kind) -> str:
    return (
        "use equals, in, less_than, greater_than, at_least, at_most or between"
        if kind.ordered
        else "use equals or in"
    )


def _as_list(raw: Any) -> list[Any]:
    return list(raw) if isinstance(raw, list) else [raw]


def _written(raw: Any) -> str:
    if isinstance(raw, list):
        return "[" + ", ".join(_written(item) for item in raw) + "]"
    if isinstance(raw, dt.date | dt.time):
        return raw.isoformat()
    if isinstance(raw, bool):
        return str(raw).lower()
    return str(raw)
