"""Database layer: engine and sessions, models, embedded PostgreSQL, transaction helpers."""
