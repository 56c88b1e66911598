"""etbench."""
