"""The inspection line: product layout, region patches, rank images and test kits (thesis ch. 10)."""
