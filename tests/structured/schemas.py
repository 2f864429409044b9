"""Twenty JSON schemas of the shapes structured-output clients send, each with a prompt."""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "minLength": 1, "maxLength": 40}
SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    (
        "Alice is 30 years old. Describe her.",
        {
            "type": "object",
            "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
            "required": ["name", "age"],
        },
    ),
    (
        "Give me a city and its country.",
        {
            "type": "object",
            "properties": {"city": NAME, "country": NAME},
            "required": ["city", "country"],
        },
    ),
    (
        "Rate the movie Inception from 1 to 5 and say if you recommend it.",
        {
            "type": "object",
            "properties": {
                "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                "recommend": {"type": "boolean"},
            },
            "required": ["rating", "recommend"],
        },
    ),
    (
        "What is the weather like? Answer with a condition and a temperature in Celsius.",
        {
            "type": "object",
            "properties": {
                "condition": {"enum": ["sunny", "cloudy", "rainy", "snowy"]},
                "celsius": {"type": "number", "minimum": -60, "maximum": 60},
            },
            "required": ["condition", "celsius"],
        },
    ),
    (
        "List three fruits.",
        {
            "type": "object",
            "properties": {
                "fruits": {"type": "array", "items": NAME, "minItems": 3, "maxItems": 3}
            },
            "required": ["fruits"],
        },
    ),
    (
        "Name between one and four programming languages.",
        {
            "type": "array",
            "items": {"type": "string", "maxLength": 20},
            "minItems": 1,
            "maxItems": 4,
        },
    ),
    (
        "Create a user profile for Bob, with an address.",
        {
            "type": "object",
            "properties": {
                "name": NAME,
                "address": {
                    "type": "object",
                    "properties": {
                        "street": NAME,
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                    },
                    "required": ["street", "zip"],
                },
            },
            "required": ["name", "address"],
        },
    ),
    (
        "Is the sky green? Answer yes or no with a confidence.",
        {
            "type": "object",
            "properties": {
                "answer": {"enum": ["yes", "no"]},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["answer", "confidence"],
        },
    ),
    (
        "Give a product with a price and optional discount.",
        {
            "type": "object",
            "properties": {
                "product": NAME,
                "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 10000},
                "discount": {"type": "integer", "minimum": 0, "maximum": 90},
            },
            "required": ["product", "price"],
        },
    ),
    (
        "Write an email address for John at example.com.",
        {
            "type": "object",
            "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,12}@example\\.com$"}},
            "required": ["email"],
        },
    ),
    (
        "Give a date in ISO format for New Year's Day 2025.",
        {
            "type": "object",
            "properties": {"date": {"type": "string", "pattern": "^2025-[0-9]{2}-[0-9]{2}$"}},
            "required": ["date"],
        },
    ),
    (
        "Describe a team of two people with their roles.",
        {
            "type": "object",
            "properties": {
                "team": {
                    "type": "array",
                    "minItems": 2,
                    "maxItems": 2,
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": NAME,
                            "role": {"enum": ["lead", "engineer", "designer"]},
                        },
                        "required": ["name", "role"],
                    },
                }
            },
            "required": ["team"],
        },
    ),
    (
        "Give the RGB values of the color red.",
        {
            "type": "object",
            "properties": {
                c: {"type": "integer", "minimum": 0, "maximum": 255} for c in ("r", "g", "b")
            },
            "required": ["r", "g", "b"],
        },
    ),
    (
        "Summarize: The cat sat on the mat all day.",
        {
            "type": "object",
            "properties": {
                "summary": {"type": "string", "maxLength": 60},
                "words": {"type": "integer", "minimum": 1, "maximum": 50},
            },
            "required": ["summary", "words"],
        },
    ),
    (
        "Classify the sentiment of: I love this phone!",
        {
            "type": "object",
            "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]}},
            "required": ["sentiment"],
        },
    ),
    (
        "Give a book with its title, author and publication year.",
        {
            "type": "object",
            "properties": {
                "title": NAME,
                "author": NAME,
                "year": {"type": "integer", "minimum": 1000, "maximum": 2030},
            },
            "required": ["title", "author", "year"],
        },
    ),
    (
        "Give a list of up to three tags for a blog post about cooking.",
        {
            "type": "object",
            "properties": {
                "tags": {
                    "type": "array",
                    "items": {"type": "string", "pattern": "^[a-z]{2,12}$"},
                    "maxItems": 3,
                }
            },
            "required": ["tags"],
        },
    ),
    (
        "Describe a point in 3D space.",
        {
            "type": "object",
            "properties": {
                "x": {"type": "number"},
                "y": {"type": "number"},
                "z": {"type": "number"},
            },
            "required": ["x", "y", "z"],
        },
    ),
    (
        "Give a recipe name with a list of ingredients and a cooking time in minutes.",
        {
            "type": "object",
            "properties": {
                "recipe": NAME,
                "ingredients": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 5},
                "minutes": {"type": "integer", "minimum": 1, "maximum": 600},
                "vegetarian": {"type": "boolean"},
            },
            "required": ["recipe", "ingredients", "minutes"],
        },
    ),
    (
        "Answer with a status object.",
        {
            "type": "object",
            "properties": {
                "status": {"enum": ["ok", "error"]},
                "code": {"type": "integer", "minimum": 100, "maximum": 599},
                "detail": {"anyOf": [{"type": "string", "maxLength": 40}, {"type": "null"}]},
            },
            "required": ["status", "code", "detail"],
        },
    ),
]
