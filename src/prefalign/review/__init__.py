"""People in the loop: the labelling and side-by-side review page, its SQLite store, agreement and export."""
