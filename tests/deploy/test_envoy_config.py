"""deploy/envoy/envoy.yaml is a valid Envoy bootstrap whose ext_authz filter asks the PDP.

Envoy cannot run here, so the file is parsed into ``envoy.config.bootstrap.v3.Bootstrap``
with protobuf's ``json_format``: an unknown field, a wrong type or a ``typed_config`` whose
type xds-protos does not define fails the parse. Then the settings that keep the door
closed are checked one by one.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2, json_format, message, symbol_database

from pdp.server.ext_authz import ModelRoutes
from tests.harness import ROOT

ENVOY = ROOT / "deploy" / "envoy" / "envoy.yaml"
# Every typed_config the file may use, and the xds-protos module that defines it.
TYPED = {
    module.DESCRIPTOR.message_types_by_name[name].full_name
    for module, name in (
        (http_connection_manager_pb2, "HttpConnectionManager"),
        (ext_authz_pb2, "ExtAuthz"),
        (ext_authz_pb2, "ExtAuthzPerRoute"),
        (router_pb2, "Router"),
        (header_mutation_pb2, "HeaderMutation"),
        (tls_pb2, "UpstreamTlsContext"),
        (http_protocol_options_pb2, "HttpProtocolOptions"),
    )
}


@pytest.fixture(scope="module")
def bootstrap() -> Any:
    document = yaml.safe_load(ENVOY.read_text())
    return json_format.ParseDict(document, bootstrap_pb2.Bootstrap())


def typed_configs(value: message.Message) -> list[any_pb2.Any]:
    """Every Any in the message tree, depth first."""
    found = []
    for field, item in value.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        if field.message_type.GetOptions().map_entry:
            items = [entry for entry in item.values() if isinstance(entry, message.Message)]
        elif field.is_repeated:
            items = list(item)
        else:
            items = [item]
        for child in items:
            if isinstance(child, any_pb2.Any):
                found.append(child)
            found.extend(typed_configs(child))
    return found


def unpack(packed: any_pb2.Any, cls: Any) -> Any:
    value = cls()
    assert packed.Unpack(value), f"{packed.type_url} is not {cls.DESCRIPTOR.full_name}"
    return value


def unpack_any(packed: any_pb2.Any) -> Any:
    """Unpack by the type URL alone, as Envoy does: the type must be known to protobuf."""
    cls = symbol_database.Default().GetSymbol(packed.TypeName())
    return unpack(packed, cls)


def test_every_typed_config_resolves_from_xds_protos(bootstrap: Any) -> None:
    seen: list[str] = []
    pending = typed_configs(bootstrap)
    while pending:  # typed_configs inside typed_configs too (the filters inside the HCM)
        packed = pending.pop()
        seen.append(packed.TypeName())
        pending.extend(typed_configs(unpack_any(packed)))
    assert set(seen) == TYPED  # each type used, each one known; none left opaque
    assert len(seen) == 10  # HCM, its header mutation, 2 filters, 2 per-route, 3 TLS, HTTP/2


def manager(bootstrap: Any) -> Any:
    [listener] = bootstrap.static_resources.listeners
    [chain] = listener.filter_chains
    [network] = chain.filters
    return unpack(network.typed_config, http_connection_manager_pb2.HttpConnectionManager)


def test_ext_authz_asks_the_pdp_and_fails_closed(bootstrap: Any) -> None:
    hcm = manager(bootstrap)
    names = [f.name for f in hcm.http_filters]
    assert names == ["envoy.filters.http.ext_authz", "envoy.filters.http.router"]
    authz = unpack(hcm.http_filters[0].typed_config, ext_authz_pb2.ExtAuthz)
    assert authz.failure_mode_allow is False
    assert authz.transport_api_version == config_source_pb2.ApiVersion.Value("V3")
    assert authz.status_on_error.code == 503
    assert 0 < authz.grpc_service.timeout.ToMilliseconds() <= 1000
    assert not authz.HasField("with_request_body")  # plain HTTP: headers only
    cluster = {c.name: c for c in bootstrap.static_resources.clusters}[
        authz.grpc_service.envoy_grpc.cluster_name
    ]
    [endpoint] = cluster.load_assignment.endpoints[0].lb_endpoints
    assert endpoint.endpoint.address.socket_address.port_value == 9191
    options = unpack(
        cluster.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ],
        http_protocol_options_pb2.HttpProtocolOptions,
    )
    assert options.explicit_http_config.HasField("http2_protocol_options")  # gRPC
    tls = unpack(cluster.transport_socket.typed_config, tls_pb2.UpstreamTlsContext)
    assert tls.common_tls_context.tls_certificates  # a client certificate: mTLS
    assert tls.common_tls_context.validation_context.trusted_ca.filename


def test_model_routes_forward_their_whole_body_under_the_pdps_prefixes(bootstrap: Any) -> None:
    defaults = ModelRoutes()
    routes = {
        route.match.prefix: route
        for host in manager(bootstrap).route_config.virtual_hosts
        for route in host.routes
    }
    for prefix in (defaults.openai, defaults.anthropic):
        assert prefix is not None
        per_route = unpack(
            routes[prefix].typed_per_filter_config["envoy.filters.http.ext_authz"],
            ext_authz_pb2.ExtAuthzPerRoute,
        )
        body = per_route.check_settings.with_request_body
        assert body.max_request_bytes >= 1024 * 1024 and body.allow_partial_message is False
        assert body.pack_as_bytes is True
        assert routes[prefix].route.prefix_rewrite == "/"


def test_the_run_header_and_request_id_are_set_by_envoy_not_the_agent(bootstrap: Any) -> None:
    hcm = manager(bootstrap)
    assert hcm.preserve_external_request_id is False  # the agent's id could replay an allow
    [extension] = hcm.early_header_mutation_extensions
    mutation = unpack(extension.typed_config, header_mutation_pb2.HeaderMutation)
    [append] = [m.append for m in mutation.mutations]
    assert append.header.key == "x-abc-run"
    assert append.append_action == append.OVERWRITE_IF_EXISTS_OR_ADD
