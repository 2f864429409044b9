"""Tool-call and reasoning parsers: turn a model's raw text into OpenAI `tool_calls` and
`reasoning_content`, for a whole answer or incrementally while it streams.

Pure text in, typed results out; no server wiring. See `parsers.py` (tool-call formats),
`reasoning.py` (`<think>` formats) and `calls.py` (the result types).
"""
