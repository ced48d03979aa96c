"""Reports: the tidy results table, its summary (peaks, drops, deltas), figures, and the PDF."""
