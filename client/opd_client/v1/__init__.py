"""Generated protobuf/gRPC stubs for opd.v1 (do not edit; see scripts/gen_proto.py)."""
