"""One module per verb; helpers shared by several verbs live in `common`."""
