"""The attribute and its data: levels and codes, attribute tables, writing attribute channels, model folders without
case tables."""
