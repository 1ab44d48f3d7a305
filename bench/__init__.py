"""Load benchmarks for shop.v1 (`make bench`): the service beside bare baselines, one run."""
