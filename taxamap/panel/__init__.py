"""Reference panels: scores a person can read and compare.

A map's raw cosine similarities (~0.0-0.15 for real species) mean little on their own: every
query gets hotspots. A reference panel of species gives them a yardstick:

* :mod:`taxamap.panel.members`: which species (the shipped table's by default, ``--panel FILE``,
  ``--clade PREFIX``);
* :mod:`taxamap.panel.vectors`: their prompt embeddings, computed once per text model and cached;
* :mod:`taxamap.panel.relative`: ``relative``, at each cell the fraction of the panel's species
  scoring lower than the query (exact, or from per-cell statistics kept beside the stores for the
  default panel), and the "no signal" rule;
* :mod:`taxamap.panel.species_at`: "what lives here?", the panel ranked at one cell;
* :mod:`taxamap.panel.richness`: per cell, how many species' thresholded ranges hold it;
* :mod:`taxamap.panel.reference`: the same over one grid's stores, for the scorer and the web app.
"""

from __future__ import annotations

from taxamap.panel.members import (DEFAULT_PANEL_NAME, Panel, default_panel, panel_from_file,
                                   resolve_panel, select_clade)
from taxamap.panel.reference import (ReferencePanel, prepare_panel, relative_scores,
                                     richness_dataset, richness_of, species_at)
from taxamap.panel.relative import SignalVerdict, signal_verdict

__all__ = ["DEFAULT_PANEL_NAME", "Panel", "ReferencePanel", "SignalVerdict", "default_panel",
           "panel_from_file", "prepare_panel", "relative_scores", "resolve_panel",
           "richness_dataset", "richness_of", "select_clade", "signal_verdict", "species_at"]
