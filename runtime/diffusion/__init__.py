"""Text-to-image generation without torch: numpy schedulers and a backend-agnostic sampling loop."""
