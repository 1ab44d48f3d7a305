"""The servicer context type every handler takes."""

from typing import Any

import grpc

Context = grpc.aio.ServicerContext[Any, Any]
