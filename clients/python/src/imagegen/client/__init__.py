"""A small Python client for imagegen, for agents, workflows and the CLI.

Public surface: `ImageGenClient`, `GeneratedImage`, `GenerationResult`,
`PromptSuggestion`, `EnhancedPrompt`, and `CHANNEL_OPTIONS` for channels a caller opens
itself.
"""

from importlib import metadata as _metadata

from imagegen.client._client import (
    CHANNEL_OPTIONS,
    EnhancedPrompt,
    GeneratedImage,
    GenerationResult,
    ImageGenClient,
    PromptSuggestion,
)

try:
    __version__ = _metadata.version("imagegen-client")
except _metadata.PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CHANNEL_OPTIONS",
    "EnhancedPrompt",
    "GeneratedImage",
    "GenerationResult",
    "ImageGenClient",
    "PromptSuggestion",
]
