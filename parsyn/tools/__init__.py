"""Tools for agent workers: each takes JSON arguments and answers with text, within limits.

`Tool` / `@tool` make a typed function a tool (schema from its signature); `Toolbox` holds tools by name
and gives the chat template its `tools` list. Built in: `python_tool()` (the bubblewrap sandbox in
`sandbox.py`), `sql_tool(path)` (read-only SQLite), `search_tool(source)` (BM25 over local documents) and
`calculator_tool()`. A call never raises for what the tool or its arguments do; see `Tool.call`.
"""

from .base import Tool, Toolbox, ToolError, ToolResult, tool
from .calculator import calculator_tool
from .python import python_tool
from .search import search_tool
from .sql import sql_tool

__all__ = ["Tool", "ToolError", "ToolResult", "Toolbox", "tool", "calculator_tool", "python_tool", "search_tool",
           "sql_tool"]
