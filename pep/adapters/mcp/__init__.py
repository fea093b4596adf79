"""MCP over streamable HTTP: both protocol revisions, decided and filtered.

``adapter``: what a request asks and whether it is decided; ``envelope``: which revision
it speaks and whether its headers agree with its body; ``answers``: every answer read and
its tool lists filtered; ``refusals``: how a refusal is said in each revision.
"""

from pep.adapters.mcp.adapter import McpAdapter
from pep.adapters.mcp.answers import AnswerFilter

__all__ = ["AnswerFilter", "McpAdapter"]
