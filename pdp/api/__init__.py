"""The public contract both sides may import: the generated gRPC stubs of abc.pdp.v1,
the closed set of reason codes, and the mapping from protocol requests to actions.

``pep`` reaches ``pdp`` only through this package.
"""

from pdp.api.abc.pdp.v1 import pdp_pb2, pdp_pb2_grpc
from pdp.api.reasons import ReasonCode

__all__ = ["ReasonCode", "pdp_pb2", "pdp_pb2_grpc"]
