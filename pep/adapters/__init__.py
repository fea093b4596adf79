"""Protocol adapters, siblings of one shape: request → action, verdict → refusal."""

from pep.adapters.anthropic import AnthropicAdapter
from pep.adapters.base import Adapter, Call
from pep.adapters.http import HttpAdapter
from pep.adapters.mcp import McpAdapter
from pep.adapters.openai import OpenAIAdapter

__all__ = ["Adapter", "AnthropicAdapter", "Call", "HttpAdapter", "McpAdapter", "OpenAIAdapter"]
