"""Region presets shipped with taxamap (Natural Earth derived) and their registry."""
