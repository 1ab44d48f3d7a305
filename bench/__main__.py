"""`python -m bench`: a placeholder until the benchmark suite lands."""

from __future__ import annotations


def main() -> int:
    print(
        "shop-service bench: no benchmarks yet; "
        "the benchmark suite arrives with the performance issue."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
