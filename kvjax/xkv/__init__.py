"""XKV: offline per-layer budget profiles (`profile`), the exact budget solver, and the profile file."""
