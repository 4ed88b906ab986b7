"""Generated protobuf and gRPC stubs for the `shop.v1` contracts (do not edit)."""
