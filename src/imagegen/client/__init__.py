"""A small Python client for imagegen, for agents, workflows and the CLI.

Public surface: `ImageGenClient`, `GeneratedImage`, `GenerationResult`.
"""

from imagegen.client._client import GeneratedImage, GenerationResult, ImageGenClient

__all__ = ["GeneratedImage", "GenerationResult", "ImageGenClient"]
