"""Writers turn a :class:`taxamap.score.ScoreMap` into files users open: GeoTIFF, HTML, PNG."""
