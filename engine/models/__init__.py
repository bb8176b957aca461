"""One file per architecture; engine.registry maps config.json names to them."""
