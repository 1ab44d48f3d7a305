"""What runs around the service: Envoy in front of replicas (envoy/, cluster.py), Patroni."""
