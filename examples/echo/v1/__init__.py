"""Generated protobuf and gRPC stubs for the `echo.v1` contracts (do not edit)."""
