"""imagegen: a gRPC service that makes and edits images with AI."""

# `imagegen.v1` (the generated contract) is built from generated/ and may sit in
# another directory than this file in an editable install; let it join the package.
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"
