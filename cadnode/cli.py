"""The `cadnode` command: serve, and the admin's views and checks."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from cadnode.admin.backup import add_backup_command, backup_command
from cadnode.admin.commands import COMMANDS as ADMIN_COMMANDS
from cadnode.admin.commands import add_admin_commands, admin_command, hash_password_command
from cadnode.admin.schema import add_db_commands, db_command
from cadnode.core import connection, logs
from cadnode.core.config import Settings, load_settings
from cadnode.core.db import Database, Delivery, DeliveryState, Instance, Job, Result, Study
from cadnode.core.migrations import SchemaError
from cadnode.core.yamlfile import ConfigError
from cadnode.deliver import outbox_admin as deliveries
from cadnode.feedback.labels import rules_at
from cadnode.infer.answers import SegmentAnswer, parse_answer, summary
from cadnode.infer.bundle import discover, discover_versions
from cadnode.infer.release_commands import COMMANDS as RELEASE_COMMANDS
from cadnode.infer.release_commands import add_release_commands, release_command, roles_of
from cadnode.prioritize.history import history_line, study_priority
from cadnode.prioritize.policy import load_policy, unknown_engines
from cadnode.retain.commands import COMMANDS as RETAIN_COMMANDS
from cadnode.retain.commands import add_retain_commands, retain_command
from cadnode.route import RuleSet, load_rules
from cadnode.route.explain import CASES, Connection, explain, read_subjects, run_cases
from cadnode.watch.agreement import add_compare_command, compare_command
from cadnode.watch.drift_listing import add_drift_command, drift_command
from cadnode.watch.listing import add_alerts_command, alerts_command
from cadnode.watch.performance_listing import add_performance_command, performance_command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cadnode", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the node (DICOM SCP and every stage)")
    studies = commands.add_parser("studies", help="received studies, their state and results")
    studies.add_argument("--json", action="store_true", help="one JSON document")
    commands.add_parser("check", help="validate configuration, rules and engines, then exit")
    add_rules_commands(commands)
    add_engines_commands(commands)
    add_deliveries_commands(commands)
    add_admin_commands(commands)
    add_retain_commands(commands)
    add_alerts_command(commands)
    add_performance_command(commands)
    add_db_commands(commands)
    add_backup_command(commands)
    args = parser.parse_args(argv)

    logs.configure()
    if args.command == "hash-password":
        return hash_password_command()
    try:
        settings = load_settings()
        if args.command in ADMIN_COMMANDS:
            return admin_command(settings, args)
        if args.command in RETAIN_COMMANDS:
            return retain_command(settings, args)
        if args.command == "serve":
            from cadnode.daemon import serve

            serve(settings)
        elif args.command == "studies":
            show_studies(settings, as_json=args.json)
        elif args.command == "check":
            check_everything(settings)
        elif args.command == "rules":
            return rules_command(settings, args)
        elif args.command == "engines":
            return engines_command(settings, args)
        elif args.command == "deliveries":
            return deliveries_command(settings, args)
        elif args.command == "alerts":
            return alerts_command(settings, args)
        elif args.command == "performance":
            return performance_command(settings, args)
        elif args.command == "db":
            return db_command(settings, args)
        elif args.command == "backup":
            return backup_command(settings, args)
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return 2
    except SchemaError as error:  # the database is not one this cadnode can upgrade
        print(f"database {connection.shown(settings.database_url)}: {error}", file=sys.stderr)
        return 2
    return 0


def check_everything(settings: Settings) -> None:
    from cadnode.infer.backends import backend_faults

    engines = discover(settings.engines.dir)
    if faults := backend_faults(settings.engines, engines):
        raise ConfigError(faults)
    rules = configured_rules(settings)
    policy = load_policy(settings.priority.policy_file)
    print(
        f"configuration OK: {len(engines)} engine(s), {len(rules.rules)} rule(s), "
        f"rules version {rules.version}"
    )
    print(f"priority policy OK: {len(policy.rules)} rule(s), version {policy.version}")
    findings = rules_at(settings.feedback.findings_file)  # ConfigError naming file:line
    print(f"feedback findings OK: {len(findings.findings)} finding(s)")
    for note in unknown_engines(settings.priority.policy_file, policy, engines):
        print(f"note: {note}")


def add_rules_commands(commands: Any) -> None:
    rules = commands.add_parser("rules", help="routing rules: check, explain, test")
    rules_commands = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_commands.add_parser("check", help="validate a rules file; exit 2 on errors")
    check.add_argument("file", nargs="?", type=Path, help="default: the configured rules file")
    explain = rules_commands.add_parser(
        "explain", help="for each DICOM file: the rule that fires, and why the others do not"
    )
    explain.add_argument("files", nargs="+", type=Path, metavar="FILE.dcm")
    explain.add_argument("--calling-ae", help="as if sent by this AE title")
    explain.add_argument("--called-ae", help="as if sent to this AE title (default: ours)")
    explain.add_argument("--source-address", help="as if sent from this IP address")
    test = rules_commands.add_parser(
        "test", help="run regression cases against the rules; exit 1 on any mismatch"
    )
    test.add_argument(
        "cases", nargs="?", type=Path, help="default: rules-tests.yaml beside the rules file"
    )
    for command in (explain, test):
        command.add_argument("--rules", type=Path, help="default: the configured rules file")


def add_engines_commands(commands: Any) -> None:
    engines = commands.add_parser(
        "engines", help="engine bundles: list, info, verify, export-triton"
    )
    actions = engines.add_subparsers(dest="engines_command", required=True)
    actions.add_parser("list", help="name, version, task, backend here, sha256, labels")
    info = actions.add_parser("info", help="one engine's manifest: inputs, labels, provenance")
    info.add_argument("name", metavar="NAME")
    verify = actions.add_parser(
        "verify", help="schema, hashes, load and a test inference per engine; exit 1 on a fault"
    )
    verify.add_argument("names", nargs="*", metavar="NAME", help="default: every engine")
    from cadnode.infer.triton_repository import add_export_arguments

    add_export_arguments(actions)
    add_compare_command(actions)
    add_release_commands(actions)
    add_drift_command(actions)


def engines_command(settings: Settings, args: argparse.Namespace) -> int:
    if args.engines_command == "compare":  # the database only: no engine to load
        return compare_command(settings, args)
    if args.engines_command in RELEASE_COMMANDS:  # the release table (cadnode/infer/releases.py)
        return release_command(settings, args)
    if args.engines_command == "drift":  # the database and the manifests only
        return drift_command(settings, args)
    from cadnode.infer import catalogue  # loads ONNX Runtime; only these commands need it

    if args.engines_command == "list":
        return catalogue.list_engines(settings.engines, roles=roles_of(settings))
    if args.engines_command == "info":
        return catalogue.describe(settings.engines, args.name)
    if args.engines_command == "export-triton":
        from cadnode.infer.triton_repository import export_command

        return export_command(settings.engines, args)
    plans = settings.storage.data_dir / "plans"
    return catalogue.verify(settings.engines, args.names, limits=settings.limits, plan_cache=plans)


def rules_command(settings: Settings, args: argparse.Namespace) -> int:
    if args.rules_command == "check":
        rules = configured_rules(settings, args.file)
        print(f"{rules.path}: {len(rules.rules)} rule(s) OK, version {rules.version}")
        return 0
    rules = configured_rules(settings, args.rules)
    if args.rules_command == "explain":
        called_ae = args.called_ae or settings.dicom.ae_title
        connection = Connection(args.calling_ae, called_ae, args.source_address)
        print(explain(rules, read_subjects(args.files, connection)))
        return 0
    results = run_cases(rules, args.cases or (args.rules or settings.rules).parent / CASES)
    for result in results:
        print(result.line())
    failed = sum(result.problem is not None for result in results)
    print(f"{len(results)} case(s), {failed} failed, rules version {rules.version}")
    return 1 if failed else 0


def add_deliveries_commands(commands: Any) -> None:
    deliveries = commands.add_parser(
        "deliveries", help="the outbox: list deliveries, retry dead letters, discard"
    )
    actions = deliveries.add_subparsers(dest="deliveries_command", required=True)
    listing = actions.add_parser("list", help="every delivery, its state and last error")
    listing.add_argument("--state", choices=[s.value for s in DeliveryState])
    listing.add_argument("--json", action="store_true", help="one JSON document")
    retry = actions.add_parser(
        "retry", help="failed deliveries back to pending, due now (the running node sends them)"
    )
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("ids", nargs="*", type=int, default=[], metavar="ID")
    which.add_argument("--all-failed", action="store_true", help="every dead letter")
    discard = actions.add_parser("discard", help="pending or failed deliveries never to be sent")
    discard.add_argument("ids", nargs="+", type=int, metavar="ID")


def deliveries_command(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 1 when any named delivery could not be changed (each says why)."""
    database = Database(settings.database_url)
    if args.deliveries_command == "list":
        state = DeliveryState(args.state) if args.state else None
        rows = deliveries.delivery_rows(database, state, settings.destinations)
        print(json.dumps(rows, indent=2) if args.json else deliveries.table(rows))
        return 0
    actor = f"cli:{getpass.getuser()}"
    if args.deliveries_command == "retry":
        outcomes = deliveries.retry(database, args.ids, actor, all_failed=args.all_failed)
    else:
        outcomes = deliveries.discard(database, args.ids, actor)
    for outcome in outcomes:
        print(outcome.line(), file=sys.stdout if outcome.done else sys.stderr)
    if args.deliveries_command == "retry" and not outcomes:
        print("no failed deliveries")
    return 0 if all(outcome.done for outcome in outcomes) else 1


def configured_rules(settings: Settings, file: Path | None = None) -> RuleSet:
    """The rules file, checked against the installed engines and configured destinations."""
    versions: dict[str, list[str]] = {}
    for name, version in discover_versions(settings.engines.dir):
        versions.setdefault(name, []).append(version)
    return load_rules(file or settings.rules, versions, settings.destinations, versions=versions)


def study_rows(database: Database) -> list[dict[str, Any]]:
    with database.session() as session:
        rows = []
        jobs = session.exec(select(Job).order_by(Job.id)).all()  # type: ignore[arg-type]
        for job in jobs:
            study = session.get(Study, job.study_id)
            assert study is not None
            results = session.exec(  # a shadow version's answers are not results
                select(Result).where(Result.job_id == job.id, col(Result.shadow).is_(False))
            ).all()
            deliveries = session.exec(select(Delivery).where(Delivery.job_id == job.id)).all()
            modalities = session.exec(
                select(Instance.sop_class_uid).where(Instance.job_id == job.id)
            ).all()
            rows.append(
                {
                    "study_uid": study.study_uid,
                    "job": job.id,
                    "version": job.version,
                    "state": job.state.value,
                    "reason": job.reason,
                    "failure": job.failure.value if job.failure else None,
                    "rule": job.rule,
                    "rules_version": job.rules_version,
                    "instances": job.instance_count,
                    "sop_classes": sorted(set(modalities)),
                    "received_at": job.first_instance_at.isoformat(),
                    "updated_at": job.updated_at.isoformat(),
                    "results": [
                        {
                            "engine": r.engine,
                            "version": r.engine_version,
                            "sop_instance_uid": r.sop_instance_uid,
                            **_summary(r.answer),
                        }
                        for r in results
                    ],
                    "deliveries": [
                        {
                            "object_uid": d.object_uid,
                            "destination": d.destination,
                            "state": d.state.value,
                            "attempts": d.attempts,
                            "last_error": d.last_error,
                        }
                        for d in deliveries
                    ],
                    **study_priority(session, study.id),
                }
            )
        return rows


def show_studies(settings: Settings, *, as_json: bool) -> None:
    rows = study_rows(Database(settings.database_url))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'JOB':>4} {'VER':>3} {'STATE':<10} {'PRIO':<6} {'RULE':<18} {'N':>3}  RESULT / REASON")
    for row in rows:
        outcome = "; ".join(
            f"{r['engine']}: {r['summary']}"
            + ("" if r["probability"] is None else f" (p={r['probability']:.3f})")
            for r in row["results"]
        ) or (row["reason"] or "")
        print(
            f"{row['job']:>4} {row['version']:>3} {row['state']:<10} {row['priority'] or '-':<6} "
            f"{row['rule'] or '-':<18} {row['instances']:>3}  {outcome}  [{row['study_uid']}]"
        )
        if row["priority_history"]:
            print(f"{'':>9}priority: {history_line(row)}")


def _summary(stored: dict[str, Any]) -> dict[str, Any]:
    answer = parse_answer(stored)
    probability = None if isinstance(answer, SegmentAnswer) else answer.probability
    return {
        "task": answer.task,
        "summary": summary(answer),
        "probability": probability,
        "ruled_out": answer.ruled_out,
    }


if __name__ == "__main__":
    sys.exit(main())
