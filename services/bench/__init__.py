"""`radixserve bench`: a load generator for any OpenAI-compatible server.

datasets (what to send) → runner (when to send it) → client (one streamed request, timed) →
metrics (the summary) → report (the table and the JSON file).
"""
