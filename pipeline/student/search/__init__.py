"""`kdcache search`: KD-guided architecture search over one cache (AdaBERT-style, on Ray Tune)."""
