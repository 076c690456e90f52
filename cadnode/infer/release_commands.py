"""`cadnode engines promote | rollback | shadow | retire`: change which version of an engine is
live and which run in shadow (the release table, cadnode/infer/releases.py).

Before a promotion or a rollback the admin sees the version's model card (intended use,
metrics, operating points) and the comparison with the live version so far (cadnode.watch
.agreement), and confirms (`--yes` skips the question). A running node routes the next job
by the new table: no restart.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cadnode.core import audit
from cadnode.core.config import Settings
from cadnode.core.db import Database, ReleaseRole, utcnow
from cadnode.core.yamlfile import ConfigError
from cadnode.infer import releases
from cadnode.infer.bundle import Bundle, discover_versions, version_order

COMMANDS = ("promote", "rollback", "shadow", "retire")
Ask = Callable[[str], str]
Say = Callable[[str], None]


def add_release_commands(actions: Any) -> None:
    promote = actions.add_parser(
        "promote", help="make a version live (the live one becomes shadow, or retired)"
    )
    promote.add_argument("name", metavar="NAME")
    promote.add_argument("version", metavar="VERSION")
    rollback = actions.add_parser("rollback", help="put back the version live before this one")
    rollback.add_argument("name", metavar="NAME")
    for command in (promote, rollback):
        command.add_argument(
            "--retire", action="store_true", help="retire the live version instead of shadowing it"
        )
        command.add_argument("--yes", action="store_true", help="do not ask to confirm")
        command.add_argument(
            "--since", default="7d", help="the comparison's window (default 7d; 12h, 30d, ...)"
        )
    for role, words in (
        ("shadow", "run a version in shadow on the live version's inputs"),
        ("retire", "stop running a version (it stays installed)"),
    ):
        command = actions.add_parser(role, help=words)
        command.add_argument("name", metavar="NAME")
        command.add_argument("version", metavar="VERSION")


def release_command(
    settings: Settings, args: argparse.Namespace, ask: Ask = input, say: Say = print
) -> int:
    try:
        bundles = versions_of(settings.engines.dir, args.name)
    except ConfigError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return 2
    installed = list(bundles)
    database = Database(settings.database_url)
    actor = f"cli:{getpass.getuser()}"  # who, for the audit trail
    try:
        if args.engines_command in ("shadow", "retire"):
            role = ReleaseRole.shadow if args.engines_command == "shadow" else ReleaseRole.retired
            after = releases.set_role(
                database, args.name, args.version, role, installed, actor=actor
            )
        else:
            target = _target(database, args, installed)
            # Shown with --yes too: a scripted promotion's output records what it acted on.
            _show(settings, database, args, bundles[target], say)
            if not args.yes and not _confirmed(args, bundles[target], ask):
                say("nothing changed")
                return 1
            after = (
                releases.promote(
                    database, args.name, target, installed, retire=args.retire, actor=actor
                )
                if args.engines_command == "promote"
                else releases.rollback(
                    database, args.name, installed, retire=args.retire, actor=actor
                )
            )
    except (releases.ReleaseError, ValueError) as error:
        print(f"cadnode engines {args.engines_command}: {error}", file=sys.stderr)
        return 2
    shadows = ", ".join(after.shadows) or "none"
    say(f"{args.name}: live {after.live}, shadow {shadows} (for jobs routed from now on)")
    return 0


def versions_of(engines_dir: Path, name: str) -> dict[str, Bundle]:
    """The installed versions of one engine, by version; ConfigError when there is none."""
    found = {v: b for (n, v), b in discover_versions(engines_dir).items() if n == name}
    if not found:
        raise ConfigError([f"{engines_dir}: no engine named {name!r} installed"])
    return dict(sorted(found.items(), key=lambda item: version_order(item[0])))


def roles_of(settings: Settings) -> dict[tuple[str, str], str]:
    """Every installed version's role, for `cadnode engines list`."""
    by_name: dict[str, list[str]] = {}
    try:
        installed = discover_versions(settings.engines.dir)
    except ConfigError:  # the list shows each faulty bundle; roles need them all sound
        return {}
    for name, version in installed:
        by_name.setdefault(name, []).append(version)
    database = Database(settings.database_url)
    with database.session() as session:
        return {
            (name, version): role
            for name, versions in by_name.items()
            for version, role in releases.roles(session, name, versions).items()
        }


def _target(database: Database, args: argparse.Namespace, installed: list[str]) -> str:
    """The version that will be live: the one named, or the one a rollback puts back."""
    if args.engines_command == "promote":
        return str(args.version)
    return releases.rollback_target(database, args.name, installed)


def _show(
    settings: Settings, database: Database, args: argparse.Namespace, bundle: Bundle, say: Say
) -> None:
    """The model card's summary and the comparison so far, before anything changes."""
    for line in card_summary(bundle):
        say(line)
    say("")
    say(comparison(settings, database, args.name, _window(args.since)))


def _confirmed(args: argparse.Namespace, bundle: Bundle, ask: Ask) -> bool:
    demoted = "retired" if args.retire else "shadow"
    question = (
        f"Make {args.name} {bundle.manifest.version} live (the live version becomes "
        f"{demoted}) for jobs routed from now on? [y/N] "
    )
    try:
        return ask(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def card_summary(bundle: Bundle) -> list[str]:
    """What the model card says an admin must know before a version goes live."""
    manifest = bundle.manifest
    provenance = manifest.provenance
    lines = [
        f"{manifest.name} {manifest.version} ({manifest.task.value}), {bundle.folder}",
        f"  model sha256 {bundle.sha256}",
        f"  intended use: {provenance.intended_use}",
        f"  training data: {provenance.training_data}",
        f"  built {provenance.date} from {provenance.code_revision}",
    ]
    for name, value in provenance.metrics.items():
        interval = provenance.confidence_intervals.get(name)
        shown = f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""
        lines.append(f"  {name}: {value:.4f}{shown}")
    for name, point in manifest.operating_points.items():
        figures = [
            f"{figure} {value:.4f}"
            for figure, value in (
                ("sensitivity", point.sensitivity),
                ("specificity", point.specificity),
            )
            if value is not None
        ]
        lines.append(
            f"  operating point {name}: threshold {point.threshold:.4f} {', '.join(figures)}"
        )
    return lines


def comparison(settings: Settings, database: Database, name: str, since: dt.timedelta) -> str:
    """The live and shadow versions compared so far (cadnode.watch.agreement), if available."""
    try:
        from cadnode.watch.agreement import comparison_text
    except ImportError:
        return "comparison not available"
    try:
        return comparison_text(database, name, since, answers=settings.storage.answers)
    except Exception as error:  # the prompt still shows the model card; say why not this
        return f"comparison not available: {type(error).__name__}: {error}"


def _window(text: str) -> dt.timedelta:
    """`--since` as a duration back from now (7d, 12h) or an ISO 8601 time."""
    now = utcnow()
    return now - audit.parse_since(text, now)
