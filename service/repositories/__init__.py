"""One repository per aggregate: SQL only. Takes an AsyncSession, flushes, never commits."""
