"""The one error the tokenizer service raises for bad input (mapped to INVALID_ARGUMENT)."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """The request cannot be served as sent: an unknown role, a broken template, a bad id, …"""
