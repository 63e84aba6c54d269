"""Image runners (image classification)."""
