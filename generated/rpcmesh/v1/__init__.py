"""Generated protobuf and gRPC stubs for the `rpcmesh.v1` contracts (do not edit)."""
