"""Alembic environment: always run through ``enginedge.adapters.store.migrate``.

That code opens the connection (async engine, ``run_sync``) and hands it over in
``config.attributes["connection"]``, so the same migrations serve SQLite and PostgreSQL.
"""

from alembic import context

from enginedge.adapters.store.tables import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
