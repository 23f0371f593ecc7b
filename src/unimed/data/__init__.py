"""Data: dataset adapters to canonical records, report processing, transforms, pre-training datasets."""
