"""Container health check for compose (Docker has no gRPC probe; Kubernetes uses its own).

    python /opt/abc/healthcheck.py grpc 127.0.0.1:9191                  # abc-pdp
    python /opt/abc/healthcheck.py http http://127.0.0.1:15090/metrics  # abc-pep

Exit 0 when the PDP's grpc.health.v1 answers SERVING (only once its bundle has compiled and
its log has replayed), or when the sidecar's metrics answer 200 (served only once its
manifest is registered); exit 1 with one line on stderr otherwise.
"""

from __future__ import annotations

import sys
import urllib.request
from collections.abc import Sequence

TIMEOUT_SECONDS = 3.0


def grpc_serving(address: str) -> str | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=TIMEOUT_SECONDS
            )
        except grpc.RpcError as exc:
            return f"{address}: {exc.code().name}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def http_ok(url: str) -> str | None:
    if not url.startswith(("http://", "https://")):
        return f"{url}: not an http(s) URL"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:  # noqa: S310
            return None if response.status == 200 else f"{url}: HTTP {response.status}"
    except OSError as exc:
        return f"{url}: {exc}"


def main(argv: Sequence[str]) -> int:
    checks = {"grpc": grpc_serving, "http": http_ok}
    if len(argv) != 2 or argv[0] not in checks:
        print("usage: healthcheck.py grpc HOST:PORT | http URL", file=sys.stderr)
        return 2
    problem = checks[argv[0]](argv[1])
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
