"""Prompt suites: YAML data with cited sources, expanded into generation requests by ``prompts.suites``."""
