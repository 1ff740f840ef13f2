"""Generated from proto/imagegen/v1 by scripts/gen_proto.py. Do not edit."""
