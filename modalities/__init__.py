"""Modalities served by diffkit: each subpackage plugs into the core through the registry."""
