"""resd: host resource reservation daemon."""
