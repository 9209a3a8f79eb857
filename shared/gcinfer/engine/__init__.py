"""The tensor engine: tiled prediction, spatial transforms and resizing; pure torch code that knows no pipeline,
file or configuration."""
