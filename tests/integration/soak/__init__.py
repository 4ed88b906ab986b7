"""The rolling-restart soak: the example shop under traffic while its control plane(s) restart."""
