"""Reports over runs and evaluations: tables, plots, markdown, HTML, JSON."""
