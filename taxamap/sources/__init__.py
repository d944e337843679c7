"""Per-cell inputs fetched for a grid: satellite tiles, local rasters, Earth Engine, WorldClim."""
