"""Model cache: the registry of prepared models and the offline pipeline that builds them."""
