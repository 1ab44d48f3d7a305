"""Load benchmarks for shop.v1 (`make bench`)."""
