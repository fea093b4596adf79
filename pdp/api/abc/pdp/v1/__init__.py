"""Generated from proto/ by pdp/api/generate.py; do not edit."""
