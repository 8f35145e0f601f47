"""MegaContext components in fixed-shape form: layouts and working-context assembly."""
