"""The Envoy bootstrap for N replicas, rendered from envoy.template.yaml beside this file.

    from deploy.envoy.config import render
    text = render([("127.0.0.1", 50051), ("10.0.0.2", 50051)], listen_port=8080, admin_port=9901)
    Path("envoy.yaml").write_text(text)   # envoy -c envoy.yaml

`render(endpoints, *, listen_port, admin_port, descriptor=DESCRIPTOR, listen_host="127.0.0.1",
admin_host="127.0.0.1") -> str` returns YAML text (Envoy reads it from a file named *.yaml).
`endpoints` are the replicas' (IP address, gRPC port) pairs: the cluster is STATIC, so give IP
addresses, not host names. `descriptor` is the FileDescriptorSet `make generate` builds for the
JSON transcoder; Envoy reads it at start, so pass an absolute path. The template holds the whole
policy (routes, retries, health checks, outlier detection); this module only fills in addresses.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from pathlib import Path
from string import Template

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = Path(__file__).with_name("envoy.template.yaml")
DESCRIPTOR = ROOT / "generated" / "descriptors" / "shop_v1.binpb"


def render(
    endpoints: Sequence[tuple[str, int]],
    *,
    listen_port: int,
    admin_port: int,
    descriptor: Path = DESCRIPTOR,
    listen_host: str = "127.0.0.1",
    admin_host: str = "127.0.0.1",
) -> str:
    """Envoy's bootstrap YAML: `listen_host:listen_port` in front of `endpoints`, the admin
    interface on `admin_host:admin_port`."""
    if not endpoints:
        raise ValueError("an Envoy cluster needs at least one endpoint")
    for host, _ in (*endpoints, (listen_host, 0), (admin_host, 0)):
        ipaddress.ip_address(host)  # ValueError for a host name: STATIC wants addresses
    lb_endpoints = [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
        for host, port in endpoints
    ]
    # JSON is YAML's flow style, so the lists and strings drop into the template as they are.
    return Template(TEMPLATE.read_text()).substitute(
        lb_endpoints=json.dumps(lb_endpoints),
        listen_host=json.dumps(listen_host),
        listen_port=int(listen_port),
        admin_host=json.dumps(admin_host),
        admin_port=int(admin_port),
        descriptor=json.dumps(str(Path(descriptor).resolve())),
    )
