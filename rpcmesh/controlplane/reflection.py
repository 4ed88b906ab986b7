"""Server reflection under both names: ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.

grpcio-reflection (1.85) ships only the v1alpha service, but current clients
(grpcurl, grpc-node's reflection clients, Postman) ask for
``grpc.reflection.v1.ServerReflection`` first. The two protos are the same
messages with the same field numbers under a different package, so one
servicer answers both: the v1 service is registered with v1alpha's
(de)serializers, which read and write v1's bytes unchanged.

So that a client which asks reflection about the v1 service itself gets an
answer, a ``grpc/reflection/v1/reflection.proto`` descriptor is put into the
default pool, built from v1alpha's by renaming the package (file options are
dropped; they only name other languages' packages).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1_FILE_NAME = "grpc/reflection/v1/reflection.proto"
_ALPHA_PACKAGE = "grpc.reflection.v1alpha"
_V1_PACKAGE = "grpc.reflection.v1"
_METHOD = "ServerReflectionInfo"


def _register_v1_file() -> None:
    """Add the v1 reflection proto's descriptor to the default pool, once."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE_NAME)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = V1_FILE_NAME
    proto.package = _V1_PACKAGE
    proto.ClearField("options")
    old, new = f".{_ALPHA_PACKAGE}.", f".{_V1_PACKAGE}."
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old) :]
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old) :]
            method.output_type = new + method.output_type[len(old) :]
    pool.AddSerializedFile(proto.SerializeToString())


def add_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serve reflection, v1 and v1alpha, on server for service_names (both reflection names added).

    server may be a registering proxy (security guard, tracing): the handlers
    go through its ``add_generic_rpc_handlers``/``add_registered_method_handlers``.
    """
    _register_v1_file()
    names = [*service_names]
    for name in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME):
        if name not in names:
            names.append(name)
    servicer = reflection.aio.ReflectionServicer(names)
    for service_name in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME):
        handlers = {
            _METHOD: grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
        server.add_registered_method_handlers(service_name, handlers)
