"""One module per pipeline stage plus the pieces they share. Stages never import Ray."""
