"""Alembic environment: pclited passes its own connection; the alembic CLI gets the URL from pclited's settings."""

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine

from service.models import Base

config = context.config
if config.config_file_name and config.get_main_option("sqlalchemy.url") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _run(connection) -> None:
    # Batch mode: SQLite can only change a table by copying it.
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        from service.core.config import load_settings
        from service.core.db import normalize_url
        url = normalize_url(load_settings().database_url)
    engine = create_engine(url)
    with engine.connect() as conn:
        _run(conn)
        conn.commit()
    engine.dispose()


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=Base.metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
