"""End-to-end tests: real clients (a real Home Assistant Core) against ``superwhisper serve``."""
