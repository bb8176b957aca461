"""One file per architecture; engine.models.registry maps config.json names to them."""
