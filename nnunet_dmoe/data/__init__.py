"""The attribute and its data: levels and codes, attribute tables, writing attribute channels, synthetic data, model
folders without case tables."""
