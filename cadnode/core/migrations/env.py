"""Alembic's environment: every command runs through here (cadnode/core/migrations/__init__.py
passes the connection, already in its transaction, as `config.attributes["connection"]`)."""

from __future__ import annotations

from alembic import context

from cadnode.core.migrations.compare import compare_type, models, render_item


def run() -> None:
    if context.is_offline_mode():
        raise RuntimeError("cadnode migrates a live database only (no --sql scripts)")
    context.configure(
        connection=context.config.attributes["connection"],
        target_metadata=models(),
        render_as_batch=True,  # SQLite alters a table by copying it
        compare_type=compare_type,
        render_item=render_item,
        transactional_ddl=True,  # every revision of one upgrade commits together, or none
        # `python -m cadnode.core.migrations revision` reviews what it is about to write
        process_revision_directives=context.config.attributes.get("review"),
    )
    with context.begin_transaction():
        context.run_migrations()


run()
