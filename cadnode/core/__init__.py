"""The shared ground every stage stands on: configuration, the database, the stage
runner, locks, durable files, YAML loading, logs and the audit trail."""
