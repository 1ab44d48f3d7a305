"""gRPC servicers: validate, convert proto <-> domain, own the unit of work, call repositories."""
