"""Images, datasets and the generated shapes set."""
