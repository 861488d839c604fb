"""Importers for adapters trained with other MixLoRA implementations."""
