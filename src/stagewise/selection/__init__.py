"""Selection: the staged strategy under a time budget, the verdict, the backend stage and the report."""
