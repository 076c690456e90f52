"""cadnode.dicom.matching's value matching as SQL conditions, for the query index.

A column holds each value as matching compares it (`comparable`: without its padding, a name
in upper case, "" for none), so each kind of `Wanted` is one comparison: a single value is
`=`, a list of UIDs `IN`, a range `>=` and a prefix `<=`, wildcards a case-sensitive pattern
(SQLite's GLOB, PostgreSQL's LIKE: cadnode.core.connection.Wildcard), as matching is on
values already comparable. An empty value never matches, as in matching.
tests/test_matching_sql.py holds the two to the same table of cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, true

from cadnode.core.connection import Wildcard
from cadnode.dicom.matching import How, Wanted


def condition(column: Any, alternatives: Sequence[Wanted]) -> ColumnElement[bool]:
    """Where the column's value satisfies one of the alternatives (never where it is "")."""
    return and_(column != "", or_(*(_satisfies(column, wanted) for wanted in alternatives)))


def _satisfies(column: Any, wanted: Wanted) -> ColumnElement[bool]:
    if wanted.how is How.uid_list:
        return column.in_(wanted.values)  # type: ignore[no-any-return]
    if wanted.how is How.range:
        low, high = wanted.values
        bounds: list[ColumnElement[bool]] = []
        if low:
            bounds.append(column >= low)
        if high:
            bounds.append(func.substr(column, 1, len(high)) <= high)
        return and_(true(), *bounds)
    if wanted.how is How.wildcard:
        return Wildcard(column, wanted.values[0])
    return column == wanted.values[0]  # type: ignore[no-any-return]

