"""A small Python client for imagegen, for agents, workflows and the CLI.

Public surface: `ImageGenClient`, `GeneratedImage`, `GenerationResult`, and
`CHANNEL_OPTIONS` for channels a caller opens itself.
"""

from imagegen.client._client import (
    CHANNEL_OPTIONS,
    GeneratedImage,
    GenerationResult,
    ImageGenClient,
)

__all__ = ["CHANNEL_OPTIONS", "GeneratedImage", "GenerationResult", "ImageGenClient"]
