"""Optional integrations with other model code bases (duck-typed: nothing here imports them)."""
