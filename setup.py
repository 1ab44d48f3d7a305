"""The one compiled module: StreamUsers' batch encoder (service/api/_user_batch.c).

Everything else is declared in pyproject.toml. The extension is optional: where it does not
compile (no C compiler, another platform) the install goes on without it and
service/api/users_encode.py falls back to upb.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "service.api._user_batch",
            sources=["service/api/_user_batch.c"],
            optional=True,
        )
    ]
)
