"""The ordered comparisons, named once for both condition languages: `match:` on DICOM values
in rules.yaml (cadnode.route.language) and `when:` on engine answers in rules.yaml and
priority.yaml (cadnode.infer.conditions).

`between` takes two bounds, lowest first, both included; the others take one.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any


class Order(StrEnum):
    less_than = "less_than"
    at_most = "at_most"
    greater_than = "greater_than"
    at_least = "at_least"
    between = "between"


COMPARE: dict[Order, Callable[[Any, Any], bool]] = {
    Order.less_than: lambda value, bound: value < bound,
    Order.at_most: lambda value, bound: value <= bound,
    Order.greater_than: lambda value, bound: value > bound,
    Order.at_least: lambda value, bound: value >= bound,
    Order.between: lambda value, bounds: bounds[0] <= value <= bounds[1],
}
