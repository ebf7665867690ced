"""Modules exported from the course notebooks in modules/: tensor, embeddings, attention."""
