"""One repository per aggregate: SQL only. Each is built one way, on the handle its door gave:
Repository(session) in a unit of work, Repository(conn) in a batch (the Core statements run on
either; the ORM ones need the session). They add, query and flush, never commit."""
