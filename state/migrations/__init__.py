"""Alembic migrations of the store (env.py, versions/), run by `state.schema`; no alembic.ini."""
