"""The admin listener: /metrics, the JSON API under /api, and its OpenAPI document."""
