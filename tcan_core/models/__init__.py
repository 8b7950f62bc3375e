"""Model loading: state-dict files, format detection, and loaders for the SD1.5 family."""
