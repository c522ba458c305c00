"""Reports: reading runs, figures per family, the HTML and markdown documents, and ``compare``."""
