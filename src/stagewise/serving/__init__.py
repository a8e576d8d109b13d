"""Serving: the persistent index, the live index a service follows, micro-batching and the HTTP service."""
