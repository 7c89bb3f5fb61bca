"""What runs on the GPUs and how it is started. Imports nothing from `gateway` and never touches the store."""
