"""The gRPC room: what only gRPC knows. Servicers (convert -> call -> convert), the converters
(one per aggregate), wire validation, page tokens, interceptors, status and context helpers,
the compiled StreamUsers encoder."""
