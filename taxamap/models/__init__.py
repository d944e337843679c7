"""Model resolution and the TaxaBind encoders (one module per modality)."""
