"""grpc.aio server interceptors, each covering unary and streaming methods."""
