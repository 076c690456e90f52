"""A mask's outlines as closed polylines along its pixels' edges, for graphic annotations.

A presentation state's PIXEL units put 0,0 at the top-left corner of the top-left pixel and
Columns,Rows at the bottom-right corner of the last one, so a path along the edges between
pixels inside and outside the mask is the mask's exact boundary, in whole numbers. The path
is traced edge by edge (crack following), kept only where it turns, then thinned by
Douglas-Peucker within half a pixel (a staircase becomes its diagonal; a single pixel keeps
its four corners) and, when still too long, at doubled tolerances until it fits. Every point
kept is a corner on the boundary: the outline never strays into the mask or away from it
by more than the tolerance, and never has more than `max_points` points.

Regions touching only at a corner are outlined separately (4-connected), and each hole gets
its own outline, so an outline is a simple closed loop. Only the `max_outlines` largest are
kept: a noisy mask cannot make thousands of graphic objects.
"""

from __future__ import annotations

import numpy as np

# Per outline: far below the 8191 points an explicit-VR FL element (16-bit length) can hold.
MAX_POINTS = 1000
# Per mask (one label on one frame): the largest regions and holes, by area.
MAX_OUTLINES = 32
# Half a pixel: a staircase edge is drawn straight, a one-pixel region stays a square.
TOLERANCE = 0.5

# Directions of travel along pixel edges, as (row, column) steps: east, south, west, north.
# The boundary is walked with the mask on the right (clockwise on screen around a region).
_STEPS = ((0, 1), (1, 0), (0, -1), (-1, 0))


def outlines(
    mask: np.ndarray,
    *,
    tolerance: float = TOLERANCE,
    max_points: int = MAX_POINTS,
    max_outlines: int = MAX_OUTLINES,
) -> list[np.ndarray]:
    """Closed polylines around `mask`'s regions and holes, largest first: float arrays of
    (column, row) points in PIXEL units, the first point repeated last."""
    if mask.ndim != 2:
        raise ValueError(f"a mask must be (rows, columns), got {mask.shape}")
    if max_points < 5:
        raise ValueError("an outline needs room for at least 4 corners and the closing point")
    loops = sorted(trace(mask.astype(bool, copy=False)), key=lambda loop: -abs(area(loop)))
    kept = [simplified(loop, tolerance, max_points - 1) for loop in loops[:max_outlines]]
    return [np.vstack([loop, loop[:1]])[:, ::-1].astype(float) for loop in kept]


def trace(mask: np.ndarray) -> list[np.ndarray]:
    """Every boundary loop of `mask` as an (n, 2) int array of (row, column) corners where the
    boundary turns, not closed (the last corner joins the first)."""
    width = mask.shape[1] + 1  # corners per row: a corner's id is row * width + column
    exits = _boundary_edges(mask, width)
    loops = []
    for start in sorted(exits):
        while exits.get(start):
            loops.append(_walk(exits, start, exits[start][0], width))
    return [np.array([divmod(corner, width) for corner in loop]) for loop in loops]


def _boundary_edges(mask: np.ndarray, width: int) -> dict[int, list[int]]:
    """For each corner, the directions of the boundary edges that leave it (two where two
    regions touch diagonally, else one)."""
    padded = np.pad(mask, 1)
    inside = padded[1:-1, 1:-1]
    # An inside pixel's edge is on the boundary where its neighbour across it is outside;
    # each edge starts at the corner that keeps the pixel on the right of the walk.
    sides = (
        (inside & ~padded[:-2, 1:-1], (0, 0)),  # top edge, walked east from its left corner
        (inside & ~padded[1:-1, 2:], (0, 1)),  # right edge, south from its top corner
        (inside & ~padded[2:, 1:-1], (1, 1)),  # bottom edge, west from its right corner
        (inside & ~padded[1:-1, :-2], (1, 0)),  # left edge, north from its bottom corner
    )
    exits: dict[int, list[int]] = {}
    for direction, (edges, (down, right)) in enumerate(sides):
        rows, columns = np.nonzero(edges)
        for corner in ((rows + down) * width + columns + right).tolist():
            exits.setdefault(corner, []).append(direction)
    return exits


def _walk(exits: dict[int, list[int]], start: int, heading: int, width: int) -> list[int]:
    """Follow the boundary from `start`, leaving along `heading`, until the loop closes,
    using up its edges; the corners where it turns."""
    offsets = [row * width + column for row, column in _STEPS]
    first_heading, corner = heading, start
    walked: list[tuple[int, int]] = []  # (corner, heading leaving it), one per edge
    while True:
        exits[corner].remove(heading)
        walked.append((corner, heading))
        corner += offsets[heading]
        # Back at the start, the first edge is a way on too: taking it closes the loop.
        ways = exits.get(corner, []) + ([first_heading] if corner == start else [])
        heading = _way_on(ways, arrived=heading)
        if corner == start and heading == first_heading:
            break
    # Keep the corners where the walk turns (the first compared with the last edge's heading).
    return [
        corner
        for (corner, leaving), (_, before) in zip(walked, walked[-1:] + walked[:-1], strict=True)
        if leaving != before
    ]


def _way_on(ways: list[int], *, arrived: int) -> int:
    """The way on from a corner: the only one or, where two regions touch diagonally, the
    right turn (around the pixel just passed, so diagonal neighbours get separate loops)."""
    if len(ways) == 1:
        return ways[0]
    right_turn = (arrived + 1) % 4
    if right_turn not in ways:
        raise AssertionError(f"boundary walk lost at a corner with ways {ways}")
    return right_turn


def area(loop: np.ndarray) -> float:
    """Signed area enclosed by a loop of (row, column) points (shoelace): positive around a
    region, negative around a hole."""
    rows, columns = loop[:, 0].astype(float), loop[:, 1].astype(float)
    return float(np.dot(columns, np.roll(rows, -1)) - np.dot(rows, np.roll(columns, -1))) / 2


def simplified(loop: np.ndarray, tolerance: float, max_points: int) -> np.ndarray:
    """The loop's corners thinned by Douglas-Peucker within `tolerance`, the tolerance
    doubled until at most `max_points` remain."""
    while True:
        kept: np.ndarray = loop[_douglas_peucker_closed(loop, tolerance)]
        if len(kept) <= max_points:
            return kept
        tolerance *= 2


def _douglas_peucker_closed(loop: np.ndarray, tolerance: float) -> np.ndarray:
    """Indices kept of a closed loop: split at its first point and the point farthest from
    it, each half thinned on its own."""
    count = len(loop)
    if count <= 3:
        return np.arange(count)
    points = loop.astype(float)
    far = int(np.argmax(np.hypot(*(points - points[0]).T)))
    keep = np.zeros(count, dtype=bool)
    keep[[0, far]] = True
    closed = np.vstack([points, points[:1]])
    for first, last in ((0, far), (far, count)):
        _thin(closed, first, last, tolerance, keep)
    return np.nonzero(keep)[0]


def _thin(points: np.ndarray, first: int, last: int, tolerance: float, keep: np.ndarray) -> None:
    """Mark in `keep` the points between `first` and `last` that Douglas-Peucker keeps (an
    explicit stack: a long boundary would exceed Python's recursion limit)."""
    stack = [(first, last)]
    while stack:
        start, end = stack.pop()
        if end - start < 2:
            continue
        between = points[start + 1 : end]
        distances = _distances(between, points[start], points[end])
        worst = int(np.argmax(distances))
        if distances[worst] > tolerance:
            middle = start + 1 + worst
            keep[middle % len(keep)] = True
            stack += [(start, middle), (middle, end)]


def _distances(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Each point's distance to the segment's line (to `start` when the segment is a point)."""
    direction = end - start
    length = float(np.hypot(*direction))
    offsets = points - start
    distances: np.ndarray
    if length == 0.0:
        distances = np.hypot(offsets[:, 0], offsets[:, 1])
    else:
        distances = np.abs(direction[0] * offsets[:, 1] - direction[1] * offsets[:, 0]) / length
    return distances
