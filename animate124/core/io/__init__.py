"""Files: atomic writes (nothing half-written is left behind) and safe loading of tensors from user files."""
