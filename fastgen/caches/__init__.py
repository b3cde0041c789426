"""Training-free caches (ToMe, RAS, step caches) land here; each registers its recipe prefix."""
