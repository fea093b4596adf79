"""The public contract both sides may import: the generated gRPC stubs of abc.pdp.v1.

``pep`` reaches ``pdp`` only through this package.
"""

from pdp.api.abc.pdp.v1 import pdp_pb2, pdp_pb2_grpc

__all__ = ["pdp_pb2", "pdp_pb2_grpc"]
