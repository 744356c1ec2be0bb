"""Pretrained networks, loaded from local weight files only (`brics weights`): never a download."""
