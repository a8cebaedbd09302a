"""Third-party code shipped inside deeplense_ray (each package keeps its own licence file)."""
