"""gRPC edge of the runtime: the only package that imports generated protobuf code."""
