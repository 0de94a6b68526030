"""Files: atomic writes (nothing half-written is left behind), safe loading of tensors from user files, and any image
read as 8-bit RGB(A)."""
