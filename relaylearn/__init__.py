"""relaylearn: train one medical-imaging model across hospitals that never connect (Relay Learning)."""

__version__ = "0.1.0"
