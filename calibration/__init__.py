"""Calibration data sources and the layer-by-layer statistics engine (see issue #3)."""
