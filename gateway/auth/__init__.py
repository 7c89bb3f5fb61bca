"""Client API keys for the OpenAI routes: the keys themselves, the in-memory key cache that
checks each request, and the per-key rate limits."""
