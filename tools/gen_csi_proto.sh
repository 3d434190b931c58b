#!/usr/bin/env bash
# Regenerate the CSI plugin's protobuf and gRPC modules from thinstore/frontends/csi/csi.proto:
#
#   tools/gen_csi_proto.sh          (needs grpcio-tools: pip install -e '.[test]')
#
# The generated csi_pb2.py and csi_pb2_grpc.py are committed, so installing thinstore needs
# only grpcio and protobuf; tests/test_csi_proto.py fails when they no longer match the .proto.
# Run from anywhere: the proto is compiled with the repository root as its include path, so
# the modules import each other as thinstore.frontends.csi.csi_pb2.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. \
    thinstore/frontends/csi/csi.proto
echo "regenerated thinstore/frontends/csi/csi_pb2.py and csi_pb2_grpc.py"
