"""The serving room: builds the grpc.aio server (health, reflection, limits, TLS, security), runs
its workers and shuts it down."""
