"""What users make from a score map: range products (thresholds, polygons), evaluation against
occurrences, and the occurrence points themselves (files, GBIF)."""
