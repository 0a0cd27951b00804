"""What a model and its data say: metrics and their table, interpretation (confusion, top losses), the data
audit (label issues, near-duplicates), show_batch and every figure."""
