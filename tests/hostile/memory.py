"""What a node process costs while it is attacked: its resident memory, its threads."""

from __future__ import annotations

from pathlib import Path


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/{pid}/status")


def children(pid: int) -> list[int]:
    """The process's children (receiver processes), recursively."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "children").read_text()
        except OSError:
            continue
        for child in map(int, text.split()):
            found += [child, *children(child)]
    return found


def resident_mb(pid: int) -> float:
    """Resident memory of the process and its children, in MiB."""
    return sum(_status(p, "VmRSS") for p in [pid, *children(pid)]) / 1024


def peak_mb(pid: int) -> float:
    """The high-water mark of resident memory (VmHWM) of the process and its children, MiB:
    a spike between two samples still shows."""
    return sum(_status(p, "VmHWM") for p in [pid, *children(pid)]) / 1024


def threads(pid: int) -> int:
    return sum(_status(p, "Threads") for p in [pid, *children(pid)])


def reset_peak(pid: int) -> None:
    """Start the high-water mark afresh (Linux: 5 to clear_refs), so `peak_mb` measures the
    attack, not the node's start-up."""
    for p in [pid, *children(pid)]:
        Path(f"/proc/{p}/clear_refs").write_text("5")
