"""The prompt assistant's use cases (PromptAssistantService), one module each:

- suggestions.py  SuggestPrompts: ranked completions from the caller's own prompts, the
                  templates they can see and the built-in phrases, read through
                  repositories/prompts.py and ranked by domain/suggestions.py.
- enhancement.py  EnhancePrompt: the chat model (providers/chat_enhancer.py) or the local
                  enhancer (domain/enhancement.py), screened by content moderation
                  (the PromptScreen port), priced and recorded in usage.
"""

from imagegen.services.prompts.enhancement import (
    AllowAllScreen,
    ChatModel,
    Enhancement,
    EnhancementSettings,
    PromptEnhancement,
    PromptScreen,
)
from imagegen.services.prompts.suggestions import PromptSuggestions, SuggestionSettings

__all__ = [
    "AllowAllScreen",
    "ChatModel",
    "Enhancement",
    "EnhancementSettings",
    "PromptEnhancement",
    "PromptScreen",
    "PromptSuggestions",
    "SuggestionSettings",
]
