"""Reading cases: layouts, image files, input checks, synthetic phantoms."""
